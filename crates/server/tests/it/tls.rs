//! The embedded registry over TLS and mutual TLS: etcd's API through a
//! tonic client dialing with muster-tls's connector, clients without a
//! certificate refused, the https client URL, certificate rotation under an
//! open watch, and broken files at start.

use std::time::{Duration, Instant};

use muster_proto as pb;
use muster_server::{Server, ServerConfig, ServerTls};
use muster_testkit::TestPki;
use muster_tls::ClientTls;
use pb::cluster_client::ClusterClient;
use pb::kv_client::KvClient;
use tonic::transport::{Channel, Endpoint};

use crate::common;

/// `--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`.
fn mtls(pki: &TestPki) -> ServerTls {
    ServerTls::new(pki.server_cert(), pki.server_key()).with_client_ca(pki.ca(), true)
}

async fn start(tls: ServerTls) -> Server {
    Server::start(ServerConfig::in_memory().with_tls(tls))
        .await
        .unwrap()
}

/// The client side of `etcdctl --cacert --cert --key`.
fn client(pki: &TestPki) -> ClientTls {
    ClientTls::new()
        .with_ca(pki.ca())
        .with_identity(pki.client_cert(), pki.client_key())
}

/// A tonic channel to `server` through muster-tls's connector. The URI is
/// `http://`: the connector does TLS and ignores the scheme, so tonic must
/// not try its own.
async fn connect(server: &Server, tls: &ClientTls) -> Result<Channel, tonic::transport::Error> {
    let connector = tls
        .connector(&[muster_tls::ALPN_H2])
        .unwrap()
        .await_server_first(Duration::from_secs(5));
    Endpoint::from_shared(format!("http://{}", server.addr()))
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
}

/// The whole chain of `e`'s sources, for assertions on the message.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn put(key: &str, value: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

/// The value of the next put event on `stream`.
async fn next_value(stream: &mut tonic::Streaming<pb::WatchResponse>) -> String {
    loop {
        let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("an event within 30 s")
            .expect("the stream is healthy")
            .expect("the stream is open");
        assert!(!resp.canceled, "{resp:?}");
        if let Some(event) = resp.events.into_iter().next() {
            return String::from_utf8(event.kv.unwrap().value).unwrap();
        }
    }
}

