//! The instance model and the key schema.
//!
//! An instance of service `S` with id `I` lives at `{prefix}/{S}/{I}`
//! (default prefix [`DEFAULT_PREFIX`]) and its value is versioned JSON:
//!
//! ```json
//! {"schema":1,"addr":"http://10.0.0.7:8080","version":"1.4.2","zone":"eu-1",
//!  "weight":100,"tags":["canary"],"metadata":{"git":"abc123"},"status":"serving",
//!  "registered_at":1795000000000}
//! ```
//!
//! The service name and id come from the key, not the value. Values written
//! by Go clients of etcd's `naming/endpoints` package
//! (`{"Op":0,"Addr":"...","Metadata":...}`) are read too, so a muster caller
//! can discover services registered by Go programs.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The key prefix under which services live unless configured otherwise.
pub const DEFAULT_PREFIX: &str = "/muster/services";
/// The longest service name or instance id accepted.
pub const MAX_NAME_LEN: usize = 128;
/// The longest address accepted.
pub const MAX_ADDR_LEN: usize = 512;
/// The weight an instance gets when none is given.
pub const DEFAULT_WEIGHT: u32 = 100;
/// The largest weight accepted.
pub const MAX_WEIGHT: u32 = 10_000;
/// The largest encoded value accepted (etcd's default request limit is 1.5 MiB;
/// a registry entry should be far smaller).
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// The schema version written in every value.
pub const SCHEMA_VERSION: u32 = 1;

/// Whether an instance takes new traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Takes traffic.
    #[default]
    Serving,
    /// Finishing in-flight work; balancers send it nothing new.
    Draining,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Serving => "serving",
            Status::Draining => "draining",
        })
    }
}

/// One running instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The service it belongs to (no `/`, at most [`MAX_NAME_LEN`] bytes).
    pub service: String,
    /// Unique within the service (no `/`, at most [`MAX_NAME_LEN`] bytes).
    pub id: String,
    /// Where to reach it: `host:port` or a URL.
    pub addr: String,
    /// The version it runs (free-form, often semver); empty when unknown.
    pub version: String,
    /// The zone or region it runs in; empty when unknown.
    pub zone: String,
    /// Relative weight for weighted balancing, 1..=[`MAX_WEIGHT`].
    pub weight: u32,
    /// Free-form labels, e.g. `canary`.
    pub tags: Vec<String>,
    /// Free-form key/value metadata.
    pub metadata: BTreeMap<String, String>,
    /// Serving or draining.
    pub status: Status,
}

impl Instance {
    /// A serving instance with default weight and no labels.
    pub fn new(service: impl Into<String>, id: impl Into<String>, addr: impl Into<String>) -> Self {
        Instance {
            service: service.into(),
            id: id.into(),
            addr: addr.into(),
            version: String::new(),
            zone: String::new(),
            weight: DEFAULT_WEIGHT,
            tags: Vec::new(),
            metadata: BTreeMap::new(),
            status: Status::Serving,
        }
    }

    /// Sets the version.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Sets the zone.
    pub fn with_zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = zone.into();
        self
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Adds a tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds a metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Whether it takes new traffic.
    pub fn is_serving(&self) -> bool {
        self.status == Status::Serving
    }

    /// Whether it carries `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// Checks every field; the error says which one is wrong and why.
    pub fn validate(&self) -> Result<()> {
        validate_name("service name", &self.service)?;
        validate_name("instance id", &self.id)?;
        self.validate_fields()
    }

