//! The library over TLS with client certificates (etcd's
//! `--client-cert-auth`): the same bodies against real etcd and the
//! embedded registry, both given the same test PKI.

use std::sync::Arc;
use std::time::Duration;

use muster::discovery::{Change, Update};
use muster::{ClientTls, Config, Error, Etcd, Instance};
use muster_testkit::{EmbeddedNode, EtcdNode, Registry, TestPki};

use crate::common::{config, next_changes, registered};

/// A registry serving mutual TLS from `pki`, and the PKI (which must
/// outlive it: the files are its certificates).
type Start = fn(&TestPki) -> Option<Box<dyn Registry>>;

fn etcd(pki: &TestPki) -> Option<Box<dyn Registry>> {
    muster_testkit::init_tracing();
    muster_testkit::require_etcd()?;
    Some(Box::new(
        EtcdNode::start_tls(pki, true).expect("start etcd with TLS"),
    ))
}

fn embedded(pki: &TestPki) -> Option<Box<dyn Registry>> {
    muster_testkit::init_tracing();
    Some(Box::new(
        EmbeddedNode::start_tls(pki, true).expect("start the embedded registry with TLS"),
    ))
}

fn tls_client(pki: &TestPki) -> ClientTls {
    ClientTls::new()
        .with_ca(pki.ca())
        .with_identity(pki.client_cert(), pki.client_key())
}

fn connect(node: &dyn Registry, tls: ClientTls) -> Etcd {
    Etcd::connect(config(vec![node.endpoint()]).with_tls(tls)).expect("client")
}

/// A client whose requests may take a minute: a refusal that is not
/// reported at once would end as [`Error::Timeout`], not as the refusal.
fn patient(endpoint: String) -> Config {
    config(vec![endpoint]).with_request_timeout(Duration::from_secs(60))
}

async fn register_discover_and_watch_over_mtls(node: Box<dyn Registry>, pki: &TestPki) {
    assert!(
        node.endpoint().starts_with("https://"),
        "{}",
        node.endpoint()
    );
    let etcd = connect(&*node, tls_client(pki));
    let a = Instance::new("user", "a", "http://127.0.0.1:8080");
    let registrar = registered(&etcd, 5, [a.clone()]).await;
    let user = muster::Discovery::new(etcd.clone())
        .service("user")
        .await
        .unwrap();
    assert_eq!(user.snapshot().len(), 1);
    let mut updates = user.updates();
    assert!(matches!(updates.next().await, Some(Update::Reset(s)) if s.len() == 1));
    let b = Instance::new("user", "b", "http://127.0.0.1:8081");
    registrar.register(b.clone()).await.unwrap();
    assert_eq!(
        next_changes(&mut updates, "an addition over TLS").await,
        vec![Change::Added(Arc::new(b))]
    );
    // A bare host:port is TLS when TLS settings are given.
    let bare = node.endpoint().replacen("https://", "", 1);
    let etcd = Etcd::connect(config(vec![bare]).with_tls(tls_client(pki))).unwrap();
    let status = etcd
        .status()
        .await
        .expect("status over TLS from a bare endpoint");
    assert!(status.header.is_some());
}

/// Failover works across TLS endpoints as across plaintext ones: a dead
/// first endpoint is skipped.
async fn fails_over_across_tls_endpoints(node: Box<dyn Registry>, pki: &TestPki) {
    let dead = format!("https://127.0.0.1:{}", muster_testkit::free_port());
    let etcd =
        Etcd::connect(config(vec![dead, node.endpoint()]).with_tls(tls_client(pki))).unwrap();
    for _ in 0..3 {
        etcd.status().await.expect("answered by the live endpoint");
    }
    assert_eq!(etcd.current_endpoint(), node.endpoint());
}

/// A refused connection is reported as such (not waited out until the
/// request timeout), with a sentence naming what to fix.
async fn refused(node: &dyn Registry, tls: ClientTls, expect: &[&str]) {
    let etcd = Etcd::connect(patient(node.endpoint()).with_tls(tls)).unwrap();
    let err = etcd.status().await.expect_err("refused");
    assert!(matches!(err, Error::Tls(_)), "{err:?}");
    let text = err.to_string();
    for part in expect {
        assert!(text.contains(part), "{text:?} should say {part:?}");
    }
}

async fn clients_without_a_good_certificate_are_refused(node: Box<dyn Registry>, pki: &TestPki) {
    let ca = || ClientTls::new().with_ca(pki.ca());
    refused(&*node, ca(), &["requires a client certificate", "--cert"]).await;
    let other = pki.other_client_cert();
    refused(
        &*node,
        ca().with_identity(&*other, pki.other_client_key()),
        &[
            "refused our client certificate",
            &other.display().to_string(),
        ],
    )
    .await;
    refused(
        &*node,
        ca().with_identity(pki.expired_cert(), pki.expired_key()),
        &["refused our client certificate"],
    )
    .await;
    let other_ca = pki.other_ca();
    refused(
        &*node,
        tls_client(pki).with_ca(&*other_ca),
        &["not signed by", &other_ca.display().to_string(), "--cacert"],
    )
    .await;
}

