//! Handshakes between muster-tls's connector and acceptor over loopback,
//! with certificates generated here: what succeeds, what is refused and
//! how each refusal reads, and reload.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use muster_tls::generate::{Authority, DAY, Leaf};
use muster_tls::{ClientTls, Pem, ServerTls, TlsServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

type Ca = Authority;

fn ca(name: &str) -> Ca {
    Authority::new(name, "muster tls tests", 30 * DAY).unwrap()
}

fn leaf(ca: &Ca, cn: &str, server: bool, expired: bool) -> (String, String) {
    let kind = if server {
        Leaf::Server {
            sans: &["127.0.0.1", "localhost"],
        }
    } else {
        Leaf::Client { cn }
    };
    let now = SystemTime::now();
    let (from, to) = if expired {
        (now - 10 * DAY, now - DAY)
    } else {
        (now - DAY, now + 30 * DAY)
    };
    let issued = ca.issue(kind, "muster tls tests", from, to).unwrap();
    (issued.cert_pem, issued.key_pem)
}

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    other: Ca,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: ca("test CA"),
            other: ca("other CA"),
        }
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
    fn ca_file(&self) -> PathBuf {
        self.write("ca.pem", self.ca.cert_pem())
    }
    fn pair(&self, name: &str, ca: &Ca, server: bool, expired: bool) -> (PathBuf, PathBuf) {
        let (cert, key) = leaf(ca, name, server, expired);
        (
            self.write(&format!("{name}.pem"), &cert),
            self.write(&format!("{name}-key.pem"), &key),
        )
    }
}

/// A server that writes "hello" first (as HTTP/2 servers send SETTINGS),
/// then echoes.
async fn serve(tls: TlsServer) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut incoming = tls.incoming(listener);
    tokio::spawn(async move {
        while let Some(Ok(mut stream)) = incoming.next().await {
            tokio::spawn(async move {
                let _ = stream.write_all(b"hello").await;
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

fn client(ca: &Path) -> ClientTls {
    ClientTls::new().with_ca(ca)
}

async fn dial(tls: &ClientTls, port: u16) -> Result<muster_tls::TlsStream, muster_tls::Error> {
    tls.connector(&[b"h2"])?
        .await_server_first(Duration::from_secs(5))
        .connect("127.0.0.1", port)
        .await
}

async fn mtls_server(pki: &Pki) -> (u16, TlsServer) {
    let (cert, key) = pki.pair("server", &pki.ca, true, false);
    let tls = ServerTls::new(cert, key)
        .with_client_ca(pki.ca_file(), true)
        .build()
        .unwrap();
    (serve(tls.clone()).await, tls)
}

#[tokio::test]
async fn mutual_tls_round_trip() {
    let pki = Pki::new();
    let (port, _) = mtls_server(&pki).await;
    let (cert, key) = pki.pair("client", &pki.ca, false, false);
    let mut stream = dial(&client(&pki.ca_file()).with_identity(cert, key), port)
        .await
        .unwrap();
    assert_eq!(stream.alpn_protocol(), Some(&b"h2"[..]));
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello", "the bytes read while checking are replayed");
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn refusals_say_why() {
    let pki = Pki::new();
    let (port, _) = mtls_server(&pki).await;
    let ca = pki.ca_file();

    let none = dial(&client(&ca), port).await.unwrap_err().to_string();
    assert!(none.contains("requires a client certificate"), "{none}");
    assert!(none.contains(&format!("127.0.0.1:{port}")), "{none}");

    let (cert, key) = pki.pair("stranger", &pki.other, false, false);
    let wrong_ca = dial(&client(&ca).with_identity(&*cert, &*key), port)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        wrong_ca.contains("refused our client certificate"),
        "{wrong_ca}"
    );
    assert!(wrong_ca.contains(&cert.display().to_string()), "{wrong_ca}");

    let (cert, key) = pki.pair("expired", &pki.ca, false, true);
    let expired = dial(&client(&ca).with_identity(cert, key), port)
        .await
        .unwrap_err()
        .to_string();
    assert!(expired.contains("expired"), "{expired}");

    let other_ca = pki.write("other-ca.pem", pki.other.cert_pem());
    let untrusted = dial(&client(&other_ca), port)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        untrusted.contains("not signed by the CA bundle") && untrusted.contains("other-ca.pem"),
        "{untrusted}"
    );

    let insecure = ClientTls::new().with_insecure_skip_verify(true);
    let skipped = dial(&insecure, port).await.unwrap_err().to_string();
    assert!(
        skipped.contains("requires a client certificate"),
        "skipping verification gets past the server's certificate: {skipped}"
    );
}

#[tokio::test]
async fn tls_client_against_plaintext_and_plaintext_against_tls() {
    let pki = Pki::new();
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_port = plain.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = plain.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            });
        }
    });
    let e = dial(&client(&pki.ca_file()), plain_port)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not speak TLS"), "{e}");

    let (port, _) = mtls_server(&pki).await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.contains("HTTP request to an HTTPS server"),
        "{answer}"
    );
}

