//! Test certificates ([`TestPki`]) and etcd with TLS / mutual TLS (the etcd
//! tests are skipped if etcd is absent).

use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use muster_testkit::{
    EtcdCluster, EtcdNode, EtcdOptions, EtcdTls, TestPki, http_get, metric_value, require_etcd,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

mod common;
use common::{eventually, ok};

/// etcdctl flags for calls expected to fail: etcdctl retries until these
/// expire.
const SHORT: [&str; 2] = ["--dial-timeout=1s", "--command-timeout=2s"];

fn failed(out: Output) -> String {
    assert!(
        !out.status.success(),
        "etcdctl unexpectedly succeeded\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn flag(name: &str, path: &Path) -> String {
    format!("--{name}={}", path.display())
}

// --- a minimal DER reader, enough for a certificate's serial and validity ---

/// Splits one DER TLV off `d`: `(tag, content, rest)`.
fn tlv(d: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = d[0];
    let (len, header) = if d[1] < 0x80 {
        (usize::from(d[1]), 2)
    } else {
        let n = usize::from(d[1] & 0x7f);
        let len = d[2..2 + n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, 2 + n)
    };
    (tag, &d[header..header + len], &d[header + len..])
}

/// Unix seconds of a DER UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, t: &[u8]) -> i64 {
    let s = std::str::from_utf8(t).unwrap();
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = s[..2].parse().unwrap();
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &s[2..])
        }
        0x18 => (s[..4].parse().unwrap(), &s[4..]),
        _ => panic!("not a time: tag {tag:#x}"),
    };
    let num = |i: usize| -> i64 { rest[i..i + 2].parse().unwrap() };
    let (month, day, h, m, sec) = (num(0), num(2), num(4), num(6), num(8));
    assert_eq!(&rest[10..], "Z");
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + h * 3600 + m * 60 + sec
}

struct CertInfo {
    serial: Vec<u8>,
    not_before: i64,
    not_after: i64,
}

fn cert_info(der: &[u8]) -> CertInfo {
    let (_, cert, _) = tlv(der);
    let (_, tbs, _) = tlv(cert);
    let (tag, first, mut rest) = tlv(tbs);
    let serial = if tag == 0xa0 {
        // [0] version, then the serial.
        let (tag, serial, r) = tlv(rest);
        assert_eq!(tag, 0x02);
        rest = r;
        serial
    } else {
        first
    };
    let (_, _signature_alg, rest) = tlv(rest);
    let (_, _issuer, rest) = tlv(rest);
    let (tag, validity, _) = tlv(rest);
    assert_eq!(tag, 0x30);
    let (t1, nb, rest) = tlv(validity);
    let (t2, na, _) = tlv(rest);
    CertInfo {
        serial: serial.to_vec(),
        not_before: der_time(t1, nb),
        not_after: der_time(t2, na),
    }
}

/// The single certificate in a PEM file, and checks its key file parses.
fn load(cert: &Path, key: &Path) -> CertInfo {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(certs.len(), 1, "{}", cert.display());
    PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("{}: {e}", key.display()));
    cert_info(&certs[0])
}

