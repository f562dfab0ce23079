//! muster's own layout: `{prefix}/{service}/{id}` holding muster's
//! versioned JSON (see [`crate::instance`] for the schema). It is the only
//! layout with every field muster keeps (zone, weight, tags, status,
//! first-registration time). It also reads values written by etcd's
//! naming package, as muster always has.

use std::time::{Duration, SystemTime};

use super::{Layout, LayoutKind};
use crate::error::Result;
use crate::instance::{self, DEFAULT_PREFIX, Instance};

/// muster's layout.
#[derive(Debug, Clone, Copy, Default)]
pub struct Muster;

impl Layout for Muster {
    fn kind(&self) -> LayoutKind {
        LayoutKind::Muster
    }

    fn default_prefix(&self) -> &'static str {
        DEFAULT_PREFIX
    }

    fn default_ttl(&self) -> Duration {
        Duration::from_secs(10)
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
        instance::decode_value(service, id, value)
    }

    fn encode(&self, instance: &Instance, registered_at: Option<SystemTime>) -> Result<Vec<u8>> {
        instance.encode_registration(registered_at)
    }

    fn new_id(&self, _service: &str, _addr: &str) -> String {
        format!("{:016x}", fastrand::u64(..))
    }
}
