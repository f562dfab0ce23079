//! tonic and tower integration: a discovered service as a `tower::discover`
//! stream, and as a ready-to-use gRPC channel that balances over its live
//! instances and follows every change.
//!
//! [`BalancedChannel`] is a `tower::Service` that tonic clients accept in
//! place of a `Channel`:
//!
//! ```no_run
//! # async fn run(discovery: muster::Discovery) -> muster::Result<()> {
//! use muster::grpc::{BalancedChannel, ChannelConfig};
//! let greeter = discovery.service("greeter").await?;
//! let channel = BalancedChannel::new(&greeter, ChannelConfig::default());
//! // let mut client = GreeterClient::new(channel);
//! # Ok(()) }
//! ```
//!
//! Each call picks an instance from discovery's local table (power of two
//! choices on in-flight calls by default; draining instances get nothing
//! new) and goes out on that instance's own HTTP/2 connection. When an
//! instance dies, the connection failure ejects it for a while, so its
//! death costs no failed call even before its lease expires:
//!
//! - a call that provably never reached it (connection refused, or already
//!   known closed) is sent to another instance, as gRPC's transparent retry
//!   does;
//! - a call whose connection broke before any response arrived may or may
//!   not have run there, so it is sent again only if it is idempotent:
//!   marked per request with the [`Idempotent`] extension, or for every
//!   call with [`ChannelConfig::idempotent`].
//!
//! A call that got a response, even an error status, is never repeated.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Buf, Bytes};
use futures_util::Stream;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::discover::Change as DiscoverChange;

use crate::balance::{AnyLoadBalancer, BalancerKind, Filter, Picked};
use crate::discovery::{Change, Service, Update};
use crate::instance::Instance;

/// A boxed error, as tower services return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A discovered service as a `tower::discover` stream keyed by instance id:
/// serving instances are inserted, removed and draining ones removed, and
/// an instance whose address changed is inserted again. `make` turns an
/// instance into the service to balance over (e.g. a tonic `Channel`);
/// returning `None` skips it.
pub fn discover<S, F>(
    service: &Service,
    make: F,
) -> impl Stream<Item = Result<DiscoverChange<String, S>, Infallible>> + Send + 'static
where
    S: Send + 'static,
    F: Fn(&Instance) -> Option<S> + Send + 'static,
{
    let updates = service.updates();
    let state = (
        updates,
        make,
        HashMap::<String, Arc<Instance>>::new(),
        Vec::new(),
    );
    futures_util::stream::unfold(
        state,
        |(mut updates, make, mut known, mut queue)| async move {
            loop {
                if let Some(change) = queue.pop() {
                    return Some((Ok(change), (updates, make, known, queue)));
                }
                let update = updates.next().await?;
                let mut next: HashMap<String, Arc<Instance>> = known.clone();
                match update {
                    Update::Reset(snapshot) => {
                        next = snapshot
                            .serving()
                            .map(|i| (i.id.clone(), i.clone()))
                            .collect();
                    }
                    Update::Changes { changes, .. } => {
                        for change in changes {
                            match change {
                                Change::Added(i) | Change::Updated { new: i, .. }
                                    if i.is_serving() =>
                                {
                                    next.insert(i.id.clone(), i);
                                }
                                other => {
                                    next.remove(&other.instance().id);
                                }
                            }
                        }
                    }
                }
                // Emit removals and insertions (an insertion replaces).
                for id in known.keys() {
                    if !next.contains_key(id) {
                        queue.push(DiscoverChange::Remove(id.clone()));
                    }
                }
                for (id, instance) in &next {
                    let changed = known.get(id).is_none_or(|old| old.addr != instance.addr);
                    if changed && let Some(svc) = make(instance) {
                        queue.push(DiscoverChange::Insert(id.clone(), svc));
                    }
                }
                queue.reverse();
                known = next;
            }
        },
    )
}

