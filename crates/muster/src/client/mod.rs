//! The etcd connection layer.
//!
//! [`Etcd`] is a cheap-to-clone handle on one or more etcd endpoints. Every
//! unary call carries a timeout; when an endpoint is unreachable the call
//! fails over to the next one (always for reads and lease calls, and for
//! writes only when the request provably never left: the connection could
//! not be made). With credentials it authenticates, attaches the token to
//! every call and, as etcd's Go client does, re-authenticates and retries
//! once when etcd refuses the token (see [Authentication](#authentication)).
//! Long-lived
//! streams (lease keep-alive, watch) are opened through the same failover and
//! carry etcd's require-leader metadata, so a member cut off from its cluster
//! ends the stream instead of silently going quiet.
//!
//! All watches of one handle share a single gRPC watch stream: see
//! [`watch`].
//!
//! # Authentication
//!
//! etcd's simple tokens die after `--auth-token-ttl` (300 s) without use,
//! when their user is deleted or changes password, when auth is disabled,
//! and when the member restarts (they live in its memory). A call refused
//! with `invalid auth token`, `revision of auth store is old` or (holding
//! credentials) `user name is empty` authenticates again and is sent once
//! more: the refusal comes before the request is applied, so this is safe
//! for writes too. `Authenticate` itself goes without a token (etcd would
//! refuse it for carrying the stale one). When etcd answers that
//! authentication is not enabled, the handle drops its token and calls
//! without one until etcd asks for a user again. A stream carries the token
//! it was opened with: the watch hub opens a new stream when etcd refuses a
//! watch for its token (see [`watch`]).

mod acting;
mod auth;
pub mod watch;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use muster_proto as pb;
use muster_proto::auth_client::AuthClient;
use muster_proto::cluster_client::ClusterClient;
use muster_proto::kv_client::KvClient;
use muster_proto::lease_client::LeaseClient;
use muster_proto::maintenance_client::MaintenanceClient;
use muster_proto::watch_client::WatchClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::error::{AuthRefusal, Error, Result, describe_range, is_auth_not_enabled};

pub use watch::{WatchEvent, WatchOptions, Watcher};

/// The metadata key etcd reads to refuse serving a stream from a member
/// without a leader (`rpctypes.MetadataRequireLeaderKey`).
pub const REQUIRE_LEADER_KEY: &str = "hasleader";
/// etcd's default `--grpc-keepalive-min-time`: clients pinging more often
/// get their connection closed.
pub const ETCD_KEEPALIVE_MIN_TIME: Duration = Duration::from_secs(5);
/// The environment variable holding a comma-separated endpoint list.
pub const ENDPOINTS_ENV: &str = "MUSTER_ENDPOINTS";
/// The endpoint used when none is given.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:2379";
/// etcd's default largest request (1.5 MiB) plus gRPC overhead.
const MAX_MESSAGE: usize = 2 * 1024 * 1024 + 512 * 1024;