    fn validate_fields(&self) -> Result<()> {
        if self.addr.trim().is_empty() {
            return Err(Error::invalid("address", "must not be empty"));
        }
        if self.addr.len() > MAX_ADDR_LEN {
            return Err(Error::invalid(
                "address",
                format!("{} bytes, at most {MAX_ADDR_LEN} allowed", self.addr.len()),
            ));
        }
        if self.addr.chars().any(char::is_control) {
            return Err(Error::invalid("address", "contains control characters"));
        }
        if !(1..=MAX_WEIGHT).contains(&self.weight) {
            return Err(Error::invalid(
                "weight",
                format!(
                    "{} is out of range 1..={MAX_WEIGHT} (mark the instance draining to stop traffic)",
                    self.weight
                ),
            ));
        }
        if self.tags.iter().any(|t| t.is_empty()) {
            return Err(Error::invalid("tag", "tags must not be empty"));
        }
        Ok(())
    }

    /// The etcd key of this instance under `prefix`.
    pub fn key(&self, prefix: &str) -> String {
        instance_key(prefix, &self.service, &self.id)
    }

    /// Encodes the value stored in etcd (validating first).
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.encode_registration(None)
    }

    /// Encodes the value with the time of the first registration, as the
    /// [`Registrar`](crate::Registrar) writes it (read back by
    /// [`registered_at`]).
    pub fn encode_registration(&self, registered_at: Option<SystemTime>) -> Result<Vec<u8>> {
        self.validate()?;
        let value = serde_json::to_vec(&StoredValue {
            schema: SCHEMA_VERSION,
            addr: self.addr.clone(),
            version: self.version.clone(),
            zone: self.zone.clone(),
            weight: self.weight,
            tags: self.tags.clone(),
            metadata: self.metadata.clone(),
            status: self.status,
            registered_at: registered_at.map(|t| {
                t.duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }),
        })
        .map_err(|e| Error::invalid("instance", e.to_string()))?;
        if value.len() > MAX_VALUE_LEN {
            return Err(Error::invalid(
                "instance",
                format!(
                    "encoded value is {} bytes, at most {MAX_VALUE_LEN} allowed",
                    value.len()
                ),
            ));
        }
        Ok(value)
    }

    /// Decodes the value at `key` (a key under `prefix`). Accepts muster's
    /// schema and the Go naming package's `{"Op":0,"Addr":...}` form.
    pub fn decode(prefix: &str, key: &[u8], value: &[u8]) -> Result<Instance> {
        let key_str = String::from_utf8_lossy(key);
        let malformed = |reason: String| Error::Malformed {
            key: key_str.to_string(),
            reason,
        };
        let (service, id) = parse_key(prefix, key)
            .ok_or_else(|| malformed(format!("key is not of the form {prefix}/<service>/<id>")))?;
        if value.len() > MAX_VALUE_LEN {
            return Err(malformed(format!(
                "value of {} bytes is too large",
                value.len()
            )));
        }
        let instance = decode_value(&service, &id, value).map_err(malformed)?;
        instance.validate().map_err(|e| malformed(e.to_string()))?;
        Ok(instance)
    }

    /// Checks an instance read from the registry: like [`Instance::validate`]
    /// but with the id as other registries spell it (an address, a UUID;
    /// see [`crate::layout::parse_key`]).
    pub fn validate_decoded(&self) -> Result<()> {
        validate_name("service name", &self.service)?;
        if self.id.is_empty() || self.id.chars().any(char::is_control) {
            return Err(Error::invalid(
                "instance id",
                "empty or with control characters",
            ));
        }
        self.validate_fields()
    }
}

/// Reads muster's value (or the Go naming package's) for `service`/`id`.
pub(crate) fn decode_value(
    service: &str,
    id: &str,
    value: &[u8],
) -> std::result::Result<Instance, String> {
    let instance = match wire_value(value)? {
        WireValue::Muster(v) => {
            if v.schema > SCHEMA_VERSION {
                return Err(format!(
                    "schema {} is newer than this build understands ({SCHEMA_VERSION})",
                    v.schema
                ));
            }
            Instance {
                service: service.to_string(),
                id: id.to_string(),
                addr: v.addr,
                version: v.version,
                zone: v.zone,
                weight: if v.weight == 0 {
                    DEFAULT_WEIGHT
                } else {
                    v.weight
                },
                tags: v.tags,
                metadata: v.metadata,
                status: v.status,
            }
        }
        WireValue::GoNaming(g) => {
            if g.op != 0 {
                return Err(format!("naming op {} is not an add", g.op));
            }
            let mut instance = Instance::new(service, id, g.addr);
            instance.metadata = json_metadata(g.metadata);
            instance
        }
    };
    Ok(instance)
}