/// Makes an `http://` URL of an instance address (`host:port` or a URL).
pub fn instance_uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// How a [`BalancedChannel`] behaves.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// The selection algorithm (default power of two choices).
    pub balancer: BalancerKind,
    /// Which instances are eligible.
    pub filter: Filter,
    /// Connection timeout per instance.
    pub connect_timeout: Duration,
    /// Timeout per call, if any.
    pub timeout: Option<Duration>,
    /// How many instances one call may try.
    pub max_attempts: usize,
    /// How long an instance that refused a connection is skipped (doubles
    /// on repeat, up to 16x).
    pub eject_for: Duration,
    /// The largest request body kept for a retry; larger ones are not retried.
    pub max_replay_bytes: usize,
    /// Whether every call may be repeated on another instance when its
    /// connection broke before a response (see [`Idempotent`]).
    pub idempotent: bool,
}

/// Marks one request as safe to repeat: insert it into the request's
/// extensions (`request.extensions_mut().insert(Idempotent)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Idempotent;

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            balancer: BalancerKind::PowerOfTwo,
            filter: Filter::new(),
            connect_timeout: Duration::from_secs(1),
            timeout: None,
            max_attempts: 3,
            eject_for: Duration::from_secs(1),
            max_replay_bytes: 64 * 1024,
            idempotent: false,
        }
    }
}

/// A gRPC channel over every live instance of a discovered service; see the
/// module docs. Cheap to clone.
#[derive(Clone)]
pub struct BalancedChannel {
    inner: Arc<ChannelInner>,
}

impl std::fmt::Debug for BalancedChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancedChannel")
            .field("instances", &self.inner.lb.len())
            .finish_non_exhaustive()
    }
}

struct ChannelInner {
    lb: Arc<AnyLoadBalancer>,
    config: ChannelConfig,
    /// One lazily connected channel per address; copy-on-write.
    channels: ArcSwap<HashMap<String, Channel>>,
    /// Ejected addresses: until when, and how many times in a row.
    ejected: ArcSwap<HashMap<String, (Instant, u32)>>,
    eject_lock: Mutex<()>,
}

impl BalancedChannel {
    /// A channel over `service`'s instances, following its changes.
    pub fn new(service: &Service, config: ChannelConfig) -> BalancedChannel {
        let lb = service.balancer(config.balancer, config.filter.clone());
        BalancedChannel {
            inner: Arc::new(ChannelInner {
                lb,
                config,
                channels: ArcSwap::default(),
                ejected: ArcSwap::default(),
                eject_lock: Mutex::new(()),
            }),
        }
    }

    /// How many instances calls are spread over now.
    pub fn len(&self) -> usize {
        self.inner.lb.len()
    }

    /// Whether there is no instance to call.
    pub fn is_empty(&self) -> bool {
        self.inner.lb.is_empty()
    }
}