/// How to reach etcd. Its `Debug` form shows the user name but never the
/// password or the token.
#[derive(Clone)]
pub struct Config {
    /// `host:port`, `http://host:port` or `https://host:port`, tried in
    /// order with failover. All plaintext or all TLS: mixing `http://` and
    /// `https://` is an error. A bare `host:port` is TLS when
    /// [`Config::tls`] is set.
    pub endpoints: Vec<String>,
    /// TLS settings (etcdctl's `--cacert`, `--cert`, `--key`,
    /// `--insecure-skip-tls-verify`) for `https://` endpoints; `https://`
    /// endpoints without them trust the system's roots and present no
    /// client certificate.
    pub tls: Option<muster_tls::ClientTls>,
    /// Username and password, when etcd has auth enabled.
    pub credentials: Option<(String, String)>,
    /// A token to send from the start (gRPC metadata `token`), for a
    /// caller that authenticated elsewhere, such as the dashboard acting
    /// for a logged-in user. Without [`Config::credentials`] it is never
    /// refreshed: when it expires, calls fail with [`Error::AuthFailed`].
    pub token: Option<String>,
    /// How long to wait for a TCP connection.
    pub connect_timeout: Duration,
    /// How long one unary call may take.
    pub request_timeout: Duration,
    /// HTTP/2 keep-alive ping interval, sent while a stream is open: a dead
    /// connection is noticed within this plus [`Config::keepalive_timeout`].
    /// etcd closes connections that ping more often than its
    /// `--grpc-keepalive-min-time` (default 5 s) with `too_many_pings`, so
    /// keep it at or above that.
    pub keepalive_interval: Duration,
    /// How long to wait for a keep-alive ping's answer.
    pub keepalive_timeout: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(user, _)| (user, "<redacted>")),
            )
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("keepalive_timeout", &self.keepalive_timeout)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            endpoints: vec![DEFAULT_ENDPOINT.into()],
            tls: None,
            credentials: None,
            token: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// A configuration for these endpoints with default timeouts.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Config {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Config::default()
        }
    }

    /// Splits a comma-separated endpoint list (`a:2379, b:2379`).
    pub fn parse_endpoints(list: &str) -> Vec<String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    /// The endpoints in `MUSTER_ENDPOINTS` (comma separated), or
    /// `127.0.0.1:2379` when it is unset or empty.
    pub fn endpoints_from_env() -> Vec<String> {
        match std::env::var(ENDPOINTS_ENV) {
            Ok(list) if !Config::parse_endpoints(&list).is_empty() => {
                Config::parse_endpoints(&list)
            }
            _ => vec![DEFAULT_ENDPOINT.to_string()],
        }
    }

    /// Sets username and password.
    pub fn with_credentials(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.credentials = Some((user.into(), password.into()));
        self
    }

    /// Sends `token` from the start (see [`Config::token`]).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The endpoints as URLs: a bare `host:port` gets `https://` when
    /// [`Config::tls`] is set, else `http://`; a trailing `/` goes. Fails
    /// on another scheme, an endpoint that is not a URL, or a mix of
    /// `http://` and `https://` (a client speaks TLS to all its endpoints
    /// or to none).
    pub fn urls(&self) -> Result<Vec<String>> {
        let mut urls = Vec::with_capacity(self.endpoints.len());
        for endpoint in &self.endpoints {
            let endpoint = endpoint.trim().trim_end_matches('/');
            let url = if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
                endpoint.to_string()
            } else if endpoint.contains("://") {
                return Err(Error::invalid(
                    "endpoint",
                    format!("{endpoint:?}: the scheme must be http:// or https://"),
                ));
            } else if self.tls.is_some() {
                format!("https://{endpoint}")
            } else {
                format!("http://{endpoint}")
            };
            Endpoint::from_shared(url.clone())
                .map_err(|e| Error::invalid("endpoint", format!("{endpoint:?}: {e}")))?;
            urls.push(url);
        }
        let secure = urls.iter().find(|u| u.starts_with("https://"));
        let plain = urls.iter().find(|u| u.starts_with("http://"));
        if let (Some(s), Some(p)) = (secure, plain) {
            return Err(Error::invalid(
                "endpoints",
                format!(
                    "the list mixes {s} (TLS) and {p} (plaintext): a client speaks TLS to all its endpoints or to none"
                ),
            ));
        }
        Ok(urls)
    }

    /// Sets the TLS settings (see [`Config::tls`]).
    pub fn with_tls(mut self, tls: muster_tls::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the per-request timeout.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

/// A handle on an etcd cluster (or muster's embedded registry). Clones share
/// connections, the auth token and the watch stream.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints())
            .finish_non_exhaustive()
    }
}

struct Inner {
    channels: Vec<(String, Channel)>,
    /// Per plaintext channel, its dialer: it notices a TLS server on the
    /// other end (see [`Etcd::explain`]).
    plain: Vec<Option<muster_tls::PlainConnector>>,
    current: AtomicUsize,
    config: Config,
    /// Replaced as a whole on every change, so that the `Arc` a request was
    /// sent with tells whether someone refreshed it since.
    auth: ArcSwap<AuthState>,
    auth_lock: tokio::sync::Mutex<()>,
    authentications: AtomicU64,
    watch_hub: OnceLock<watch::Hub>,
}

/// What a handle with credentials knows about its authentication.
#[derive(Debug, Default)]
pub(crate) struct AuthState {
    /// The token sent with every request.
    token: Option<AsciiMetadataValue>,
    /// etcd said authentication is not enabled: requests go without a token
    /// until etcd asks for a user (`user name is empty`).
    disabled: bool,
}

/// The auth state one request or stream was sent with.
pub(crate) type Auth = Arc<AuthState>;

