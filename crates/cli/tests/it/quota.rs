//! `muster serve --quota-backend-bytes` driven by etcdctl, as an operator
//! would: fill until `database space exceeded`, `alarm list`, free the
//! space (`del`, `compact`, `defrag`), `alarm disarm`, write again.

use std::ffi::OsStr;

use crate::common::{self, etcdctl, free_port, text};

const QUOTA: u64 = 4 << 20;

/// The body of `GET path` on `muster serve`'s HTTP address.
fn http_get(http: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).expect("HTTP address");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map_or(out.clone(), |(_, body)| body.to_string())
}

fn metrics(http: &str) -> String {
    http_get(http, "/metrics")
}

#[test]
fn etcdctl_fills_the_quota_then_frees_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let quota = QUOTA.to_string();
    let server = common::serve(
        port,
        &[
            OsStr::new("--data-dir"),
            dir.path().as_os_str(),
            OsStr::new("--quota-backend-bytes"),
            OsStr::new(&quota),
        ],
    );
    let endpoint = format!("127.0.0.1:{port}");
    let value = "x".repeat(100 << 10);
    let mut acked = 0;
    let refused = loop {
        assert!(acked < 1000, "the quota was never reached");
        let out = muster_testkit::etcdctl_at(&endpoint, &["put", &format!("q/{acked:05}"), &value])
            .unwrap();
        if !out.status.success() {
            break text(&out.stderr);
        }
        acked += 1;
    };
    assert!(
        refused.contains("etcdserver: mvcc: database space exceeded"),
        "{refused}"
    );
    let alarms = etcdctl(&endpoint, &["alarm", "list"]);
    assert!(alarms.contains("alarm:NOSPACE"), "{alarms}");
    let m = metrics(&server.1);
    assert_eq!(
        muster_testkit::metric_value(&m, "muster_server_alarm", &[r#"alarm="NOSPACE""#]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        muster_testkit::metric_value(&m, "muster_server_quota_backend_bytes", &[]),
        Some(QUOTA as f64)
    );
    assert!(
        muster_testkit::metric_value(&m, "muster_mvcc_db_total_size_in_bytes", &[]).unwrap() > 0.0
    );
    // The dashboard shows the alarm and the quota next to the size.
    let status: serde_json::Value =
        serde_json::from_str(&http_get(&server.1, "/api/status")).expect("status JSON");
    assert_eq!(status["alarms"], serde_json::json!(["NOSPACE"]), "{status}");
    assert_eq!(status["quota"], QUOTA, "{status}");
    assert!(status["db_size"].as_i64().unwrap() > 0, "{status}");
    // Reads still work.
    let count = etcdctl(
        &endpoint,
        &["get", "q/", "--prefix", "--keys-only", "-w", "json"],
    );
    let count: serde_json::Value = serde_json::from_str(&count).unwrap();
    assert_eq!(count["count"], acked);

    let deleted = etcdctl(&endpoint, &["del", "q/", "--prefix", "-w", "json"]);
    let deleted: serde_json::Value = serde_json::from_str(&deleted).unwrap();
    let rev = deleted["header"]["revision"].as_i64().unwrap();
    etcdctl(&endpoint, &["compact", &rev.to_string(), "--physical"]);
    let defrag = etcdctl(&endpoint, &["defrag"]);
    assert!(defrag.contains("Finished defragmenting"), "{defrag}");
    etcdctl(&endpoint, &["alarm", "disarm"]);
    assert_eq!(etcdctl(&endpoint, &["alarm", "list"]).trim(), "");
    assert_eq!(etcdctl(&endpoint, &["put", "after", "v"]).trim(), "OK");
}

/// With auth on, `defrag` needs the root role and `alarm list` does not,
/// as etcd's `authMaintenanceServer`; the same answers from etcd and muster.
fn defrag_needs_root(backend: &common::Backend) {
    let endpoint = backend.endpoint();
    common::enable_auth(&endpoint);
    let ep = endpoint.trim_start_matches("http://");
    let alice = muster_testkit::etcdctl_at(ep, &["--user", "alice:alicepw", "defrag"]).unwrap();
    assert!(!alice.status.success());
    let err = text(&alice.stderr);
    // etcd passes the auth error through untranslated.
    assert!(
        err.contains("code = Unknown desc = auth: permission denied"),
        "{err}"
    );
    let alarms =
        muster_testkit::etcdctl_at(ep, &["--user", "alice:alicepw", "alarm", "list"]).unwrap();
    assert!(alarms.status.success(), "{}", text(&alarms.stderr));
    let root = etcdctl(ep, &["--user", "root:rootpw", "defrag"]);
    assert!(root.contains("Finished defragmenting"), "{root}");
}

#[test]
fn defrag_needs_root_on_muster() {
    defrag_needs_root(&common::Backend::embedded());
}

#[test]
fn defrag_needs_root_on_etcd() {
    let Some(etcd) = common::Backend::etcd() else {
        return;
    };
    defrag_needs_root(&etcd);
}