/// String metadata from any JSON value: an object's entries (non-strings
/// as their JSON text); anything else, under `metadata`.
pub(crate) fn json_metadata(value: Option<serde_json::Value>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match value {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) => {
            for (k, v) in map {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                out.insert(k, v);
            }
        }
        Some(other) => {
            out.insert("metadata".to_string(), other.to_string());
        }
    }
    out
}

#[derive(Serialize, Deserialize)]
struct StoredValue {
    schema: u32,
    addr: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    zone: String,
    #[serde(default)]
    weight: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tags: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    status: Status,
    /// Unix time of the first registration, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    registered_at: Option<u64>,
}

/// When the instance in `value` was first registered, if its writer said
/// (muster's registrar does; Go's naming package does not).
pub fn registered_at(value: &[u8]) -> Option<SystemTime> {
    #[derive(Deserialize)]
    struct Stamp {
        registered_at: Option<u64>,
    }
    let stamp: Stamp = serde_json::from_slice(value).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_millis(stamp.registered_at?))
}

#[derive(Deserialize)]
struct GoNamingValue {
    #[serde(rename = "Op", default)]
    op: u8,
    #[serde(rename = "Addr")]
    addr: String,
    #[serde(rename = "Metadata", default)]
    metadata: Option<serde_json::Value>,
}

/// A value as either writer stores it.
enum WireValue {
    Muster(StoredValue),
    GoNaming(GoNamingValue),
}

/// Parses `value` as muster's own value, else as the Go naming package's.
/// Two direct parses rather than serde's `untagged`, which first copies
/// the whole document into an intermediate tree (every string allocated
/// once more) on every watch event of every caller.
fn wire_value(value: &[u8]) -> std::result::Result<WireValue, String> {
    let muster = match serde_json::from_slice::<StoredValue>(value) {
        Ok(v) => return Ok(WireValue::Muster(v)),
        Err(e) => e,
    };
    if muster.is_syntax() || muster.is_eof() {
        return Err(format!("not valid JSON: {muster}"));
    }
    serde_json::from_slice::<GoNamingValue>(value)
        .map(WireValue::GoNaming)
        .map_err(|go| {
            format!("neither muster's instance value ({muster}) nor a Go naming entry ({go})")
        })
}

/// Checks a service name or instance id: 1..=[`MAX_NAME_LEN`] bytes of
/// letters, digits, `.`, `_`, `-`, `:` or `@`; no `/`.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(what, "must not be empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(
            what,
            format!("{} bytes, at most {MAX_NAME_LEN} allowed", name.len()),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')))
    {
        return Err(Error::invalid(
            what,
            format!("{name:?} contains {c:?}; use letters, digits, '.', '_', '-', ':' or '@'"),
        ));
    }
    if name == "." || name == ".." {
        return Err(Error::invalid(what, format!("{name:?} is reserved")));
    }
    Ok(())
}

/// Checks a key prefix: starts with `/`, does not end with `/`.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    if !prefix.starts_with('/') || prefix.ends_with('/') || prefix.contains("//") {
        return Err(Error::invalid(
            "prefix",
            format!("{prefix:?} must start with '/', not end with '/', and have no empty segment"),
        ));
    }
    Ok(())
}

/// `{prefix}/{service}/{id}`.
pub fn instance_key(prefix: &str, service: &str, id: &str) -> String {
    format!("{prefix}/{service}/{id}")
}

/// `{prefix}/{service}/`: the trailing `/` keeps `user` from matching
/// `user_admin` (etcd issue 15022).
pub fn service_prefix(prefix: &str, service: &str) -> String {
    format!("{prefix}/{service}/")
}