impl ChannelInner {
    fn channel(&self, addr: &str) -> Result<Channel, BoxError> {
        if let Some(ch) = self.channels.load().get(addr) {
            return Ok(ch.clone());
        }
        let mut endpoint = Endpoint::from_shared(instance_uri(addr))?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true);
        if let Some(t) = self.config.timeout {
            endpoint = endpoint.timeout(t);
        }
        let channel = endpoint.connect_lazy();
        let live: Vec<String> = self.lb.instances().iter().map(|i| i.addr.clone()).collect();
        self.channels.rcu(|current| {
            let mut next: HashMap<String, Channel> = current
                .iter()
                .filter(|(a, _)| live.contains(a))
                .map(|(a, c)| (a.clone(), c.clone()))
                .collect();
            next.entry(addr.to_string())
                .or_insert_with(|| channel.clone());
            next
        });
        Ok(self.channels.load().get(addr).cloned().unwrap_or(channel))
    }

    fn is_ejected(&self, addr: &str) -> bool {
        self.ejected
            .load()
            .get(addr)
            .is_some_and(|(until, _)| *until > Instant::now())
    }

    fn eject(&self, addr: &str) {
        let _guard = self
            .eject_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = (**self.ejected.load()).clone();
        let now = Instant::now();
        next.retain(|_, (until, _)| *until + self.config.eject_for * 16 > now);
        let strikes = next.get(addr).map_or(0, |(_, n)| *n) + 1;
        let period = self.config.eject_for * (1u32 << (strikes - 1).min(4));
        tracing::warn!(%addr, ?period, "instance refused a call; ejecting it");
        next.insert(addr.to_string(), (now + period, strikes));
        self.ejected.store(Arc::new(next));
    }

    fn readmit(&self, addr: &str) {
        if self.ejected.load().contains_key(addr) {
            let _guard = self
                .eject_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut next = (**self.ejected.load()).clone();
            next.remove(addr);
            self.ejected.store(Arc::new(next));
        }
    }

    /// Picks an instance not tried yet and not ejected, if there is one;
    /// otherwise any instance not tried yet.
    fn pick(&self, tried: &[String]) -> Option<Picked> {
        let mut fallback = None;
        for _ in 0..(self.lb.len() * 2).max(4) {
            let picked = self.lb.pick()?;
            if tried.iter().any(|t| *t == picked.addr) {
                continue;
            }
            if !self.is_ejected(&picked.addr) {
                return Some(picked);
            }
            fallback.get_or_insert(picked);
        }
        fallback.or_else(|| {
            // Few instances: scan for one not tried.
            let all = self.lb.instances();
            let any = all.iter().find(|i| !tried.contains(&i.addr))?;
            (0..all.len() * 4).find_map(|_| self.lb.pick().filter(|p| p.addr == any.addr))
        })
    }

    async fn call(
        self: Arc<Self>,
        req: http::Request<Body>,
    ) -> Result<http::Response<Body>, BoxError> {
        let (parts, body) = req.into_parts();
        let idempotent = self.config.idempotent || parts.extensions.get::<Idempotent>().is_some();
        let replay = Replay::new(body, self.config.max_replay_bytes);
        let mut tried: Vec<String> = Vec::new();
        loop {
            let Some(picked) = self.pick(&tried) else {
                return Err(if tried.is_empty() {
                    tonic::Status::unavailable("no live instance of the service").into()
                } else {
                    tonic::Status::unavailable(format!(
                        "every instance tried failed: {}",
                        tried.join(", ")
                    ))
                    .into()
                });
            };
            let addr = picked.addr.clone();
            let mut channel = self.channel(&addr)?;
            let req = http::Request::from_parts(parts.clone(), Body::new(replay.attempt()));
            let result = tower::ServiceExt::ready(&mut channel).await;
            let result = match result {
                Ok(ch) => tower::Service::call(ch, req).await,
                Err(e) => Err(e),
            };
            drop(picked); // ends the in-flight count
            match result {
                Ok(resp) => {
                    self.readmit(&addr);
                    return Ok(resp);
                }
                Err(e) => {
                    let failure = classify(&e);
                    if failure != Failure::Other {
                        self.eject(&addr);
                    }
                    tried.push(addr);
                    let retry = match failure {
                        Failure::NotSent => true,
                        Failure::ConnectionBroken => idempotent,
                        Failure::Other => false,
                    };
                    if !retry || !replay.can_replay() || tried.len() >= self.config.max_attempts {
                        return Err(e.into());
                    }
                    tracing::debug!(error = %e, ?failure, "call failed before any response; trying another instance");
                }
            }
        }
    }
}

impl tower::Service<http::Request<Body>> for BalancedChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call waits for its own instance's connection.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(self.inner.clone().call(req))
    }
}

/// How a call failed before any response arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The request never reached the server: safe to send elsewhere.
    NotSent,
    /// The connection broke; the server may or may not have run it.
    ConnectionBroken,
    /// Anything else (timeouts included): not retried.
    Other,
}

fn classify(error: &(dyn std::error::Error + 'static)) -> Failure {
    use std::io::ErrorKind;
    let mut failure = Failure::Other;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_canceled() || h.is_closed() {
                return Failure::NotSent;
            }
            if h.is_incomplete_message() {
                failure = Failure::ConnectionBroken;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::ConnectionRefused => return Failure::NotSent,
                ErrorKind::BrokenPipe
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionAborted
                | ErrorKind::UnexpectedEof => failure = Failure::ConnectionBroken,
                _ => {}
            }
            // An io::Error's source() skips the error it wraps; look inside.
            if let Some(inner) = io.get_ref() {
                source = Some(inner);
                continue;
            }
        }
        let text = e.to_string();
        if text.contains("tcp connect error") || text.contains("error trying to connect") {
            return Failure::NotSent;
        }
        source = e.source();
    }
    failure
}

