//! Choosing the algorithm at run time.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    ConsistentHash, Filter, LoadBalancer, Picked, PowerOfTwo, Random, RoundRobin, SmoothWeighted,
};
use crate::{Error, Instance};

/// A load-balancing algorithm, as named in configuration.
///
/// Parses from and displays as `round-robin`, `random`, `weighted`, `p2c`
/// or `hash` (parsing ignores case and also accepts `weighted-round-robin`,
/// `power-of-two` and `consistent-hash`); (de)serializes the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum BalancerKind {
    /// [`RoundRobin`].
    #[default]
    RoundRobin,
    /// [`Random`].
    Random,
    /// [`SmoothWeighted`].
    Weighted,
    /// [`PowerOfTwo`].
    PowerOfTwo,
    /// [`ConsistentHash`].
    ConsistentHash,
}

impl BalancerKind {
    /// Every kind, in declaration order.
    pub const ALL: [BalancerKind; 5] = [
        BalancerKind::RoundRobin,
        BalancerKind::Random,
        BalancerKind::Weighted,
        BalancerKind::PowerOfTwo,
        BalancerKind::ConsistentHash,
    ];

    /// The configuration name.
    pub const fn as_str(self) -> &'static str {
        match self {
            BalancerKind::RoundRobin => "round-robin",
            BalancerKind::Random => "random",
            BalancerKind::Weighted => "weighted",
            BalancerKind::PowerOfTwo => "p2c",
            BalancerKind::ConsistentHash => "hash",
        }
    }
}

impl fmt::Display for BalancerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BalancerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let lower = s.trim().to_ascii_lowercase();
        if let Some(kind) = BalancerKind::ALL.into_iter().find(|k| k.as_str() == lower) {
            return Ok(kind);
        }
        match lower.as_str() {
            "weighted-round-robin" => Ok(BalancerKind::Weighted),
            "power-of-two" => Ok(BalancerKind::PowerOfTwo),
            "consistent-hash" => Ok(BalancerKind::ConsistentHash),
            _ => Err(Error::invalid(
                "load balancer",
                format!(
                    "unknown algorithm {s:?}; expected one of {}",
                    BalancerKind::ALL.map(BalancerKind::as_str).join(", ")
                ),
            )),
        }
    }
}

impl TryFrom<String> for BalancerKind {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<BalancerKind> for &'static str {
    fn from(kind: BalancerKind) -> Self {
        kind.as_str()
    }
}

/// A [`LoadBalancer`] whose algorithm is chosen at run time (e.g. per
/// route from a configuration file).
///
/// An enum rather than a boxed trait object: a pick is one `match` and a
/// direct, inlinable call.
#[derive(Debug)]
pub enum AnyLoadBalancer {
    /// Round-robin.
    RoundRobin(LoadBalancer<RoundRobin>),
    /// Uniformly random.
    Random(LoadBalancer<Random>),
    /// Smooth weighted round-robin.
    Weighted(LoadBalancer<SmoothWeighted>),
    /// Power of two choices.
    PowerOfTwo(LoadBalancer<PowerOfTwo>),
    /// Consistent hashing.
    ConsistentHash(LoadBalancer<ConsistentHash>),
}

macro_rules! dispatch {
    ($self:expr, $lb:ident => $e:expr) => {
        match $self {
            AnyLoadBalancer::RoundRobin($lb) => $e,
            AnyLoadBalancer::Random($lb) => $e,
            AnyLoadBalancer::Weighted($lb) => $e,
            AnyLoadBalancer::PowerOfTwo($lb) => $e,
            AnyLoadBalancer::ConsistentHash($lb) => $e,
        }
    };
}

