//! Prometheus metrics of a running server, in the text exposition format.

use std::fmt::Write;

use crate::core::Core;

/// Renders every metric.
pub fn render(core: &Core) -> String {
    let (keys, leases, compacted) = core.counts();
    let stats = core.storage().stats();
    let mut out = String::with_capacity(1024);
    let mut gauge = |name: &str, help: &str, kind: &str, value: f64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    };
    gauge(
        "muster_registry_revision",
        "The committed (durable, visible) revision.",
        "gauge",
        core.committed() as f64,
    );
    gauge(
        "muster_registry_compact_revision",
        "The revision history was compacted to.",
        "gauge",
        compacted as f64,
    );
    gauge("muster_registry_keys", "Live keys.", "gauge", keys as f64);
    gauge(
        "muster_registry_leases",
        "Live leases.",
        "gauge",
        leases as f64,
    );
    gauge(
        "muster_registry_watchers",
        "Watchers on all streams.",
        "gauge",
        core.hub().watcher_count() as f64,
    );
    gauge(
        "muster_watch_fell_behind_total",
        "Times a watcher's stream was full and it went back to catching up from history.",
        "counter",
        core.hub().fell_behind() as f64,
    );
    gauge(
        "muster_storage_commits_total",
        "Durable commits (fsyncs).",
        "counter",
        stats.commits as f64,
    );
    gauge(
        "muster_storage_batches_total",
        "Write batches made durable; more batches than commits is group commit at work.",
        "counter",
        stats.batches as f64,
    );
    gauge(
        "muster_storage_db_bytes",
        "Size of the database file.",
        "gauge",
        stats.file_bytes as f64,
    );
    gauge(
        "muster_uptime_seconds",
        "Seconds since the server started.",
        "gauge",
        core.uptime().as_secs_f64(),
    );
    // etcd's names, so that etcd dashboards and tests read both backends.
    let c = &core.counters;
    let load = |v: &std::sync::atomic::AtomicU64| v.load(std::sync::atomic::Ordering::Relaxed);
    let _ = writeln!(
        out,
        "# HELP grpc_server_started_total Total number of RPCs started on the server."
    );
    let _ = writeln!(out, "# TYPE grpc_server_started_total counter");
    let _ = writeln!(
        out,
        "grpc_server_started_total{{grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\",grpc_type=\"bidi_stream\"}} {}",
        load(&c.watch_streams)
    );
    let _ = writeln!(
        out,
        "grpc_server_started_total{{grpc_method=\"LeaseKeepAlive\",grpc_service=\"etcdserverpb.Lease\",grpc_type=\"bidi_stream\"}} {}",
        load(&c.keepalive_streams)
    );
    let _ = writeln!(
        out,
        "# HELP grpc_server_msg_received_total Total number of RPC stream messages received on the server."
    );
    let _ = writeln!(out, "# TYPE grpc_server_msg_received_total counter");
    let _ = writeln!(
        out,
        "grpc_server_msg_received_total{{grpc_method=\"LeaseKeepAlive\",grpc_service=\"etcdserverpb.Lease\",grpc_type=\"bidi_stream\"}} {}",
        load(&c.keepalive_messages)
    );
    out
}