async fn plaintext_to_a_tls_port_fails_fast(node: Box<dyn Registry>, _pki: &TestPki) {
    let plain = node.endpoint().replacen("https://", "http://", 1);
    let etcd = Etcd::connect(patient(plain)).unwrap();
    let err = etcd.status().await.expect_err("plaintext to TLS");
    assert!(
        !matches!(err, Error::Timeout(_)),
        "reported, not waited out: {err}"
    );
    assert!(
        err.to_string().contains("TLS"),
        "the error points at TLS: {err}"
    );
}

#[test]
fn mixing_plaintext_and_tls_endpoints_is_refused() {
    let err = Etcd::connect(Config::new([
        "https://127.0.0.1:2379",
        "http://127.0.0.1:2380",
    ]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("TLS to all its endpoints or to none"), "{err}");
}

#[test]
fn unreadable_certificates_are_an_error_at_construction() {
    let err = Etcd::connect(
        Config::new(["https://127.0.0.1:2379"])
            .with_tls(ClientTls::new().with_ca("/nonexistent/ca.pem")),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

/// The embedded registry's certificate is rotated on disk while a watch is
/// open: the watch keeps delivering, new connections get the new
/// certificate (the embedded registry polls its files; the testkit's node
/// every 100 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_server_certificate_keeps_open_watches_and_serves_the_new_one() {
    muster_testkit::init_tracing();
    let pki = TestPki::generate().unwrap();
    let node = EmbeddedNode::start_tls(&pki, true).unwrap();
    let etcd = connect(&node, tls_client(&pki));
    let a = Instance::new("user", "a", "http://127.0.0.1:8080");
    let registrar = registered(&etcd, 5, [a]).await;
    let user = muster::Discovery::new(etcd.clone())
        .service("user")
        .await
        .unwrap();
    let mut updates = user.updates();
    assert!(matches!(updates.next().await, Some(Update::Reset(_))));

    let port = node.client_port();
    let before = served_certificate(&pki, port).await;
    let (cert, key) = pki.issue_server("rotated").unwrap();
    std::fs::copy(&key, pki.server_key()).unwrap();
    std::fs::copy(&cert, pki.server_cert()).unwrap();
    muster_testkit::eventually("the new certificate is served", || async {
        served_certificate(&pki, port).await != before
    })
    .await;
    // The watch opened before the rotation still delivers.
    let b = Instance::new("user", "b", "http://127.0.0.1:8081");
    registrar.register(b.clone()).await.unwrap();
    assert_eq!(
        next_changes(&mut updates, "an addition after the rotation").await,
        vec![Change::Added(Arc::new(b))]
    );
}

/// The leaf certificate a new TLS connection to `port` is given.
async fn served_certificate(pki: &TestPki, port: u16) -> Vec<u8> {
    let stream = ClientTls::new()
        .with_ca(pki.ca())
        .with_identity(pki.client_cert(), pki.client_key())
        .connector(&[muster_tls::ALPN_H2])
        .unwrap()
        .connect("127.0.0.1", port)
        .await
        .expect("a new connection");
    stream.peer_certificates().unwrap()[0].to_vec()
}

macro_rules! on_both_tls {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                async fn run(start: super::Start) {
                    let pki = muster_testkit::TestPki::generate().expect("test PKI");
                    if let Some(node) = start(&pki) {
                        super::$name(node, &pki).await
                    }
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn etcd() {
                    run(super::etcd).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    run(super::embedded).await
                }
            }
        )*
    };
}

/// With `--client-cert-auth` and auth enabled, a request without a token
/// is the user its certificate's Common Name names; a token overrides it.
async fn client_certificates_name_users(node: Box<dyn Registry>, pki: &TestPki) {
    let ctl = |args: &[&str]| {
        let out = muster_testkit::etcdctl_tls_at(&node.endpoint(), pki, args).unwrap();
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ctl(&["user", "add", "root:rootpw"]);
    ctl(&["user", "grant-role", "root", "root"]);
    ctl(&["user", "add", "svc:svcpw"]);
    ctl(&["role", "add", "svc"]);
    ctl(&[
        "role",
        "grant-permission",
        "svc",
        "--prefix=true",
        "readwrite",
        "/svc/",
    ]);
    ctl(&["user", "grant-role", "svc", "svc"]);
    ctl(&["auth", "enable"]);
    // etcdctl's certificate (CN root) makes it root without --user.
    assert_eq!(ctl(&["user", "list"]), "root\nsvc\n");

    let (cert, key) = pki.issue_client("svc-client", "svc").unwrap();
    let svc_tls = ClientTls::new().with_ca(pki.ca()).with_identity(cert, key);
    let svc = connect(&*node, svc_tls.clone());
    let put = |k: &str| muster_proto::PutRequest {
        key: k.as_bytes().to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    };
    svc.put(put("/svc/a")).await.expect("svc writes its prefix");
    let err = svc
        .put(put("/other"))
        .await
        .expect_err("outside its prefix");
    assert!(err.to_string().contains("permission denied"), "{err}");
    // With credentials, the token's user acts, not the certificate's.
    let as_root = Etcd::connect(
        config(vec![node.endpoint()])
            .with_tls(svc_tls)
            .with_credentials("root", "rootpw"),
    )
    .unwrap();
    as_root
        .put(put("/other"))
        .await
        .expect("root writes anywhere");
}

on_both_tls!(
    client_certificates_name_users,
    register_discover_and_watch_over_mtls,
    fails_over_across_tls_endpoints,
    clients_without_a_good_certificate_are_refused,
    plaintext_to_a_tls_port_fails_fast,
);
