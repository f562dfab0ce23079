//! The request path: answer the gateway's own paths, find the route, pick
//! an instance, forward, retry when it is safe, and stream the answer back.

use std::borrow::Cow;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use muster::Instance;
use muster::balance::{AnyLoadBalancer, InFlight, Picked};
use tokio::time::Sleep;

use crate::body::{GatewayBody, RequestBody};
use crate::client::{Outbound, SendError, UpstreamClient};
use crate::config::GatewayConfig;
use crate::error::json_error;
use crate::headers::{ClientAddr, Outgoing, RequestFraming, write_request_head};
use crate::metrics::{ErrorKind, Metrics};
use crate::route::{ActiveRoute, RouteTable};
use crate::tls::TlsClients;
use crate::upgrade::{is_upgrade, tunnel};
use crate::upstream::Upstreams;

/// How long a request to a service that discovery has not listed yet
/// waits for the listing (at most; the route's timeout may be shorter).
const RESOLVE_WAIT: Duration = Duration::from_secs(3);

/// Everything the request path needs; shared by all connections.
#[derive(Debug)]
pub(crate) struct Proxy {
    pub(crate) routes: ArcSwap<RouteTable>,
    pub(crate) upstreams: Upstreams,
    pub(crate) metrics: Arc<Metrics>,
    /// Connectors for `https://` instances.
    pub(crate) tls: TlsClients,
    connect_timeout: Duration,
    pool_idle_timeout: Duration,
    health_path: Option<String>,
    metrics_path: Option<String>,
}

/// What [`Proxy::forward`] needs of the client's request besides its
/// body.
struct ClientRequest<'a> {
    parts: &'a http::request::Parts,
    /// See [`request_host`].
    host: Option<&'a str>,
    /// The client's side of a protocol upgrade it asked for.
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The connection's timer for the route timeout (see [`within`]).
    timer: Option<Pin<&'a mut Sleep>>,
}

/// An instance chosen for one attempt.
enum Target {
    /// From the lane's balancer: holds the lane's own handle on the
    /// instance, and the in-flight guard.
    Picked(Picked),
    /// The last resort of a retry (no guard).
    Listed(Arc<Instance>),
}

impl Target {
    fn instance(&self) -> &Instance {
        match self {
            Target::Picked(p) => p,
            Target::Listed(i) => i,
        }
    }

    /// The guard counting the request in flight, if any.
    fn into_in_flight(self) -> Option<InFlight> {
        match self {
            Target::Picked(p) => p.into_in_flight(),
            Target::Listed(_) => None,
        }
    }
}

impl Proxy {
    pub(crate) fn new(config: &GatewayConfig, upstreams: Upstreams, metrics: Arc<Metrics>) -> Self {
        Proxy {
            routes: ArcSwap::default(),
            upstreams,
            metrics,
            tls: TlsClients::new(config.upstream_ca.clone()),
            connect_timeout: config.connect_timeout,
            pool_idle_timeout: config.pool_idle_timeout,
            health_path: config.health_path.clone(),
            metrics_path: config.metrics_path.clone(),
        }
    }

    /// A pool of upstream connections. Each serving thread has its own, so
    /// a request and its upstream connection live on the same thread.
    pub(crate) fn client(&self) -> UpstreamClient {
        UpstreamClient::new(self.connect_timeout, self.pool_idle_timeout)
    }

    /// The Prometheus text.
    pub(crate) fn render_metrics(&self) -> String {
        let mut out = self.metrics.render(&self.upstreams.reports());
        // How fast discovery applies changes, per routed service.
        self.upstreams.discovery().render_metrics(&mut out);
        out
    }

