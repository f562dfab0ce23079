//! The tower layer that applies the faults to gRPC requests: refusals and
//! latency before a request is served, cuts of open streams.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::TryFutureExt;
use futures_util::future::{Either, MapOk};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

use super::{Before, Faults, StreamGuard, StreamKind, UNAVAILABLE_MESSAGE};

/// Wraps the gRPC services with the server's faults; without faults it
/// passes everything through untouched.
#[derive(Debug, Clone)]
pub struct FaultLayer {
    faults: Option<Arc<Faults>>,
}

impl FaultLayer {
    /// Applies `faults`, if any.
    pub fn new(faults: Option<Arc<Faults>>) -> FaultLayer {
        FaultLayer { faults }
    }
}

impl<S> tower::Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> FaultService<S> {
        FaultService {
            inner,
            faults: self.faults.clone(),
        }
    }
}

/// See [`FaultLayer`].
#[derive(Debug, Clone)]
pub struct FaultService<S> {
    inner: S,
    faults: Option<Arc<Faults>>,
}

/// The streams a cut can end, by gRPC path.
fn stream_kind(path: &str) -> Option<StreamKind> {
    match path {
        "/etcdserverpb.Watch/Watch" => Some(StreamKind::Watch),
        "/etcdserverpb.Lease/LeaseKeepAlive" => Some(StreamKind::KeepAlive),
        _ => None,
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<Request<B>> for FaultService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Body + Send + 'static,
{
    type Response = Response<FaultBody<R>>;
    type Error = S::Error;
    /// Without faults, the service's own future, unboxed: this layer sits
    /// on every request's path.
    type Future = Either<
        MapOk<S::Future, fn(Response<R>) -> Response<FaultBody<R>>>,
        BoxFuture<Result<Self::Response, S::Error>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(faults) = self.faults.clone() else {
            let plain: fn(Response<R>) -> Response<FaultBody<R>> = |r| r.map(FaultBody::plain);
            return Either::Left(self.inner.call(req).map_ok(plain));
        };
        // The clone that was made ready serves this request (tower's rule
        // for services called after an await).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let kind = stream_kind(req.uri().path());
        Either::Right(Box::pin(async move {
            match faults.before_request() {
                Before::Go => {}
                Before::Wait(wait) => tokio::time::sleep(wait).await,
                Before::Refuse => {
                    let refused = Status::unavailable(UNAVAILABLE_MESSAGE).into_http::<()>();
                    let (parts, ()) = refused.into_parts();
                    return Ok(Response::from_parts(parts, FaultBody::refused()));
                }
            }
            let guard = kind.map(|kind| faults.stream(kind));
            let resp = inner.call(req).await?;
            Ok(resp.map(|body| match guard {
                Some(guard) => FaultBody::cuttable(body, guard),
                None => FaultBody::plain(body),
            }))
        }))
    }
}

/// A response body that a fault can end early (with `Unavailable` in its
/// trailers), or the empty body of a refusal.
pub struct FaultBody<B> {
    inner: Option<B>,
    /// Resolves, with the reason, when the stream is cut.
    cut: Option<BoxFuture<&'static str>>,
    /// Keeps the stream registered while the body lives.
    _guard: Option<StreamGuard>,
    ended: bool,
}

impl<B> std::fmt::Debug for FaultBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultBody")
            .field("cuttable", &self.cut.is_some())
            .field("ended", &self.ended)
            .finish()
    }
}

impl<B> FaultBody<B> {
    fn plain(inner: B) -> FaultBody<B> {
        FaultBody {
            inner: Some(inner),
            cut: None,
            _guard: None,
            ended: false,
        }
    }

    fn refused() -> FaultBody<B> {
        FaultBody {
            inner: None,
            cut: None,
            _guard: None,
            ended: true,
        }
    }

    fn cuttable(inner: B, guard: StreamGuard) -> FaultBody<B> {
        let cut = guard.cut.clone();
        FaultBody {
            inner: Some(inner),
            cut: Some(Box::pin(async move { cut.fired().await })),
            _guard: Some(guard),
            ended: false,
        }
    }
}

/// The trailers that end a cut stream.
fn unavailable_trailers(message: &'static str) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("14"));
    trailers.insert("grpc-message", HeaderValue::from_static(message));
    trailers
}

impl<B: Body + Unpin> Body for FaultBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(cut) = this.cut.as_mut()
            && let Poll::Ready(reason) = cut.as_mut().poll(cx)
        {
            this.ended = true;
            this.cut = None;
            // Drops the service's stream: its task sees the client gone.
            this.inner = None;
            return Poll::Ready(Some(Ok(Frame::trailers(unavailable_trailers(reason)))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) if self.cut.is_none() => inner.size_hint(),
            Some(_) => SizeHint::default(),
            None => SizeHint::with_exact(0),
        }
    }
}
