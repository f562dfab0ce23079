//! The names this server answers, after Consul's:
//!
//! | name (under the domain, `muster.` by default) | what |
//! |---|---|
//! | `{service}.service` | the service's serving instances |
//! | `{tag}.{service}.service` | ... carrying `tag` |
//! | `_{service}._tcp.service` | RFC 2782 form of `{service}.service` |
//! | `_{service}._{tag}.service` | RFC 2782 form of `{tag}.{service}.service` |
//! | `{service}.service.{zone}`, and each form above with `.{zone}` | ... in `zone` |
//! | `{id}.{service}.instance` | one instance, by its id made a DNS label |
//!
//! Names are matched case-insensitively.

use std::fmt::Write as _;

/// What a query name asks for, relative to the domain (labels lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// The domain itself.
    Apex,
    /// A service's instances, optionally filtered.
    Service {
        service: String,
        tag: Option<String>,
        zone: Option<String>,
    },
    /// One instance.
    Instance { service: String, id: String },
    /// A name that exists only because names below it do (`service`,
    /// `instance`, `{zone}`, `service.{zone}`, `{service}.instance`):
    /// NOERROR with no records when what it names is known.
    Interior(Interior),
    /// Under the domain, but nothing this server could ever answer.
    Unknown,
}

/// The empty non-terminals of the name space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Interior {
    /// `service` or `instance` under the domain: exists when any service
    /// does.
    Any,
    /// `{zone}` or `service.{zone}`: exists when an instance is in `zone`.
    Zone(String),
    /// `{service}.instance`: exists when the service has instances.
    Service(String),
}

/// Parses `labels` (the query name without the domain, leftmost first,
/// lowercase).
pub(crate) fn parse(labels: &[&str]) -> Lookup {
    match labels {
        [] => Lookup::Apex,
        ["service" | "instance"] => Lookup::Interior(Interior::Any),
        [.., "instance"] => match labels {
            [service, "instance"] => Lookup::Interior(Interior::Service(service.to_string())),
            [id, service, "instance"] => Lookup::Instance {
                service: service.to_string(),
                id: id.to_string(),
            },
            _ => Lookup::Unknown,
        },
        [rest @ .., "service"] => service(rest, None),
        [zone] => Lookup::Interior(Interior::Zone(zone.to_string())),
        ["service", zone] => Lookup::Interior(Interior::Zone(zone.to_string())),
        [rest @ .., "service", zone] => service(rest, Some(zone)),
        _ => Lookup::Unknown,
    }
}

/// The labels before `service`.
fn service(labels: &[&str], zone: Option<&str>) -> Lookup {
    let (service, tag) = match labels {
        [service] => (*service, None),
        // RFC 2782: `_service._proto`; as Consul, `_tcp` means no filter
        // and anything else is a tag.
        [service, proto] if service.starts_with('_') && proto.starts_with('_') => {
            let tag = &proto[1..];
            (&service[1..], (tag != "tcp").then_some(tag))
        }
        [tag, service] => (*service, Some(*tag)),
        _ => return Lookup::Unknown,
    };
    if service.is_empty() || tag.is_some_and(str::is_empty) {
        return Lookup::Unknown;
    }
    Lookup::Service {
        service: service.to_string(),
        tag: tag.map(str::to_string),
        zone: zone.map(str::to_string),
    }
}

/// Whether `s` is a label that can be typed in a query: 1 to 63 bytes of
/// letters, digits, hyphens and underscores.
pub(crate) fn is_query_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The longest label.
const MAX_LABEL: usize = 63;

/// An instance id as a host-name label (letters, digits and hyphens, not
/// at either end, 63 bytes at most), lowercase: the id itself when it
/// already is one; otherwise its characters made safe (anything else
/// becomes `-`), cut to fit, and an 8-digit hash of the exact id appended,
/// so that ids that differ only in the replaced characters still get
/// different labels (`a_b` and `a.b` become `a-b-<hash>`).
pub(crate) fn instance_label(id: &str) -> String {
    let lower = id.to_ascii_lowercase();
    if is_host_label(&lower) {
        return lower;
    }
    hashed_label(id)
}

