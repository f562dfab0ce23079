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

use crate::client::ResponseBody;

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
        /// Reads from the upstream connection, and gives it back to the
        /// pool once complete.
        body: ResponseBody,
        /// Counts the request as in flight to its instance until the
        /// response body is done (or the client goes away).
        in_flight: Option<InFlight>,
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

    /// An upstream's body, holding the request's in-flight guard.
    pub(crate) fn upstream(body: ResponseBody, in_flight: Option<InFlight>) -> Self {
        let mut kind = Kind::Upstream { body, in_flight };
        done(&mut kind);
        GatewayBody { kind }
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let kind = &mut self.get_mut().kind;
        match kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream { body, .. } => {
                let frame = Pin::new(body).poll_frame(cx);
                if frame.is_ready() {
                    done(kind);
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

/// Once the upstream body is complete (or failed), the request stops
/// counting as in flight.
fn done(kind: &mut Kind) {
    if let Kind::Upstream { body, in_flight } = kind
        && in_flight.is_some()
        && body.is_end_stream()
    {
        in_flight.take();
    }
}

/// A client's request body, held in a shared slot rather than moved into
/// the upstream request, so that when an attempt fails before the body was
/// touched (a connect error, typically) the body is still here and the
/// request can be retried on another instance.
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

impl SharedBody {
    /// The next frame of the client's body.
    pub(crate) fn poll_frame(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.0.started.store(true, Ordering::Release);
        let mut slot = self.0.body.lock().unwrap_or_else(PoisonError::into_inner);
        match slot.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }
}