#[tokio::test]
async fn bad_material_names_the_file() {
    let pki = Pki::new();
    let (cert, key) = pki.pair("server", &pki.ca, true, false);
    let (_, other_key) = pki.pair("other", &pki.ca, true, false);

    let e = ServerTls::new(&*cert, &*other_key)
        .build()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not match") && e.contains("other-key.pem"),
        "{e}"
    );

    let e = ServerTls::new(&*key, &*cert)
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("swapped"), "{e}");

    let missing = pki.dir.path().join("nope.pem");
    let e = ServerTls::new(&*missing, &*key)
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.pem"), "{e}");

    let garbage = pki.write("garbage.pem", "not pem at all");
    let e = ClientTls::new()
        .with_ca(&*garbage)
        .connector(&[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("garbage.pem") && e.contains("CERTIFICATE"),
        "{e}"
    );

    let e = ClientTls::new()
        .with_ca(&*cert)
        .with_identity(&*cert, &*other_key)
        .connector(&[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not match"), "{e}");

    let e = ServerTls::new(&*cert, &*key)
        .with_client_ca(Pem::memory("ca", pki.ca.cert_pem()), true)
        .build();
    assert!(e.is_ok(), "in-memory PEM works");
}

#[tokio::test]
async fn reload_takes_a_new_pair_and_keeps_the_old_on_bad_files() {
    let pki = Pki::new();
    let (cert, key) = pki.pair("server", &pki.ca, true, false);
    let tls = ServerTls::new(&*cert, &*key)
        .with_reload_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let port = serve(tls.clone()).await;
    let _reloader = tls.spawn_reloader();
    let ca = client(&pki.ca_file());
    let before = dial(&ca, port).await.unwrap();
    let old = before.peer_certificates().unwrap()[0].clone();

    // A half-done rotation: new certificate, old key. Refused, old pair kept.
    let (new_cert, new_key) = leaf(&pki.ca, "server", true, false);
    std::fs::write(&cert, &new_cert).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tls.reload_failures() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a mismatched pair is noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = dial(&ca, port).await.unwrap();
    assert_eq!(during.peer_certificates().unwrap()[0], old);

    // The key follows: the new pair is taken for new connections.
    std::fs::write(&key, &new_key).unwrap();
    loop {
        let conn = dial(&ca, port).await.unwrap();
        if conn.peer_certificates().unwrap()[0] != old {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new pair is taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tls.reloads(), 1);

    // The connection made before the rotation still works.
    let mut before = before;
    let mut buf = [0u8; 5];
    before.read_exact(&mut buf).await.unwrap();
    before.write_all(b"still").await.unwrap();
    before.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still");
}

#[tokio::test]
async fn a_client_takes_its_rotated_certificate_at_the_next_connection() {
    let pki = Pki::new();
    let (port, _) = mtls_server(&pki).await;
    let (cert, key) = pki.pair("client", &pki.ca, false, false);
    let connector = client(&pki.ca_file())
        .with_identity(&*cert, &*key)
        .connector(&[b"h2"])
        .unwrap()
        .await_server_first(Duration::from_secs(5));
    connector.connect("127.0.0.1", port).await.unwrap();

    // Rotated to a certificate the server does not trust: the next
    // connection presents it (and is refused).
    let (stranger, stranger_key) = leaf(&pki.other, "client", false, false);
    std::fs::write(&key, &stranger_key).unwrap();
    std::fs::write(&cert, &stranger).unwrap();
    let e = connector
        .connect("127.0.0.1", port)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused our client certificate"), "{e}");

    // Half a rotation (a key of another certificate): the previous pair
    // stays in use.
    let (good, good_key) = leaf(&pki.ca, "client", false, false);
    std::fs::write(&cert, &good).unwrap();
    let e = connector
        .connect("127.0.0.1", port)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("refused our client certificate"),
        "the previous pair: {e}"
    );

    std::fs::write(&key, &good_key).unwrap();
    connector.connect("127.0.0.1", port).await.unwrap();
}
