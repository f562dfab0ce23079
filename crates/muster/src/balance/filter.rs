//! Which instances a load balancer may pick.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Instance;

/// Decides which instances are eligible.
///
/// An instance is eligible when it is serving (draining instances never
/// are), lies in [`zone`](Self::zone) if set, runs [`version`](Self::version)
/// if set, and carries every tag in [`tags`](Self::tags). Then, if
/// [`prefer_zone`](Self::prefer_zone) is set and some eligible instance is in
/// that zone, only those are used; when none is, all eligible instances are
/// (fail over to other zones rather than to nothing).
///
/// Deserializes from configuration with every field optional:
///
/// ```
/// let f: muster::balance::Filter =
///     serde_json::from_str(r#"{"tags":["canary"],"prefer_zone":"eu-1"}"#).unwrap();
/// assert_eq!(f, muster::balance::Filter::new().tag("canary").prefer_zone("eu-1"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filter {
    /// Only instances in this zone (exact match).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Only instances running this version (exact match).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Only instances carrying all of these tags.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Prefer instances in this zone, falling back to all eligible instances
    /// when none is there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefer_zone: Option<String>,
}

impl Filter {
    /// A filter admitting every serving instance.
    pub fn new() -> Self {
        Filter::default()
    }

    /// Requires the zone.
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// Requires the version.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Requires a tag (in addition to any already required).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Prefers a zone.
    pub fn prefer_zone(mut self, zone: impl Into<String>) -> Self {
        self.prefer_zone = Some(zone.into());
        self
    }

    /// Whether `instance` meets the zone, version and tag requirements
    /// (status and zone preference aside).
    pub fn matches(&self, instance: &Instance) -> bool {
        self.zone.as_ref().is_none_or(|z| *z == instance.zone)
            && self.version.as_ref().is_none_or(|v| *v == instance.version)
            && self.tags.iter().all(|t| instance.has_tag(t))
    }

    /// Whether `instance` is serving and [`matches`](Self::matches).
    pub fn admits(&self, instance: &Instance) -> bool {
        instance.is_serving() && self.matches(instance)
    }

    /// The eligible instances among `all`, in the order given.
    pub fn select(&self, all: &[Arc<Instance>]) -> Vec<Arc<Instance>> {
        let eligible = all.iter().filter(|i| self.admits(i));
        if let Some(zone) = &self.prefer_zone {
            let preferred: Vec<_> = eligible
                .clone()
                .filter(|i| i.zone == *zone)
                .cloned()
                .collect();
            if !preferred.is_empty() {
                return preferred;
            }
        }
        eligible.cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Status;

    fn inst(id: &str, zone: &str, version: &str, tags: &[&str]) -> Arc<Instance> {
        let mut i = Instance::new("svc", id, "a:1")
            .with_zone(zone)
            .with_version(version);
        for t in tags {
            i = i.with_tag(*t);
        }
        Arc::new(i)
    }

    fn ids(v: &[Arc<Instance>]) -> Vec<&str> {
        v.iter().map(|i| i.id.as_str()).collect()
    }

    fn set() -> Vec<Arc<Instance>> {
        vec![
            inst("a", "eu-1", "1.0", &[]),
            inst("b", "eu-1", "2.0", &["canary"]),
            inst("c", "us-1", "2.0", &["canary", "gpu"]),
            Arc::new(
                Instance {
                    status: Status::Draining,
                    ..(*inst("d", "eu-1", "1.0", &[])).clone()
                }
                .with_tag("canary"),
            ),
        ]
    }

    #[test]
    fn filters_by_zone_version_and_tags() {
        let all = set();
        assert_eq!(ids(&Filter::new().select(&all)), ["a", "b", "c"]);
        assert_eq!(ids(&Filter::new().zone("eu-1").select(&all)), ["a", "b"]);
        assert_eq!(ids(&Filter::new().version("2.0").select(&all)), ["b", "c"]);
        assert_eq!(ids(&Filter::new().tag("canary").select(&all)), ["b", "c"]);
        assert_eq!(
            ids(&Filter::new().tag("canary").tag("gpu").select(&all)),
            ["c"]
        );
        assert!(Filter::new().zone("ap-1").select(&all).is_empty());
    }

    #[test]
    fn draining_is_never_eligible() {
        let all = set();
        let f = Filter::new();
        assert!(f.matches(&all[3]));
        assert!(!f.admits(&all[3]));
        assert!(!ids(&Filter::new().tag("canary").zone("eu-1").select(&all)).contains(&"d"));
    }

    #[test]
    fn zone_preference_falls_back() {
        let all = set();
        assert_eq!(ids(&Filter::new().prefer_zone("us-1").select(&all)), ["c"]);
        assert_eq!(
            ids(&Filter::new().prefer_zone("ap-1").select(&all)),
            ["a", "b", "c"]
        );
        // The preference applies after the requirements.
        assert_eq!(
            ids(&Filter::new()
                .version("1.0")
                .prefer_zone("us-1")
                .select(&all)),
            ["a"]
        );
    }

    #[test]
    fn deserializes_from_config() {
        let f: Filter = serde_json::from_str(r#"{"zone":"eu-1","version":"2.0"}"#).unwrap();
        assert_eq!(f, Filter::new().zone("eu-1").version("2.0"));
        assert_eq!(serde_json::from_str::<Filter>("{}").unwrap(), Filter::new());
        assert!(serde_json::from_str::<Filter>(r#"{"zones":"x"}"#).is_err());
    }
}
