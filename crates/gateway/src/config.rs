//! What the gateway is told: listeners, routes, defaults, passive health.
//!
//! Routes come from [`GatewayConfig::routes`] (e.g. command-line flags)
//! and/or a TOML file ([`GatewayConfig::routes_file`]) that is re-read
//! whenever it changes. The file looks like this:
//!
//! ```toml
//! # Optional: defaults for the routes of this file.
//! [defaults]
//! balancer = "p2c"
//! timeout = "30s"
//! # upstream_ca = "/etc/muster/ca.pem"   # for https:// instances
//!
//! # Optional: HTTPS on the listener, as --tls-cert/--tls-key (which win
//! # when both are given). Read at start; the files' contents are re-read
//! # as they change, the paths only on restart.
//! [tls]
//! cert = "/etc/muster/gateway.pem"
//! key = "/etc/muster/gateway-key.pem"
//!
//! [[route]]
//! prefix = "/api/users"     # longest matching prefix wins
//! service = "user"
//! strip_prefix = true       # /api/users/42 is sent as /42
//!
//! [[route]]
//! prefix = "/"
//! host = "shop.example.com" # only for this Host (port ignored)
//! service = "shop"
//! balancer = "hash"
//! hash_key = { header = "x-user" }   # or { cookie = "session" }
//! timeout = "5s"
//! retries = 0
//! filter = { tags = ["canary"], prefer_zone = "eu-1" }
//!
//! [[route]]
//! prefix = "/billing"
//! service = "billing"       # instances registered as https://host:port
//! upstream_ca = "/etc/muster/billing-ca.pem"  # CA that signs their certificates
//! ```
//!
//! TLS (set on [`GatewayConfig`], or with `muster gateway`'s flags):
//!
//! * [`GatewayConfig::tls_cert`] and [`GatewayConfig::tls_key`] (`--tls-cert`,
//!   `--tls-key`) turn the main listener into HTTPS, offering HTTP/2 and
//!   HTTP/1.1 by ALPN. The files are checked every
//!   [`GatewayConfig::tls_reload_interval`]: a new pair is used for new
//!   connections, a broken one is logged and the old pair kept. A
//!   plaintext request on the TLS port is answered `400`. The admin
//!   listener stays plaintext.
//! * Instances registered with an `https://host:port` address are dialled
//!   over TLS (ALPN `http/1.1`), verified against the route's
//!   [`Route::upstream_ca`], else [`GatewayConfig::upstream_ca`]
//!   (`--upstream-cacert`), else the system's roots, for the name `host`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use muster::balance::{BalancerKind, Filter};
use muster::parse_duration;
use serde::{Deserialize, Deserializer};

use crate::error::GatewayError;

/// The whole configuration of a gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where to listen for HTTP/1.1 and h2c (port 0: any free port).
    pub listen: SocketAddr,
    /// An optional second listener answering only `/metrics` and the
    /// health path (for scrapers and probes kept off the public port).
    pub admin_listen: Option<SocketAddr>,
    /// Routes given directly (e.g. by flags). They come before the file's
    /// routes: on the same host and prefix, these win.
    pub routes: Vec<Route>,
    /// A TOML routes file, re-read when it changes (see the module docs).
    pub routes_file: Option<PathBuf>,
    /// How often the routes file is checked for changes.
    pub reload_interval: Duration,
    /// Defaults for every route that does not set its own.
    pub defaults: RouteDefaults,
    /// Passive health checking (ejection of failing instances).
    pub health: HealthConfig,
    /// Connect timeout towards upstream instances.
    pub connect_timeout: Duration,
    /// How long idle upstream connections are kept in the pool.
    pub pool_idle_timeout: Duration,
    /// A client connection with no request in progress is closed after
    /// this long without a new request: idle keep-alive connections, and
    /// request heads that never complete.
    pub client_idle_timeout: Duration,
    /// The path the gateway answers itself with `200 ok` on every listener
    /// (`None`: only on the admin listener, at `/healthz`).
    pub health_path: Option<String>,
    /// The path of the Prometheus metrics on the main listener (`None`:
    /// only on the admin listener, at `/metrics`).
    pub metrics_path: Option<String>,
    /// Serving threads (0: one per CPU). Each runs its own event loop and
    /// upstream connection pool; client connections are spread over them.
    pub workers: usize,
    /// How long [`GatewayHandle::shutdown`](crate::GatewayHandle::shutdown)
    /// waits for requests in progress before closing their connections.
    pub drain_timeout: Duration,
    /// The certificate chain (PEM) of the main listener: with
    /// [`GatewayConfig::tls_key`], the listener speaks HTTPS (HTTP/2 and
    /// HTTP/1.1 by ALPN) instead of plaintext HTTP/1.1 and h2c. The admin
    /// listener stays plaintext.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of [`GatewayConfig::tls_cert`].
    pub tls_key: Option<PathBuf>,
    /// How often the certificate and key files are checked for a new pair
    /// (a rotated pair is used for new connections; open ones keep theirs).
    pub tls_reload_interval: Duration,
    /// The CA bundle (PEM) that signs the certificates of `https://`
    /// instances, for routes that set no [`Route::upstream_ca`] (`None`:
    /// the system's roots).
    pub upstream_ca: Option<PathBuf>,
}

