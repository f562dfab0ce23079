//! # muster-dns
//!
//! A DNS interface to muster's discovery, for callers in any language,
//! with Consul's names and conventions. It answers from a
//! [`muster::Catalog`] (every service under a prefix, kept current by a
//! watch), so a query never waits on the registry, and answers keep coming
//! from the last known catalog while the registry is unreachable.
//!
//! ## Names
//!
//! Under the domain (`muster.` by default, [`DnsConfig::domain`]), matched
//! case-insensitively:
//!
//! | name | types | answer |
//! |---|---|---|
//! | `{service}.service.muster` | A, AAAA | the serving instances' addresses, shuffled per answer |
//! | `{service}.service.muster`, `_{service}._tcp.service.muster` | SRV | port and target `{id}.{service}.instance.muster` per serving instance, the target's A/AAAA in the additional section |
//! | `{tag}.{service}.service.muster`, `_{service}._{tag}.service.muster` | A, AAAA, SRV | only instances with that tag |
//! | `{service}.service.{zone}.muster` (and every form above with `.{zone}`) | A, AAAA, SRV | only instances in that zone |
//! | `{id}.{service}.instance.muster` | A, AAAA, SRV | that instance, serving or draining |
//! | `muster` | SOA | the domain's SOA (serial: the catalog's revision) |
//!
//! Draining instances are left out of service answers. An instance's
//! `addr` (`host:port` or a URL) gives the host and the port (from the URL's
//! scheme when not written: 80 for http, 443 for https). Where the host is
//! a name rather than an IP address, the instance is left out of A and AAAA
//! answers (a name cannot hold several CNAMEs, nor a CNAME beside other
//! records; `muster_dns_instances{addr="name"}` counts them), its SRV
//! record targets the host name itself for the client to resolve (as
//! Consul does for services registered with a host name), and its instance
//! name is a CNAME to the host. Ids that are not host-name labels
//! (letters, digits, hyphens, at most 63) are made into one: other
//! characters become `-`, and an 8-digit hash of the id is appended
//! (`10.0.0.1:8080` becomes `10-0-0-1-8080-<hash>`). Service names must be
//! DNS labels (letters, digits, `-`, `_`); other services are not served
//! (`muster_dns_instances{addr="unnamed"}`).
//!
//! ## Answers
//!
//! - TTL [`DnsConfig::ttl`], default 0 as Consul's: callers ask again
//!   rather than cache a moving set.
//! - NXDOMAIN, with the SOA in the authority section, for names under the
//!   domain that hold nothing (an unknown service, a filter nothing
//!   matches, a service whose instances are all draining); NOERROR with no
//!   answer and the SOA for a name that exists without records of the
//!   asked type (AAAA of IPv4-only instances, TXT); REFUSED for names
//!   outside the domain.
//! - UDP answers larger than 512 bytes (without EDNS) or the client's EDNS
//!   payload size (capped at [`DnsConfig::max_udp_payload`]) are cut: the
//!   additional section dropped, then answers from the end until it fits,
//!   with the TC bit set so that the client asks again over TCP, which
//!   gets everything.
//!
//! ## Limits
//!
//! UDP and TCP listen on the same address. Answering never waits, so in
//! flight there is at most one query per UDP task and per TCP connection;
//! TCP connections are limited ([`DnsConfig::max_tcp_connections`], more
//! are closed at once and counted) and closed when idle
//! ([`DnsConfig::tcp_idle_timeout`]). Malformed queries get FORMERR (or
//! nothing, if shorter than a header); responses are never answered.
//!
//! ## Metrics
//!
//! [`DnsServer::render_metrics`] gives the Prometheus text (the metrics are
//! listed in the `metrics` module): queries by type and response code,
//! latency, truncations, drops, TCP connections, catalog staleness.
#![forbid(unsafe_code)]

mod addr;
mod answer;
mod index;
mod metrics;
mod names;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::Name;
use muster::Catalog;
use tokio::task::JoinHandle;

use server::Shared;

/// The domain answered for unless configured otherwise.
pub const DEFAULT_DOMAIN: &str = "muster";
/// Consul's DNS port, the default here too.
pub const DEFAULT_PORT: u16 = 8600;

/// Why the DNS server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The domain is not a DNS name.
    #[error("invalid DNS domain {domain:?}: {reason}")]
    InvalidDomain {
        /// The domain as given.
        domain: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A setting is out of range.
    #[error("invalid DNS setting: {0}")]
    Invalid(String),
    /// The address could not be bound.
    #[error("cannot listen for DNS over {proto} on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// `udp` or `tcp`.
        proto: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// How the DNS server listens and answers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DnsConfig {
    /// Address for both UDP and TCP (port 0: one free port for both).
    /// Default `127.0.0.1:8600`.
    pub listen: SocketAddr,
    /// The domain answered for, `muster` by default (a trailing dot is
    /// optional; several labels are fine: `svc.example.internal`).
    pub domain: String,
    /// TTL of every record, in seconds (also the SOA's negative-caching
    /// TTL). Default 0, as Consul.
    pub ttl: u32,
    /// The largest UDP answer, in bytes, to a client that says (with
    /// EDNS) it takes more than 512. Default 1232, the size that avoids IP
    /// fragmentation on common paths (DNS flag day 2020).
    pub max_udp_payload: u16,
    /// At most this many TCP connections at once; more are closed at once.
    /// Default 256.
    pub max_tcp_connections: usize,
    /// A TCP connection silent this long, or this slow to send one query
    /// or take one answer, is closed. Default 10 s.
    pub tcp_idle_timeout: Duration,
    /// Tasks reading the UDP socket, each answering one datagram at a
    /// time. Default: the number of CPUs (at least 2).
    pub udp_tasks: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            domain: DEFAULT_DOMAIN.to_string(),
            ttl: 0,
            max_udp_payload: 1232,
            max_tcp_connections: 256,
            tcp_idle_timeout: Duration::from_secs(10),
            udp_tasks: std::thread::available_parallelism()
                .map_or(2, std::num::NonZeroUsize::get)
                .max(2),
        }
    }
}

