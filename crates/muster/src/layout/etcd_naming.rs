//! etcd's naming layout, as written by Go's
//! `go.etcd.io/etcd/client/v3/naming/endpoints` (3.4:
//! `clientv3/naming/endpoints/endpoints_impl.go`, the value type in
//! `endpoints/internal/update.go`):
//!
//! - key: any key under `{target}/`, by convention `{target}/{addr}`; here
//!   the target is `{prefix}/{service}` (or just `{service}` with the empty
//!   default prefix, as in `etcd:///my-service`);
//! - value: the JSON of an update with Go's capitalised field names,
//!   `{"Op":0,"Addr":"10.0.0.1:8080","Metadata":null}` (Op 0 adds; 1, from
//!   gRPC's old naming package, deletes and is never stored by
//!   `endpoints`); `Metadata` is any JSON;
//! - no lease unless the writer attaches one;
//! - the Go resolver (`etcd:///service`) hands only `Addr` to gRPC, so it
//!   is written as a bare `host:port`; muster's zone, weight, tags and
//!   version travel in `Metadata` as a string map.
//!
//! Deletes are known from the key alone (the 3.4 resolver reads the
//! deleted value from prev_kv; muster keeps its own table). No status:
//! a draining instance's key is removed.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{
    Layout, LayoutKind, check_writable, fields_from_metadata, host_port, metadata_with_fields,
    to_json,
};
use crate::error::Result;
use crate::instance::{Instance, json_metadata};

/// etcd's naming layout.
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdNaming;

/// `endpoints/internal.Update` (field names are Go's, no JSON tags).
#[derive(Serialize, Deserialize)]
pub(super) struct Update {
    #[serde(rename = "Op", default)]
    pub(super) op: u8,
    #[serde(rename = "Addr", default)]
    pub(super) addr: String,
    #[serde(rename = "Metadata", default)]
    pub(super) metadata: Option<serde_json::Value>,
}

impl Layout for EtcdNaming {
    fn kind(&self) -> LayoutKind {
        LayoutKind::EtcdNaming
    }

    fn default_prefix(&self) -> &'static str {
        ""
    }

    fn default_ttl(&self) -> Duration {
        // The package attaches no lease; muster's registrar always does, so
        // that a crashed instance's entry goes away.
        Duration::from_secs(10)
    }

    fn decode(
        &self,
        service: &str,
        id: &str,
        value: &[u8],
    ) -> std::result::Result<Instance, String> {
        let update: Update =
            serde_json::from_slice(value).map_err(|e| format!("not an endpoints update: {e}"))?;
        if update.op != 0 {
            return Err(format!("op {} is not an add", update.op));
        }
        if update.addr.is_empty() {
            return Err("Addr is empty".into());
        }
        let mut instance = Instance::new(service, id, update.addr);
        instance.metadata = json_metadata(update.metadata);
        fields_from_metadata(&mut instance);
        Ok(instance)
    }

    fn encode(&self, instance: &Instance, _registered_at: Option<SystemTime>) -> Result<Vec<u8>> {
        check_writable(instance)?;
        let meta = metadata_with_fields(instance, true);
        to_json(&Update {
            op: 0,
            addr: host_port(&instance.addr).to_string(),
            metadata: (!meta.is_empty()).then(|| serde_json::json!(meta)),
        })
    }

    fn new_id(&self, _service: &str, addr: &str) -> String {
        host_port(addr).to_string()
    }
}
