//! Body types: what the gateway answers with, and what it sends upstream.
//! Both stream frame by frame; nothing is ever collected whole.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use muster::balance::InFlight;

use crate::client::Pooled;

/// The body of a response the gateway gives: either its own small answer
/// (errors, health, metrics) or the upstream's body, streamed through.
#[derive(Debug)]
pub struct GatewayBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Upstream {
        body: Incoming,
        /// Counts the request as in flight to its instance until the
        /// response body is done (or the client goes away).
        in_flight: Option<InFlight>,
        /// The upstream connection, back to the pool once the body is
        /// read to the end (closed if it is dropped before).
        pooled: Option<Pooled>,
    },
}

impl GatewayBody {
    /// A body of known bytes.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        GatewayBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
        }
    }

    /// An empty body.
    pub(crate) fn empty() -> Self {
        GatewayBody {
            kind: Kind::Full(None),
        }
    }

    /// An upstream's body, holding the request's in-flight guard and its
    /// connection.
    pub(crate) fn upstream(body: Incoming, in_flight: Option<InFlight>, pooled: Pooled) -> Self {
        let mut kind = Kind::Upstream {
            body,
            in_flight,
            pooled: Some(pooled),
        };
        done(&mut kind, false);
        GatewayBody { kind }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let kind = &mut self.get_mut().kind;
        match kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream { body, .. } => {
                let frame = Pin::new(body).poll_frame(cx);
                match &frame {
                    Poll::Ready(Some(Ok(_))) => done(kind, false),
                    Poll::Ready(None) => done(kind, true),
                    Poll::Ready(Some(Err(_))) => {
                        if let Kind::Upstream { pooled, .. } = kind {
                            pooled.take();
                        }
                    }
                    Poll::Pending => {}
                }
                frame
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream { body, .. } => body.size_hint(),
        }
    }
}

/// Once the upstream body is complete: the connection goes back to the pool
/// and the request stops counting as in flight.
fn done(kind: &mut Kind, ended: bool) {
    if let Kind::Upstream {
        body,
        in_flight,
        pooled,
    } = kind
        && (ended || body.is_end_stream())
    {
        in_flight.take();
        if let Some(pooled) = pooled.take() {
            pooled.release();
        }
    }
}

/// The body of a request sent upstream.
///
/// A client's body is held in a shared slot rather than moved into the
/// upstream request, so that when an attempt fails before the body was
/// touched (a connect error, typically) the body is still here and the
/// request can be retried on another instance.
#[derive(Debug)]
pub(crate) enum UpstreamBody {
    /// No body.
    Empty,
    /// The client's body, streamed on first poll.
    Shared(SharedBody),
}

/// See [`UpstreamBody::Shared`].
#[derive(Debug, Clone)]
pub(crate) struct SharedBody(Arc<SharedInner>);

#[derive(Debug)]
struct SharedInner {
    started: AtomicBool,
    body: Mutex<Option<Incoming>>,
}

impl SharedBody {
    pub(crate) fn new(body: Incoming) -> Self {
        SharedBody(Arc::new(SharedInner {
            started: AtomicBool::new(false),
            body: Mutex::new(Some(body)),
        }))
    }

    /// Whether any of the body was asked for (and so may be gone).
    pub(crate) fn started(&self) -> bool {
        self.0.started.load(Ordering::Acquire)
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Shared(shared) => {
                shared.0.started.store(true, Ordering::Release);
                let mut slot = shared.0.body.lock().unwrap_or_else(PoisonError::into_inner);
                match slot.as_mut() {
                    Some(body) => Pin::new(body).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Shared(shared) => shared
                .0
                .body
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_none_or(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Shared(shared) => shared
                .0
                .body
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
        }
    }
}
