//! `muster get <service>`: one service's instances.

use std::time::{Duration, SystemTime};

use muster::Instance;
use muster::instance::{registered_at, validate_name};
use muster_proto as pb;

use crate::global::{GlobalArgs, Output};
use crate::output::{Table, human, print, print_json, registry_error, rfc3339};

/// Flags of `muster get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// The service name.
    pub service: String,
}

/// One instance as `get` shows it.
struct Row {
    instance: Instance,
    lease: i64,
    /// `None`: no lease (0) or the lease is gone.
    lease_left: Option<Duration>,
    registered_at: Option<SystemTime>,
    create_revision: i64,
    mod_revision: i64,
}

/// Runs `muster get`.
pub async fn run(global: &GlobalArgs, args: GetArgs) -> anyhow::Result<()> {
    validate_name("service name", &args.service)?;
    let etcd = global.connect()?;
    // One range over this service only (not the whole catalog): one revision.
    let source = global.source();
    let dir = source.service_dir(&args.service);
    let resp = etcd
        .range(pb::RangeRequest {
            key: dir.clone().into_bytes(),
            range_end: muster::instance::prefix_range_end(dir.as_bytes()),
            ..Default::default()
        })
        .await
        .map_err(|e| registry_error(&etcd, e))?;
    let revision = resp.header.as_ref().map_or(0, |h| h.revision);
    let mut rows = Vec::new();
    for kv in &resp.kvs {
        match source.decode(&kv.key, &kv.value) {
            None => {
                tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "skipping a key outside the layout")
            }
            Some(Ok(instance)) => rows.push(Row {
                instance,
                lease: kv.lease,
                lease_left: None,
                registered_at: registered_at(&kv.value),
                create_revision: kv.create_revision,
                mod_revision: kv.mod_revision,
            }),
            Some(Err(e)) => tracing::warn!(error = %e, "skipping a malformed entry"),
        }
    }
    if rows.is_empty() {
        anyhow::bail!("no service named {}", args.service);
    }
    let left = muster::catalog::lease_time_left(&etcd, rows.iter().map(|r| r.lease))
        .await
        .map_err(|e| registry_error(&etcd, e))?;
    for row in &mut rows {
        row.lease_left = left.get(&row.lease).copied().flatten();
    }
    let now = SystemTime::now();
    let age = |row: &Row| {
        row.registered_at
            .map(|t| now.duration_since(t).unwrap_or_default())
    };

    match global.output {
        Output::Json => print_json(&serde_json::json!({
            "service": args.service,
            "revision": revision,
            "instances": rows.iter().map(|row| {
                let i = &row.instance;
                serde_json::json!({
                    "id": i.id,
                    "addr": i.addr,
                    "zone": i.zone,
                    "version": i.version,
                    "weight": i.weight,
                    "status": i.status.to_string(),
                    "tags": i.tags,
                    "metadata": i.metadata,
                    "lease": row.lease,
                    "lease_left_secs": row.lease_left.map(|d| d.as_secs()),
                    "registered_at": row.registered_at.map(rfc3339),
                    "age_secs": age(row).map(|d| d.as_secs()),
                    "create_revision": row.create_revision,
                    "mod_revision": row.mod_revision,
                })
            }).collect::<Vec<_>>(),
        })),
        Output::Table => {
            let mut table = Table::new(&[
                "ID", "ADDRESS", "ZONE", "VERSION", "WEIGHT", "STATUS", "LEASE", "AGE",
            ]);
            let or_dash = |s: &str| {
                if s.is_empty() {
                    "-".to_string()
                } else {
                    s.to_string()
                }
            };
            for row in &rows {
                let i = &row.instance;
                let lease = match (row.lease, row.lease_left) {
                    (0, _) => "-".to_string(),
                    (_, Some(left)) => human(left),
                    (_, None) => "expired".to_string(),
                };
                table.row(vec![
                    i.id.clone(),
                    i.addr.clone(),
                    or_dash(&i.zone),
                    or_dash(&i.version),
                    i.weight.to_string(),
                    i.status.to_string(),
                    lease,
                    age(row).map_or_else(|| "-".to_string(), human),
                ]);
            }
            print(&table.render())
        }
    }
}
