//! `muster deregister <service> <id>`: delete one instance's key.

use muster::instance::validate_name;
use muster_proto as pb;

use crate::global::{GlobalArgs, Output};
use crate::output::{print, print_json, registry_error};

/// Flags of `muster deregister`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "This removes entries whose process is gone (or that were written \
    without a lease). A live process that registered through muster's registrar puts its \
    instance back: stop that process instead."
)]
pub struct DeregisterArgs {
    /// The service name.
    pub service: String,
    /// The instance id.
    pub id: String,
}

/// Runs `muster deregister`.
pub async fn run(global: &GlobalArgs, args: DeregisterArgs) -> anyhow::Result<()> {
    validate_name("service name", &args.service)?;
    validate_name("instance id", &args.id)?;
    let etcd = global.connect()?;
    let key = global.source().key(&args.service, &args.id);
    let resp = etcd
        .delete_range(pb::DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            prev_kv: true,
            ..Default::default()
        })
        .await
        .map_err(|e| registry_error(&etcd, e))?;
    if resp.deleted == 0 {
        anyhow::bail!("no instance {} of service {}", args.id, args.service);
    }
    let lease = resp.prev_kvs.first().map_or(0, |kv| kv.lease);
    if lease != 0 {
        tracing::info!(
            lease = format_args!("{lease:x}"),
            "it was held under a lease: if its process is still alive it registers it again"
        );
    }
    match global.output {
        Output::Json => print_json(&serde_json::json!({
            "service": args.service,
            "id": args.id,
            "key": key,
            "lease": lease,
            "revision": resp.header.as_ref().map_or(0, |h| h.revision),
        })),
        Output::Table => print(&format!(
            "deregistered instance {} of service {}\n",
            args.id, args.service
        )),
    }
}
