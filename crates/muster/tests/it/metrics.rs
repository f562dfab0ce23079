//! Propagation figures against both backends: every applied change is
//! timed per service, the revision lag returns to 0 once the table is
//! current (progress notifications move an idle one), and the Prometheus
//! text carries both for discovery and the catalog; a table says when it
//! was published.

use std::time::Instant;

use crate::common;

use common::*;
use muster::catalog::Catalog;
use muster::{Discovery, Instance};
use muster_testkit::Registry;

async fn discovery_times_every_change_and_reports_lag(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let discovery = Discovery::new(etcd.clone());
    let user = discovery.service("user").await.unwrap();
    let billing = discovery.service("billing").await.unwrap();
    let listed = billing.snapshot();
    let listed_at = listed.published_at().expect("the first list publishes");
    let catalog = Catalog::follow(etcd.clone(), muster::instance::DEFAULT_PREFIX)
        .await
        .unwrap();
    assert_eq!(
        user.apply_stats().count(),
        0,
        "the first list is not a change"
    );
    let before = Instant::now();
    let registrar = registered(
        &etcd,
        30,
        (0..5).map(|i| Instance::new("user", format!("u{i}"), format!("127.0.0.1:{}", 7000 + i))),
    )
    .await;
    user.wait_for(DEADLINE, |s| s.len() == 5).await.unwrap();
    let published = user.snapshot().published_at().expect("a watched change");
    assert!(before <= published && published <= Instant::now());
    assert!(user.apply_stats().count() >= 1);
    let p99 = user.apply_stats().quantile(0.99).expect("a figure");
    assert!(p99 <= user.apply_stats().max().max(p99));
    eventually("the catalog timed the user changes", || {
        let n = catalog.apply_stats("user").map_or(0, |s| s.count());
        async move { n >= 1 }
    })
    .await;
    // Changes elsewhere raise the registry's revision; billing's table
    // catches up through progress notifications: lag back to 0.
    registrar
        .register(Instance::new("cart", "c1", "127.0.0.1:1"))
        .await
        .unwrap();
    eventually("no service's table lags behind the registry", || {
        let mut out = String::new();
        discovery.render_metrics(&mut out);
        let lags: Vec<f64> = ["user", "billing"]
            .iter()
            .filter_map(|s| {
                muster_testkit::metric_value(
                    &out,
                    "muster_discovery_revision_lag",
                    &[&format!("service=\"{s}\"")],
                )
            })
            .collect();
        async move { lags.len() == 2 && lags.iter().all(|l| *l == 0.0) }
    })
    .await;
    // Billing moved on by progress alone: its instances are the listed
    // ones, published when they were listed.
    let moved = billing.snapshot();
    assert!(moved.revision() > listed.revision());
    assert_eq!(moved.published_at(), Some(listed_at));
    let mut out = String::new();
    discovery.render_metrics(&mut out);
    let count = muster_testkit::metric_value(
        &out,
        "muster_discovery_apply_seconds_count",
        &["service=\"user\""],
    );
    assert_eq!(count, Some(user.apply_stats().count() as f64), "{out}");
    assert!(out.contains("muster_discovery_malformed_total{layout=\"muster\"}"));
    let mut out = String::new();
    catalog.render_metrics(&mut out);
    assert!(
        out.contains("muster_discovery_apply_seconds_bucket{service=\"user\",le=\"+Inf\"}"),
        "{out}"
    );
    registrar.shutdown().await.unwrap();
}

muster_testkit::on_both!(discovery_times_every_change_and_reports_lag);