impl GatewayConfig {
    /// A gateway on `listen` with no routes yet and default settings.
    pub fn new(listen: SocketAddr) -> Self {
        GatewayConfig {
            listen,
            admin_listen: None,
            routes: Vec::new(),
            routes_file: None,
            reload_interval: Duration::from_secs(1),
            defaults: RouteDefaults::default(),
            health: HealthConfig::default(),
            connect_timeout: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(90),
            client_idle_timeout: Duration::from_secs(60),
            health_path: Some("/healthz".to_string()),
            metrics_path: None,
            drain_timeout: Duration::from_secs(30),
            workers: 0,
            tls_cert: None,
            tls_key: None,
            tls_reload_interval: Duration::from_secs(5),
            upstream_ca: None,
        }
    }

    /// Serves HTTPS with this certificate chain and key (PEM files).
    pub fn with_tls(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls_cert = Some(cert.into());
        self.tls_key = Some(key.into());
        self
    }

    /// Adds a route.
    pub fn with_route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// Sets the routes file.
    pub fn with_routes_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.routes_file = Some(path.into());
        self
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig::new(SocketAddr::from(([127, 0, 0, 1], 8080)))
    }
}

/// Settings used by routes that do not set their own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteDefaults {
    /// The load-balancing algorithm (default power of two choices on
    /// in-flight requests).
    pub balancer: BalancerKind,
    /// Time allowed until the upstream's response headers, retries
    /// included (default 30 s); past it the client gets 504.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// How many times a failed request may be retried on another instance
    /// (default 1; see [`Route::retries`]).
    pub retries: u32,
}

impl Default for RouteDefaults {
    fn default() -> Self {
        RouteDefaults {
            balancer: BalancerKind::PowerOfTwo,
            timeout: Duration::from_secs(30),
            retries: 1,
        }
    }
}

/// Passive health checking: instances that keep failing are ejected from
/// the pool for a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive failures (connect errors, errors before a response,
    /// timeouts, 5xx answers) that eject an instance (0: never eject).
    pub failures: u32,
    /// How long the first ejection lasts; each further ejection without a
    /// success in between doubles it.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            failures: 3,
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(60),
        }
    }
}

