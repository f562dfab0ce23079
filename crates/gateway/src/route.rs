//! The route table: which route a request takes, and the path it is
//! forwarded with.
//!
//! Host-specific routes are tried first, then host-less ones; within each
//! group the longest matching prefix wins. A table is immutable; a reload
//! builds a new one (reusing the load balancers of unchanged routes, so
//! in-flight counts carry over) and swaps it in. Each serving thread has
//! its own copy of the routes (`crate::lane`).

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use muster::balance::{AnyLoadBalancer, BalancerKind};

use crate::config::{HashKey, Route, RouteDefaults};
use crate::error::GatewayError;
use crate::lane;
use crate::metrics::{Metrics, RouteMetrics};
use crate::tls::{TlsClients, Trust};
use crate::upstream::{ServiceState, Upstreams};

/// A route ready to serve.
#[derive(Debug)]
pub(crate) struct ActiveRoute {
    pub(crate) route: Route,
    /// `host prefix` or `prefix`: the metrics label.
    pub(crate) label: String,
    pub(crate) kind: BalancerKind,
    pub(crate) timeout: Duration,
    pub(crate) retries: u32,
    pub(crate) service: Arc<ServiceState>,
    pub(crate) lb: Arc<AnyLoadBalancer>,
    pub(crate) metrics: Arc<RouteMetrics>,
    /// What the service's `https://` instances are verified against.
    pub(crate) trust: Trust,
}

impl ActiveRoute {
    /// Whether `path` falls under the prefix.
    fn matches_path(&self, path: &str) -> bool {
        prefix_matches(&self.route.prefix, path)
    }

    /// The path and query to forward when the prefix is stripped (`None`:
    /// forward them unchanged).
    pub(crate) fn upstream_path(&self, path: &str, query: Option<&str>) -> Option<String> {
        if !self.route.strip_prefix {
            return None;
        }
        let rest = &path[self.route.prefix.len().min(path.len())..];
        let mut out = String::with_capacity(rest.len() + 2 + query.map_or(0, |q| q.len() + 1));
        if !rest.starts_with('/') {
            out.push('/');
        }
        out.push_str(rest);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }

    /// The consistent-hashing key of a request, if the route hashes.
    pub(crate) fn hash_key<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        if self.kind != BalancerKind::ConsistentHash {
            return None;
        }
        match self.route.hash_key.as_ref()? {
            HashKey::Header(name) => headers.get(name.as_str()).map(|v| v.as_bytes()),
            HashKey::Cookie(name) => cookie(headers, name),
        }
    }
}

/// The value of cookie `name`.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    for value in headers.get_all(http::header::COOKIE) {
        for pair in value.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            if let Some(rest) = pair.strip_prefix(name.as_bytes())
                && let Some(v) = rest.strip_prefix(b"=")
            {
                return Some(v);
            }
        }
    }
    None
}

/// Segment-boundary prefix match.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    path.starts_with(prefix)
        && (path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/')
}

/// An immutable set of routes, with one copy per lane (serving thread,
/// see `crate::lane`): each copy's routes are allocations of their own,
/// with their own load balancers, so that a request only touches its own
/// thread's reference counts and in-flight counters.
#[derive(Debug)]
pub(crate) struct RouteTable {
    lanes: Box<[Lane]>,
}

/// One lane's copy of the routes.
#[derive(Debug, Default)]
struct Lane {
    /// Host-specific routes, longest prefix first.
    with_host: Vec<Arc<ActiveRoute>>,
    /// Host-less routes, longest prefix first.
    any_host: Vec<Arc<ActiveRoute>>,
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable {
            lanes: Box::new([Lane::default()]),
        }
    }
}