/// A request body that records what it sends (up to a limit) so that the
/// request can be sent again to another instance.
struct Replay {
    shared: Arc<Mutex<ReplayState>>,
}

struct ReplayState {
    inner: Option<Body>,
    recorded: Vec<Bytes>,
    recorded_len: usize,
    trailers: Option<http::HeaderMap>,
    ended: bool,
    overflow: bool,
    limit: usize,
}

impl Replay {
    fn new(body: Body, limit: usize) -> Replay {
        Replay {
            shared: Arc::new(Mutex::new(ReplayState {
                inner: Some(body),
                recorded: Vec::new(),
                recorded_len: 0,
                trailers: None,
                ended: false,
                overflow: false,
                limit,
            })),
        }
    }

    fn attempt(&self) -> ReplayBody {
        ReplayBody {
            shared: self.shared.clone(),
            pos: 0,
            trailers_sent: false,
        }
    }

    fn can_replay(&self) -> bool {
        !self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .overflow
    }
}

struct ReplayBody {
    shared: Arc<Mutex<ReplayState>>,
    pos: usize,
    trailers_sent: bool,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let mut state = this.shared.lock().unwrap_or_else(PoisonError::into_inner);
        if this.pos < state.recorded.len() {
            if state.overflow {
                return Poll::Ready(Some(Err(tonic::Status::internal(
                    "request body too large to send again",
                ))));
            }
            let chunk = state.recorded[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if state.ended {
            if !this.trailers_sent
                && let Some(t) = state.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        let Some(inner) = state.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                state.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(mut data) => {
                        let bytes = data.copy_to_bytes(data.remaining());
                        if !state.overflow {
                            if state.recorded_len + bytes.len() > state.limit {
                                state.overflow = true;
                                state.recorded.clear();
                            } else {
                                state.recorded_len += bytes.len();
                                state.recorded.push(bytes.clone());
                            }
                        }
                        this.pos = state.recorded.len();
                        Frame::data(bytes)
                    }
                    Err(frame) => {
                        if let Some(t) = frame.trailers_ref() {
                            state.trailers = Some(t.clone());
                            this.trailers_sent = true;
                        }
                        frame
                    }
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        state.ended
            && self.pos >= state.recorded.len()
            && (self.trailers_sent || state.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_body_replays_what_it_sent() {
        let body = Body::new(http_body_util::Full::new(Bytes::from_static(b"hello")));
        let replay = Replay::new(body, 1024);
        let first = replay.attempt().collect().await.unwrap().to_bytes();
        let second = replay.attempt().collect().await.unwrap().to_bytes();
        assert_eq!(first, "hello");
        assert_eq!(second, "hello");
        assert!(replay.can_replay());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_replayed() {
        let body = Body::new(http_body_util::Full::new(Bytes::from(vec![7u8; 100])));
        let replay = Replay::new(body, 10);
        let first = replay.attempt().collect().await.unwrap().to_bytes();
        assert_eq!(first.len(), 100);
        assert!(!replay.can_replay());
    }

    #[test]
    fn failures_are_classified_conservatively() {
        use std::io::{Error, ErrorKind};
        assert_eq!(
            classify(&Error::from(ErrorKind::ConnectionRefused)),
            Failure::NotSent
        );
        assert_eq!(
            classify(&Error::from(ErrorKind::BrokenPipe)),
            Failure::ConnectionBroken
        );
        assert_eq!(
            classify(&Error::from(ErrorKind::ConnectionReset)),
            Failure::ConnectionBroken
        );
        assert_eq!(classify(&Error::from(ErrorKind::TimedOut)), Failure::Other);
        let wrapped = Error::other(Error::from(ErrorKind::ConnectionRefused));
        assert_eq!(classify(&wrapped), Failure::NotSent);
    }

    #[test]
    fn uris() {
        assert_eq!(instance_uri("10.0.0.1:80"), "http://10.0.0.1:80");
        assert_eq!(instance_uri("https://x:1"), "https://x:1");
    }
}
