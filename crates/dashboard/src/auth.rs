//! Logins, when the registry has authentication enabled.
//!
//! How it works is told in the crate's documentation (# Logins).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use muster::Etcd;
use serde::Deserialize;

use crate::Dashboard;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "muster_session";
/// A session unused for this long ends.
pub(crate) const IDLE: Duration = Duration::from_secs(30 * 60);
/// No session lives longer than this.
pub(crate) const LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Live sessions at most.
pub(crate) const MAX_SESSIONS: usize = 1024;
/// How long the answer to "is auth on?" is trusted.
pub(crate) const AUTH_FRESH: Duration = Duration::from_secs(5);
/// How long a permission check is trusted.
pub(crate) const PERMISSION_FRESH: Duration = Duration::from_secs(5);
/// Permission checks run at once for one request.
const CHECKS_AT_ONCE: usize = 16;
/// The largest login request body.
pub(crate) const MAX_LOGIN_BODY: usize = 8 * 1024;

/// A check of whether authentication is on, answered in-process.
pub(crate) type AuthCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Login state: whether auth is on, and the sessions.
pub(crate) struct Auth {
    /// The dashboard's client without credentials or token, for the probe.
    anonymous: Etcd,
    check: Mutex<Option<AuthCheck>>,
    /// The last answer of the probe and when it came.
    known: Mutex<Option<(bool, Instant)>>,
    probing: tokio::sync::Mutex<()>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    secure_cookie: AtomicBool,
    /// Failed logins slowed down per browser address: the registry sees
    /// every dashboard login come from the dashboard, so its own throttle
    /// cannot tell one browser from another.
    throttle: muster_tls::Throttle,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("known", &*lock(&self.known))
            .field("sessions", &lock(&self.sessions).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A key range: key and range end.
type KeyRange = (Vec<u8>, Vec<u8>);

/// One logged-in user. Holds etcd's token (inside `etcd`), never the
/// password.
pub(crate) struct Session {
    id: String,
    user: String,
    /// The dashboard's connections, sending the user's token.
    etcd: Etcd,
    created: Instant,
    last_used: Mutex<Instant>,
    ended: AtomicBool,
    perms: Mutex<HashMap<KeyRange, (bool, Instant)>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the id nor the token: they are secrets.
        f.debug_struct("Session")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Whether the session can be used at `now`.
fn usable(session: &Session, now: Instant) -> bool {
    !session.ended.load(Ordering::Relaxed)
        && now.duration_since(session.created) < LIFETIME
        && now.duration_since(*lock(&session.last_used)) < IDLE
}

impl Session {
    /// The user name.
    pub(crate) fn user(&self) -> &str {
        &self.user
    }

    fn touch(&self) {
        *lock(&self.last_used) = Instant::now();
    }

    /// Whether the user may read `[key, end)`: asked of the registry with
    /// the user's token unless asked within [`PERMISSION_FRESH`].
    async fn may_read(&self, key: Vec<u8>, end: Vec<u8>) -> Permission {
        let cached = lock(&self.perms).get(&(key.clone(), end.clone())).copied();
        if let Some((allowed, at)) = cached
            && at.elapsed() < PERMISSION_FRESH
        {
            return if allowed {
                Permission::Yes
            } else {
                Permission::No
            };
        }
        let req = muster_proto::RangeRequest {
            key: key.clone(),
            range_end: end.clone(),
            count_only: true,
            ..Default::default()
        };
        let allowed = match self.etcd.range(req).await {
            Ok(_) => true,
            Err(muster::Error::PermissionDenied { .. }) => false,
            Err(muster::Error::AuthFailed(reason)) => {
                tracing::info!(user = %self.user, %reason, "the registry refused a dashboard session's token; the session ends");
                self.ended.store(true, Ordering::Relaxed);
                return Permission::Ended;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot check a permission");
                return Permission::Unknown(cached.map(|(allowed, _)| allowed));
            }
        };
        let mut perms = lock(&self.perms);
        // (key, range end) → (may read, when asked). Ranges nobody asked about for a while are forgotten.
        if perms.len() > 4096 {
            perms.retain(|_, (_, at)| at.elapsed() < PERMISSION_FRESH);
        }
        perms.insert((key, end), (allowed, Instant::now()));
        if allowed {
            Permission::Yes
        } else {
            Permission::No
        }
    }
}

/// A permission check's answer.
#[derive(Debug, Clone, Copy)]
enum Permission {
    Yes,
    No,
    /// The token is no longer valid: the session has ended.
    Ended,
    /// The registry did not answer; the last answer, if any.
    Unknown(Option<bool>),
}

/// Who is looking.
#[derive(Debug, Clone)]
pub(crate) enum Viewer {
    /// Authentication is off: everyone sees everything.
    Anyone,
    /// A logged-in user.
    User(Arc<Session>),
}

/// The session has ended (or auth came on under an anonymous viewer).
#[derive(Debug)]
pub(crate) struct Ended;

/// Which services a viewer may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Visible {
    /// Every service.
    All,
    /// The decision per service name; a name not in it is hidden.
    Only(HashMap<String, bool>),
}

impl Visible {
    pub(crate) fn shows(&self, service: &str) -> bool {
        match self {
            Visible::All => true,
            Visible::Only(decided) => decided.get(service).copied().unwrap_or(false),
        }
    }

    /// Whether a service decided in both `self` and `before` went from
    /// shown to hidden or back (so the page needs a fresh snapshot).
    pub(crate) fn flipped_from(&self, before: &Visible) -> bool {
        match (before, self) {
            (Visible::All, Visible::All) => false,
            (Visible::All, Visible::Only(now)) => now.values().any(|shown| !shown),
            (Visible::Only(then), Visible::All) => then.values().any(|shown| !shown),
            (Visible::Only(then), Visible::Only(now)) => then
                .iter()
                .any(|(name, shown)| now.get(name).is_some_and(|s| s != shown)),
        }
    }
}

impl Auth {
    pub(crate) fn new(etcd: &Etcd) -> Auth {
        Auth {
            anonymous: etcd.anonymous(),
            check: Mutex::new(None),
            known: Mutex::new(None),
            probing: tokio::sync::Mutex::new(()),
            sessions: Mutex::new(HashMap::new()),
            secure_cookie: AtomicBool::new(false),
            throttle: muster_tls::Throttle::default(),
        }
    }

    pub(crate) fn throttle(&self) -> &muster_tls::Throttle {
        &self.throttle
    }

    pub(crate) fn set_check(&self, check: AuthCheck) {
        *lock(&self.check) = Some(check);
    }

    pub(crate) fn set_secure_cookie(&self, secure: bool) {
        self.secure_cookie.store(secure, Ordering::Relaxed);
    }

    /// The session a cookie names, if it is still usable (and then it
    /// counts as used).
    fn session(&self, id: &str) -> Option<Arc<Session>> {
        let mut sessions = lock(&self.sessions);
        let session = sessions.get(id)?.clone();
        if !usable(&session, Instant::now()) {
            sessions.remove(id);
            return None;
        }
        session.touch();
        Some(session)
    }

    fn insert(&self, session: Arc<Session>) {
        let now = Instant::now();
        let mut sessions = lock(&self.sessions);
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| usable(s, now));
        }
        while sessions.len() >= MAX_SESSIONS {
            let Some(oldest) = sessions
                .values()
                .min_by_key(|s| *lock(&s.last_used))
                .map(|s| s.id.clone())
            else {
                break;
            };
            if let Some(s) = sessions.remove(&oldest) {
                s.ended.store(true, Ordering::Relaxed);
            }
        }
        sessions.insert(session.id.clone(), session);
    }

    fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let session = lock(&self.sessions).remove(id)?;
        session.ended.store(true, Ordering::Relaxed);
        Some(session)
    }

    /// Live sessions (for tests and the debug output).
    pub(crate) fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }
}

impl Dashboard {
    fn auth(&self) -> &Auth {
        &self.inner.auth
    }

    /// Whether the registry has authentication enabled: the in-process
    /// check when one is set, else the probe (cached for [`AUTH_FRESH`]).
    /// A registry that cannot be asked keeps the last answer; without one
    /// this is the error.
    pub(crate) async fn auth_enabled(&self) -> Result<bool, muster::Error> {
        let check = lock(&self.auth().check).clone();
        if let Some(check) = check {
            return Ok(check());
        }
        let fresh = |known: Option<(bool, Instant)>| {
            known.and_then(|(on, at)| (at.elapsed() < AUTH_FRESH).then_some(on))
        };
        if let Some(on) = fresh(*lock(&self.auth().known)) {
            return Ok(on);
        }
        let _one_at_a_time = self.auth().probing.lock().await;
        let known = *lock(&self.auth().known);
        if let Some(on) = fresh(known) {
            return Ok(on);
        }
        match self.probe_auth().await {
            Ok(on) => {
                if known.is_some_and(|(was, _)| was != on) || known.is_none() {
                    tracing::info!(
                        enabled = on,
                        "registry authentication is {}",
                        if on {
                            "on: the dashboard asks for a login"
                        } else {
                            "off: the dashboard needs no login"
                        }
                    );
                }
                *lock(&self.auth().known) = Some((on, Instant::now()));
                Ok(on)
            }
            Err(e) => match known {
                Some((on, _)) => {
                    tracing::debug!(error = %e, "cannot tell whether auth is on; keeping the last answer");
                    Ok(on)
                }
                None => Err(e),
            },
        }
    }

