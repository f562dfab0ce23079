//! Key layouts: how a registry entry is spelled in etcd.
//!
//! muster's own layout is one of several in use on etcd. Go fleets register
//! with etcd's `naming/endpoints` package, kratos, go-zero or go-micro, each
//! with its own value format. A [`Layout`] reads and writes one of them, so
//! that a muster caller sees a Go fleet and a Go caller sees a muster
//! service, one service at a time.
//!
//! Every layout here keeps an instance at `{prefix}/{service}/{id}` (the
//! prefix may be empty: go-zero and etcd's naming package often use bare
//! `service/id` keys); what differs is the prefix their library uses by
//! default, the value, the lease TTL, and whether the value can say that
//! an instance is draining:
//!
//! | layout        | default prefix     | value                                   | TTL  | draining |
//! |---------------|--------------------|-----------------------------------------|------|----------|
//! | `muster`      | `/muster/services` | muster's JSON ([`crate::instance`])     | 10 s | status   |
//! | `etcd-naming` | (none)             | `{"Op":0,"Addr":..,"Metadata":..}`      | none | removed  |
//! | `kratos`      | `/microservices`   | `{"id","name","version","metadata","endpoints"}` | 15 s | removed |
//! | `go-zero`     | (none)             | bare `host:port`                        | 10 s | removed  |
//! | `go-micro`    | `/micro/registry`  | a `Service` JSON holding one node       | 90 s | removed  |
//!
//! `auto` ([`Auto`]) reads any of them, telling them apart by the value.
//!
//! An instance read from any layout becomes the same [`Instance`]. Where a
//! layout has no field for what muster keeps (zone, weight, tags), it is
//! read from and written to the instance's string metadata under the keys
//! [`META_ZONE`], [`META_WEIGHT`] and [`META_TAGS`], which is where Go
//! services conventionally put them (kratos's weighted balancer reads
//! `weight` there). Layouts with no status remove a draining instance's key
//! instead of marking it: Go callers cannot be told "no new work" any other
//! way, and a removed key is what makes them stop picking it.
//!
//! A value a layout cannot parse is skipped, logged and counted
//! ([`render_metrics`]: `muster_discovery_malformed_total{layout}`); the rest
//! of the service is still served.

mod auto;
mod etcd_naming;
mod go_micro;
mod go_zero;
mod kratos;
mod muster;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

pub use auto::Auto;
pub use etcd_naming::EtcdNaming;
pub use go_micro::GoMicro;
pub use go_zero::GoZero;
pub use kratos::Kratos;
pub use muster::Muster;

use crate::error::{Error, Result};
use crate::instance::{DEFAULT_WEIGHT, Instance, MAX_VALUE_LEN, Status};

/// Metadata key holding the zone in layouts without a zone field.
pub const META_ZONE: &str = "zone";
/// Metadata key holding the weight in layouts without a weight field.
pub const META_WEIGHT: &str = "weight";
/// Metadata key holding the tags, comma-separated, in layouts without tags.
pub const META_TAGS: &str = "tags";
/// Metadata key holding the version in layouts without a version field.
pub const META_VERSION: &str = "version";

/// One registry's spelling of an instance; see the module docs.
pub trait Layout: Send + Sync + fmt::Debug + 'static {
    /// Which layout this is.
    fn kind(&self) -> LayoutKind;

    /// The prefix its library keeps services under by default.
    fn default_prefix(&self) -> &'static str;

    /// The lease TTL its library registers with by default.
    fn default_ttl(&self) -> Duration;

    /// Whether a value can say an instance is draining (otherwise a
    /// draining instance's key is removed).
    fn has_status(&self) -> bool {
        false
    }

    /// Reads the value at `{prefix}/{service}/{id}`. The error says why the
    /// value is not one of this layout's.
    fn decode(
        &self,
        service: &str,
        id: &str,
        value: &[u8],
    ) -> std::result::Result<Instance, String>;

    /// The value its library would write for `instance` (checked first).
    /// `registered_at` is kept where the layout has room for it.
    fn encode(&self, instance: &Instance, registered_at: Option<SystemTime>) -> Result<Vec<u8>>;

    /// An id for a new instance in its library's style (a UUID, the
    /// address, a number).
    fn new_id(&self, service: &str, addr: &str) -> String;
}