/// `{prefix}/`: every service's keys, as the catalog lists them (the
/// trailing `/` keeps `/muster/services` from matching
/// `/muster/services_old`).
pub fn prefix_dir(prefix: &str) -> String {
    format!("{}/", prefix.trim_end_matches('/'))
}

pub use muster_proto::prefix_range_end;

/// Splits `{prefix}/{service}/{id}` into service and id.
pub fn parse_key(prefix: &str, key: &[u8]) -> Option<(String, String)> {
    split_key(prefix, key).map(|(service, id)| (service.to_string(), id.to_string()))
}

/// [`parse_key`] without copying: the service and id as slices of `key`.
pub(crate) fn split_key<'k>(prefix: &str, key: &'k [u8]) -> Option<(&'k str, &'k str)> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
    let (service, id) = rest.split_once('/')?;
    if validate_name("service name", service).is_err() || validate_name("instance id", id).is_err()
    {
        return None;
    }
    Some((service, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let i = Instance::new("user", "u-1", "http://127.0.0.1:8080")
            .with_zone("eu-1")
            .with_version("1.2.3")
            .with_tag("canary")
            .with_metadata("git", "abc")
            .with_weight(7);
        let key = i.key(DEFAULT_PREFIX);
        assert_eq!(key, "/muster/services/user/u-1");
        let back = Instance::decode(DEFAULT_PREFIX, key.as_bytes(), &i.encode().unwrap()).unwrap();
        assert_eq!(back, i);
    }

    #[test]
    fn reads_go_naming_values() {
        let v = br#"{"Op":0,"Addr":"10.0.0.1:50051","Metadata":{"w":3}}"#;
        let i = Instance::decode("/svc", b"/svc/greeter/10.0.0.1:50051", v).unwrap();
        assert_eq!(i.addr, "10.0.0.1:50051");
        assert_eq!(i.id, "10.0.0.1:50051");
        assert_eq!(i.metadata["w"], "3");
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "a/b", "..", "sp ace", &"x".repeat(129)] {
            assert!(validate_name("service name", bad).is_err(), "{bad:?}");
        }
        assert!(validate_name("service name", "user-service.v2").is_ok());
        let err = Instance::new("user", "1", "").validate().unwrap_err();
        assert!(err.to_string().contains("address"), "{err}");
        let err = Instance::new("user", "1", "x:1")
            .with_weight(0)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("weight"), "{err}");
    }

    #[test]
    fn malformed_values_are_errors_not_panics() {
        for v in [
            &b"not json"[..],
            b"{}",
            b"{\"schema\":1}",
            b"{\"schema\":99,\"addr\":\"a\"}",
            b"\xff\xfe",
            b"{\"Op\":1,\"Addr\":\"a\"}",
        ] {
            let e = Instance::decode("/p", b"/p/s/i", v).unwrap_err();
            assert!(matches!(e, Error::Malformed { .. }), "{e}");
        }
        assert!(Instance::decode("/p", b"/p/s", b"{}").is_err());
        assert!(Instance::decode("/p", b"/other/s/i", b"{}").is_err());
        // The error says what was wrong, for either writer's format.
        let e = Instance::decode("/p", b"/p/s/i", b"{\"schema\":").unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let e = Instance::decode("/p", b"/p/s/i", br#"{"schema":1}"#).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("neither muster's instance value"), "{text}");
        assert!(text.contains("`addr`") && text.contains("`Addr`"), "{text}");
    }

    #[test]
    fn prefix_ranges() {
        assert_eq!(prefix_range_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"\xff"), vec![0]);
        assert_eq!(service_prefix("/p", "user"), "/p/user/");
        assert_eq!(
            parse_key("/p", b"/p/user/1"),
            Some(("user".into(), "1".into()))
        );
        assert_eq!(parse_key("/p", b"/p/user/1/extra"), None);
    }
}
