//! go-zero's layout, as written by `github.com/zeromicro/go-zero/core/discov`
//! (`publisher.go`: `register` puts `makeEtcdKey(key, id)` =
//! `{key}/{id}` with the bare value under a lease; the subscriber in
//! `internal/registry.go` lists and watches `{key}/`):
//!
//! - key: `{key}/{id}`, where `{key}` is the configured service key (often
//!   `user.rpc`, no prefix) and `{id}` the lease id in decimal, or the id
//!   set with `discov.WithId`;
//! - value: the bare `host:port` go-zero's RPC server listens on;
//! - a lease of 10 s (`TimeToLive`), kept alive; the publisher puts its key
//!   again when it is deleted.
//!
//! A bare address has no room for anything else: version, zone, weight,
//! tags and metadata are not written (and read as defaults). No status: a
//! draining instance's key is removed. muster writes a fixed decimal id
//! (as `WithId` does), so that the key survives a new lease.

use std::time::{Duration, SystemTime};

use super::{Layout, LayoutKind, check_writable, host_port};
use crate::error::{Error, Result};
use crate::instance::Instance;

/// go-zero's layout.
#[derive(Debug, Clone, Copy, Default)]
pub struct GoZero;

impl Layout for GoZero {
    fn kind(&self) -> LayoutKind {
        LayoutKind::GoZero
    }

    fn default_prefix(&self) -> &'static str {
        ""
    }

    fn default_ttl(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn decode(
        &self,
        service: &str,
        id: &str,
        value: &[u8],
    ) -> std::result::Result<Instance, String> {
        let addr = std::str::from_utf8(value).map_err(|_| "not UTF-8".to_string())?;
        if !is_bare_addr(addr) {
            return Err(format!("{:?} is not a bare host:port", truncate(addr)));
        }
        Ok(Instance::new(service, id, addr))
    }

    fn encode(&self, instance: &Instance, _registered_at: Option<SystemTime>) -> Result<Vec<u8>> {
        check_writable(instance)?;
        let addr = host_port(&instance.addr);
        if !is_bare_addr(addr) {
            return Err(Error::invalid(
                "address",
                format!("{:?} has no host:port for go-zero", instance.addr),
            ));
        }
        Ok(addr.as_bytes().to_vec())
    }

    fn new_id(&self, _service: &str, _addr: &str) -> String {
        // A positive int64, as discov.WithId takes.
        fastrand::i64(1..i64::MAX).to_string()
    }
}

/// `host:port`: a non-empty host and a numeric port, nothing else (no
/// whitespace, no scheme, no JSON).
pub(super) fn is_bare_addr(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_[]:%".contains(&b))
}

fn truncate(s: &str) -> &str {
    let end = s.char_indices().nth(40).map_or(s.len(), |(i, _)| i);
    &s[..end]
}