/// Whether a failed call may be sent again to another endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads and lease calls: safe to repeat.
    Idempotent,
    /// Writes: only when the request never reached a server.
    IfNotSent,
}

/// A channel to `url` (`https://...`) that dials through muster's TLS
/// connector. tonic is given the `http://` form of the URL so that it
/// leaves TLS to the connector (its own TLS would hide handshake errors and
/// cannot skip verification); requests still say `https`.
fn tls_channel(
    endpoint: Endpoint,
    url: &str,
    connector: &muster_tls::TlsConnector,
) -> Result<Channel> {
    let origin = http::Uri::try_from(url)
        .map_err(|e| Error::invalid("endpoint", format!("{url:?}: {e}")))?;
    Ok(endpoint
        .origin(origin)
        .connect_with_connector_lazy(connector.clone()))
}

/// A token as request metadata; tokens are printable ASCII.
fn token_value(token: &str) -> Result<AsciiMetadataValue> {
    AsciiMetadataValue::try_from(token)
        .map_err(|_| Error::invalid("token", "a token is printable ASCII"))
}

fn is_connect_error(status: &Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let msg = status.message().to_ascii_lowercase();
    msg.contains("connect")
        || msg.contains("connection refused")
        || msg.contains("dns")
        // No request goes out before the handshake is done.
        || msg.contains("tls handshake")
}

impl Etcd {
    /// Creates a handle. Connections are made lazily, so this fails only on
    /// a malformed configuration, never because etcd is down.
    pub fn connect(config: Config) -> Result<Etcd> {
        if config.endpoints.is_empty() {
            return Err(Error::invalid(
                "endpoints",
                "at least one endpoint is required",
            ));
        }
        if config.keepalive_interval < ETCD_KEEPALIVE_MIN_TIME {
            tracing::warn!(
                interval = ?config.keepalive_interval,
                "keep-alive interval is below etcd's default --grpc-keepalive-min-time (5s); etcd will close the connection with too_many_pings unless it was lowered"
            );
        }
        let urls = config.urls()?;
        let token = config.token.as_deref().map(token_value).transpose()?;
        let connector = if urls[0].starts_with("https://") {
            let tls = config.tls.clone().unwrap_or_default();
            let connector = tls
                .connector(&[muster_tls::ALPN_H2])
                .map_err(|e| Error::Tls(e.to_string()))?;
            // gRPC servers send SETTINGS at once: a refused client
            // certificate (TLS 1.3 says so after the handshake) is caught
            // at connect time, in words.
            Some(connector.await_server_first(config.connect_timeout))
        } else {
            None
        };
        let mut channels = Vec::with_capacity(config.endpoints.len());
        let mut plain = Vec::with_capacity(config.endpoints.len());
        for (ep, url) in config.endpoints.iter().zip(urls) {
            let dial = match &connector {
                Some(_) => url.replacen("https://", "http://", 1),
                None => url.clone(),
            };
            let endpoint = Endpoint::from_shared(dial)
                .map_err(|e| Error::invalid("endpoint", format!("{ep:?}: {e}")))?
                .connect_timeout(config.connect_timeout)
                .http2_keep_alive_interval(config.keepalive_interval)
                .keep_alive_timeout(config.keepalive_timeout)
                // etcd counts pings without an open stream as abuse.
                .keep_alive_while_idle(false)
                .tcp_nodelay(true);
            let channel = match &connector {
                Some(connector) => {
                    plain.push(None);
                    tls_channel(endpoint, &url, connector)?
                }
                None => {
                    // Our own dialer, only to recognise a TLS port.
                    let dialer = muster_tls::PlainConnector::new();
                    plain.push(Some(dialer.clone()));
                    endpoint.connect_with_connector_lazy(dialer)
                }
            };
            channels.push((url, channel));
        }
        Ok(Etcd {
            inner: Arc::new(Inner {
                channels,
                plain,
                current: AtomicUsize::new(0),
                config,
                auth: ArcSwap::from_pointee(AuthState {
                    token,
                    disabled: false,
                }),
                auth_lock: tokio::sync::Mutex::new(()),
                authentications: AtomicU64::new(0),
                watch_hub: OnceLock::new(),
            }),
        })
    }

    /// A handle on one endpoint with default settings.
    pub fn connect_to(endpoint: impl Into<String>) -> Result<Etcd> {
        Etcd::connect(Config::new([endpoint.into()]))
    }

