//! # muster-dashboard
//!
//! A live, read-only web dashboard of the services in the registry (muster's
//! embedded registry or any etcd v3 cluster).
//!
//! [`Dashboard::start`] follows every service under a prefix with a
//! [`muster::Catalog`]; [`router`] serves it over HTTP:
//!
//! | path | what |
//! | --- | --- |
//! | `/` | the page: HTML, CSS and vanilla JavaScript embedded in the binary (no network, no framework) |
//! | `/api/services` | every service and instance as JSON, with each lease's time left and each instance's age |
//! | `/api/events` | server-sent events: a `snapshot` first, then a `changes` message per watch batch, and `leases` every 2 s |
//! | `/api/status` | the registry's status (Maintenance.Status, key counts, leader) and how current the catalog is |
//! | `/api/session` | whether the registry has authentication on, and who is logged in |
//! | `POST /api/login` | logs in (`{"name", "password"}` as `application/json`) when the registry has authentication on |
//! | `POST /api/logout` | ends the session |
//!
//! Nothing in it writes to the registry: every route but login and logout
//! answers `GET` (and `HEAD`) only. Values come from the network, so the
//! page renders them as text, never as HTML, under a strict content
//! security policy.
//!
//! # Logins
//!
//! The dashboard reads the registry with its own client, which may see more
//! than a visitor should. When the registry has auth on, every `/api/`
//! route but `POST /api/login` and `POST /api/logout` wants a session, and
//! shows only the services its user may read:
//!
//! * **Is auth on?** Asked of the registry with a token-less count-only
//!   Range (etcd refuses it with `user name is empty` when auth is on): no
//!   login attempt, so nothing for the registry's brute-force throttling to
//!   count. With a client certificate configured (etcd then takes the
//!   certificate's user for a token-less request), an `Authenticate` of an
//!   empty name settles it: `authentication is not enabled` or not. The
//!   answer is cached for 5 s. `muster serve` asks its own
//!   server in-process instead ([`Dashboard::set_auth_check`]).
//! * **Login** (`POST /api/login`, `{"name", "password"}` as
//!   `application/json`, which a cross-site form cannot send) authenticates
//!   with the registry; a wrong password is the registry's 401, with its
//!   words. The session keeps the user name and etcd's token, never the
//!   password; its id (256 random bits from the OS) goes in the
//!   `muster_session` cookie (`HttpOnly; SameSite=Strict; Path=/`, and
//!   `Secure` over HTTPS). A session ends on logout, after 30 minutes
//!   without a request (an open page keeps it alive), after 8 hours
//!   in all, or when the registry stops knowing its token (etcd forgets
//!   tokens unused for `--auth-token-ttl`, 300 s by default, and drops a
//!   user's tokens when the user is deleted or its password changes;
//!   muster's registry also forgets them all on a restart). At most 1024
//!   live at once: the one used least recently goes first.
//! * **What a user sees:** a service is shown when a count-only Range on
//!   its key prefix (`{prefix}/{service}/`) with the user's token succeeds,
//!   hidden when etcd says permission denied; one check of the whole
//!   prefix first spares the per-service checks for users who may read it
//!   all. Answers are cached per session for 5 s, so a
//!   revoked permission hides the service within that window (the event
//!   stream sends a new snapshot when a decision flips). Lease times and
//!   events of hidden services are left out too, and `/api/status` gives
//!   key counts only to a user who may read those keys.
//!
//! [`Dashboard::set_secure_cookies`] marks the cookie `Secure`; with
//! authentication off the page needs no login, as before.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let etcd = muster::Etcd::connect_to("127.0.0.1:2379")?;
//! let dashboard = muster_dashboard::Dashboard::start(etcd, muster::instance::DEFAULT_PREFIX).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:2381").await?;
//! axum::serve(listener, muster_dashboard::router(dashboard)).await?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod api;
mod assets;
mod auth;
mod events;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use muster::Etcd;
use muster::catalog::Catalog;
use tokio::sync::watch;

pub use api::RegistryStatus;

/// A lease's time left is read again when older than this.
const LEASE_FRESH: Duration = Duration::from_secs(1);
/// How long a lease read may take before the answer goes out without it.
const LEASE_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Leases read per batch.
const LEASE_CHUNK: usize = 64;
/// Cached lease readings nobody asked about for this long are dropped.
const LEASE_FORGET: Duration = Duration::from_secs(60);

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The first list of the prefix failed (registry unreachable, bad prefix).
    #[error("cannot follow the services under {prefix}: {source}")]
    Follow {
        /// The key prefix.
        prefix: String,
        /// Why.
        #[source]
        source: muster::Error,
    },
    /// A call to the registry failed.
    #[error("registry call failed: {0}")]
    Registry(#[from] muster::Error),
}