fn load_ca(cert: &Path) -> CertInfo {
    let der = CertificateDer::from_pem_file(cert).unwrap();
    cert_info(&der)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

#[test]
fn pki_files_parse_with_distinct_serials_and_expected_validity() {
    let pki = TestPki::generate().unwrap();
    let now = now_secs();
    let day = 86_400;
    let mut serials = vec![load_ca(&pki.ca()).serial, load_ca(&pki.other_ca()).serial];
    for (cert, key) in [
        (pki.server_cert(), pki.server_key()),
        (pki.client_cert(), pki.client_key()),
        (pki.other_client_cert(), pki.other_client_key()),
    ] {
        let info = load(&cert, &key);
        assert!(
            info.not_before <= now - day + 60 && info.not_before >= now - day - 60,
            "{}",
            cert.display()
        );
        assert!(info.not_after >= now + 29 * day, "{}", cert.display());
        serials.push(info.serial);
    }
    let expired = load(&pki.expired_cert(), &pki.expired_key());
    assert!(
        expired.not_after < now,
        "expired.pem is still valid: not_after {} >= now {now}",
        expired.not_after
    );
    assert!(expired.not_after <= now - day + 60);
    assert!(expired.not_before <= now - 10 * day + 60);
    serials.push(expired.serial);

    let (rotated, rotated_key) = pki.issue_server("rotated").unwrap();
    assert_eq!(rotated, pki.dir().join("rotated.pem"));
    assert_eq!(rotated_key, pki.dir().join("rotated-key.pem"));
    serials.push(load(&rotated, &rotated_key).serial);
    assert_ne!(
        std::fs::read(&rotated_key).unwrap(),
        std::fs::read(pki.server_key()).unwrap(),
        "a fresh key"
    );
    let (alice, alice_key) = pki.issue_client("alice", "alice").unwrap();
    serials.push(load(&alice, &alice_key).serial);

    let n = serials.len();
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), n, "serials are distinct");
    assert!(
        serials.iter().all(|s| s[0] & 0x80 == 0),
        "serials are positive"
    );

    assert!(pki.issue_server("../escape").is_err());
    let dir = pki.dir().to_owned();
    drop(pki);
    assert!(!dir.exists(), "temp dir removed on drop");
}

#[test]
fn mtls_node_requires_a_client_certificate_from_the_ca() {
    let Some(()) = require_etcd() else { return };
    let pki = TestPki::generate().unwrap();
    let mut node = EtcdNode::start_tls(&pki, true).unwrap();
    assert_eq!(
        node.endpoint(),
        format!("https://127.0.0.1:{}", node.client_port())
    );
    assert_ne!(node.metrics_port(), node.client_port());
    assert!(node.is_healthy());
    assert_eq!(
        node.metric("etcd_server_has_leader", &[]),
        Some(1.0),
        "metrics over plain HTTP on the metrics port"
    );
    assert!(
        http_get(node.metrics_port(), "/health")
            .unwrap()
            .contains("\"health\":\"true\"")
    );

    // The harness's etcdctl passes the CA and the client certificate.
    ok(node.etcdctl(&["put", "k", "v"]).unwrap());
    assert_eq!(
        ok(node.etcdctl(&["get", "k", "--print-value-only"]).unwrap()).trim(),
        "v"
    );

    // In parallel: each failing call lasts until etcdctl's timeout.
    let (other, expired) = (pki.other_client_cert(), pki.expired_cert());
    let (other_key, expired_key) = (pki.other_client_key(), pki.expired_key());
    std::thread::scope(|s| {
        s.spawn(|| rejected(&node, &pki, None));
        s.spawn(|| rejected(&node, &pki, Some((&other, &other_key))));
        s.spawn(|| rejected(&node, &pki, Some((&expired, &expired_key))));
    });
    // And they failed for the expected reasons.
    for reason in [
        NO_CERT,
        "certificate signed by unknown authority",
        "certificate has expired",
    ] {
        eventually(reason, Duration::from_secs(10), || {
            node.log_tail(500).contains(reason)
        });
    }

    // restart() keeps TLS and client-certificate authentication.
    node.kill();
    node.restart().unwrap();
    assert!(node.endpoint().starts_with("https://"));
    assert_eq!(
        ok(node.etcdctl(&["get", "k", "--print-value-only"]).unwrap()).trim(),
        "v"
    );
    let before = node.log_tail(5000).matches(NO_CERT).count();
    rejected(&node, &pki, None);
    eventually(
        "rejection after restart logged",
        Duration::from_secs(10),
        || node.log_tail(5000).matches(NO_CERT).count() > before,
    );
}

/// What etcd logs for a TLS client without a certificate.
const NO_CERT: &str = "client didn't provide a certificate";

