//! A registry outage: the last known catalog keeps being answered, the
//! staleness is exported, and answers are current again after it.

use hickory_proto::rr::RecordType;
use muster::Instance;
use muster_testkit::{Registry, on_both};

use crate::common::*;

on_both!(answers_survive_a_registry_outage);

async fn answers_survive_a_registry_outage(mut registry: Box<dyn Registry>) {
    let etcd = client(&*registry);
    let server = dns(&etcd).await;
    let addr = server.local_addr();
    put_instance(&etcd, &Instance::new("pay", "p-1", "192.0.2.20:80")).await;
    put_instance(&etcd, &Instance::new("pay", "p-2", "192.0.2.21:80")).await;
    caught_up(&server, revision(&etcd).await).await;
    let stale = |server: &muster_dns::DnsServer| {
        metric_value(
            &server.render_metrics(),
            "muster_dns_catalog_stale_seconds",
            &[],
        )
        .expect("stale gauge")
    };
    assert_eq!(stale(&server), 0.0);

    registry.kill();
    eventually("the catalog is reported stale", || async {
        stale(&server) > 0.0
    })
    .await;
    // Still answered, over UDP and TCP, from the last known catalog.
    for _ in 0..10 {
        assert_eq!(
            a_now(addr, "pay.service.muster.").await,
            ["192.0.2.20", "192.0.2.21"]
        );
    }
    let srv = tcp(addr, &query("pay.service.muster.", RecordType::SRV, None)).await;
    assert_eq!(srv.answers.len(), 2);

    registry.restart().expect("restart the registry");
    eventually("the catalog is live again", || async {
        stale(&server) == 0.0
    })
    .await;
    // Changes made after the outage are answered.
    let etcd = client(&*registry);
    put_instance(&etcd, &Instance::new("pay", "p-3", "192.0.2.22:80")).await;
    eventually("a registration after the outage is answered", || async {
        a_now(addr, "pay.service.muster.").await.len() == 3
    })
    .await;
}