    /// Answers the admin listener: health and metrics only.
    pub(crate) fn handle_admin(&self, req: &Request<Incoming>) -> Response<GatewayBody> {
        let path = req.uri().path();
        if path == "/metrics" || self.metrics_path.as_deref() == Some(path) {
            return self.metrics_response();
        }
        if path == "/healthz" || self.health_path.as_deref() == Some(path) {
            return text(StatusCode::OK, "ok\n");
        }
        json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the admin listener serves /metrics and /healthz",
            None,
        )
    }

    fn metrics_response(&self) -> Response<GatewayBody> {
        let mut resp = text(StatusCode::OK, self.render_metrics());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }

    /// Answers one request from a client. Never fails: every problem is an
    /// HTTP answer.
    ///
    /// Generic over the request body (hyper's [`Incoming`] today), so that
    /// a downstream server other than hyper's can hand its requests here.
    ///
    /// `timer`: a connection that serves its requests one at a time lends
    /// its own timer for the route timeout, reset for each request (see
    /// [`within`]); without one, each request arms a timer of its own.
    pub(crate) async fn handle<B>(
        &self,
        client: &UpstreamClient,
        mut req: Request<B>,
        peer: &ClientAddr,
        timer: Option<Pin<&mut Sleep>>,
    ) -> Response<GatewayBody>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let start = Instant::now();
        let path = req.uri().path();
        if self.health_path.as_deref() == Some(path) {
            return text(StatusCode::OK, "ok\n");
        }
        if self.metrics_path.as_deref() == Some(path) {
            return self.metrics_response();
        }
        if let Some(resp) = reject(&req) {
            self.metrics
                .unrouted
                .observe(resp.status(), start.elapsed());
            return resp;
        }
        // Taken before the request is split (hyper keeps it in the
        // request's extensions).
        let upgrade = is_upgrade(req.version(), req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let host = request_host(&parts);
        let table = self.routes.load();
        let Some(route) = table.find(host.as_deref(), path) else {
            let resp = json_error(
                StatusCode::NOT_FOUND,
                "no_route",
                &format!(
                    "no route for {} {}{}",
                    parts.method,
                    host.as_deref().unwrap_or(""),
                    path
                ),
                None,
            );
            self.metrics
                .unrouted
                .observe(resp.status(), start.elapsed());
            return resp;
        };
        let route = route.clone();
        drop(table);
        let request = ClientRequest {
            parts: &parts,
            host: host.as_deref(),
            upgrade: client_upgrade,
            timer,
        };
        let resp = self
            .forward(client, &route, request, body, peer, start)
            .await;
        route.metrics.observe(resp.status(), start.elapsed());
        resp
    }

    async fn forward<B>(
        &self,
        client: &UpstreamClient,
        route: &ActiveRoute,
        request: ClientRequest<'_>,
        body: B,
        peer: &ClientAddr,
        start: Instant,
    ) -> Response<GatewayBody>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let deadline = start + route.timeout;
        let ClientRequest {
            parts,
            host,
            upgrade: client_upgrade,
            mut timer,
        } = request;
        let upgrade = client_upgrade.is_some();

        // What every attempt sends. The client's headers are not touched:
        // the rewriting happens as the head is written.
        let rewritten = route.upstream_path(parts.uri.path(), parts.uri.query());
        let target = match &rewritten {
            Some(path) => path.as_str(),
            None => parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
        };
        let hash_key = route.hash_key(&parts.headers);
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        );
        // The body is framed again: its length if known, else chunked. A
        // request that may carry a body says it has none.
        let framing = if http_body::Body::is_end_stream(&body) {
            let bodyless = matches!(
                parts.method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE | Method::TRACE
            );
            if bodyless && crate::headers::find(&parts.headers, &header::CONTENT_LENGTH).is_none() {
                RequestFraming::None
            } else {
                RequestFraming::Length(0)
            }
        } else {
            match http_body::Body::size_hint(&body).exact() {
                Some(n) => RequestFraming::Length(n),
                None => RequestFraming::Chunked,
            }
        };
        let chunked = framing == RequestFraming::Chunked;
        let mut body = (!http_body::Body::is_end_stream(&body)).then(|| RequestBody::new(body));
        let uri_authority = parts.uri.authority().map(|a| a.as_str());

        let attempts = 1 + route.retries;
        let mut tried: Vec<String> = Vec::new();
        let mut last_error = String::new();
        for attempt in 0..attempts {
            let Some(target_instance) = self.pick(route, hash_key, &tried, deadline).await else {
                if attempt == 0 {
                    return self.no_instance(route);
                }
                break;
            };
            let state = route.service.instance(target_instance.instance());
            // Borrowed: cloning would bump a reference count that every
            // serving thread shares.
            let Some((scheme, authority)) = state.target.as_ref() else {
                tracing::warn!(service = %route.route.service, instance = %state.id, addr = %state.addr, "instance address is not http(s)://host:port; skipping it");
                last_error = format!(
                    "instance {} has an unusable address {:?}",
                    state.id, state.addr
                );
                tried.push(target_instance.instance().id.clone());
                continue;
            };
            let tls = if *scheme == http::uri::Scheme::HTTPS {
                match self.tls.connector(&route.trust) {
                    Ok(tls) => Some(&**tls),
                    Err(e) => {
                        // The gateway's fault, not the instance's.
                        tracing::warn!(service = %route.route.service, instance = %state.id, error = %e, "cannot verify https:// instances; set an upstream CA");
                        last_error = format!("instance {} ({}): {e}", state.id, state.addr);
                        tried.push(target_instance.instance().id.clone());
                        continue;
                    }
                }
            } else {
                None
            };
            let outgoing = Outgoing {
                method: &parts.method,
                target,
                headers: &parts.headers,
                client: peer,
                host,
                default_host: uri_authority.unwrap_or(authority.as_str()),
                upgrade,
                framing,
            };
            // Written into the connection's own buffer (no allocation).
            let head = |out: &mut Vec<u8>| write_request_head(out, &outgoing);
            let sent = Instant::now();
            // A pooled connection the upstream had closed gets one more go
            // on a fresh connection, on the same instance.
            let mut fresh = false;
            let result = loop {
                let outbound = Outbound {
                    method: &parts.method,
                    head: &head,
                    body: body.as_mut(),
                    chunked,
                    sent,
                };
                // Pinned here, where it stays: `within` borrows it rather
                // than moving it into its own state (two copies of the
                // send's future saved).
                let result = {
                    let send = pin!(client.send(authority, tls, outbound, fresh));
                    within(deadline, timer.as_mut().map(Pin::as_mut), send).await
                };
                match result {
                    Ok(Err(SendError::Stale(e)))
                        if !fresh && idempotent && body.as_ref().is_none_or(|b| !b.started()) =>
                    {
                        tracing::debug!(service = %route.route.service, instance = %state.id, error = %e, "pooled connection was closed; sending again");
                        fresh = true;
                    }
                    other => break other,
                }
            };
            match result {
                Err(Elapsed) => {
                    route.metrics.error(ErrorKind::Timeout);
                    route.service.failure(&state);
                    tracing::debug!(service = %route.route.service, instance = %state.id, "upstream timed out");
                    return json_error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        &format!(
                            "service {:?} did not answer within {:?}",
                            route.route.service, route.timeout
                        ),
                        Some(&route.route.service),
                    );
                }
                Ok(Ok(answer)) => {
                    state.latency.observe(sent.elapsed());
                    if answer.status.is_server_error() {
                        route.service.failure(&state);
                    } else {
                        route.service.success(&state);
                    }
                    if let Some(upgrade) = answer.upgraded {
                        let mut resp = Response::new(GatewayBody::empty());
                        *resp.status_mut() = answer.status;
                        *resp.headers_mut() = answer.headers.to_map();
                        let (protocol, upgraded) = *upgrade;
                        let Some(client_upgrade) = client_upgrade else {
                            tracing::warn!(service = %route.route.service, instance = %state.id, "upstream switched protocols unasked");
                            return json_error(
                                StatusCode::BAD_GATEWAY,
                                "upstream_failed",
                                &format!(
                                    "service {:?} switched protocols without being asked",
                                    route.route.service
                                ),
                                Some(&route.route.service),
                            );
                        };
                        let headers = resp.headers_mut();
                        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                        headers.insert(header::UPGRADE, protocol);
                        tunnel(client_upgrade, upgraded, target_instance.into_in_flight());
                        return resp;
                    }
                    // The header lines go with the body, as they came.
                    let mut resp = Response::new(GatewayBody::upstream(
                        answer.body,
                        target_instance.into_in_flight(),
                        answer.headers,
                    ));
                    *resp.status_mut() = answer.status;
                    return resp;
                }
                Ok(Err(e)) => {
                    let (kind, retryable) = match &e {
                        // Nothing was sent.
                        SendError::Connect(_) => (ErrorKind::Connect, true),
                        SendError::Tls(reason) => {
                            tracing::warn!(service = %route.route.service, instance = %state.id, addr = %state.addr, error = %reason, "TLS to the instance failed");
                            (ErrorKind::Tls, true)
                        }
                        SendError::Stale(_) | SendError::Request(_) => (
                            ErrorKind::Request,
                            idempotent && body.as_ref().is_none_or(|b| !b.started()),
                        ),
                    };
                    route.metrics.error(kind);
                    route.service.failure(&state);
                    last_error = format!("instance {} ({}): {e}", state.id, state.addr);
                    tracing::debug!(service = %route.route.service, error = %last_error, retryable, "upstream attempt failed");
                    tried.push(target_instance.instance().id.clone());
                    if !retryable {
                        break;
                    }
                    if attempt + 1 < attempts {
                        route.metrics.retry();
                    }
                }
            }
        }
        tracing::warn!(service = %route.route.service, error = %last_error, "upstream failed");
        json_error(
            StatusCode::BAD_GATEWAY,
            "upstream_failed",
            &format!("service {:?} failed: {last_error}", route.route.service),
            Some(&route.route.service),
        )
    }

    /// Picks an instance not tried yet. Waits for discovery's first listing
    /// if the service has none yet.
    async fn pick(
        &self,
        route: &ActiveRoute,
        key: Option<&[u8]>,
        tried: &[String],
        deadline: Instant,
    ) -> Option<Target> {
        if let Some(t) = pick_from(&route.lb, key, tried) {
            return Some(t);
        }
        if route.service.is_resolved() || !tried.is_empty() {
            return None;
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(RESOLVE_WAIT);
        if !route.service.wait_resolved(wait).await {
            return None;
        }
        pick_from(&route.lb, key, tried)
    }

    fn no_instance(&self, route: &ActiveRoute) -> Response<GatewayBody> {
        let service = &route.route.service;
        let message = if route.service.is_resolved() {
            format!("service {service:?} has no live instance")
        } else {
            match route.service.last_error() {
                Some(e) => format!("service {service:?} cannot be discovered yet: {e}"),
                None => format!("service {service:?} is not discovered yet"),
            }
        };
        json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_instance",
            &message,
            Some(service),
        )
    }
}