/// `etcdctl get k` trusting the CA and presenting `cert` (cert, key), which
/// must fail.
fn rejected(node: &EtcdNode, pki: &TestPki, cert: Option<(&Path, &Path)>) {
    let mut args: Vec<String> = SHORT.iter().map(|s| (*s).to_owned()).collect();
    args.push(flag("cacert", &pki.ca()));
    if let Some((c, k)) = cert {
        args.push(flag("cert", c));
        args.push(flag("key", k));
    }
    args.extend(["get".to_owned(), "k".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    failed(node.etcdctl_raw(&args).unwrap());
}

/// etcd 3.4 with `--trusted-ca-file` but without `--client-cert-auth`:
/// client certificates are still required (documented on
/// [`EtcdTls::trusted_ca_file`]).
#[test]
fn trusted_ca_without_client_cert_auth_still_requires_client_certs() {
    let Some(()) = require_etcd() else { return };
    let pki = TestPki::generate().unwrap();
    let mut tls = EtcdTls::from_pki(&pki, false);
    tls.trusted_ca_file = Some(pki.ca());
    let node = EtcdNode::start_with(EtcdOptions {
        tls: Some(tls),
        ..EtcdOptions::default()
    })
    .unwrap();
    ok(node.etcdctl(&["put", "k", "v"]).unwrap());
    let ca = flag("cacert", &pki.ca());
    failed(
        node.etcdctl_raw(&[SHORT[0], SHORT[1], &ca, "get", "k"])
            .unwrap(),
    );
    eventually("rejection logged", Duration::from_secs(10), || {
        node.log_tail(500).contains(NO_CERT)
    });
}

#[test]
fn server_only_tls_node_accepts_clients_without_certificates() {
    let Some(()) = require_etcd() else { return };
    let pki = TestPki::generate().unwrap();
    let node = EtcdNode::start_tls(&pki, false).unwrap();
    assert!(node.endpoint().starts_with("https://"));
    let tls = node.tls().unwrap();
    assert!(!tls.client_cert_auth && tls.trusted_ca_file.is_none());
    ok(node.etcdctl(&["put", "k", "v"]).unwrap());
    let ca = flag("cacert", &pki.ca());
    assert_eq!(
        ok(node
            .etcdctl_raw(&[&ca, "get", "k", "--print-value-only"])
            .unwrap())
        .trim(),
        "v"
    );
    // A client that does not trust the test CA refuses the server.
    let other_ca = flag("cacert", &pki.other_ca());
    failed(
        node.etcdctl_raw(&[SHORT[0], SHORT[1], &other_ca, "get", "k"])
            .unwrap(),
    );
}

#[test]
fn mtls_cluster_serves_and_restarts_members_with_tls() {
    let Some(()) = require_etcd() else { return };
    let pki = TestPki::generate().unwrap();
    let mut cluster = EtcdCluster::start_with(
        3,
        EtcdOptions {
            tls: Some(EtcdTls::from_pki(&pki, true)),
            ..EtcdOptions::default()
        },
    )
    .unwrap();
    assert!(
        cluster
            .endpoints()
            .iter()
            .all(|e| e.starts_with("https://"))
    );
    ok(cluster.etcdctl(&["put", "k", "v"]).unwrap());
    cluster.kill_member(1);
    cluster.restart_member(1).unwrap();
    assert!(cluster.is_member_healthy(1));
    let text = http_get(cluster.member_metrics_port(1), "/metrics").unwrap();
    assert_eq!(
        metric_value(&text, "etcd_server_has_leader", &[]),
        Some(1.0)
    );
    // The restarted member itself serves mTLS clients (etcdctl run directly:
    // the harness's always targets all running members).
    let (ca, cert, key) = (
        flag("cacert", &pki.ca()),
        flag("cert", &pki.client_cert()),
        flag("key", &pki.client_key()),
    );
    let out = std::process::Command::new(
        std::env::var_os("MUSTER_ETCDCTL_BIN").unwrap_or_else(|| "etcdctl".into()),
    )
    .env("ETCDCTL_API", "3")
    .env_remove("ETCDCTL_ENDPOINTS")
    .arg(format!("--endpoints={}", cluster.member_endpoint(1)))
    .args([&ca, &cert, &key, "get", "k", "--print-value-only"])
    .output()
    .unwrap();
    assert_eq!(ok(out).trim(), "v");
}
