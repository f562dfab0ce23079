//! The route table: which route a request takes, and the path it is
//! forwarded with.
//!
//! Host-specific routes are tried first, then host-less ones; within each
//! group the longest matching prefix wins. A table is immutable; a reload
//! builds a new one (reusing the load balancers of unchanged routes, so
//! in-flight counts carry over) and swaps it in.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use muster::balance::{AnyLoadBalancer, BalancerKind};

use crate::config::{HashKey, Route, RouteDefaults};
use crate::error::GatewayError;
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

/// An immutable set of routes.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    /// Host-specific routes, longest prefix first.
    with_host: Vec<Arc<ActiveRoute>>,
    /// Host-less routes, longest prefix first.
    any_host: Vec<Arc<ActiveRoute>>,
}

impl RouteTable {
    /// Builds a table from routes in priority order (on the same host and
    /// prefix the first wins), reusing what `previous` already had. Fails
    /// if a route's upstream CA cannot be loaded.
    pub(crate) fn build(
        routes: &[Route],
        defaults: &RouteDefaults,
        previous: Option<&RouteTable>,
        upstreams: &Upstreams,
        metrics: &Metrics,
        tls: &TlsClients,
    ) -> Result<RouteTable, GatewayError> {
        let mut table = RouteTable::default();
        for route in routes {
            let host = route.host.as_ref().map(|h| h.to_ascii_lowercase());
            let exists = table.with_host.iter().chain(&table.any_host).any(|r| {
                r.route.prefix == route.prefix
                    && r.route.host.as_ref().map(|h| h.to_ascii_lowercase()) == host
            });
            if exists {
                tracing::warn!(prefix = %route.prefix, host = ?route.host, "duplicate route ignored");
                continue;
            }
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
            // Reuse the balancer of an identical route (in-flight counts
            // carry over), or at least the service state.
            let old = previous.and_then(|p| {
                p.all().find(|r| {
                    r.route.service == route.service
                        && r.kind == kind
                        && r.route.filter == route.filter
                })
            });
            let (service, lb) = match old {
                Some(r) => (r.service.clone(), r.lb.clone()),
                None => {
                    let service = upstreams.service(&route.service);
                    let lb = service.balancer(kind, route.filter.clone());
                    (service, lb)
                }
            };
            let mut route = route.clone();
            route.host = host;
            let active = Arc::new(ActiveRoute {
                label: label.clone(),
                kind,
                timeout: route.timeout.unwrap_or(defaults.timeout),
                retries: route.retries.unwrap_or(defaults.retries),
                metrics: metrics.route(&label),
                service,
                lb,
                route,
                trust,
            });
            if active.route.host.is_some() {
                table.with_host.push(active);
            } else {
                table.any_host.push(active);
            }
        }
        // Stable: equal lengths keep their priority order.
        table
            .with_host
            .sort_by_key(|r| std::cmp::Reverse(r.route.prefix.len()));
        table
            .any_host
            .sort_by_key(|r| std::cmp::Reverse(r.route.prefix.len()));
        Ok(table)
    }

    fn all(&self) -> impl Iterator<Item = &Arc<ActiveRoute>> {
        self.with_host.iter().chain(&self.any_host)
    }

    /// The routes, for logs.
    pub(crate) fn describe(&self) -> Vec<String> {
        self.all()
            .map(|r| format!("{} -> {}", r.label, r.route.service))
            .collect()
    }

    /// The route for a request to `host` (without port) and `path`.
    pub(crate) fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<ActiveRoute>> {
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