    async fn probe_auth(&self) -> Result<bool, muster::Error> {
        let key = format!("{}/", self.prefix().trim_end_matches('/')).into_bytes();
        let req = muster_proto::RangeRequest {
            key,
            count_only: true,
            ..Default::default()
        };
        let anonymous = &self.auth().anonymous;
        match anonymous.range(req).await {
            Ok(_) => {
                let has_identity = anonymous
                    .config()
                    .tls
                    .as_ref()
                    .is_some_and(|tls| tls.cert.is_some());
                if !has_identity {
                    return Ok(false);
                }
                // The certificate may name a user who may read: ask
                // Authenticate, which says whether auth is enabled.
                match anonymous.authenticate_as("", "").await {
                    Ok(None) => Ok(false),
                    Ok(Some(_)) | Err(muster::Error::AuthFailed(_)) => Ok(true),
                    Err(e) => Err(e),
                }
            }
            Err(muster::Error::PermissionDenied { .. } | muster::Error::AuthFailed(_)) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// The viewer of a request with these headers: anyone when auth is
    /// off, else the session its cookie names; otherwise the response to
    /// give (401, or 503 when the registry cannot say whether auth is on).
    pub(crate) async fn viewer(&self, headers: &HeaderMap) -> Result<Viewer, Response> {
        match self.auth_enabled().await {
            Ok(false) => Ok(Viewer::Anyone),
            Ok(true) => session_id(headers)
                .and_then(|id| self.auth().session(id))
                .map(Viewer::User)
                .ok_or_else(login_required),
            Err(e) => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cannot tell whether the registry requires a login: {e}"),
            )),
        }
    }

    /// Whether `viewer` may still look: a session that has not ended, or
    /// an anonymous viewer while auth stays off.
    pub(crate) async fn still_valid(&self, viewer: &Viewer) -> bool {
        match viewer {
            Viewer::Anyone => matches!(self.auth_enabled().await, Ok(false)),
            Viewer::User(session) => {
                let now = Instant::now();
                // An open page keeps its session alive.
                let ok = !session.ended.load(Ordering::Relaxed)
                    && now.duration_since(session.created) < LIFETIME;
                if ok {
                    session.touch();
                } else {
                    self.auth().remove(&session.id);
                }
                ok
            }
        }
    }

    /// Which of `services` the viewer may see.
    pub(crate) async fn visible<'a>(
        &self,
        viewer: &Viewer,
        services: impl IntoIterator<Item = &'a str>,
    ) -> Result<Visible, Ended> {
        let Viewer::User(session) = viewer else {
            return Ok(Visible::All);
        };
        let dir = format!("{}/", self.prefix().trim_end_matches('/'));
        let end = muster::instance::prefix_range_end(dir.as_bytes());
        let whole = session.may_read(dir.into_bytes(), end).await;
        let registry_down = match whole {
            Permission::Yes => return Ok(Visible::All),
            Permission::Ended => {
                self.auth().remove(&session.id);
                return Err(Ended);
            }
            Permission::No => false,
            Permission::Unknown(Some(true)) => return Ok(Visible::All),
            Permission::Unknown(_) => true,
        };
        let mut names: Vec<&str> = services.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        let mut decided = HashMap::with_capacity(names.len());
        if registry_down {
            // Do not wait for a timeout per service: the last answers.
            let perms = lock(&session.perms);
            for name in names {
                let key = self.service_range(name);
                let shown = perms.get(&key).is_some_and(|(allowed, _)| *allowed);
                decided.insert(name.to_string(), shown);
            }
            return Ok(Visible::Only(decided));
        }
        for chunk in names.chunks(CHECKS_AT_ONCE) {
            let mut checks = tokio::task::JoinSet::new();
            for name in chunk {
                let (key, end) = self.service_range(name);
                let session = session.clone();
                let name = name.to_string();
                checks.spawn(async move { (name, session.may_read(key, end).await) });
            }
            while let Some(done) = checks.join_next().await {
                let Ok((name, permission)) = done else {
                    continue; // a panicked check hides its service
                };
                let shown = match permission {
                    Permission::Yes => true,
                    Permission::No => false,
                    Permission::Unknown(last) => last.unwrap_or(false),
                    Permission::Ended => {
                        self.auth().remove(&session.id);
                        return Err(Ended);
                    }
                };
                decided.insert(name, shown);
            }
        }
        Ok(Visible::Only(decided))
    }

    /// Whether the viewer may read `[key, end)` (the whole keyspace, the
    /// prefix), for the status panel's counts; `false` when unsure.
    pub(crate) async fn may_read(&self, viewer: &Viewer, key: Vec<u8>, end: Vec<u8>) -> bool {
        match viewer {
            Viewer::Anyone => true,
            Viewer::User(session) => match session.may_read(key, end).await {
                Permission::Yes => true,
                Permission::Unknown(last) => last.unwrap_or(false),
                Permission::No | Permission::Ended => false,
            },
        }
    }

    /// `{prefix}/{service}/` and its prefix end.
    fn service_range(&self, service: &str) -> (Vec<u8>, Vec<u8>) {
        let key = muster::instance::service_prefix(self.prefix().trim_end_matches('/'), service);
        let end = muster::instance::prefix_range_end(key.as_bytes());
        (key.into_bytes(), end)
    }

    /// Live sessions.
    pub fn sessions(&self) -> usize {
        self.auth().session_count()
    }
}

