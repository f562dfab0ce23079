//! kratos's layout, as written by `github.com/go-kratos/kratos/contrib/registry/etcd`
//! (`registry.go`: `registerKey`, `marshal` of `registry.ServiceInstance`
//! from kratos's `registry/registry.go`):
//!
//! - key: `{namespace}/{name}/{id}`, namespace `/microservices` by default,
//!   id a UUID by default;
//! - value: `json.Marshal` of `ServiceInstance`, fields in this order and
//!   none omitted: `{"id","name","version","metadata":{string:string},
//!   "endpoints":["grpc://10.0.0.5:9000","http://10.0.0.5:8000"]}`
//!   (`grpcs`/`https` with TLS; older versions appended `?isSecure=false`,
//!   which is accepted and read);
//! - a lease of 15 s kept alive; deregistration deletes the key.
//!
//! Its watcher re-reads the whole prefix `{namespace}/{name}` (no trailing
//! `/`) on every event and fails the whole lookup on one value it cannot
//! parse, so what muster writes is exactly that JSON and nothing else
//! (muster's zone, weight and tags go into `metadata`). An instance with
//! several endpoints is read with one address: the first `http`/`https`
//! endpoint (what the gateway proxies to), else the first one; every
//! endpoint is kept in the metadata as `endpoint.{scheme}`. No status: a
//! draining instance's key is removed.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{
    Layout, LayoutKind, check_writable, fields_from_metadata, metadata_with_fields, to_json,
    uuid_v4,
};
use crate::error::Result;
use crate::instance::Instance;

/// kratos's layout.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kratos;

/// kratos's `registry.ServiceInstance`.
#[derive(Serialize, Deserialize)]
pub(super) struct ServiceInstance {
    #[serde(default)]
    pub(super) id: String,
    #[serde(default)]
    pub(super) name: String,
    #[serde(default)]
    pub(super) version: String,
    #[serde(default)]
    pub(super) metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub(super) endpoints: Option<Vec<String>>,
}

/// Metadata key prefix of the endpoints kept beside the chosen address.
pub const ENDPOINT_META_PREFIX: &str = "endpoint.";

impl Layout for Kratos {
    fn kind(&self) -> LayoutKind {
        LayoutKind::Kratos
    }

    fn default_prefix(&self) -> &'static str {
        "/microservices"
    }

    fn default_ttl(&self) -> Duration {
        Duration::from_secs(15)
    }

    fn decode(
        &self,
        service: &str,
        id: &str,
        value: &[u8],
    ) -> std::result::Result<Instance, String> {
        let si: ServiceInstance = serde_json::from_slice(value)
            .map_err(|e| format!("not a kratos ServiceInstance: {e}"))?;
        if !si.name.is_empty() && si.name != service {
            return Err(format!(
                "name {:?} is not the key's service {service:?}",
                si.name
            ));
        }
        let endpoints: Vec<String> = si
            .endpoints
            .unwrap_or_default()
            .iter()
            .map(|e| normalize_endpoint(e))
            .filter(|e| !e.is_empty())
            .collect();
        let addr = endpoints
            .iter()
            .find(|e| e.starts_with("http://") || e.starts_with("https://"))
            .or_else(|| endpoints.first())
            .ok_or("no endpoints")?
            .clone();
        let id = if si.id.is_empty() { id } else { &si.id };
        let mut instance = Instance::new(service, id, addr).with_version(si.version);
        instance.metadata = si.metadata.unwrap_or_default();
        fields_from_metadata(&mut instance);
        for e in &endpoints {
            if let Some((scheme, _)) = e.split_once("://") {
                instance
                    .metadata
                    .entry(format!("{ENDPOINT_META_PREFIX}{scheme}"))
                    .or_insert_with(|| e.clone());
            }
        }
        Ok(instance)
    }

    fn encode(&self, instance: &Instance, _registered_at: Option<SystemTime>) -> Result<Vec<u8>> {
        check_writable(instance)?;
        let mut metadata = metadata_with_fields(instance, false);
        // Endpoints read from kratos and written back stay endpoints.
        let mut endpoints = vec![endpoint_url(&instance.addr)];
        metadata.retain(|k, v| match k.strip_prefix(ENDPOINT_META_PREFIX) {
            Some(_) => {
                if !endpoints.contains(v) {
                    endpoints.push(v.clone());
                }
                false
            }
            None => true,
        });
        to_json(&ServiceInstance {
            id: instance.id.clone(),
            name: instance.service.clone(),
            version: instance.version.clone(),
            metadata: Some(metadata),
            endpoints: Some(endpoints),
        })
    }

    fn new_id(&self, _service: &str, _addr: &str) -> String {
        uuid_v4()
    }
}

/// An endpoint without the `?isSecure=` of older kratos versions, whose
/// `true` means the TLS scheme.
fn normalize_endpoint(e: &str) -> String {
    let Some((base, query)) = e.split_once('?') else {
        return e.to_string();
    };
    let secure = query
        .split('&')
        .any(|kv| kv.eq_ignore_ascii_case("isSecure=true"));
    match (secure, base.split_once("://")) {
        (true, Some(("http", rest))) => format!("https://{rest}"),
        (true, Some(("grpc", rest))) => format!("grpcs://{rest}"),
        _ => base.to_string(),
    }
}

/// kratos endpoints are URLs: a bare `host:port` is written as `http://`.
fn endpoint_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}
