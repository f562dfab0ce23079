//! TLS through the gateway: HTTPS on its listener (curl over HTTP/1.1 and
//! HTTP/2, WebSocket upgrades, certificate reload, plaintext refused with
//! 400) and `https://` instances behind it (verified against the route's
//! or the gateway's CA, failures answered 502 and counted against the
//! instance). Certificates are generated here (muster-tls); nothing is
//! committed. Every body runs against real etcd and the embedded registry.

use crate::common;

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use muster::Instance;
use muster_gateway::{Gateway, GatewayConfig, GatewayHandle, Route};
use muster_testkit::Registry;
use muster_tls::generate::{Authority, DAY, Leaf};
use muster_tls::{ClientTls, ServerTls, TlsStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------
// Certificates

struct Ca {
    authority: Authority,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let authority = Authority::new(name, "muster gateway tests", 30 * DAY).unwrap();
        Ca {
            pem: authority.cert_pem().to_string(),
            authority,
        }
    }

    /// A server certificate for 127.0.0.1 and localhost: (cert, key) PEM.
    /// (`_cn` only tells the call sites apart.)
    fn server(&self, _cn: &str) -> (String, String) {
        let now = SystemTime::now();
        let sans = Leaf::Server {
            sans: &["127.0.0.1", "localhost"],
        };
        let issued = self
            .authority
            .issue(sans, "muster gateway tests", now - DAY, now + 30 * DAY)
            .unwrap();
        (issued.cert_pem, issued.key_pem)
    }
}

/// Files in a temporary directory.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.path().join(name);
        // Written whole, then renamed: the gateway's reloader never reads
        // half a file.
        let tmp = self.0.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// A server pair signed by `ca` as `cert.pem` and `key.pem`.
    fn pair(&self, ca: &Ca, prefix: &str, cn: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = ca.server(cn);
        (
            self.write(&format!("{prefix}cert.pem"), &cert),
            self.write(&format!("{prefix}key.pem"), &key),
        )
    }
}

/// A gateway's TLS material: its CA (what clients trust), and the files.
struct Listener {
    dir: Dir,
    ca: Ca,
    ca_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Listener {
    fn new() -> Listener {
        let dir = Dir::new();
        let ca = Ca::new("gateway test CA");
        let ca_file = dir.write("ca.pem", &ca.pem);
        let (cert, key) = dir.pair(&ca, "", "gateway");
        Listener {
            dir,
            ca,
            ca_file,
            cert,
            key,
        }
    }

    /// Test gateway settings with HTTPS on the listener; the certificate
    /// files are checked every 50 ms.
    fn config(&self, routes: Vec<Route>) -> GatewayConfig {
        let mut config = gateway_config(routes).with_tls(&self.cert, &self.key);
        config.tls_reload_interval = std::time::Duration::from_millis(50);
        config
    }

    fn client(&self) -> ClientTls {
        ClientTls::new().with_ca(self.ca_file.as_path())
    }
}

// ---------------------------------------------------------------------------
// Clients

/// A TLS connection to the gateway offering `alpn`.
async fn dial(tls: &ClientTls, port: u16, alpn: &[&[u8]]) -> TlsStream {
    tokio::time::timeout(
        DEADLINE,
        tls.connector(alpn).unwrap().connect("127.0.0.1", port),
    )
    .await
    .expect("handshake in time")
    .expect("TLS handshake with the gateway")
}

/// An HTTP/1.1 connection over TLS.
async fn https1(
    tls: &ClientTls,
    port: u16,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = dial(tls, port, &[muster_tls::ALPN_HTTP11]).await;
    assert_eq!(stream.alpn_protocol(), Some(muster_tls::ALPN_HTTP11));
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// A request on `send`: status, headers and body.
async fn request(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: Bytes,
) -> (StatusCode, http::HeaderMap, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .body(Full::new(body))
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, send.send_request(req))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// `GET {path}` on a new HTTPS connection: the status.
async fn https_status(tls: &ClientTls, port: u16, path: &str) -> StatusCode {
    let mut send = https1(tls, port).await;
    request(&mut send, "GET", path, Bytes::new()).await.0
}

/// Waits until `GET {path}` through the HTTPS gateway answers 200.
async fn wait_routed_tls(tls: &ClientTls, port: u16, path: &str) {
    eventually(&format!("{path} is routed over TLS"), || async {
        https_status(tls, port, path).await == StatusCode::OK
    })
    .await;
}

/// curl with `args`: whether it succeeded, and its output.
async fn curl(args: &[&str]) -> (bool, String, String) {
    let out = tokio::time::timeout(
        DEADLINE,
        tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args)
            .output(),
    )
    .await
    .expect("curl finished in time")
    .expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn curl_available() -> bool {
    let found = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("curl is not installed: skipping the curl part (apt-get install -y curl)");
    }
    found
}

async fn start(config: GatewayConfig, env: &Env) -> GatewayHandle {
    Gateway::start(config, env.discovery.clone())
        .await
        .expect("start the gateway")
}

// ---------------------------------------------------------------------------
// The listener

async fn https_listener_serves_http1_and_http2(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _up = env.upstream("web", "w-1").await;
    let pki = Listener::new();
    let gw = start(pki.config(vec![Route::new("/", "web")]), &env).await;
    assert!(gw.is_tls());
    let port = gw.local_addr().port();
    wait_routed_tls(&pki.client(), port, "/x").await;

    // The upstream is told the client came over TLS.
    let mut send = https1(&pki.client(), port).await;
    let (status, headers, body) = request(&mut send, "GET", "/p", Bytes::new()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "w-1"));
    assert_eq!(headers["x-upstream-x-forwarded-proto"], "https");
    assert!(
        headers["x-upstream-forwarded"]
            .to_str()
            .unwrap()
            .starts_with("for=127.0.0.1;proto=https"),
        "{headers:?}"
    );