/// The dashboard's state: a followed catalog and a registry client. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    etcd: Etcd,
    catalog: Catalog,
    leases: Mutex<HashMap<i64, LeaseReading>>,
    /// One lease read at a time, shared by every request that needs it.
    reading: tokio::sync::Mutex<()>,
    closed: watch::Sender<bool>,
    auth: auth::Auth,
    /// The registry's space quota in bytes, when the process serving the
    /// dashboard knows it (etcd's API does not report it).
    quota: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct LeaseReading {
    left: Option<Duration>,
    read_at: Instant,
    wanted_at: Instant,
}

impl Dashboard {
    /// Lists every service under `prefix` and follows it. Fails when the
    /// registry cannot be reached for the first list.
    pub async fn start(etcd: Etcd, prefix: &str) -> Result<Dashboard, Error> {
        let catalog = Catalog::follow(etcd.clone(), prefix)
            .await
            .map_err(|source| Error::Follow {
                prefix: prefix.to_string(),
                source,
            })?;
        Ok(Dashboard::with_catalog(etcd, catalog))
    }

    /// A dashboard over a catalog already followed with `etcd`.
    pub fn with_catalog(etcd: Etcd, catalog: Catalog) -> Dashboard {
        Dashboard {
            inner: Arc::new(Inner {
                auth: auth::Auth::new(&etcd),
                etcd,
                catalog,
                leases: Mutex::new(HashMap::new()),
                reading: tokio::sync::Mutex::new(()),
                closed: watch::channel(false).0,
                quota: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Shows `bytes` as the registry's space quota next to its database
    /// size (`muster serve` knows its own; etcd's API does not say).
    pub fn set_quota(&self, bytes: u64) {
        self.inner
            .quota
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The quota set with [`Dashboard::set_quota`], if any.
    pub(crate) fn quota(&self) -> Option<u64> {
        let q = self.inner.quota.load(std::sync::atomic::Ordering::Relaxed);
        (q > 0).then_some(q)
    }

    /// The followed catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.inner.catalog
    }

    /// The key prefix shown.
    pub fn prefix(&self) -> &str {
        self.inner.catalog.prefix()
    }

    /// Ends every open event stream (they would otherwise hold a graceful
    /// HTTP shutdown forever). Streams opened afterwards end at once.
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    /// The registry's status: Maintenance.Status of the endpoint in use,
    /// the number of keys, the leader.
    pub async fn status(&self) -> Result<RegistryStatus, Error> {
        api::registry_status(self).await
    }

    /// Answers "does the registry have authentication enabled?" with
    /// `check` instead of asking the registry (for a dashboard in the
    /// registry's own process, such as `muster serve`'s, whose server knows
    /// at no cost). Without it the dashboard asks the registry every few
    /// seconds, with a token-less read that etcd refuses when auth is on.
    pub fn set_auth_check(&self, check: impl Fn() -> bool + Send + Sync + 'static) {
        self.inner.auth.set_check(Arc::new(check));
    }

    /// Marks the session cookie `Secure` (the browser then sends it over
    /// HTTPS only): for a dashboard served over HTTPS.
    pub fn set_secure_cookies(&self, secure: bool) {
        self.inner.auth.set_secure_cookie(secure);
    }

    /// The throttle of failed logins, per browser address (its counters:
    /// failures, attempts that waited, addresses slowed down now). It sees
    /// addresses only when the router is served with
    /// `into_make_service_with_connect_info::<SocketAddr>()`.
    pub fn login_throttle(&self) -> &muster_tls::Throttle {
        self.inner.auth.throttle()
    }

    /// The router serving the page and its API.
    pub fn router(&self) -> Router {
        router(self.clone())
    }

    /// The cached time left of each lease, as of now.
    fn cached_leases(
        &self,
        leases: impl IntoIterator<Item = i64>,
    ) -> HashMap<i64, Option<Duration>> {
        let cache = self
            .inner
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        leases
            .into_iter()
            .filter_map(|lease| {
                let reading = cache.get(&lease)?;
                Some((lease, reading.current()))
            })
            .collect()
    }

    /// The time left of each lease (0, no lease, is left out), read again
    /// where the cached reading is older than [`LEASE_FRESH`]. A lease that
    /// could not be read in time is left out.
    async fn lease_left(
        &self,
        leases: impl IntoIterator<Item = i64>,
    ) -> HashMap<i64, Option<Duration>> {
        let wanted: Vec<i64> = {
            let mut seen: Vec<i64> = leases.into_iter().filter(|l| *l != 0).collect();
            seen.sort_unstable();
            seen.dedup();
            seen
        };
        let now = Instant::now();
        let stale: Vec<i64> = {
            let mut cache = self
                .inner
                .leases
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            cache.retain(|_, r| now.duration_since(r.wanted_at) < LEASE_FORGET);
            wanted
                .iter()
                .copied()
                .filter(|lease| match cache.get_mut(lease) {
                    Some(r) => {
                        r.wanted_at = now;
                        now.duration_since(r.read_at) >= LEASE_FRESH
                    }
                    None => true,
                })
                .collect()
        };
        if !stale.is_empty() {
            let read = async {
                let _one_at_a_time = self.inner.reading.lock().await;
                // Another request may have read them while we waited.
                let still_stale: Vec<i64> = {
                    let cache = self
                        .inner
                        .leases
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    stale
                        .iter()
                        .copied()
                        .filter(|lease| {
                            cache
                                .get(lease)
                                .is_none_or(|r| r.read_at.elapsed() >= LEASE_FRESH)
                        })
                        .collect()
                };
                if still_stale.is_empty() {
                    return;
                }
                // In chunks, so what was read before a timeout is kept.
                for chunk in still_stale.chunks(LEASE_CHUNK) {
                    let read_at = Instant::now();
                    let left = match muster::catalog::lease_time_left(
                        &self.inner.etcd,
                        chunk.iter().copied(),
                    )
                    .await
                    {
                        Ok(left) => left,
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot read lease times");
                            return;
                        }
                    };
                    let mut cache = self
                        .inner
                        .leases
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    for (lease, left) in left {
                        cache.insert(
                            lease,
                            LeaseReading {
                                left,
                                read_at,
                                wanted_at: read_at,
                            },
                        );
                    }
                }
            };
            if tokio::time::timeout(LEASE_READ_TIMEOUT, read)
                .await
                .is_err()
            {
                tracing::debug!("reading lease times timed out");
            }
        }
        self.cached_leases(wanted)
    }
}

impl LeaseReading {
    /// The time left now: the reading minus the time since it was taken.
    fn current(&self) -> Option<Duration> {
        self.left
            .map(|left| left.saturating_sub(self.read_at.elapsed()))
    }
}

/// The router serving the dashboard: the page at `/`, its assets under
/// `/assets/`, and the read-only API under `/api/`. Merge it into an
/// existing `axum` app with [`Router::merge`].
pub fn router(dashboard: Dashboard) -> Router {
    routes(dashboard)
}

/// Refuses requests whose `Host` is a name other than `localhost`: for a
/// dashboard bound to loopback, so that a web page the operator visits
/// cannot read it through DNS rebinding (its name resolving to
/// 127.0.0.1). IP literals and `localhost` pass; anything else gets 421.
pub fn local_hosts_only(router: Router) -> Router {
    router.layer(axum::middleware::from_fn(check_host))
}

async fn check_host(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    match host {
        Some(host) if !is_local_host(&host) => (
            axum::http::StatusCode::MISDIRECTED_REQUEST,
            format!(
                "muster: Host {host:?} is refused: this address serves loopback only \
                 (DNS rebinding protection); use http://127.0.0.1:<port>/\n"
            ),
        )
            .into_response(),
        _ => next.run(request).await,
    }
}

/// `localhost`, `*.localhost` or an IP literal, with or without a port.
fn is_local_host(authority: &str) -> bool {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        return rest
            .split(']')
            .next()
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost") || host.parse::<std::net::IpAddr>().is_ok()
}

fn routes(dashboard: Dashboard) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/assets/app.js", get(assets::script))
        .route("/assets/style.css", get(assets::style))
        .route("/api/services", get(api::services))
        .route("/api/status", get(api::status))
        .route("/api/events", get(events::stream))
        .route("/api/session", get(auth::session))
        .route(
            "/api/login",
            post(auth::login).layer(DefaultBodyLimit::max(auth::MAX_LOGIN_BODY)),
        )
        .route("/api/logout", post(auth::logout))
        .with_state(dashboard)
}

#[cfg(test)]
mod tests {
    use super::is_local_host;

    #[test]
    fn only_local_hosts_pass() {
        for ok in [
            "127.0.0.1:2381",
            "localhost:2381",
            "LOCALHOST",
            "[::1]:2381",
            "10.0.0.7",
            "a.localhost:1",
        ] {
            assert!(is_local_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:2381",
            "evil.example",
            "localhost.evil.example",
            "[zz]:1",
            "",
        ] {
            assert!(!is_local_host(bad), "{bad}");
        }
    }
}
