//! Prometheus metrics of a running server, in the text exposition format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use muster_tls::TlsServer;

use crate::core::Core;

/// Writes metric families: `# HELP`, `# TYPE`, then one line per sample.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            if labels.is_empty() {
                let _ = writeln!(self.0, "{name} {value}");
            } else {
                let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
            }
        }
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help, &[("", value)]);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &crate::storage::LatencySnapshot) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} histogram");
        for (bound, count) in h.cumulative() {
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let count = h.count();
        let _ = writeln!(self.0, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(self.0, "{name}_sum {}", h.sum.as_secs_f64());
        let _ = writeln!(self.0, "{name}_count {count}");
    }
}

const WATCH: &str =
    r#"grpc_method="Watch",grpc_service="etcdserverpb.Watch",grpc_type="bidi_stream""#;
const KEEPALIVE: &str =
    r#"grpc_method="LeaseKeepAlive",grpc_service="etcdserverpb.Lease",grpc_type="bidi_stream""#;

/// Renders every metric.
pub fn render(core: &Core) -> String {
    let (keys, leases, compacted) = core.counts();
    let stats = core.storage().stats();
    let load = |v: &AtomicU64| v.load(Ordering::Relaxed) as f64;
    let mut m = Exposition(String::with_capacity(2048));
    m.single(
        "muster_registry_revision",
        "gauge",
        "The committed (durable, visible) revision.",
        core.committed() as f64,
    );
    m.single(
        "muster_registry_compact_revision",
        "gauge",
        "The revision history was compacted to.",
        compacted as f64,
    );
    m.single("muster_registry_keys", "gauge", "Live keys.", keys as f64);
    m.single(
        "muster_registry_leases",
        "gauge",
        "Live leases.",
        leases as f64,
    );
    m.single(
        "muster_registry_watchers",
        "gauge",
        "Watchers on all streams.",
        core.hub().watcher_count() as f64,
    );
    m.single(
        "muster_watch_fell_behind_total",
        "counter",
        "Times a watcher's stream was full and it went back to catching up from history.",
        core.hub().fell_behind() as f64,
    );
    m.single(
        "muster_storage_commits_total",
        "counter",
        "Durable commits (write-ahead log records, one fdatasync each).",
        stats.commits as f64,
    );
    m.single(
        "muster_storage_checkpoints_total",
        "counter",
        "Checkpoints: database transactions applying logged commits, many each.",
        stats.checkpoints as f64,
    );
    m.single(
        "muster_storage_wal_bytes_total",
        "counter",
        "Bytes appended to the write-ahead log.",
        stats.wal_bytes as f64,
    );
    m.single(
        "muster_storage_pending_bytes",
        "gauge",
        "Bytes of changes logged but not yet checkpointed into the database (approximate).",
        stats.pending_bytes as f64,
    );
    m.single(
        "muster_storage_batches_total",
        "counter",
        "Write batches made durable; more batches than commits is group commit at work.",
        stats.batches as f64,
    );
    let latencies = core.storage().latencies();
    m.histogram(
        "muster_storage_wal_append_seconds",
        "Time to append a commit's record to the write-ahead log and fdatasync it (etcd: etcd_disk_wal_fsync_duration_seconds).",
        &latencies.wal_append,
    );
    m.histogram(
        "muster_storage_checkpoint_seconds",
        "Time of each checkpoint, one durable database transaction (etcd: etcd_disk_backend_commit_duration_seconds).",
        &latencies.checkpoint,
    );
    m.single(
        "muster_storage_db_bytes",
        "gauge",
        "Size of the database file.",
        stats.file_bytes as f64,
    );
    m.single(
        "muster_mvcc_db_total_size_in_bytes",
        "gauge",
        "Size of the database file, as etcd's etcd_mvcc_db_total_size_in_bytes.",
        stats.file_bytes as f64,
    );
    m.single(
        "muster_mvcc_db_total_size_in_use_in_bytes",
        "gauge",
        "Bytes of the history the store keeps, as etcd's etcd_mvcc_db_total_size_in_use_in_bytes: what the space quota is checked against.",
        core.data_bytes() as f64,
    );
    m.single(
        "muster_server_quota_backend_bytes",
        "gauge",
        "The space quota in bytes, as etcd's etcd_server_quota_backend_bytes.",
        core.quota_bytes() as f64,
    );
    let alarms = core.alarms();
    let active = |t: muster_proto::AlarmType| {
        f64::from(u8::from(alarms.iter().any(|a| a.alarm == t as i32)))
    };
    m.family(
        "muster_server_alarm",
        "gauge",
        "1 while an alarm of the type is active (NOSPACE: database space exceeded).",
        &[
            (
                r#"alarm="NOSPACE""#,
                active(muster_proto::AlarmType::Nospace),
            ),
            (
                r#"alarm="CORRUPT""#,
                active(muster_proto::AlarmType::Corrupt),
            ),
        ],
    );
    m.single(
        "muster_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        core.uptime().as_secs_f64(),
    );
    let (auth_enabled, auth_revision, users, roles) = core.auth_summary();
    m.single(
        "muster_auth_enabled",
        "gauge",
        "1 when authentication is on.",
        f64::from(u8::from(auth_enabled)),
    );
    m.single(
        "muster_auth_revision",
        "gauge",
        "The auth store's revision (raised by every user, role or permission change).",
        auth_revision as f64,
    );
    m.single("muster_auth_users", "gauge", "Users.", users as f64);
    m.single("muster_auth_roles", "gauge", "Roles.", roles as f64);
    m.single(
        "muster_auth_tokens",
        "gauge",
        "Live simple tokens (expired ones until swept, within a second).",
        core.tokens().len() as f64,
    );
    let throttle = core.throttle();
    m.single(
        "muster_auth_failures_total",
        "counter",
        "Failed Authenticate calls (wrong user or password). Successful ones are not counted.",
        throttle.failures() as f64,
    );
    m.single(
        "muster_auth_throttled_total",
        "counter",
        "Authenticate calls made to wait because their peer failed before.",
        throttle.delayed() as f64,
    );
    m.single(
        "muster_auth_throttled_peers",
        "gauge",
        "Peers whose logins are currently slowed down after failures.",
        throttle.peers() as f64,
    );
    // etcd's names, so that etcd dashboards and tests read both backends.
    let c = &core.counters;
    m.family(
        "grpc_server_started_total",
        "counter",
        "Total number of RPCs started on the server.",
        &[
            (WATCH, load(&c.watch_streams)),
            (KEEPALIVE, load(&c.keepalive_streams)),
        ],
    );
    m.family(
        "grpc_server_msg_received_total",
        "counter",
        "Total number of RPC stream messages received on the server.",
        &[(KEEPALIVE, load(&c.keepalive_messages))],
    );
    if let Some(faults) = core.faults() {
        let labels: Vec<(String, f64)> = faults
            .counts()
            .into_iter()
            .map(|(name, n)| (format!("fault=\"{name}\""), n as f64))
            .collect();
        let samples: Vec<(&str, f64)> = labels.iter().map(|(l, n)| (l.as_str(), *n)).collect();
        m.family(
            "muster_faults_injected_total",
            "counter",
            "Times each injected fault acted (--faults): requests delayed (latency), watch \
             streams cut (drop-watch), requests refused and streams cut (unavailable), \
             compactions (compact), leases doomed (lease-expire-early).",
            &samples,
        );
        m.single(
            "muster_faults_unavailable",
            "gauge",
            "1 while an injected outage window is open.",
            f64::from(u8::from(faults.in_outage())),
        );
    }
    m.0
}

/// Renders the certificate reload counters of TLS listeners, each labelled
/// `listener="<name>"` (e.g. `grpc`, `http`). Nothing without listeners.
pub fn render_tls(listeners: &[(&str, &TlsServer)]) -> String {
    let mut m = Exposition(String::new());
    if listeners.is_empty() {
        return m.0;
    }
    let labels: Vec<String> = listeners
        .iter()
        .map(|(name, _)| format!("listener=\"{name}\""))
        .collect();
    let samples = |value: fn(&TlsServer) -> u64| -> Vec<(&str, f64)> {
        labels
            .iter()
            .zip(listeners)
            .map(|(label, (_, tls))| (label.as_str(), value(tls) as f64))
            .collect()
    };
    m.family(
        "muster_tls_reloads_total",
        "counter",
        "Times changed certificate files were loaded and taken into use for new connections.",
        &samples(TlsServer::reloads),
    );
    m.family(
        "muster_tls_reload_failures_total",
        "counter",
        "Times changed certificate files could not be used (the previous certificate stays in use).",
        &samples(TlsServer::reload_failures),
    );
    m.0
}