    /// The endpoints, normalized to URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.channels.iter().map(|(u, _)| u.clone()).collect()
    }

    /// The configuration this handle was made with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The endpoint calls currently go to.
    pub fn current_endpoint(&self) -> String {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.channels.len();
        self.inner.channels[i].0.clone()
    }

    /// The endpoint to use first, then `start + 1`, ... for later attempts.
    fn first_endpoint(&self) -> usize {
        self.inner.current.load(Ordering::Relaxed)
    }

    fn channel(&self, start: usize, attempt: usize) -> (usize, Channel) {
        let i = (start + attempt) % self.inner.channels.len();
        (i, self.inner.channels[i].1.clone())
    }

    /// A transport failure on plaintext channel `index` whose server turned
    /// out to speak TLS, in words (HTTP/2 reports it as a bare broken pipe).
    fn explain(&self, index: usize, status: &Status) -> Option<Error> {
        if !matches!(
            status.code(),
            tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
        ) {
            return None;
        }
        let found = self.inner.plain.get(index)?.as_ref()?.finding()?;
        Some(if found.certain {
            Error::Tls(found.to_string())
        } else {
            Error::Unavailable(found.to_string())
        })
    }

    fn mark_failed(&self, index: usize) {
        let n = self.inner.channels.len();
        if n > 1 {
            // Move on only if nobody else already did.
            let _ = self.inner.current.compare_exchange(
                index,
                (index + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn request<M>(
        &self,
        msg: M,
        timeout: Option<Duration>,
        token: Option<&AsciiMetadataValue>,
    ) -> Request<M> {
        let mut req = Request::new(msg);
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        if let Some(token) = token {
            req.metadata_mut().insert("token", token.clone());
        }
        req
    }

    /// The configured user name, if any.
    pub(crate) fn user(&self) -> Option<String> {
        self.inner
            .config
            .credentials
            .as_ref()
            .map(|(u, _)| u.clone())
    }

    /// The auth state to send the next request with: authenticates first
    /// when there are credentials and no token yet (unless etcd said auth
    /// is off).
    async fn ensure_auth(&self) -> Result<Auth> {
        let state = self.inner.auth.load_full();
        if self.inner.config.credentials.is_none() || state.token.is_some() || state.disabled {
            return Ok(state);
        }
        self.authenticate(None).await?;
        Ok(self.inner.auth.load_full())
    }

    /// Whether a request refused with `refusal` is worth sending again
    /// (clientv3's `shouldRefreshToken`, plus an old auth revision without
    /// credentials, which clientv3 also retries).
    fn retries_after(&self, refusal: AuthRefusal) -> bool {
        match refusal {
            AuthRefusal::InvalidToken | AuthRefusal::UserEmpty => {
                self.inner.config.credentials.is_some()
            }
            AuthRefusal::OldRevision => true,
            AuthRefusal::Denied => false,
        }
    }

    /// Replaces the token that `stale` held, which etcd refused, unless
    /// someone already did. Without credentials there is nothing to do.
    pub(crate) async fn refresh_auth(&self, stale: &Auth) -> Result<()> {
        self.authenticate(Some(stale)).await
    }

    /// Authenticates, once for all the callers that found the same token
    /// (`stale`; `None`: there was none) refused. On `authentication is not
    /// enabled` it drops the token and succeeds: calls go without one.
    async fn authenticate(&self, stale: Option<&Auth>) -> Result<()> {
        let Some((user, password)) = self.inner.config.credentials.clone() else {
            return Ok(());
        };
        let _guard = self.inner.auth_lock.lock().await;
        let current = self.inner.auth.load_full();
        match stale {
            Some(stale) if !Arc::ptr_eq(&current, stale) => return Ok(()),
            None if current.token.is_some() || current.disabled => return Ok(()),
            _ => {}
        }
        let msg = pb::AuthenticateRequest {
            name: user,
            password,
        };
        self.inner.authentications.fetch_add(1, Ordering::Relaxed);
        // Without a token: etcd checks one on every request, Authenticate
        // included, and would refuse the stale one.
        let result = self
            .call_unchecked(Retry::Idempotent, msg, None, |ch, req| async move {
                AuthClient::new(ch).authenticate(req).await
            })
            .await;
        let resp = match result {
            Ok(resp) => resp,
            Err(Error::Grpc(status)) if is_auth_not_enabled(&status) => {
                if !current.disabled {
                    tracing::info!(
                        "etcd has authentication disabled; calling without a token until it asks for one"
                    );
                }
                self.inner.auth.store(Arc::new(AuthState {
                    token: None,
                    disabled: true,
                }));
                return Ok(());
            }
            Err(e @ (Error::Unavailable(_) | Error::Timeout(_) | Error::Tls(_))) => return Err(e),
            Err(e) => {
                // The old token is dead anyway; the next call tries afresh.
                self.inner.auth.store(Arc::new(AuthState::default()));
                return Err(Error::AuthFailed(match e {
                    Error::Grpc(status) => status.message().to_string(),
                    other => other.to_string(),
                }));
            }
        };
        let token = AsciiMetadataValue::try_from(resp.token.as_str())
            .map_err(|_| Error::AuthFailed("etcd returned an unusable token".into()))?;
        self.inner.auth.store(Arc::new(AuthState {
            token: Some(token),
            disabled: false,
        }));
        tracing::debug!(refreshed = stale.is_some(), "authenticated to etcd");
        Ok(())
    }

    /// One unary call with timeout and endpoint failover, no auth handling.
    async fn call_unchecked<M, R, F, Fut>(
        &self,
        retry: Retry,
        msg: M,
        token: Option<&AsciiMetadataValue>,
        f: F,
    ) -> Result<R>
    where
        M: Clone,
        F: Fn(Channel, Request<M>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<R>, Status>>,
    {
        let timeout = self.inner.config.request_timeout;
        let attempts = self.inner.channels.len();
        let mut last = None;
        let start = self.first_endpoint();
        for attempt in 0..attempts {
            let (index, channel) = self.channel(start, attempt);
            let req = self.request(msg.clone(), Some(timeout), token);
            let status = match tokio::time::timeout(timeout, f(channel, req)).await {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => match self.explain(index, &status) {
                    Some(e) => {
                        self.mark_failed(index);
                        last = Some(e);
                        continue;
                    }
                    None => status,
                },
                Err(_) => {
                    self.mark_failed(index);
                    if retry == Retry::Idempotent {
                        last = Some(Error::Timeout(timeout));
                        continue;
                    }
                    return Err(Error::Timeout(timeout));
                }
            };
            let failover = status.code() == tonic::Code::Unavailable
                && (retry == Retry::Idempotent || is_connect_error(&status));
            if failover {
                tracing::debug!(endpoint = %self.inner.channels[index].0, error = %status.message(), "etcd endpoint failed, trying the next");
                self.mark_failed(index);
                last = Some(Error::from_status(status));
                continue;
            }
            return Err(Error::Grpc(status));
        }
        Err(last.unwrap_or_else(|| Error::Unavailable("no endpoint answered".into())))
    }

    /// One unary call: authentication, timeout, failover, error mapping.
    /// A call etcd refused for its token is sent once more with a fresh one.
    async fn call<M, R, F, Fut>(&self, retry: Retry, msg: M, f: F) -> Result<R>
    where
        M: Clone,
        F: Fn(Channel, Request<M>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<R>, Status>>,
    {
        let auth = self.ensure_auth().await?;
        match self
            .call_unchecked(retry, msg.clone(), auth.token.as_ref(), &f)
            .await
        {
            Err(Error::Grpc(status))
                if AuthRefusal::from_status(&status).is_some_and(|r| self.retries_after(r)) =>
            {
                tracing::debug!(error = %status.message(), "etcd refused the token; re-authenticating and retrying");
                self.refresh_auth(&auth).await?;
                let auth = self.inner.auth.load_full();
                self.call_unchecked(retry, msg, auth.token.as_ref(), &f)
                    .await
                    .map_err(|e| self.map_error(e))
            }
            other => other.map_err(|e| self.map_error(e)),
        }
    }

    /// A gRPC status as muster's error; a refusal names the user.
    fn map_error(&self, e: Error) -> Error {
        match map_grpc(e) {
            Error::PermissionDenied { request, .. } => Error::PermissionDenied {
                user: self.user(),
                request,
            },
            other => other,
        }
    }

    /// Opens a bidirectional stream with failover, sending `first` before
    /// waiting for the server's answer (etcd sends no headers until the
    /// first request arrives). Returns the auth state the stream carries.
    async fn open_stream<M, R, F, Fut>(
        &self,
        first: Vec<M>,
        f: F,
    ) -> Result<(mpsc::Sender<M>, tonic::Streaming<R>, Auth)>
    where
        M: Clone + Send + 'static,
        F: Fn(Channel, Request<ReceiverStream<M>>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<tonic::Streaming<R>>, Status>>,
    {
        let mut auth = self.ensure_auth().await?;
        let timeout = self.inner.config.request_timeout;
        let attempts = self.inner.channels.len();
        let mut last = None;
        let mut reauthed = false;
        let mut attempt = 0;
        let start = self.first_endpoint();
        while attempt < attempts {
            let (index, channel) = self.channel(start, attempt);
            let (tx, rx) = mpsc::channel(64.max(first.len() + 16));
            for m in &first {
                // A fresh channel with room for all of `first`.
                let _ = tx.try_send(m.clone());
            }
            let mut req = self.request(ReceiverStream::new(rx), None, auth.token.as_ref());
            req.metadata_mut()
                .insert(REQUIRE_LEADER_KEY, AsciiMetadataValue::from_static("true"));
            match tokio::time::timeout(timeout, f(channel, req)).await {
                Ok(Ok(resp)) => return Ok((tx, resp.into_inner(), auth)),
                Ok(Err(status)) => {
                    if let Some(e) = self.explain(index, &status) {
                        self.mark_failed(index);
                        last = Some(e);
                    } else if status.code() == tonic::Code::Unavailable {
                        self.mark_failed(index);
                        last = Some(Error::from_status(status));
                    } else if !reauthed
                        && AuthRefusal::from_status(&status).is_some_and(|r| self.retries_after(r))
                    {
                        reauthed = true;
                        self.refresh_auth(&auth).await?;
                        auth = self.inner.auth.load_full();
                        continue;
                    } else {
                        return Err(self.map_error(Error::Grpc(status)));
                    }
                }
                Err(_) => {
                    self.mark_failed(index);
                    last = Some(Error::Timeout(timeout));
                }
            }
            attempt += 1;
        }
        Err(last.unwrap_or_else(|| Error::Unavailable("no endpoint answered".into())))
    }

    /// Reads keys.
    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse> {
        let (key, end) = (req.key.clone(), req.range_end.clone());
        let what = || format!("read {}", describe_range(&key, &end));
        self.call(Retry::Idempotent, req, |ch, r| async move {
            KvClient::new(ch)
                .max_decoding_message_size(usize::MAX)
                .range(r)
                .await
        })
        .await
        .map_err(|e| denied(e, what))
    }

    /// Writes one key.
    pub async fn put(&self, req: pb::PutRequest) -> Result<pb::PutResponse> {
        let key = req.key.clone();
        let what = || format!("write {}", describe_range(&key, &[]));
        self.call(Retry::IfNotSent, req, |ch, r| async move {
            KvClient::new(ch).put(r).await
        })
        .await
        .map_err(|e| denied(e, what))
    }

    /// Deletes a key or range.
    pub async fn delete_range(
        &self,
        req: pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse> {
        let (key, end) = (req.key.clone(), req.range_end.clone());
        let what = || format!("delete {}", describe_range(&key, &end));
        self.call(Retry::IfNotSent, req, |ch, r| async move {
            KvClient::new(ch).delete_range(r).await
        })
        .await
        .map_err(|e| denied(e, what))
    }

    /// Runs a transaction.
    pub async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse> {
        self.call(Retry::IfNotSent, req, |ch, r| async move {
            KvClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE)
                .txn(r)
                .await
        })
        .await
    }

    /// Compacts history up to `revision`.
    pub async fn compact(&self, revision: i64, physical: bool) -> Result<pb::CompactionResponse> {
        let req = pb::CompactionRequest { revision, physical };
        self.call(Retry::IfNotSent, req, |ch, r| async move {
            KvClient::new(ch).compact(r).await
        })
        .await
    }

    /// Grants a lease of `ttl` seconds.
    pub async fn lease_grant(&self, ttl: i64) -> Result<pb::LeaseGrantResponse> {
        let resp = self
            .call(
                Retry::Idempotent,
                pb::LeaseGrantRequest { ttl, id: 0 },
                |ch, r| async move { LeaseClient::new(ch).lease_grant(r).await },
            )
            .await?;
        if !resp.error.is_empty() {
            return Err(Error::Grpc(Status::unknown(resp.error)));
        }
        Ok(resp)
    }

    /// Revokes a lease, deleting every key attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<pb::LeaseRevokeResponse> {
        self.call(
            Retry::Idempotent,
            pb::LeaseRevokeRequest { id },
            |ch, r| async move { LeaseClient::new(ch).lease_revoke(r).await },
        )
        .await
    }

    /// A lease's remaining time (TTL -1 when it does not exist).
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<pb::LeaseTimeToLiveResponse> {
        self.call(
            Retry::Idempotent,
            pb::LeaseTimeToLiveRequest { id, keys },
            |ch, r| async move { LeaseClient::new(ch).lease_time_to_live(r).await },
        )
        .await
    }

    /// Every live lease.
    pub async fn lease_leases(&self) -> Result<pb::LeaseLeasesResponse> {
        self.call(
            Retry::Idempotent,
            pb::LeaseLeasesRequest {},
            |ch, r| async move { LeaseClient::new(ch).lease_leases(r).await },
        )
        .await
    }

    /// Opens a keep-alive stream, sending a first keep-alive for `first_id`.
    pub async fn lease_keep_alive(
        &self,
        first_id: i64,
    ) -> Result<(
        mpsc::Sender<pb::LeaseKeepAliveRequest>,
        tonic::Streaming<pb::LeaseKeepAliveResponse>,
    )> {
        let (tx, stream, _) = self
            .open_stream(
                vec![pb::LeaseKeepAliveRequest { id: first_id }],
                |ch, r| async move { LeaseClient::new(ch).lease_keep_alive(r).await },
            )
            .await?;
        Ok((tx, stream))
    }

    /// Opens a raw watch stream with these first requests. Most callers
    /// want [`Etcd::watch`], which shares one stream per handle.
    ///
    /// etcd checks the stream's token (the one it was opened with) at each
    /// watch create: a refused create answers `created` and `canceled`
    /// with the reason, watch id -1, and the stream stays open.
    pub async fn watch_stream(
        &self,
        first: Vec<pb::WatchRequest>,
    ) -> Result<(
        mpsc::Sender<pb::WatchRequest>,
        tonic::Streaming<pb::WatchResponse>,
    )> {
        let (tx, stream, _) = self.watch_stream_auth(first).await?;
        Ok((tx, stream))
    }

    /// [`Etcd::watch_stream`], with the auth state the stream carries.
    pub(crate) async fn watch_stream_auth(
        &self,
        first: Vec<pb::WatchRequest>,
    ) -> Result<(
        mpsc::Sender<pb::WatchRequest>,
        tonic::Streaming<pb::WatchResponse>,
        Auth,
    )> {
        self.open_stream(first, |ch, r| async move {
            WatchClient::new(ch)
                .max_decoding_message_size(usize::MAX)
                .watch(r)
                .await
        })
        .await
    }

    /// Watches a key or range on this handle's shared watch stream.
    ///
    /// It returns once the watch is queued, not once etcd has created it:
    /// with `start_revision` 0 ("from now"), a change made right after may
    /// come before the watch exists and be missed. To see everything after
    /// a point, watch from a known revision (a read's header revision + 1),
    /// as discovery does.
    pub async fn watch(&self, options: WatchOptions) -> Result<Watcher> {
        self.watch_into(options, None).await
    }

    /// [`Etcd::watch`], with events and progress handed to `sink` on the
    /// watch stream's task instead of the returned watcher (see
    /// [`watch::Sink`]); disconnects, resumes and terminal events still
    /// arrive on the watcher.
    pub(crate) async fn watch_into(
        &self,
        options: WatchOptions,
        sink: Option<watch::Sink>,
    ) -> Result<Watcher> {
        self.inner
            .watch_hub
            .get_or_init(|| watch::Hub::start(self.clone()))
            .subscribe(options, sink)
            .await
    }

    /// The status of the endpoint calls currently go to.
    pub async fn status(&self) -> Result<pb::StatusResponse> {
        self.call(
            Retry::Idempotent,
            pb::StatusRequest {},
            |ch, r| async move { MaintenanceClient::new(ch).status(r).await },
        )
        .await
    }

    /// The cluster's active alarms (`Maintenance.Alarm` GET), as etcdctl's
    /// `alarm list`: NOSPACE once the backend passed its space quota.
    pub async fn alarms(&self) -> Result<Vec<pb::AlarmMember>> {
        self.alarm(pb::AlarmRequest {
            action: pb::alarm_request::AlarmAction::Get as i32,
            member_id: 0,
            alarm: pb::AlarmType::None as i32,
        })
        .await
        .map(|resp| resp.alarms)
    }

    /// `Maintenance.Alarm`: lists (GET), raises (ACTIVATE) or disarms
    /// (DEACTIVATE, as etcdctl's `alarm disarm`) alarms. Each action has the
    /// same effect done twice, so a call lost to a failover is sent again.
    pub async fn alarm(&self, req: pb::AlarmRequest) -> Result<pb::AlarmResponse> {
        self.call(Retry::Idempotent, req, |ch, r| async move {
            MaintenanceClient::new(ch).alarm(r).await
        })
        .await
    }

    /// The cluster's members.
    pub async fn member_list(&self) -> Result<pb::MemberListResponse> {
        self.call(
            Retry::Idempotent,
            pb::MemberListRequest {
                linearizable: false,
            },
            |ch, r| async move { ClusterClient::new(ch).member_list(r).await },
        )
        .await
    }

    /// Number of `Authenticate` calls this handle has made so far (the first
    /// one and every refresh). For tests and metrics.
    pub fn authentications(&self) -> u64 {
        self.inner.authentications.load(Ordering::Relaxed)
    }

    /// The newest registry revision seen in a watch response on this
    /// handle's stream (0 before the first). Tables that follow a prefix
    /// are current when their revision reaches it: progress notifications
    /// move idle ones forward.
    pub fn latest_watch_revision(&self) -> i64 {
        self.inner
            .watch_hub
            .get()
            .map_or(0, watch::Hub::latest_revision)
    }

    /// Number of gRPC watch streams this handle has opened so far (one at a
    /// time; reconnects count again). For tests and metrics.
    pub fn watch_streams_opened(&self) -> u64 {
        self.inner
            .watch_hub
            .get()
            .map(watch::Hub::streams_opened)
            .unwrap_or(0)
    }
}

/// A refusal of a request described by `what` ("read key /a") says so.
fn denied(e: Error, what: impl FnOnce() -> String) -> Error {
    match e {
        Error::PermissionDenied { user, request } if request.is_empty() => {
            Error::PermissionDenied {
                user,
                request: what(),
            }
        }
        other => other,
    }
}

fn map_grpc(e: Error) -> Error {
    match e {
        Error::Grpc(status) => Error::from_status(status),
        other => other,
    }
}

/// Capped exponential backoff with jitter: attempt 0 waits about `base`,
/// each later attempt doubles up to `cap`; the wait is drawn from
/// [half, full] of that so that many clients do not retry in lockstep.
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let full = exp.min(cap);
    let half = full / 2;
    half + full.saturating_sub(half).mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password_or_the_token() {
        let config = Config {
            credentials: Some(("alice".into(), "s3cret-pw".into())),
            token: Some("abcdefghijklmnop.7".into()),
            ..Config::new(["127.0.0.1:2379"])
        };
        let shown = format!("{config:?}");
        assert!(shown.contains("alice"), "{shown}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(!shown.contains("abcdefghijklmnop"), "{shown}");
        assert!(shown.contains("127.0.0.1:2379"), "{shown}");
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        for attempt in 0..40 {
            let d = backoff(attempt, base, cap);
            assert!(d <= cap, "{d:?}");
            assert!(d >= base / 2, "{d:?}");
        }
        assert!(backoff(30, base, cap) >= cap / 2);
    }

    #[test]
    fn default_keepalive_respects_etcds_ping_policy() {
        // Regression: a 3 s interval got connections closed with
        // GOAWAY too_many_pings every few seconds.
        assert!(Config::default().keepalive_interval >= ETCD_KEEPALIVE_MIN_TIME);
    }

    #[test]
    fn endpoint_lists() {
        assert_eq!(Config::parse_endpoints(" a:1, ,b:2 "), ["a:1", "b:2"]);
        assert!(Config::parse_endpoints(" , ").is_empty());
    }

    #[test]
    fn bad_config_is_an_error() {
        assert!(Etcd::connect(Config::new(Vec::<String>::new())).is_err());
        let err = Etcd::connect(Config::new(["http://[::1"])).unwrap_err();
        assert!(err.to_string().contains("endpoint"), "{err}");
    }
}