/// A pick from the balancer avoiding instances already tried.
fn pick_from(lb: &AnyLoadBalancer, key: Option<&[u8]>, tried: &[String]) -> Option<Target> {
    if tried.is_empty() {
        let picked = match key {
            Some(k) => lb.pick_key(k),
            None => lb.pick(),
        };
        return picked.map(Target::Picked);
    }
    for _ in 0..4 {
        let p = lb.pick()?;
        if !tried.contains(&p.id) {
            return Some(Target::Picked(p));
        }
    }
    // Few instances and bad luck: take the first one not tried.
    let instance = lb
        .instances()
        .into_iter()
        .find(|i| !tried.contains(&i.id))?;
    Some(Target::Listed(instance))
}

/// Requests the gateway refuses before routing.
fn reject<B>(req: &Request<B>) -> Option<Response<GatewayBody>> {
    if req.method() == Method::CONNECT {
        return Some(json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "CONNECT is not supported",
            None,
        ));
    }
    let path = req.uri().path();
    if !path.starts_with('/') {
        return Some(bad_request("the request target must be a path"));
    }
    // Dot segments would let a prefix match a path outside it.
    if path.contains("/.")
        && path.split('/').any(|seg| {
            seg == ".."
                || seg == "."
                || seg.eq_ignore_ascii_case("%2e%2e")
                || seg.eq_ignore_ascii_case("%2e")
        })
    {
        return Some(bad_request("dot segments are not allowed in the path"));
    }
    None
}