/// One route: requests whose path starts with `prefix` (and whose host is
/// `host`, if set) go to `service`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The path prefix, starting with `/`. It matches on segment
    /// boundaries: `/api` matches `/api` and `/api/x` but not `/apix`
    /// (a prefix ending in `/` matches anything below it).
    pub prefix: String,
    /// Only requests for this host (case-insensitive, port ignored).
    /// Host-specific routes are tried before host-less ones.
    #[serde(default)]
    pub host: Option<String>,
    /// The service whose instances serve the route.
    pub service: String,
    /// Remove the prefix before forwarding (`/api/x` → `/x`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// The load-balancing algorithm (default: [`RouteDefaults::balancer`]).
    #[serde(default)]
    pub balancer: Option<BalancerKind>,
    /// What consistent hashing hashes (only with `hash`): without it, or
    /// when a request lacks it, the instance is picked at random.
    #[serde(default)]
    pub hash_key: Option<HashKey>,
    /// Which instances may serve the route (zone, version, tags).
    #[serde(default)]
    pub filter: Filter,
    /// Time until the response headers (default:
    /// [`RouteDefaults::timeout`]).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    /// Retries on another instance (default: [`RouteDefaults::retries`]).
    /// Only a request that failed to connect, or an idempotent request
    /// (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) whose body was not sent
    /// yet and that failed before any response, is retried.
    #[serde(default)]
    pub retries: Option<u32>,
    /// The CA bundle (PEM) that signs the certificates of the service's
    /// `https://` instances (default: [`GatewayConfig::upstream_ca`], else
    /// the system's roots). Read when the routes are loaded: a missing or
    /// malformed file makes the routes invalid.
    #[serde(default)]
    pub upstream_ca: Option<PathBuf>,
}

/// What a consistent-hashing route hashes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum HashKey {
    /// The value of a request header.
    Header(String),
    /// The value of a cookie.
    Cookie(String),
}

impl Route {
    /// A route from `prefix` to `service` with default settings.
    pub fn new(prefix: impl Into<String>, service: impl Into<String>) -> Self {
        Route {
            prefix: prefix.into(),
            host: None,
            service: service.into(),
            strip_prefix: false,
            balancer: None,
            hash_key: None,
            filter: Filter::default(),
            timeout: None,
            retries: None,
            upstream_ca: None,
        }
    }

    /// Only for requests to `host`.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Strips the prefix before forwarding.
    pub fn strip_prefix(mut self) -> Self {
        self.strip_prefix = true;
        self
    }

    /// Sets the load-balancing algorithm.
    pub fn balancer(mut self, kind: BalancerKind) -> Self {
        self.balancer = Some(kind);
        self
    }

    /// Consistent hashing on a request header's value.
    pub fn hash_by_header(mut self, name: impl Into<String>) -> Self {
        self.balancer = Some(BalancerKind::ConsistentHash);
        self.hash_key = Some(HashKey::Header(name.into()));
        self
    }

    /// Consistent hashing on a cookie's value.
    pub fn hash_by_cookie(mut self, name: impl Into<String>) -> Self {
        self.balancer = Some(BalancerKind::ConsistentHash);
        self.hash_key = Some(HashKey::Cookie(name.into()));
        self
    }

    /// Sets the instance filter.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets how many retries are allowed.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = Some(retries);
        self
    }

    /// Verifies the service's `https://` instances against this CA bundle.
    pub fn upstream_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.upstream_ca = Some(ca.into());
        self
    }

    /// Checks the route: prefix, host, service name, hash key.
    pub fn validate(&self) -> Result<(), GatewayError> {
        let bad = |reason: String| GatewayError::InvalidRoute {
            route: self.prefix.clone(),
            reason,
        };
        if !self.prefix.starts_with('/') {
            return Err(bad("the prefix must start with '/'".into()));
        }
        if self.prefix.contains(['?', '#']) || self.prefix.chars().any(|c| c.is_whitespace()) {
            return Err(bad("the prefix must be a plain path".into()));
        }
        muster::instance::validate_name("service name", &self.service)
            .map_err(|e| bad(e.to_string()))?;
        if let Some(host) = &self.host
            && (host.is_empty() || host.contains(['/', ' ']))
        {
            return Err(bad(format!("invalid host {host:?}")));
        }
        if let Some(key) = &self.hash_key {
            let name = match key {
                HashKey::Header(n) | HashKey::Cookie(n) => n,
            };
            let header_ok =
                !matches!(key, HashKey::Header(_)) || http::HeaderName::from_str(name).is_ok();
            if name.is_empty() || !header_ok {
                return Err(bad(format!("invalid hash key name {name:?}")));
            }
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(bad("the timeout must be positive".into()));
        }
        if self
            .upstream_ca
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(bad("the upstream CA path is empty".into()));
        }
        Ok(())
    }
}