impl RouteTable {
    /// Builds a table from routes in priority order (on the same host and
    /// prefix the first wins), with `lanes` copies, reusing what `previous`
    /// already had. Fails if a route's upstream CA cannot be loaded.
    pub(crate) fn build(
        routes: &[Route],
        defaults: &RouteDefaults,
        previous: Option<&RouteTable>,
        upstreams: &Upstreams,
        metrics: &Metrics,
        tls: &TlsClients,
    ) -> Result<RouteTable, GatewayError> {
        let lanes = upstreams.lanes();
        let mut table = RouteTable {
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
        };
        let mut seen: Vec<(&str, Option<String>)> = Vec::new();
        for route in routes {
            let host = route.host.as_ref().map(|h| h.to_ascii_lowercase());
            if seen
                .iter()
                .any(|(prefix, h)| *prefix == route.prefix && *h == host)
            {
                tracing::warn!(prefix = %route.prefix, host = ?route.host, "duplicate route ignored");
                continue;
            }
            seen.push((&route.prefix, host.clone()));
            let trust = tls.trust(route.upstream_ca.as_deref()).map_err(|reason| {
                GatewayError::InvalidRoute {
                    route: route.prefix.clone(),
                    reason,
                }
            })?;
            let kind = route.balancer.unwrap_or(defaults.balancer);
            let label = match &host {
                Some(h) => format!("{h}{}", route.prefix),
                None => route.prefix.clone(),
            };
            let route_metrics = metrics.route(&label);
            let mut route = route.clone();
            route.host = host;
            let mut service: Option<Arc<ServiceState>> = None;
            for (i, lane) in table.lanes.iter_mut().enumerate() {
                // Reuse the lane's balancer of an identical route (in-flight
                // counts carry over), or at least the service state.
                let old = previous.and_then(|p| p.lanes.get(i)).and_then(|p| {
                    p.all().find(|r| {
                        r.route.service == route.service
                            && r.kind == kind
                            && r.route.filter == route.filter
                    })
                });
                let (state, lb) = match old {
                    Some(r) => (r.service.clone(), r.lb.clone()),
                    None => {
                        let state = service
                            .get_or_insert_with(|| upstreams.service(&route.service))
                            .clone();
                        let lb = state.balancer(kind, route.filter.clone());
                        (state, lb)
                    }
                };
                service.get_or_insert_with(|| state.clone());
                let active = Arc::new(ActiveRoute {
                    label: label.clone(),
                    kind,
                    timeout: route.timeout.unwrap_or(defaults.timeout),
                    retries: route.retries.unwrap_or(defaults.retries),
                    metrics: route_metrics.clone(),
                    service: state,
                    lb,
                    route: route.clone(),
                    trust: trust.clone(),
                });
                if active.route.host.is_some() {
                    lane.with_host.push(active);
                } else {
                    lane.any_host.push(active);
                }
            }
        }
        for lane in table.lanes.iter_mut() {
            // Stable: equal lengths keep their priority order.
            lane.with_host
                .sort_by_key(|r| std::cmp::Reverse(r.route.prefix.len()));
            lane.any_host
                .sort_by_key(|r| std::cmp::Reverse(r.route.prefix.len()));
        }
        Ok(table)
    }

    /// The routes, for logs.
    pub(crate) fn describe(&self) -> Vec<String> {
        self.lanes[0]
            .all()
            .map(|r| format!("{} -> {}", r.label, r.route.service))
            .collect()
    }

    /// The calling thread's route for a request to `host` (without port)
    /// and `path`.
    pub(crate) fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<ActiveRoute>> {
        self.lanes[lane::current(self.lanes.len())].find(host, path)
    }
}

impl Lane {
    fn all(&self) -> impl Iterator<Item = &Arc<ActiveRoute>> {
        self.with_host.iter().chain(&self.any_host)
    }

    fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<ActiveRoute>> {
        if let Some(host) = host
            && !self.with_host.is_empty()
        {
            let hit = self.with_host.iter().find(|r| {
                r.route
                    .host
                    .as_deref()
                    .is_some_and(|h| h.eq_ignore_ascii_case(host))
                    && r.matches_path(path)
            });
            if hit.is_some() {
                return hit;
            }
        }
        self.any_host.iter().find(|r| r.matches_path(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_on_segments() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/api/", "/api"));
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/", "/"));
    }

    #[test]
    fn cookies_are_found() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            "a=1; session=xyz; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, "session"), Some(&b"xyz"[..]));
        assert_eq!(cookie(&h, "sess"), None);
        assert_eq!(cookie(&h, "b"), Some(&b"2"[..]));
    }
}