impl AnyLoadBalancer {
    /// A load balancer of `kind` admitting what `filter` selects, with no
    /// instances yet.
    pub fn new(kind: BalancerKind, filter: Filter) -> Self {
        match kind {
            BalancerKind::RoundRobin => Self::RoundRobin(LoadBalancer::with_filter(filter)),
            BalancerKind::Random => Self::Random(LoadBalancer::with_filter(filter)),
            BalancerKind::Weighted => Self::Weighted(LoadBalancer::with_filter(filter)),
            BalancerKind::PowerOfTwo => Self::PowerOfTwo(LoadBalancer::with_filter(filter)),
            BalancerKind::ConsistentHash => Self::ConsistentHash(LoadBalancer::with_filter(filter)),
        }
    }

    /// The algorithm.
    pub fn kind(&self) -> BalancerKind {
        match self {
            Self::RoundRobin(_) => BalancerKind::RoundRobin,
            Self::Random(_) => BalancerKind::Random,
            Self::Weighted(_) => BalancerKind::Weighted,
            Self::PowerOfTwo(_) => BalancerKind::PowerOfTwo,
            Self::ConsistentHash(_) => BalancerKind::ConsistentHash,
        }
    }

    /// See [`LoadBalancer::filter`].
    pub fn filter(&self) -> &Filter {
        dispatch!(self, lb => lb.filter())
    }

    /// See [`LoadBalancer::update`].
    pub fn update(&self, all: &[Arc<Instance>]) {
        dispatch!(self, lb => lb.update(all))
    }

    /// See [`LoadBalancer::pick`].
    #[inline]
    pub fn pick(&self) -> Option<Picked> {
        dispatch!(self, lb => lb.pick())
    }

    /// See [`LoadBalancer::pick_key`].
    #[inline]
    pub fn pick_key(&self, key: &[u8]) -> Option<Picked> {
        dispatch!(self, lb => lb.pick_key(key))
    }

    /// See [`LoadBalancer::len`].
    pub fn len(&self) -> usize {
        dispatch!(self, lb => lb.len())
    }

    /// See [`LoadBalancer::is_empty`].
    pub fn is_empty(&self) -> bool {
        dispatch!(self, lb => lb.is_empty())
    }

    /// See [`LoadBalancer::instances`].
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        dispatch!(self, lb => lb.instances())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_util::instances;

    #[test]
    fn names_round_trip() {
        for kind in BalancerKind::ALL {
            assert_eq!(kind.to_string().parse::<BalancerKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
            assert_eq!(serde_json::from_str::<BalancerKind>(&json).unwrap(), kind);
        }
        let names: Vec<_> = BalancerKind::ALL.iter().map(|k| k.to_string()).collect();
        assert_eq!(names, ["round-robin", "random", "weighted", "p2c", "hash"]);
        assert_eq!(
            " P2C ".parse::<BalancerKind>().unwrap(),
            BalancerKind::PowerOfTwo
        );
        assert_eq!(
            "consistent-hash".parse::<BalancerKind>().unwrap(),
            BalancerKind::ConsistentHash
        );
    }

    #[test]
    fn unknown_names_are_explained() {
        let err = "least-conn".parse::<BalancerKind>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("least-conn") && msg.contains("p2c"), "{msg}");
        assert!(serde_json::from_str::<BalancerKind>("\"rr\"").is_err());
    }

    #[test]
    fn any_balancer_dispatches() {
        for kind in BalancerKind::ALL {
            let lb = AnyLoadBalancer::new(kind, Filter::new());
            assert_eq!(lb.kind(), kind);
            assert!(lb.is_empty() && lb.pick().is_none());
            lb.update(&instances(3));
            assert_eq!(lb.len(), 3);
            assert_eq!(lb.instances().len(), 3);
            let p = lb.pick().unwrap();
            assert!(p.id.starts_with("i-"));
            assert_eq!(p.is_tracked(), kind == BalancerKind::PowerOfTwo);
            let a = lb.pick_key(b"k").unwrap().id.clone();
            if kind == BalancerKind::ConsistentHash {
                assert_eq!(lb.pick_key(b"k").unwrap().id, a);
            }
        }
    }
}