/// The layouts muster knows, by name (`--layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum LayoutKind {
    /// muster's own ([`Muster`]).
    #[default]
    Muster,
    /// etcd's `naming/endpoints` package ([`EtcdNaming`]).
    EtcdNaming,
    /// kratos's `contrib/registry/etcd` ([`Kratos`]).
    Kratos,
    /// go-zero's `core/discov` ([`GoZero`]).
    GoZero,
    /// go-micro's `registry/etcd` ([`GoMicro`]).
    GoMicro,
    /// Any of them, detected per key ([`Auto`]).
    Auto,
}

impl LayoutKind {
    /// Every layout, in `--layout`'s order.
    pub const ALL: [LayoutKind; 6] = [
        LayoutKind::Muster,
        LayoutKind::EtcdNaming,
        LayoutKind::Kratos,
        LayoutKind::GoZero,
        LayoutKind::GoMicro,
        LayoutKind::Auto,
    ];

    /// Its name, as `--layout` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            LayoutKind::Muster => "muster",
            LayoutKind::EtcdNaming => "etcd-naming",
            LayoutKind::Kratos => "kratos",
            LayoutKind::GoZero => "go-zero",
            LayoutKind::GoMicro => "go-micro",
            LayoutKind::Auto => "auto",
        }
    }

    /// The layout itself.
    pub fn layout(self) -> &'static dyn Layout {
        match self {
            LayoutKind::Muster => &Muster,
            LayoutKind::EtcdNaming => &EtcdNaming,
            LayoutKind::Kratos => &Kratos,
            LayoutKind::GoZero => &GoZero,
            LayoutKind::GoMicro => &GoMicro,
            LayoutKind::Auto => &Auto,
        }
    }

    /// The prefix its library uses by default.
    pub fn default_prefix(self) -> &'static str {
        self.layout().default_prefix()
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for LayoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LayoutKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<LayoutKind> {
        LayoutKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = LayoutKind::ALL.iter().map(|k| k.as_str()).collect();
                Error::invalid(
                    "layout",
                    format!("{s:?} is not one of {}", names.join(", ")),
                )
            })
    }
}

/// A watched prefix and how its values are spelled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Source {
    /// The layout of its values.
    pub layout: LayoutKind,
    /// The key prefix, without a trailing `/`; may be empty.
    pub prefix: String,
}

impl Source {
    /// `layout` under its library's default prefix.
    pub fn new(layout: LayoutKind) -> Source {
        Source {
            layout,
            prefix: layout.default_prefix().to_string(),
        }
    }

    /// `layout` under `prefix`.
    pub fn with_prefix(layout: LayoutKind, prefix: impl Into<String>) -> Source {
        Source {
            layout,
            prefix: prefix.into(),
        }
    }

    /// Checks the prefix: muster's own layout wants a leading `/` (as it
    /// always has); the others take any [`validate_prefix`] accepts.
    pub fn validate(&self) -> Result<()> {
        match self.layout {
            LayoutKind::Muster => crate::instance::validate_prefix(&self.prefix),
            _ => validate_prefix(&self.prefix),
        }
    }

    /// The key of one instance.
    pub fn key(&self, service: &str, id: &str) -> String {
        key(&self.prefix, service, id)
    }

    /// The keys of one service: `{prefix}/{service}/`.
    pub fn service_dir(&self, service: &str) -> String {
        service_dir(&self.prefix, service)
    }

    /// The keys of every service: `{prefix}/` (everything for an empty
    /// prefix).
    pub fn dir(&self) -> String {
        dir(&self.prefix)
    }

