//! The catalog as DNS looks at it: services by lowercase name, each
//! instance with its address taken apart, its id made a label, its tags
//! and zone lowercased. Built once per catalog snapshot (on the first
//! query after a change), then read by every query without locks.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::Name;
use muster::{CatalogSnapshot, Instance};

use crate::addr::{self, Host};
use crate::names;

/// One instance, ready to answer.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    /// `{label}.{service}.instance.{domain}`, the label its id made a
    /// DNS label, unique within the service.
    pub(crate) name: Name,
    pub(crate) host: Host,
    /// The host as a name, for [`Host::Name`].
    pub(crate) host_name: Option<Name>,
    pub(crate) port: Option<u16>,
    /// SRV weight: the instance's weight (1..=10000).
    pub(crate) weight: u16,
    pub(crate) serving: bool,
    /// Lowercase.
    pub(crate) tags: Vec<String>,
    /// Lowercase; empty when unknown.
    pub(crate) zone: String,
}

impl Record {
    pub(crate) fn ip(&self) -> Option<IpAddr> {
        match self.host {
            Host::Ip(ip) => Some(ip),
            Host::Name(_) => None,
        }
    }

    pub(crate) fn matches(&self, tag: Option<&str>, zone: Option<&str>) -> bool {
        tag.is_none_or(|t| self.tags.iter().any(|x| x == t)) && zone.is_none_or(|z| self.zone == z)
    }
}

/// One service's instances.
#[derive(Debug, Default)]
pub(crate) struct ServiceRecords {
    /// The service name as DNS writes it (lowercase).
    pub(crate) label: String,
    /// Every instance that has a usable address, serving or draining.
    pub(crate) records: Vec<Record>,
    /// Instance label to position in `records`.
    by_label: HashMap<String, usize>,
}

impl ServiceRecords {
    pub(crate) fn instance(&self, label: &str) -> Option<&Record> {
        self.by_label.get(label).map(|i| &self.records[*i])
    }
}

/// How the instances' addresses fared, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AddrCounts {
    /// An IP address: answered as A or AAAA.
    pub(crate) ip: usize,
    /// A host name: SRV targets and instance CNAMEs only.
    pub(crate) name: usize,
    /// No usable host: not served at all.
    pub(crate) unusable: usize,
    /// Instances of services whose names cannot be a DNS label.
    pub(crate) unnamed: usize,
}

/// The whole catalog, for DNS.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// The snapshot this was built from.
    pub(crate) source: Arc<CatalogSnapshot>,
    services: HashMap<String, ServiceRecords>,
    /// Every zone of an instance with a usable address (lowercase).
    zones: HashSet<String>,
    pub(crate) counts: AddrCounts,
}

impl Index {
    /// Indexes `snapshot`, naming instances under `domain`.
    pub(crate) fn build(snapshot: Arc<CatalogSnapshot>, domain: &Name) -> Index {
        let mut index = Index::from_instances(
            snapshot
                .services()
                .values()
                .flat_map(|instances| instances.values().map(|e| &*e.instance)),
            domain,
        );
        index.source = snapshot;
        index
    }

    /// Indexes `instances` (in any order; ids sorted within a service
    /// decide which of two ids differing only in case keeps the plain
    /// label).
    pub(crate) fn from_instances<'a>(
        instances: impl IntoIterator<Item = &'a Instance>,
        domain: &Name,
    ) -> Index {
        let mut index = Index::default();
        let mut sorted: Vec<&Instance> = instances.into_iter().collect();
        sorted.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
        for instance in sorted {
            let service = instance.service.to_ascii_lowercase();
            if !names::is_query_label(&service) {
                index.counts.unnamed += 1;
                continue;
            }
            let Some(target) = addr::parse(&instance.addr) else {
                index.counts.unusable += 1;
                continue;
            };
            let records = index
                .services
                .entry(service.clone())
                .or_insert_with(|| ServiceRecords {
                    label: service,
                    ..Default::default()
                });
            let mut label = names::instance_label(&instance.id);
            if records.by_label.contains_key(&label) {
                label = names::hashed_label(&instance.id);
            }
            if records.by_label.contains_key(&label) {
                // Two ids with the same hash and safe characters: the
                // second has no instance name (it is still answered for
                // its service).
                label = format!("{label}-{}", records.records.len());
            }
            let labels: [&[u8]; 3] = [label.as_bytes(), records.label.as_bytes(), b"instance"];
            let name = Name::from_labels(labels).and_then(|n| n.append_domain(domain));
            let host_name = match &target.host {
                Host::Ip(_) => Ok(None),
                Host::Name(host) => Name::from_labels(host.split('.').map(str::as_bytes)).map(Some),
            };
            let (Ok(name), Ok(host_name)) = (name, host_name) else {
                // Too long with the domain (255 bytes): cannot be named.
                index.counts.unusable += 1;
                continue;
            };
            match target.host {
                Host::Ip(_) => index.counts.ip += 1,
                Host::Name(_) => index.counts.name += 1,
            }
            let zone = instance.zone.to_ascii_lowercase();
            if !zone.is_empty() {
                index.zones.insert(zone.clone());
            }
            records.by_label.insert(label, records.records.len());
            records.records.push(Record {
                name,
                host: target.host,
                host_name,
                port: target.port,
                weight: u16::try_from(instance.weight.max(1)).unwrap_or(u16::MAX),
                serving: instance.is_serving(),
                tags: instance
                    .tags
                    .iter()
                    .map(|t| t.to_ascii_lowercase())
                    .collect(),
                zone,
            });
        }
        index
    }

    /// A service by its lowercase name.
    pub(crate) fn service(&self, name: &str) -> Option<&ServiceRecords> {
        self.services.get(name)
    }

    /// Whether any service has a usable instance.
    pub(crate) fn has_services(&self) -> bool {
        !self.services.is_empty()
    }

    /// Whether an instance is in `zone` (lowercase).
    pub(crate) fn has_zone(&self, zone: &str) -> bool {
        self.zones.contains(zone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_by_lowercase_name_and_label() {
        let instances = [
            Instance::new("User", "U-1", "10.0.0.1:80")
                .with_tag("Canary")
                .with_zone("EU-1"),
            Instance::new("User", "u-1", "10.0.0.2:80"),
            Instance::new("User", "a_b", "api.internal:80"),
            Instance::new("User", "bad", "::::"),
            Instance::new("has.dot", "x", "10.0.0.3:80"),
        ];
        let domain = Name::from_ascii("muster.").unwrap();
        let index = Index::from_instances(&instances, &domain);
        assert_eq!(
            index.counts,
            AddrCounts {
                ip: 2,
                name: 1,
                unusable: 1,
                unnamed: 1
            }
        );
        let user = index.service("user").unwrap();
        assert_eq!(user.records.len(), 3);
        // "U-1" sorts before "u-1": it keeps the plain label.
        let first = user.instance("u-1").unwrap();
        assert_eq!(first.ip(), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(first.tags, ["canary"]);
        assert_eq!(first.name.to_ascii(), "u-1.user.instance.muster.");
        assert!(first.matches(Some("canary"), Some("eu-1")));
        assert!(!first.matches(Some("canary"), Some("us-1")));
        let other = user
            .records
            .iter()
            .find(|r| r.ip() == Some("10.0.0.2".parse().unwrap()))
            .unwrap();
        let name = other.name.to_ascii();
        assert!(
            name.starts_with("u-1-") && name.ends_with(".user.instance.muster."),
            "{name}"
        );
        assert!(index.has_zone("eu-1") && !index.has_zone("EU-1"));
        assert!(index.service("User").is_none());
    }
}