    if curl_available() {
        let ca = pki.ca_file.to_str().unwrap();
        let url = format!("https://127.0.0.1:{port}/hello");
        let format = "\n%{http_version} %{http_code} %header{x-upstream-x-forwarded-proto}";
        for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
            let (ok, out, err) = curl(&["--cacert", ca, flag, "-w", format, &url]).await;
            assert!(ok, "curl {flag}: {err}");
            assert_eq!(out, format!("w-1\n{version} 200 https"), "curl {flag}");
        }
        // Twenty requests at once, multiplexed on one HTTP/2 connection
        // (curl waits for it rather than opening more).
        let urls: Vec<String> = (0..20)
            .map(|i| format!("https://127.0.0.1:{port}/s/{i}"))
            .collect();
        let mut args = vec![
            "--cacert",
            ca,
            "--http2",
            "--parallel",
            "--parallel-max",
            "20",
        ];
        for url in &urls {
            args.extend(["-o", "/dev/null", url.as_str()]);
        }
        args.extend(["-w", "%{http_version} %{http_code} %{num_connects}\n"]);
        let (ok, out, err) = curl(&args).await;
        assert!(ok, "curl --parallel: {err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 20, "{out}");
        assert!(lines.iter().all(|l| l.starts_with("2 200 ")), "{out}");
        let connects: u32 = lines
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u32>().unwrap())
            .sum();
        assert_eq!(connects, 1, "{out}");

        // Without the CA, curl does not trust the gateway.
        let (ok, _, err) = curl(&[&url]).await;
        assert!(!ok && err.contains("certificate"), "{err}");

        // Plaintext on the TLS port: 400, saying why.
        let plain = format!("http://127.0.0.1:{port}/hello");
        let (_, out, _) = curl(&["-w", "\n%{http_code}", &plain]).await;
        assert!(
            out.contains("HTTP request to an HTTPS server") && out.ends_with("\n400"),
            "{out}"
        );
    }
    let mut tcp = tokio::net::TcpStream::connect(gw.local_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_string(&mut answer))
        .await
        .expect("the gateway answers and closes")
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 400 ") && answer.contains("HTTP request to an HTTPS server"),
        "{answer}"
    );
    eventually("refused handshakes are counted", || async {
        metric(&gw, "muster_gateway_tls_handshake_failures_total", &[]).unwrap_or(0.0) >= 1.0
    })
    .await;
    gw.shutdown().await;
}

async fn websocket_over_tls(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _up = env.upstream("chat", "c-1").await;
    let pki = Listener::new();
    let gw = start(pki.config(vec![Route::new("/ws", "chat")]), &env).await;
    let port = gw.local_addr().port();
    wait_routed_tls(&pki.client(), port, "/ws").await;

    let stream = dial(&pki.client(), port, &[muster_tls::ALPN_HTTP11]).await;
    assert_eq!(stream.alpn_protocol(), Some(muster_tls::ALPN_HTTP11));
    let (mut ws, resp) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::client_async(format!("wss://127.0.0.1:{port}/ws/room"), stream),
    )
    .await
    .expect("handshake in time")
    .expect("websocket handshake over TLS through the gateway");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    common::assert_echoes(&mut ws, 10).await;
    gw.shutdown().await;
}