#[tokio::test]
async fn mutual_tls_serves_put_range_watch_and_advertises_https() {
    let pki = TestPki::generate().unwrap();
    let server = start(mtls(&pki)).await;
    assert_eq!(server.endpoint(), format!("https://{}", server.addr()));
    assert!(server.tls().is_some());

    let channel = connect(&server, &client(&pki)).await.unwrap();
    let (_tx, mut events) = common::watch(channel.clone(), b"/tls/k", b"").await;
    let mut kv = KvClient::new(channel.clone());
    kv.put(put("/tls/k", "v1")).await.unwrap();
    let range = kv
        .range(pb::RangeRequest {
            key: "/tls/k".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(range.kvs.len(), 1);
    assert_eq!(range.kvs[0].value, b"v1");
    assert_eq!(next_value(&mut events).await, "v1");

    let members = ClusterClient::new(channel)
        .member_list(pb::MemberListRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        members.members[0].client_ur_ls,
        [format!("https://{}", server.addr())]
    );
}

#[tokio::test]
async fn clients_without_a_trusted_certificate_are_refused() {
    let pki = TestPki::generate().unwrap();
    let server = start(mtls(&pki)).await;

    let anonymous = ClientTls::new().with_ca(pki.ca());
    let e = connect(&server, &anonymous).await.unwrap_err();
    let e = chain(&e);
    assert!(e.contains("requires a client certificate"), "{e}");

    let stranger = ClientTls::new()
        .with_ca(pki.ca())
        .with_identity(pki.other_client_cert(), pki.other_client_key());
    let e = connect(&server, &stranger).await.unwrap_err();
    let e = chain(&e);
    assert!(e.contains("refused our client certificate"), "{e}");

    let expired = ClientTls::new()
        .with_ca(pki.ca())
        .with_identity(pki.expired_cert(), pki.expired_key());
    let e = connect(&server, &expired).await.unwrap_err();
    let e = chain(&e);
    assert!(e.contains("expired"), "{e}");

    // Plaintext gRPC on the TLS port gets nowhere.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr()))
        .unwrap()
        .connect()
        .await;
    match plain {
        Err(_) => {}
        Ok(channel) => {
            let answer = KvClient::new(channel).put(put("/plain", "x")).await;
            assert!(answer.is_err(), "plaintext gRPC was served: {answer:?}");
        }
    }
    assert!(
        connect(&server, &client(&pki)).await.is_ok(),
        "a client with a trusted certificate still gets in"
    );
}

#[tokio::test]
async fn server_tls_without_client_ca_takes_anonymous_clients() {
    let pki = TestPki::generate().unwrap();
    let server = start(ServerTls::new(pki.server_cert(), pki.server_key())).await;
    let channel = connect(&server, &ClientTls::new().with_ca(pki.ca()))
        .await
        .unwrap();
    KvClient::new(channel).put(put("/a", "b")).await.unwrap();
}

#[tokio::test]
async fn the_grpc_port_offers_only_http2() {
    let pki = TestPki::generate().unwrap();
    let server = start(mtls(&pki)).await;
    let e = client(&pki)
        .connector(&[muster_tls::ALPN_HTTP11])
        .unwrap()
        .await_server_first(Duration::from_secs(5))
        .connect("127.0.0.1", server.addr().port())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP/2"), "{e}");
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_connections_while_watches_go_on() {
    let pki = TestPki::generate().unwrap();
    let server = start(mtls(&pki).with_reload_interval(Duration::from_millis(50))).await;
    let tls = server.tls().unwrap().clone();
    let old = tls.certificate()[0].clone();
    let channel = connect(&server, &client(&pki)).await.unwrap();
    let (_tx, mut events) = common::watch(channel.clone(), b"/rotate", b"").await;
    let mut kv = KvClient::new(channel);
    kv.put(put("/rotate", "before")).await.unwrap();
    assert_eq!(next_value(&mut events).await, "before");

    pki.issue_server("server").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let new = loop {
        let conn = client(&pki)
            .connector(&[muster_tls::ALPN_H2])
            .unwrap()
            .await_server_first(Duration::from_secs(5))
            .connect("127.0.0.1", server.addr().port())
            .await
            .unwrap();
        let seen = conn.peer_certificates().unwrap()[0].clone();
        if seen != old {
            break seen;
        }
        assert!(Instant::now() < deadline, "the new certificate is served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(new, tls.certificate()[0]);
    assert!(tls.reloads() >= 1);

    // The watch opened before the rotation still delivers, and a new
    // channel works with the new certificate.
    kv.put(put("/rotate", "after")).await.unwrap();
    assert_eq!(next_value(&mut events).await, "after");
    let fresh = connect(&server, &client(&pki)).await.unwrap();
    KvClient::new(fresh)
        .put(put("/rotate", "fresh"))
        .await
        .unwrap();
    assert_eq!(next_value(&mut events).await, "fresh");

    let metrics = muster_server::metrics::render_tls(&[("grpc", &tls)]);
    assert!(
        metrics.lines().any(
            |l| l.starts_with("muster_tls_reloads_total{listener=\"grpc\"} ") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("muster_tls_reload_failures_total{listener=\"grpc\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn broken_files_at_start_are_an_error_naming_the_file() {
    let pki = TestPki::generate().unwrap();
    let missing = pki.dir().join("missing.pem");
    let e = Server::start(
        ServerConfig::in_memory().with_tls(ServerTls::new(&*missing, pki.server_key())),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("missing.pem"), "{e}");

    let (_, wrong_key) = pki.issue_server("unrelated").unwrap();
    let e = Server::start(
        ServerConfig::in_memory().with_tls(ServerTls::new(pki.server_cert(), &*wrong_key)),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("unrelated-key.pem"), "{e}");

    let garbage = pki.dir().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let e = Server::start(ServerConfig::in_memory().with_tls(
        ServerTls::new(pki.server_cert(), pki.server_key()).with_client_ca(&*garbage, true),
    ))
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("garbage.pem"), "{e}");
}
