//! Body types: what the gateway answers with, and what it sends upstream.
//! Both stream frame by frame; nothing is ever collected whole. They wrap
//! the bodies of the layers below: the upstream client's response body and
//! hyper's request body; the client takes any [`Body`] to send.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use muster::balance::InFlight;

use crate::client::ResponseBody;
use crate::h1::RawHeaders;
use crate::watchdog::Finished;

/// The body of a response the gateway gives: either its own small answer
/// (errors, health, metrics) or the upstream's body, streamed through.
#[derive(Debug)]
pub struct GatewayBody {
    kind: Kind,
    /// Counts the request finished on its connection once the body is
    /// dropped (see [`crate::watchdog`]).
    finished: Option<Finished>,
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
        /// The answer's header lines as the upstream sent them, until the
        /// server side takes them ([`GatewayBody::take_headers`]).
        headers: Option<RawHeaders>,
    },
}

impl GatewayBody {
    /// A body of known bytes.
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        GatewayBody {
            kind: Kind::Full((!bytes.is_empty()).then_some(bytes)),
            finished: None,
        }
    }

    /// An empty body.
    pub(crate) fn empty() -> Self {
        GatewayBody {
            kind: Kind::Full(None),
            finished: None,
        }
    }

    /// An upstream's body, holding the request's in-flight guard, and the
    /// answer's header lines (the response's header map stays empty: the
    /// gateway's HTTP/1.1 side writes the lines as they came, hyper's side
    /// makes a map of them, see [`into_hyper`]).
    pub(crate) fn upstream(
        body: ResponseBody,
        in_flight: Option<InFlight>,
        headers: RawHeaders,
    ) -> Self {
        let mut kind = Kind::Upstream {
            body,
            in_flight,
            headers: Some(headers),
        };
        done(&mut kind);
        GatewayBody {
            kind,
            finished: None,
        }
    }

    /// The upstream's header lines, if this is an upstream's body and
    /// they were not taken yet.
    pub(crate) fn take_headers(&mut self) -> Option<RawHeaders> {
        match &mut self.kind {
            Kind::Upstream { headers, .. } => headers.take(),
            Kind::Full(_) => None,
        }
    }

    /// The same body, counting its request finished when dropped.
    pub(crate) fn counted(mut self, finished: Finished) -> Self {
        self.finished = Some(finished);
        self
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
    if let Kind::Upstream {
        body, in_flight, ..
    } = kind
        && in_flight.is_some()
        && body.is_end_stream()
    {
        in_flight.take();
    }
}

/// `resp` as hyper takes it: the upstream's header lines (see
/// [`GatewayBody::upstream`]) in its header map.
pub(crate) fn into_hyper(mut resp: http::Response<GatewayBody>) -> http::Response<GatewayBody> {
    if let Some(raw) = resp.body_mut().take_headers() {
        let map = raw.to_map();
        let headers = resp.headers_mut();
        if headers.is_empty() {
            *headers = map;
        } else {
            for (name, value) in map {
                if let Some(name) = name {
                    headers.append(name, value);
                }
            }
        }
    }
    resp
}

/// A client's request body on its way upstream. It remembers whether any
/// of it was read: an attempt that failed before (a connect error,
/// typically) leaves the body whole, and the request can be sent again to
/// another instance.
#[derive(Debug)]
pub(crate) struct RequestBody<B = Incoming> {
    body: B,
    started: bool,
}

impl<B: Body<Data = Bytes> + Unpin> RequestBody<B> {
    pub(crate) fn new(body: B) -> Self {
        RequestBody {
            body,
            started: false,
        }
    }

    /// Whether any of the body was asked for (and so may be gone).
    pub(crate) fn started(&self) -> bool {
        self.started
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    /// The next frame of the client's body: from now on it counts as
    /// started.
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let RequestBody { body, started } = self.get_mut();
        *started = true;
        Pin::new(body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full};

    use super::*;

    #[tokio::test]
    async fn a_request_body_is_started_once_asked_for() {
        let mut body = RequestBody::new(Full::new(Bytes::from_static(b"abc")));
        assert!(!body.started());
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert!(body.started());
        assert!(body.is_end_stream());
    }
}