/// The safe-characters-plus-hash form of [`instance_label`], also used
/// when two ids of one service differ only in case.
pub(crate) fn hashed_label(id: &str) -> String {
    let safe: String = id
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    let safe = safe.trim_matches('-');
    // 63 = up to 54 characters, '-', 8 hex digits.
    let mut label: String = safe.chars().take(MAX_LABEL - 9).collect();
    let trimmed = label.trim_end_matches('-').len();
    label.truncate(trimmed);
    if label.is_empty() {
        label.push('i');
    }
    let _ = write!(label, "-{:08x}", fnv1a(id.as_bytes()));
    label
}

/// A host-name label (RFC 1123): letters, digits, hyphens, not starting
/// or ending with a hyphen, 1 to 63 bytes.
fn is_host_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// 32-bit FNV-1a: stable across processes and versions (labels are names
/// callers may keep).
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(service: &str, tag: Option<&str>, zone: Option<&str>) -> Lookup {
        Lookup::Service {
            service: service.into(),
            tag: tag.map(Into::into),
            zone: zone.map(Into::into),
        }
    }

    #[test]
    fn consul_forms() {
        assert_eq!(parse(&["user", "service"]), svc("user", None, None));
        assert_eq!(
            parse(&["canary", "user", "service"]),
            svc("user", Some("canary"), None)
        );
        assert_eq!(
            parse(&["_user", "_tcp", "service"]),
            svc("user", None, None)
        );
        assert_eq!(
            parse(&["_user", "_canary", "service"]),
            svc("user", Some("canary"), None)
        );
        assert_eq!(
            parse(&["user", "service", "eu-1"]),
            svc("user", None, Some("eu-1"))
        );
        assert_eq!(
            parse(&["canary", "user", "service", "eu-1"]),
            svc("user", Some("canary"), Some("eu-1"))
        );
        assert_eq!(
            parse(&["_user", "_tcp", "service", "eu-1"]),
            svc("user", None, Some("eu-1"))
        );
        assert_eq!(
            parse(&["u-1", "user", "instance"]),
            Lookup::Instance {
                service: "user".into(),
                id: "u-1".into()
            }
        );
    }

    #[test]
    fn interior_and_unknown() {
        assert_eq!(parse(&[]), Lookup::Apex);
        assert_eq!(parse(&["service"]), Lookup::Interior(Interior::Any));
        assert_eq!(parse(&["instance"]), Lookup::Interior(Interior::Any));
        assert_eq!(
            parse(&["eu-1"]),
            Lookup::Interior(Interior::Zone("eu-1".into()))
        );
        assert_eq!(
            parse(&["service", "eu-1"]),
            Lookup::Interior(Interior::Zone("eu-1".into()))
        );
        assert_eq!(
            parse(&["user", "instance"]),
            Lookup::Interior(Interior::Service("user".into()))
        );
        for unknown in [
            &["a", "b", "c", "service"][..],
            &["x", "u-1", "user", "instance"],
            &["a", "b", "c"],
            &["_", "_tcp", "service"],
            &["_user", "_", "service"],
        ] {
            assert_eq!(parse(unknown), Lookup::Unknown, "{unknown:?}");
        }
    }

    #[test]
    fn instance_labels() {
        assert_eq!(instance_label("u-1"), "u-1");
        assert_eq!(instance_label("User-1"), "user-1");
        let a = instance_label("a_b");
        let b = instance_label("a.b");
        assert!(a.starts_with("a-b-") && b.starts_with("a-b-"), "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(a, instance_label("a_b"), "stable");
        for id in [
            "-x-",
            "____",
            "日本",
            &"x".repeat(128),
            "10.0.0.1:8080",
            "a/b",
        ] {
            let label = instance_label(id);
            assert!(is_host_label(&label), "{id:?} -> {label:?}");
        }
        assert_eq!(instance_label(&"x".repeat(63)), "x".repeat(63));
        assert_eq!(instance_label(&"x".repeat(64)).len(), 63);
    }
}