impl FromRequestParts<Dashboard> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        dashboard: &Dashboard,
    ) -> Result<Viewer, Response> {
        dashboard.viewer(&parts.headers).await
    }
}

/// The `muster_session` cookie's value, if the request has one.
fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then_some(value.trim())
        })
        .filter(|id| !id.is_empty())
}

/// A JSON error answer.
fn error(status: StatusCode, message: &str) -> Response {
    let mut resp = no_store(Json(serde_json::json!({ "error": message })));
    *resp.status_mut() = status;
    resp
}

pub(crate) fn login_required() -> Response {
    let mut resp = no_store(Json(serde_json::json!({
        "error": "login required: the registry has authentication enabled",
        "login": true,
    })));
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    resp
}

fn no_store(body: impl IntoResponse) -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// 256 random bits from the OS, in hex.
fn new_session_id() -> Result<String, getrandom::Error> {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random)?;
    Ok(random.iter().map(|b| format!("{b:02x}")).collect())
}

fn cookie(value: &str, secure: bool, clear: bool) -> HeaderValue {
    let mut cookie = format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict");
    if clear {
        cookie.push_str("; Max-Age=0");
    }
    if secure {
        cookie.push_str("; Secure");
    }
    // Hex and fixed words only: always a valid header value.
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[derive(Deserialize)]
struct Login {
    name: String,
    password: String,
}

/// Whether the request says its body is JSON (`application/json`, with
/// or without parameters).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// `POST /api/login`. Failed logins from one browser address slow down
/// that address's next ones (when the router is served with
/// `into_make_service_with_connect_info::<SocketAddr>()`, as `muster`
/// serves it; without the address nobody is slowed down here).
pub(crate) async fn login(
    State(dashboard): State<Dashboard>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let peer = peer.map(|Extension(ConnectInfo(addr))| addr.ip());
    // A cross-site form cannot send this content type; a cross-site fetch
    // sending it needs a CORS preflight, which is never granted.
    if !is_json(&headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the login as application/json",
        );
    }
    let Ok(login) = serde_json::from_slice::<Login>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected {\"name\": ..., \"password\": ...}",
        );
    };
    match dashboard.auth_enabled().await {
        Ok(true) => {}
        Ok(false) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the registry has authentication disabled: no login is needed",
            );
        }
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("registry unavailable: {e}"),
            );
        }
    }
    let Login { name, password } = login;
    if name.is_empty() {
        return error(StatusCode::UNAUTHORIZED, "a user name is required");
    }
    let throttle = &dashboard.auth().throttle;
    let wait = throttle.reserve(peer);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let token = match dashboard.inner.etcd.authenticate_as(&name, &password).await {
        Ok(Some(token)) => {
            throttle.succeeded(peer);
            token
        }
        Ok(None) => {
            *lock(&dashboard.auth().known) = Some((false, Instant::now()));
            return error(
                StatusCode::BAD_REQUEST,
                "the registry has authentication disabled: no login is needed",
            );
        }
        Err(muster::Error::AuthFailed(reason)) => {
            throttle.failed(peer);
            tracing::info!(user = %name, %reason, "dashboard login refused");
            return error(StatusCode::UNAUTHORIZED, &reason);
        }
        Err(e) => {
            tracing::warn!(error = %e, "dashboard login: the registry did not answer");
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("registry unavailable: {e}"),
            );
        }
    };
    let etcd = match dashboard.inner.etcd.with_token(&token) {
        Ok(etcd) => etcd,
        Err(e) => return error(StatusCode::BAD_GATEWAY, &e.to_string()),
    };
    let id = match new_session_id() {
        Ok(id) => id,
        Err(e) => {
            tracing::error!(error = %e, "no randomness for a session id");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "cannot create a session");
        }
    };
    // A new login replaces the session the browser had.
    if let Some(old) = session_id(&headers) {
        dashboard.auth().remove(old);
    }
    let now = Instant::now();
    dashboard.auth().insert(Arc::new(Session {
        id: id.clone(),
        user: name.clone(),
        etcd,
        created: now,
        last_used: Mutex::new(now),
        ended: AtomicBool::new(false),
        perms: Mutex::new(HashMap::new()),
    }));
    tracing::info!(user = %name, "dashboard login");
    let secure = dashboard.auth().secure_cookie.load(Ordering::Relaxed);
    let mut resp = no_store(Json(serde_json::json!({ "auth": true, "user": name })));
    resp.headers_mut()
        .insert(header::SET_COOKIE, cookie(&id, secure, false));
    resp
}

