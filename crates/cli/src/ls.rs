//! `muster ls`: every service with its instance counts.

use muster::Catalog;

use crate::global::{GlobalArgs, Output};
use crate::output::{Table, print, print_json, registry_error};

/// Flags of `muster ls`.
#[derive(Debug, clap::Args)]
pub struct LsArgs {}

/// Runs `muster ls`.
pub async fn run(global: &GlobalArgs, _args: LsArgs) -> anyhow::Result<()> {
    let etcd = global.connect()?;
    let snapshot = Catalog::list_sources(&etcd, global.sources())
        .await
        .map_err(|e| registry_error(&etcd, e))?;
    let rows: Vec<(&String, usize, usize, usize)> = snapshot
        .services()
        .iter()
        .map(|(name, instances)| {
            let (serving, draining) = snapshot.counts(name);
            (name, instances.len(), serving, draining)
        })
        .collect();
    match global.output {
        Output::Json => print_json(&serde_json::json!({
            "revision": snapshot.revision(),
            "services": rows.iter().map(|(name, total, serving, draining)| serde_json::json!({
                "service": name,
                "instances": total,
                "serving": serving,
                "draining": draining,
            })).collect::<Vec<_>>(),
        })),
        Output::Table => {
            if rows.is_empty() {
                eprintln!("no services under {}", global.prefix());
                return Ok(());
            }
            let mut table = Table::new(&["SERVICE", "INSTANCES", "SERVING", "DRAINING"]);
            for (name, total, serving, draining) in rows {
                table.row(vec![
                    name.clone(),
                    total.to_string(),
                    serving.to_string(),
                    draining.to_string(),
                ]);
            }
            print(&table.render())
        }
    }
}