    /// Reads one entry: its key (service and id) and its value. `None` for a
    /// key not of the form `{prefix}/{service}/{id}`; an error (already
    /// counted in [`render_metrics`]) for a value the layout cannot read.
    pub fn decode(&self, key: &[u8], value: &[u8]) -> Option<Result<Instance>> {
        let (service, id) = self.split_key(key)?;
        Some(decode_counted(self.layout, service, id, key, value))
    }
}

impl Source {
    /// Splits one of its keys into service and id ([`parse_key`]; muster's
    /// own layout takes only ids that are muster names).
    pub fn parse_key(&self, key: &[u8]) -> Option<(String, String)> {
        self.split_key(key)
            .map(|(service, id)| (service.to_string(), id.to_string()))
    }

    /// [`Source::parse_key`] without copying: slices of `key`.
    pub(crate) fn split_key<'k>(&self, key: &'k [u8]) -> Option<(&'k str, &'k str)> {
        match self.layout {
            LayoutKind::Muster if !self.prefix.is_empty() => {
                crate::instance::split_key(&self.prefix, key)
            }
            _ => split_key(&self.prefix, key),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.layout, self.prefix)
    }
}

impl FromStr for Source {
    type Err = Error;

    /// `LAYOUT` (its default prefix) or `LAYOUT:PREFIX`.
    fn from_str(s: &str) -> Result<Source> {
        let source = match s.split_once(':') {
            Some((layout, prefix)) => Source::with_prefix(layout.parse()?, prefix),
            None => Source::new(s.parse()?),
        };
        source.validate()?;
        Ok(source)
    }
}

/// Checks a key prefix: empty, or no trailing `/` and no empty segment
/// (a leading `/` is usual but not required: Go services often use bare
/// names).
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    let inner = prefix.strip_prefix('/').unwrap_or(prefix);
    if inner.is_empty() || prefix.ends_with('/') || inner.contains("//") {
        return Err(Error::invalid(
            "prefix",
            format!("{prefix:?} must not end with '/' nor have an empty segment"),
        ));
    }
    if prefix.chars().any(char::is_control) {
        return Err(Error::invalid("prefix", "contains control characters"));
    }
    Ok(())
}

/// `{prefix}/{service}/{id}` (`{service}/{id}` for an empty prefix).
pub fn key(prefix: &str, service: &str, id: &str) -> String {
    format!("{}{service}/{id}", dir(prefix))
}

/// `{prefix}/{service}/`: the trailing `/` keeps `user` from matching
/// `user_admin` (etcd issue 15022).
pub fn service_dir(prefix: &str, service: &str) -> String {
    format!("{}{service}/", dir(prefix))
}

/// `{prefix}/`, or the empty string (every key) for an empty prefix.
pub fn dir(prefix: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    }
}

/// The longest id accepted from another registry's key.
pub const MAX_FOREIGN_ID_LEN: usize = 512;

/// Splits `{prefix}/{service}/{id}` into service and id. The service must be
/// a valid muster name; the id is the rest of the key (other registries
/// use addresses, which may hold `/` or `[`), non-empty, at most
/// [`MAX_FOREIGN_ID_LEN`] bytes, without control characters.
pub fn parse_key(prefix: &str, key: &[u8]) -> Option<(String, String)> {
    split_key(prefix, key).map(|(service, id)| (service.to_string(), id.to_string()))
}

/// [`parse_key`] without copying: the service and id as slices of `key`.
fn split_key<'k>(prefix: &str, key: &'k [u8]) -> Option<(&'k str, &'k str)> {
    let key = std::str::from_utf8(key).ok()?;
    // What `dir(prefix)` strips, without building it.
    let prefix = prefix.trim_end_matches('/');
    let rest = if prefix.is_empty() {
        key
    } else {
        key.strip_prefix(prefix)?.strip_prefix('/')?
    };
    let (service, id) = rest.split_once('/')?;
    crate::instance::validate_name("service name", service).ok()?;
    if id.is_empty() || id.len() > MAX_FOREIGN_ID_LEN || id.chars().any(char::is_control) {
        return None;
    }
    Some((service, id))
}