impl FromStr for Route {
    type Err = GatewayError;

    /// Parses the flag form `/prefix=service[,option...]` with options
    /// `strip`, `host=NAME`, `balancer=KIND`, `hash-header=NAME`,
    /// `hash-cookie=NAME`, `timeout=DURATION`, `retries=N`, `tag=T`,
    /// `zone=Z`, `prefer-zone=Z`, `version=V`, `upstream-ca=FILE`.
    fn from_str(s: &str) -> Result<Self, GatewayError> {
        let bad = |reason: String| GatewayError::InvalidRoute {
            route: s.to_string(),
            reason,
        };
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let (prefix, service) = head
            .split_once('=')
            .ok_or_else(|| bad("expected /prefix=service[,option...]".into()))?;
        let mut route = Route::new(prefix.trim(), service.trim());
        for opt in parts {
            let opt = opt.trim();
            let (key, value) = opt.split_once('=').unwrap_or((opt, ""));
            match key {
                "strip" | "strip-prefix" | "strip_prefix" => route.strip_prefix = true,
                "host" => route.host = Some(value.to_string()),
                "balancer" | "lb" => {
                    route.balancer = Some(value.parse().map_err(|e| bad(format!("{e}")))?)
                }
                "hash-header" => route = route.hash_by_header(value),
                "hash-cookie" => route = route.hash_by_cookie(value),
                "timeout" => route.timeout = Some(parse_duration(value).map_err(bad)?),
                "retries" => {
                    route.retries = Some(
                        value
                            .parse()
                            .map_err(|_| bad(format!("bad retries {value:?}")))?,
                    )
                }
                "tag" => route.filter.tags.push(value.to_string()),
                "zone" => route.filter.zone = Some(value.to_string()),
                "prefer-zone" => route.filter.prefer_zone = Some(value.to_string()),
                "version" => route.filter.version = Some(value.to_string()),
                "upstream-ca" => route.upstream_ca = Some(PathBuf::from(value)),
                _ => return Err(bad(format!("unknown option {opt:?}"))),
            }
        }
        route.validate()?;
        Ok(route)
    }
}

/// The contents of a routes file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesFile {
    /// Defaults for this file's routes (fields left out keep the gateway's).
    #[serde(default)]
    pub defaults: Option<FileDefaults>,
    /// The routes.
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    /// The listener's certificate and key (HTTPS), unless the
    /// configuration names them ([`GatewayConfig::tls_cert`]).
    #[serde(default)]
    pub tls: Option<FileTls>,
}

/// `[tls]` of a routes file: the listener's certificate, as `--tls-cert`
/// and `--tls-key`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// The certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// `[defaults]` of a routes file: each field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDefaults {
    /// See [`RouteDefaults::balancer`].
    #[serde(default)]
    pub balancer: Option<BalancerKind>,
    /// See [`RouteDefaults::timeout`].
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    /// See [`RouteDefaults::retries`].
    #[serde(default)]
    pub retries: Option<u32>,
    /// See [`Route::upstream_ca`]: for this file's routes that set none.
    #[serde(default)]
    pub upstream_ca: Option<PathBuf>,
}

impl RoutesFile {
    /// Parses and validates a routes file's text.
    pub fn parse(text: &str) -> Result<RoutesFile, String> {
        let file: RoutesFile = toml::from_str(text).map_err(|e| e.to_string())?;
        for r in &file.routes {
            r.validate().map_err(|e| e.to_string())?;
        }
        Ok(file)
    }