impl DnsConfig {
    /// The defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        DnsConfig {
            listen,
            ..Default::default()
        }
    }

    /// Sets the domain.
    pub fn with_domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = domain.into();
        self
    }

    /// Sets the TTL.
    pub fn with_ttl(mut self, ttl: u32) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the TCP connection limit.
    pub fn with_max_tcp_connections(mut self, max: usize) -> Self {
        self.max_tcp_connections = max;
        self
    }

    /// Sets the TCP idle timeout.
    pub fn with_tcp_idle_timeout(mut self, timeout: Duration) -> Self {
        self.tcp_idle_timeout = timeout;
        self
    }

    /// The domain as a lowercase, fully qualified name.
    fn domain_name(&self) -> Result<Name, Error> {
        let invalid = |reason: String| Error::InvalidDomain {
            domain: self.domain.clone(),
            reason,
        };
        let trimmed = self.domain.trim().trim_end_matches('.');
        if trimmed.is_empty() {
            return Err(invalid("empty (the root cannot be served)".into()));
        }
        if !trimmed.split('.').all(names::is_query_label) {
            return Err(invalid(
                "each label must be 1 to 63 letters, digits, '-' or '_'".into(),
            ));
        }
        let mut name =
            Name::from_ascii(trimmed.to_ascii_lowercase()).map_err(|e| invalid(e.to_string()))?;
        name.set_fqdn(true);
        Ok(name)
    }
}

/// A running DNS server. Dropping it (or [`DnsServer::shutdown`]) stops
/// it and closes its connections.
#[derive(Debug)]
pub struct DnsServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Binds UDP and TCP on [`DnsConfig::listen`] and answers from
    /// `catalog` (however it was built: any prefix, any key layout, several
    /// sources).
    pub async fn start(catalog: Catalog, config: DnsConfig) -> Result<DnsServer, Error> {
        let domain = config.domain_name()?;
        if config.max_tcp_connections == 0 || config.udp_tasks == 0 {
            return Err(Error::Invalid(
                "max_tcp_connections and udp_tasks must be positive".into(),
            ));
        }
        if config.tcp_idle_timeout.is_zero() {
            return Err(Error::Invalid("tcp_idle_timeout must be positive".into()));
        }
        let responder = answer::Responder::new(domain, config.ttl, config.max_udp_payload);
        let shared = Arc::new(Shared::new(catalog, responder));
        let (udp, tcp) = server::bind(config.listen).await?;
        let addr = tcp.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            proto: "tcp",
            source,
        })?;
        let udp = Arc::new(udp);
        let mut tasks: Vec<JoinHandle<()>> = (0..config.udp_tasks)
            .map(|_| tokio::spawn(server::serve_udp(shared.clone(), udp.clone())))
            .collect();
        tasks.push(tokio::spawn(server::serve_tcp(
            shared.clone(),
            tcp,
            server::TcpLimits {
                max_connections: config.max_tcp_connections,
                idle_timeout: config.tcp_idle_timeout,
            },
        )));
        tasks.push(tokio::spawn(server::watchdog(shared.clone())));
        let sources: Vec<String> = shared
            .catalog
            .sources()
            .iter()
            .map(ToString::to_string)
            .collect();
        tracing::info!(
            %addr,
            domain = %shared.responder.domain(),
            sources = %sources.join(","),
            "DNS server ready (UDP and TCP)"
        );
        Ok(DnsServer {
            shared,
            addr,
            tasks,
        })
    }

    /// The address UDP and TCP listen on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The domain answered for, fully qualified (`muster.`).
    pub fn domain(&self) -> String {
        self.shared.responder.domain().to_ascii()
    }

    /// The catalog answers come from.
    pub fn catalog(&self) -> &Catalog {
        &self.shared.catalog
    }

    /// The Prometheus metrics text (see the crate docs).
    pub fn render_metrics(&self) -> String {
        self.shared.render_metrics()
    }

    /// A handle that renders this server's metrics, for an HTTP handler
    /// that outlives borrowing the server.
    pub fn metrics(&self) -> DnsMetrics {
        DnsMetrics(self.shared.clone())
    }

    /// Stops listening and closes every connection.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Renders a [`DnsServer`]'s metrics; cheap to clone. Keeps the catalog
/// alive, not the server.
#[derive(Debug, Clone)]
pub struct DnsMetrics(Arc<Shared>);

impl DnsMetrics {
    /// The Prometheus metrics text.
    pub fn render(&self) -> String {
        self.0.render_metrics()
    }
}
