//! go-micro's layout, as written by `go-micro.dev/v4/registry/etcd`
//! (and v2's `github.com/micro/go-micro/v2/registry/etcd`; `etcd.go`:
//! `nodePath`, `encode` of `registry.Service` from `registry/registry.go`):
//!
//! - key: `/micro/registry/{service}/{node id}`, `/` in either part
//!   replaced by `-`; node ids are `{service}-{uuid}`;
//! - value: the JSON of a `Service` holding the one node,
//!   `{"name","version","metadata","endpoints":[...],"nodes":[{"id",
//!   "address","metadata"}]}`;
//! - a lease only when a TTL is set (go-micro servers default to 90 s,
//!   registering again every 30 s); deregistration deletes the key. Its
//!   watcher reads deletes from prev_kv.
//!
//! The node's address is the instance's (`host:port`); the version is the
//! service's; metadata is the node's merged over the service's, with
//! muster's zone, weight and tags in the node's. No status: a draining
//! instance's key is removed.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{
    Layout, LayoutKind, check_writable, fields_from_metadata, host_port, metadata_with_fields,
    to_json, uuid_v4,
};
use crate::error::Result;
use crate::instance::Instance;

/// go-micro's layout.
#[derive(Debug, Clone, Copy, Default)]
pub struct GoMicro;

/// go-micro's `registry.Service`.
#[derive(Serialize, Deserialize)]
pub(super) struct Service {
    #[serde(default)]
    pub(super) name: String,
    #[serde(default)]
    pub(super) version: String,
    #[serde(default)]
    pub(super) metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) endpoints: Option<Vec<serde_json::Value>>,
    pub(super) nodes: Option<Vec<Node>>,
}

/// go-micro's `registry.Node`.
#[derive(Serialize, Deserialize)]
pub(super) struct Node {
    #[serde(default)]
    pub(super) id: String,
    #[serde(default)]
    pub(super) address: String,
    #[serde(default)]
    pub(super) metadata: Option<BTreeMap<String, String>>,
}

impl Layout for GoMicro {
    fn kind(&self) -> LayoutKind {
        LayoutKind::GoMicro
    }

    fn default_prefix(&self) -> &'static str {
        "/micro/registry"
    }

    fn default_ttl(&self) -> Duration {
        Duration::from_secs(90)
    }

    fn decode(
        &self,
        service: &str,
        id: &str,
        value: &[u8],
    ) -> std::result::Result<Instance, String> {
        let s: Service =
            serde_json::from_slice(value).map_err(|e| format!("not a go-micro Service: {e}"))?;
        let nodes = s.nodes.unwrap_or_default();
        let node = match nodes.iter().find(|n| n.id == id) {
            Some(n) => n,
            None => nodes.first().ok_or("no nodes")?,
        };
        if node.address.is_empty() {
            return Err("the node has no address".into());
        }
        let mut instance = Instance::new(service, id, node.address.clone()).with_version(s.version);
        let mut metadata = s.metadata.unwrap_or_default();
        metadata.extend(node.metadata.clone().unwrap_or_default());
        instance.metadata = metadata;
        fields_from_metadata(&mut instance);
        Ok(instance)
    }

    fn encode(&self, instance: &Instance, _registered_at: Option<SystemTime>) -> Result<Vec<u8>> {
        check_writable(instance)?;
        to_json(&Service {
            name: instance.service.clone(),
            version: instance.version.clone(),
            metadata: None,
            endpoints: Some(Vec::new()),
            nodes: Some(vec![Node {
                id: instance.id.clone(),
                address: host_port(&instance.addr).to_string(),
                metadata: Some(metadata_with_fields(instance, false)),
            }]),
        })
    }

    fn new_id(&self, service: &str, _addr: &str) -> String {
        format!("{service}-{}", uuid_v4())
    }
}