async fn listener_certificate_is_reloaded(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _up = env.upstream("web", "w-1").await;
    let pki = Listener::new();
    let gw = start(pki.config(vec![Route::new("/", "web")]), &env).await;
    let port = gw.local_addr().port();
    wait_routed_tls(&pki.client(), port, "/x").await;

    let alpn: &[&[u8]] = &[muster_tls::ALPN_HTTP11];
    let before = dial(&pki.client(), port, alpn).await;
    let old = before.peer_certificates().unwrap()[0].clone();
    let (mut kept, conn) = hyper::client::conn::http1::handshake(TokioIo::new(before))
        .await
        .unwrap();
    tokio::spawn(conn);

    // A new pair from another CA: the key first, then the certificate
    // (in between, the pair does not match and the old one stays).
    let other = Ca::new("rotated CA");
    let (cert, key) = other.server("gateway, rotated");
    pki.dir.write("key.pem", &key);
    pki.dir.write("cert.pem", &cert);
    let other_ca = pki.dir.write("other-ca.pem", &other.pem);
    let rotated = ClientTls::new().with_ca(other_ca.as_path());
    eventually("new connections get the new certificate", || async {
        let conn = tls_connect(&rotated, port).await;
        conn.is_ok_and(|c| c.peer_certificates().unwrap()[0] != old)
    })
    .await;
    // Clients that trust only the old CA are refused now.
    let refused = tls_connect(&pki.client(), port).await.unwrap_err();
    assert!(refused.to_string().contains("not signed by"), "{refused}");
    // Requests work on the new certificate ...
    let mut send = https1(&rotated, port).await;
    assert_eq!(
        request(&mut send, "GET", "/a", Bytes::new()).await.0,
        StatusCode::OK
    );
    // ... and on the connection made before the rotation.
    assert_eq!(
        request(&mut kept, "GET", "/b", Bytes::new()).await.0,
        StatusCode::OK
    );
    assert!(
        metric(
            &gw,
            "muster_gateway_tls_certificate_reloads_total",
            &["result=\"ok\""]
        )
        .unwrap()
            >= 1.0
    );
    gw.shutdown().await;
}

async fn tls_connect(tls: &ClientTls, port: u16) -> Result<TlsStream, muster_tls::Error> {
    tls.connector(&[muster_tls::ALPN_HTTP11])?
        .connect("127.0.0.1", port)
        .await
}

