//! `auto`: reads any layout, telling them apart per value.
//!
//! For prefixes where several registries write side by side (a fleet
//! migrating from one library to another), or when the layout is not
//! known. The value decides, not the key:
//!
//! - a JSON object with `schema` (or `addr`): muster's;
//! - with `Op`/`Addr`: etcd's naming package;
//! - with `nodes`: go-micro's;
//! - with `endpoints` (and no `nodes`): kratos's;
//! - not JSON, a bare `host:port`: go-zero's.
//!
//! Anything else is counted as malformed under `auto`. Writing with `auto`
//! writes muster's layout.

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{EtcdNaming, GoMicro, GoZero, Kratos, Layout, LayoutKind, Muster};
use crate::error::Result;
use crate::instance::Instance;

/// Any layout, detected per value.
#[derive(Debug, Clone, Copy, Default)]
pub struct Auto;

impl Auto {
    /// Which layout wrote `value`, if any of them could have.
    pub fn detect(value: &[u8]) -> Option<LayoutKind> {
        let trimmed = value.trim_ascii_start();
        if trimmed.first() != Some(&b'{') {
            let s = std::str::from_utf8(value).ok()?;
            return super::go_zero::is_bare_addr(s).then_some(LayoutKind::GoZero);
        }
        // Only which top-level fields are there matters: skim the values
        // without building them.
        let f: Fields = serde_json::from_slice(value).ok()?;
        if f.schema.is_some() || f.addr.is_some() {
            Some(LayoutKind::Muster)
        } else if f.op.is_some() || f.go_addr.is_some() {
            Some(LayoutKind::EtcdNaming)
        } else if f.nodes.is_some() {
            Some(LayoutKind::GoMicro)
        } else if f.endpoints.is_some() {
            Some(LayoutKind::Kratos)
        } else {
            None
        }
    }
}

/// The fields that tell the layouts apart.
#[derive(Deserialize)]
struct Fields {
    schema: Option<IgnoredAny>,
    addr: Option<IgnoredAny>,
    #[serde(rename = "Op")]
    op: Option<IgnoredAny>,
    #[serde(rename = "Addr")]
    go_addr: Option<IgnoredAny>,
    nodes: Option<IgnoredAny>,
    endpoints: Option<IgnoredAny>,
}

impl Layout for Auto {
    fn kind(&self) -> LayoutKind {
        LayoutKind::Auto
    }

    fn default_prefix(&self) -> &'static str {
        Muster.default_prefix()
    }

    fn default_ttl(&self) -> Duration {
        Muster.default_ttl()
    }

    fn has_status(&self) -> bool {
        true
    }

    fn decode(
        &self,
        service: &str,
        id: &str,
        value: &[u8],
    ) -> std::result::Result<Instance, String> {
        match Auto::detect(value) {
            Some(LayoutKind::Muster) => Muster.decode(service, id, value),
            Some(LayoutKind::EtcdNaming) => EtcdNaming.decode(service, id, value),
            Some(LayoutKind::GoMicro) => GoMicro.decode(service, id, value),
            Some(LayoutKind::Kratos) => Kratos.decode(service, id, value),
            Some(LayoutKind::GoZero) => GoZero.decode(service, id, value),
            Some(LayoutKind::Auto) | None => Err("no known layout reads this value".into()),
        }
    }

    fn encode(&self, instance: &Instance, registered_at: Option<SystemTime>) -> Result<Vec<u8>> {
        Muster.encode(instance, registered_at)
    }

    fn new_id(&self, service: &str, addr: &str) -> String {
        Muster.new_id(service, addr)
    }
}