/// The host a request is for, without port, in lower case (borrowed
/// from the request unless it had upper-case letters): from the URI
/// (absolute form, HTTP/2) or the `Host` header.
fn request_host(req: &http::request::Parts) -> Option<Cow<'_, str>> {
    let raw = match req.uri.authority() {
        Some(a) => a.as_str(),
        None => crate::headers::find(&req.headers, &header::HOST)?
            .to_str()
            .ok()?,
    };
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    if host.is_empty() {
        None
    } else if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

fn bad_request(message: &str) -> Response<GatewayBody> {
    json_error(StatusCode::BAD_REQUEST, "bad_request", message, None)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The route's deadline passed before the answer's head came.
#[derive(Debug)]
struct Elapsed;

/// `fut`'s output, unless `deadline` passes first.
///
/// With a connection's `timer`, the deadline is set on it: resetting a
/// registered timer to a later deadline is an atomic update (tokio moves it
/// in its wheel only when the earlier deadline comes), where arming a timer
/// for each request took the timer driver's lock twice, to register it and
/// to cancel it (about 800 instructions a request).
async fn within<F: Future>(
    deadline: Instant,
    timer: Option<Pin<&mut Sleep>>,
    mut fut: Pin<&mut F>,
) -> Result<F::Output, Elapsed> {
    let Some(mut timer) = timer else {
        return tokio::time::timeout_at(deadline.into(), fut)
            .await
            .map_err(|_| Elapsed);
    };
    timer.as_mut().reset(deadline.into());
    poll_fn(|cx| {
        if let Poll::Ready(out) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        timer.as_mut().poll(cx).map(|()| Err(Elapsed))
    })
    .await
}