    /// Reads, parses and validates a routes file.
    pub fn load(path: &Path) -> Result<RoutesFile, GatewayError> {
        let text = std::fs::read_to_string(path).map_err(|e| GatewayError::RoutesFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        RoutesFile::parse(&text).map_err(|reason| GatewayError::RoutesFile {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// The file's routes with its `[defaults]` filled in.
    pub fn resolved_routes(&self) -> Vec<Route> {
        let d = self.defaults.clone().unwrap_or_default();
        self.routes
            .iter()
            .cloned()
            .map(|mut r| {
                r.balancer = r.balancer.or(d.balancer);
                r.timeout = r.timeout.or(d.timeout);
                r.retries = r.retries.or(d.retries);
                r.upstream_ca = r.upstream_ca.or_else(|| d.upstream_ca.clone());
                r
            })
            .collect()
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_routes_parse() {
        let r: Route = "/api/users=user,strip,hash-header=x-user,timeout=5s,retries=0"
            .parse()
            .unwrap();
        assert_eq!(r.prefix, "/api/users");
        assert_eq!(r.service, "user");
        assert!(r.strip_prefix);
        assert_eq!(r.balancer, Some(BalancerKind::ConsistentHash));
        assert_eq!(r.hash_key, Some(HashKey::Header("x-user".into())));
        assert_eq!(r.timeout, Some(Duration::from_secs(5)));
        assert_eq!(r.retries, Some(0));
        assert!("/x".parse::<Route>().is_err());
        assert!("x=svc".parse::<Route>().is_err());
        assert!("/x=svc,bogus".parse::<Route>().is_err());
        assert!("/x=bad name".parse::<Route>().is_err());
        assert!("/x=svc,balancer=nope".parse::<Route>().is_err());
    }

    #[test]
    fn file_parses_with_defaults() {
        let f = RoutesFile::parse(
            r#"
            [defaults]
            balancer = "round-robin"
            timeout = "2s"

            [[route]]
            prefix = "/a"
            service = "a"
            strip_prefix = true

            [[route]]
            prefix = "/"
            host = "h.example"
            service = "b"
            balancer = "hash"
            hash_key = { cookie = "session" }
            filter = { tags = ["canary"] }
            timeout = "150ms"
            "#,
        )
        .unwrap();
        let routes = f.resolved_routes();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].balancer, Some(BalancerKind::RoundRobin));
        assert_eq!(routes[0].timeout, Some(Duration::from_secs(2)));
        assert_eq!(routes[1].balancer, Some(BalancerKind::ConsistentHash));
        assert_eq!(routes[1].hash_key, Some(HashKey::Cookie("session".into())));
        assert_eq!(routes[1].timeout, Some(Duration::from_millis(150)));
        assert_eq!(routes[1].filter.tags, ["canary"]);
        assert!(RoutesFile::parse("[[route]]\nprefix = \"/a\"").is_err());
        assert!(RoutesFile::parse("[[route]]\nprefix = \"a\"\nservice = \"s\"").is_err());
        assert!(
            RoutesFile::parse("[[route]]\nprefix = \"/a\"\nservice = \"s\"\ntimeout = \"1\"")
                .is_err()
        );
        assert!(RoutesFile::parse("").unwrap().routes.is_empty());
    }

    #[test]
    fn upstream_cas_parse() {
        let r: Route = "/b=billing,upstream-ca=/etc/ca.pem".parse().unwrap();
        assert_eq!(r.upstream_ca, Some(PathBuf::from("/etc/ca.pem")));
        assert!("/b=billing,upstream-ca=".parse::<Route>().is_err());
        let f = RoutesFile::parse(
            r#"
            [defaults]
            upstream_ca = "/etc/default-ca.pem"

            [[route]]
            prefix = "/a"
            service = "a"

            [[route]]
            prefix = "/b"
            service = "b"
            upstream_ca = "/etc/b-ca.pem"
            "#,
        )
        .unwrap();
        let routes = f.resolved_routes();
        assert_eq!(
            routes[0].upstream_ca,
            Some(PathBuf::from("/etc/default-ca.pem"))
        );
        assert_eq!(routes[1].upstream_ca, Some(PathBuf::from("/etc/b-ca.pem")));
    }
}