async fn tls_settings_are_checked(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let pki = Listener::new();
    let routes = || vec![Route::new("/", "web")];
    let mut half = gateway_config(routes());
    half.tls_cert = Some(pki.cert.clone());
    let e = Gateway::start(half, env.discovery.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs its key"), "{e}");

    let missing = pki.dir.0.path().join("nope.pem");
    let bad = gateway_config(routes()).with_tls(&missing, &pki.key);
    let e = Gateway::start(bad, env.discovery.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.pem"), "{e}");

    let swapped = gateway_config(routes()).with_tls(&pki.cert, &pki.ca_file);
    assert!(
        Gateway::start(swapped, env.discovery.clone())
            .await
            .is_err()
    );

    let mut no_ca = gateway_config(routes());
    no_ca.upstream_ca = Some(missing.clone());
    let e = Gateway::start(no_ca, env.discovery.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.pem"), "{e}");

    let route_ca = gateway_config(vec![Route::new("/", "web").upstream_ca(&missing)]);
    let e = Gateway::start(route_ca, env.discovery.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.pem") && e.contains("\"/\""), "{e}");
}

// ---------------------------------------------------------------------------
// https:// upstreams

/// An HTTPS upstream (hyper over muster-tls, offering h2 and http/1.1 but
/// serving HTTP/1.1): answers with its id, the ALPN protocol it
/// negotiated (`x-alpn`) and, for a POST, the length of the body it read;
/// echoes WebSocket messages after an upgrade.
struct TlsUpstream {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsUpstream {
    async fn start(id: &str, cert: &Path, key: &Path) -> TlsUpstream {
        let tls = ServerTls::new(cert, key).build().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let id = id.to_string();
        let count = connections.clone();
        let task = tokio::spawn(async move {
            let mut incoming = tls.incoming(listener);
            let mut conns = tokio::task::JoinSet::new();
            while let Some(Ok(stream)) = incoming.next().await {
                count.fetch_add(1, Ordering::Relaxed);
                let alpn = stream
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or_else(|| "none".into());
                let id = id.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |mut req: Request<Incoming>| {
                        let (id, alpn) = (id.clone(), alpn.clone());
                        async move {
                            if req.headers().contains_key(http::header::UPGRADE) {
                                return Ok::<_, Infallible>(common::websocket(&mut req));
                            }
                            let post = req.method() == http::Method::POST;
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let text = if post {
                                format!("{id} {}", body.len())
                            } else {
                                id
                            };
                            let mut resp = Response::new(common::full(text));
                            resp.headers_mut().insert("x-alpn", alpn.parse().unwrap());
                            Ok(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        TlsUpstream {
            addr,
            connections,
            task,
        }
    }

    fn instance(&self, service: &str, id: &str) -> Instance {
        Instance::new(service, id, format!("https://{}", self.addr))
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn https_instances_are_dialled_over_tls(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let dir = Dir::new();
    let upstream_ca = Ca::new("upstream CA");
    let (cert, key) = dir.pair(&upstream_ca, "up-", "upstream");
    let up = TlsUpstream::start("s-1", &cert, &key).await;
    env.registrar
        .register(up.instance("secure", "s-1"))
        .await
        .expect("register");
    let ca_file = dir.write("upstream-ca.pem", &upstream_ca.pem);
    let own_ca = dir.write("own-ca.pem", &upstream_ca.pem);
    let stranger = dir.write("stranger-ca.pem", &Ca::new("stranger CA").pem);

    let mut config = gateway_config(vec![
        // The gateway's CA.
        Route::new("/good", "secure"),
        // The route's own.
        Route::new("/own", "secure").upstream_ca(&own_ca),
        // A CA that did not sign the upstream's certificate.
        Route::new("/wrong", "secure")
            .upstream_ca(&stranger)
            .retries(0),
    ]);
    config.upstream_ca = Some(ca_file);
    let gw = Gateway::start(config, env.discovery.clone())
        .await
        .expect("start the gateway");
    let client = http_client();
    let addr = gw.local_addr();
    wait_routed(&client, addr, "/good").await;

    let answer = get(&client, addr, "/good/x").await;
    assert_eq!(
        (answer.status, answer.body.as_str()),
        (StatusCode::OK, "s-1")
    );
    assert_eq!(
        answer.headers["x-alpn"], "http/1.1",
        "the gateway offers only HTTP/1.1 upstream"
    );
    assert_eq!(get(&client, addr, "/own").await.status, StatusCode::OK);

    // Bodies go out over TLS, and connections are pooled: one keep-alive
    // client connection (one serving thread) uses one upstream connection.
    let before = up.connections.load(Ordering::Relaxed);
    let plain = common::http_client();
    for i in 0..5usize {
        let body = vec![b'x'; 1 << (10 + 2 * i)];
        let len = body.len();
        let req = http::Request::post(format!("http://{addr}/good/up"))
            .body(common::full(body))
            .unwrap();
        let resp = plain.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(text, format!("s-1 {len}"));
    }
    assert!(
        up.connections.load(Ordering::Relaxed) - before <= 1,
        "pooled TLS connections are reused"
    );

    // An upstream whose certificate does not verify: 502 naming the
    // instance and the reason, counted against it until it is ejected.
    let answer = get(&client, addr, "/wrong").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    let message = answer.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("s-1")
            && message.contains("not signed by")
            && message.contains("stranger-ca.pem"),
        "{message}"
    );
    assert!(
        metric(
            &gw,
            "muster_gateway_upstream_errors_total",
            &["route=\"/wrong\"", "kind=\"tls\""]
        )
        .unwrap()
            >= 1.0
    );
    get(&client, addr, "/wrong").await;
    eventually("TLS failures eject the instance", || async {
        metric(
            &gw,
            "muster_gateway_ejections_total",
            &["service=\"secure\""],
        )
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    gw.shutdown().await;

    // No CA anywhere: the system's roots, which do not know the test CA.
    let gw = Gateway::start(
        gateway_config(vec![Route::new("/", "secure")]),
        env.discovery.clone(),
    )
    .await
    .unwrap();
    let addr = gw.local_addr();
    eventually("the service is discovered", || async {
        get(&client, addr, "/").await.status != StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let answer = get(&client, addr, "/").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    assert!(answer.body.contains("system"), "{}", answer.body);
    gw.shutdown().await;
}

/// A routes file names upstream CAs; a reload whose CA cannot be read is
/// refused and the routes stay.
async fn routes_file_upstream_ca(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let dir = Dir::new();
    let ca = Ca::new("file CA");
    let (cert, key) = dir.pair(&ca, "up-", "upstream");
    let up = TlsUpstream::start("f-1", &cert, &key).await;
    env.registrar
        .register(up.instance("filed", "f-1"))
        .await
        .expect("register");
    let ca_file = dir.write("ca.pem", &ca.pem);
    let routes = dir.write(
        "routes.toml",
        &format!(
            "[defaults]\nupstream_ca = {ca:?}\n\n[[route]]\nprefix = \"/f\"\nservice = \"filed\"\n",
            ca = ca_file.display().to_string()
        ),
    );
    let mut config = gateway_config(vec![]);
    config.routes_file = Some(routes.clone());
    let gw = Gateway::start(config, env.discovery.clone()).await.unwrap();
    let client = http_client();
    let addr = gw.local_addr();
    wait_routed(&client, addr, "/f").await;
    assert_eq!(get(&client, addr, "/f").await.body, "f-1");

    let missing = dir.0.path().join("missing-ca.pem");
    dir.write(
        "routes.toml",
        &format!(
            "[[route]]\nprefix = \"/f\"\nservice = \"filed\"\nupstream_ca = {missing:?}\n\n\
             [[route]]\nprefix = \"/g\"\nservice = \"filed\"\n",
            missing = missing.display().to_string()
        ),
    );
    eventually("the file naming a missing CA is refused", || async {
        metric(
            &gw,
            "muster_gateway_route_reloads_total",
            &["result=\"error\""],
        ) == Some(1.0)
    })
    .await;
    assert_eq!(get(&client, addr, "/f").await.body, "f-1");
    assert_eq!(get(&client, addr, "/g").await.status, StatusCode::NOT_FOUND);
    gw.shutdown().await;
}

/// The routes file's `[tls]` turns the listener into HTTPS, as
/// --tls-cert/--tls-key do.
async fn routes_file_tls(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _up = env.upstream("web", "w-1").await;
    let pki = Listener::new();
    let routes = pki.dir.write(
        "routes.toml",
        &format!(
            "[tls]\ncert = {cert:?}\nkey = {key:?}\n\n[[route]]\nprefix = \"/\"\nservice = \"web\"\n",
            cert = pki.cert.display().to_string(),
            key = pki.key.display().to_string()
        ),
    );
    let mut config = gateway_config(vec![]);
    config.routes_file = Some(routes);
    let gw = Gateway::start(config, env.discovery.clone()).await.unwrap();
    assert!(gw.is_tls(), "the file's [tls] is used");
    wait_routed_tls(&pki.client(), gw.local_addr().port(), "/").await;
    gw.shutdown().await;
}

/// TLS on both sides at once: an HTTPS client, an `https://` instance.
async fn tls_end_to_end(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let pki = Listener::new();
    let (cert, key) = pki.dir.pair(&pki.ca, "up-", "upstream");
    let up = TlsUpstream::start("e-1", &cert, &key).await;
    env.registrar
        .register(up.instance("e2e", "e-1"))
        .await
        .expect("register");
    let mut config = pki.config(vec![Route::new("/", "e2e")]);
    config.upstream_ca = Some(pki.ca_file.clone());
    let gw = start(config, &env).await;
    let port = gw.local_addr().port();
    wait_routed_tls(&pki.client(), port, "/").await;
    let mut send = https1(&pki.client(), port).await;
    let (status, headers, body) =
        request(&mut send, "POST", "/in", Bytes::from(vec![1u8; 300_000])).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "e-1 300000"));
    assert_eq!(headers["x-alpn"], "http/1.1");

    // A WebSocket tunnel with TLS on both of its connections.
    let stream = dial(&pki.client(), port, &[muster_tls::ALPN_HTTP11]).await;
    let (mut ws, _) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::client_async(format!("wss://127.0.0.1:{port}/ws"), stream),
    )
    .await
    .expect("handshake in time")
    .expect("websocket handshake to an https:// instance");
    let big = vec![9u8; 300_000];
    for message in [Message::text("over TLS twice"), Message::binary(big)] {
        ws.send(message.clone()).await.unwrap();
        let echo = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("an echo in time")
            .expect("an echo")
            .unwrap();
        assert_eq!(echo, message);
    }
    ws.close(None).await.unwrap();
    gw.shutdown().await;
}

muster_testkit::on_both!(
    https_listener_serves_http1_and_http2,
    websocket_over_tls,
    listener_certificate_is_reloaded,
    tls_settings_are_checked,
    https_instances_are_dialled_over_tls,
    routes_file_upstream_ca,
    routes_file_tls,
    tls_end_to_end,
);
