//! `dig`, the client operators reach for, against the server. Fails
//! without dig under `MUSTER_REQUIRE_ETCD=1`, else skips loudly.

use muster::{Instance, Status};
use muster_testkit::{Registry, on_both};

use crate::common::*;

on_both!(dig_sees_consul_style_answers);

async fn dig_sees_consul_style_answers(registry: Box<dyn Registry>) {
    if !require_dig() {
        return;
    }
    let etcd = client(&*registry);
    let server = dns(&etcd).await;
    let addr = server.local_addr();
    put_instance(
        &etcd,
        &Instance::new("user", "u-1", "http://192.0.2.1:8080"),
    )
    .await;
    put_instance(
        &etcd,
        &Instance::new("user", "u-2", "192.0.2.2:8081").with_tag("canary"),
    )
    .await;
    let mut draining = Instance::new("user", "u-3", "192.0.2.3:8082");
    draining.status = Status::Draining;
    put_instance(&etcd, &draining).await;
    for i in 0..60 {
        let ip = format!("198.51.100.{}:80", i + 1);
        put_instance(&etcd, &Instance::new("big", format!("b-{i}"), ip)).await;
    }
    caught_up(&server, revision(&etcd).await).await;

    // The README's example.
    let srv = dig(addr, &["+short", "user.service.muster", "SRV"]).await;
    let mut lines: Vec<&str> = srv.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "1 100 8080 u-1.user.instance.muster.",
            "1 100 8081 u-2.user.instance.muster."
        ],
        "{srv}"
    );
    let full = squash(&dig(addr, &["user.service.muster", "SRV"]).await);
    assert!(full.contains("status: NOERROR"), "{full}");
    assert!(full.contains("flags: qr aa rd;"), "authoritative: {full}");
    assert!(
        full.contains("ADDITIONAL SECTION")
            && full.contains("u-1.user.instance.muster. 0 IN A 192.0.2.1"),
        "{full}"
    );
    let a = dig(addr, &["+short", "canary.user.service.muster"]).await;
    assert_eq!(a.trim(), "192.0.2.2");
    let a = dig(addr, &["+short", "u-1.user.instance.muster", "A"]).await;
    assert_eq!(a.trim(), "192.0.2.1");

    let nx = squash(&dig(addr, &["nope.service.muster"]).await);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    assert!(
        nx.contains("AUTHORITY SECTION")
            && nx.contains("muster. 0 IN SOA ns.muster. hostmaster.muster."),
        "{nx}"
    );
    let refused = dig(addr, &["example.com"]).await;
    assert!(refused.contains("status: REFUSED"), "{refused}");

    // Truncated over UDP (dig +ignore keeps the cut answer), whole over TCP,
    // and plain dig retries over TCP by itself.
    let cut = squash(&dig(addr, &["+noedns", "+ignore", "big.service.muster", "A"]).await);
    assert!(cut.contains("flags: qr aa tc rd;"), "{cut}");
    let whole = dig(addr, &["+tcp", "+short", "big.service.muster", "A"]).await;
    assert_eq!(whole.lines().count(), 60, "{whole}");
    let retried = dig(addr, &["+noedns", "+short", "big.service.muster", "SRV"]).await;
    assert_eq!(retried.lines().count(), 60, "{retried}");
}

/// `text` with every run of spaces and tabs made one space (dig aligns
/// its columns with tabs).
fn squash(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}