fn decode_counted(
    layout: LayoutKind,
    service: &str,
    id: &str,
    key: &[u8],
    value: &[u8],
) -> Result<Instance> {
    let result = if value.len() > MAX_VALUE_LEN {
        Err(format!("value of {} bytes is too large", value.len()))
    } else {
        layout
            .layout()
            .decode(service, id, value)
            .and_then(|i| i.validate_decoded().map(|()| i).map_err(|e| e.to_string()))
    };
    result.map_err(|reason| {
        MALFORMED[layout.index()].fetch_add(1, Ordering::Relaxed);
        Error::Malformed {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: format!("not a {layout} entry: {reason}"),
        }
    })
}

static MALFORMED: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// How many values `layout` could not read so far, in this process.
pub fn malformed_total(layout: LayoutKind) -> u64 {
    MALFORMED[layout.index()].load(Ordering::Relaxed)
}

/// This process's layout metrics in Prometheus text format:
/// `muster_discovery_malformed_total{layout}`.
pub fn render_metrics(out: &mut String) {
    use std::fmt::Write;
    out.push_str(
        "# HELP muster_discovery_malformed_total Registry values skipped because their layout could not read them.\n\
         # TYPE muster_discovery_malformed_total counter\n",
    );
    for kind in LayoutKind::ALL {
        let _ = writeln!(
            out,
            "muster_discovery_malformed_total{{layout=\"{kind}\"}} {}",
            malformed_total(kind)
        );
    }
}

/// Reads zone, weight, tags and (when `version` is empty) the version from
/// string metadata into the instance's fields, leaving the metadata as it
/// was. A weight that is not a number in range is ignored (the default
/// weight applies): another registry's metadata is not ours to reject.
fn fields_from_metadata(instance: &mut Instance) {
    let meta = &instance.metadata;
    if let Some(zone) = meta.get(META_ZONE) {
        instance.zone = zone.clone();
    }
    if let Some(w) = meta
        .get(META_WEIGHT)
        .and_then(|w| w.trim().parse::<u32>().ok())
        && (1..=crate::instance::MAX_WEIGHT).contains(&w)
    {
        instance.weight = w;
    }
    if let Some(tags) = meta.get(META_TAGS) {
        instance.tags = tags
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect();
    }
    if instance.version.is_empty()
        && let Some(v) = meta.get(META_VERSION)
    {
        instance.version = v.clone();
    }
}

/// The instance's metadata with zone, weight and tags added, for layouts
/// without those fields (and the version when `with_version`).
fn metadata_with_fields(instance: &Instance, with_version: bool) -> BTreeMap<String, String> {
    let mut meta = instance.metadata.clone();
    if !instance.zone.is_empty() {
        meta.insert(META_ZONE.into(), instance.zone.clone());
    }
    if instance.weight != DEFAULT_WEIGHT {
        meta.insert(META_WEIGHT.into(), instance.weight.to_string());
    }
    if !instance.tags.is_empty() {
        meta.insert(META_TAGS.into(), instance.tags.join(","));
    }
    if with_version && !instance.version.is_empty() {
        meta.insert(META_VERSION.into(), instance.version.clone());
    }
    meta
}

/// Checks an instance before writing it in a layout without a status: a
/// draining instance is not written but removed, so encoding one is a bug.
fn check_writable(instance: &Instance) -> Result<()> {
    instance.validate()?;
    if instance.status == Status::Draining {
        return Err(Error::invalid(
            "status",
            "this layout has no draining status; the registrar removes the key instead",
        ));
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    let bytes = serde_json::to_vec(value).map_err(|e| Error::invalid("instance", e.to_string()))?;
    if bytes.len() > MAX_VALUE_LEN {
        return Err(Error::invalid(
            "instance",
            format!(
                "encoded value is {} bytes, at most {MAX_VALUE_LEN} allowed",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// `host:port` of an address that may be a URL (`grpc://h:p/x` → `h:p`).
fn host_port(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// A random (version 4) UUID, as kratos and go-micro generate ids.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = fastrand::u128(..).to_le_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests;