/// `POST /api/logout`: ends the session the cookie names (if any) and
/// clears the cookie.
pub(crate) async fn logout(State(dashboard): State<Dashboard>, headers: HeaderMap) -> Response {
    if let Some(session) = session_id(&headers).and_then(|id| dashboard.auth().remove(id)) {
        tracing::info!(user = %session.user, "dashboard logout");
    }
    let secure = dashboard.auth().secure_cookie.load(Ordering::Relaxed);
    let mut resp = no_store(Json(serde_json::json!({ "ok": true })));
    resp.headers_mut()
        .insert(header::SET_COOKIE, cookie("", secure, true));
    resp
}

/// `GET /api/session`: whether auth is on and who is logged in; 401 when
/// a login is needed.
pub(crate) async fn session(viewer: Viewer) -> Response {
    let body = match viewer {
        Viewer::Anyone => serde_json::json!({ "auth": false, "user": null }),
        Viewer::User(session) => serde_json::json!({ "auth": true, "user": session.user() }),
    };
    no_store(Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        assert_eq!(session_id(&headers), None);
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("x=y; muster_session=abc ; z=1"),
        );
        assert_eq!(session_id(&headers), Some("abc"));
        let mut empty = HeaderMap::new();
        empty.append(header::COOKIE, HeaderValue::from_static("muster_session="));
        assert_eq!(session_id(&empty), None);
    }

    #[test]
    fn cookies_are_http_only_and_strict() {
        let c = cookie("ab12", false, false);
        assert_eq!(
            c.to_str().unwrap(),
            "muster_session=ab12; Path=/; HttpOnly; SameSite=Strict"
        );
        let c = cookie("", true, true);
        assert_eq!(
            c.to_str().unwrap(),
            "muster_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0; Secure"
        );
    }

    #[test]
    fn session_ids_are_long_and_random() {
        let a = new_session_id().unwrap();
        let b = new_session_id().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn only_json_logins() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        assert!(!is_json(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_json(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert!(is_json(&h));
    }

    #[test]
    fn a_flip_needs_a_decision_on_both_sides() {
        let some = |pairs: &[(&str, bool)]| {
            Visible::Only(pairs.iter().map(|(n, s)| (n.to_string(), *s)).collect())
        };
        let a = some(&[("web", true), ("db", false)]);
        assert!(!a.flipped_from(&a));
        // A new service is no flip: its events come as changes.
        assert!(!some(&[("web", true), ("db", false), ("new", true)]).flipped_from(&a));
        assert!(some(&[("web", false), ("db", false)]).flipped_from(&a));
        assert!(some(&[("web", true), ("db", true)]).flipped_from(&a));
        assert!(Visible::All.flipped_from(&a));
        assert!(a.flipped_from(&Visible::All));
        assert!(!some(&[("web", true)]).flipped_from(&Visible::All));
        assert!(a.shows("web") && !a.shows("db") && !a.shows("unknown"));
    }
}
