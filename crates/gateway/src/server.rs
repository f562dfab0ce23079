//! Listeners and serving threads.
//!
//! Requests are served thread-per-core, as nginx does: `workers` threads
//! each run their own single-threaded runtime with their own upstream
//! connection pool. The acceptor hands each new client connection to the
//! next thread, and everything about that connection (its requests, their
//! upstream connections, upgrades) stays on that thread, so no request
//! wakes another thread. Shared state (routes, balancers, metrics) is
//! lock-free. Each connection speaks HTTP/1.1 or h2c (detected from its
//! first bytes), with upgrades; shutdown drains gracefully. HTTP/1.1 is
//! served by `crate::downstream`, which hands the connection to hyper for
//! h2c and upgrades (and everything, with `MUSTER_GATEWAY_H1=hyper`). With TLS, the
//! serving thread shakes hands first (so handshakes are spread over the
//! threads too) and the connection then speaks HTTP/2 or HTTP/1.1 (ALPN,
//! and the same detection).
//!
//! The admin listener is always plaintext.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use muster_tls::TlsServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::client::UpstreamClient;
use crate::downstream::{Outcome, Rewind};
use crate::error::GatewayError;
use crate::headers::ClientAddr;
use crate::proxy::Proxy;
use crate::watchdog::{Activity, Drainable, Finished, Watchdog};

/// Binds a listener (port 0: any free port).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| GatewayError::Bind { addr, source })
}

type Accepted = (std::net::TcpStream, SocketAddr);

/// The serving threads.
pub(crate) struct Workers {
    queues: Vec<mpsc::UnboundedSender<Accepted>>,
    /// Each fires when its thread has drained and stopped.
    pub(crate) done: Vec<oneshot::Receiver<()>>,
}

impl Workers {
    /// Starts `n` serving threads; they stop (draining for up to `drain`)
    /// when `stop` turns true. With `tls`, they serve HTTPS.
    pub(crate) fn start(
        n: usize,
        proxy: &Arc<Proxy>,
        stop: &watch::Receiver<bool>,
        drain: Duration,
        idle: Duration,
        tls: Option<TlsServer>,
    ) -> Result<Workers, GatewayError> {
        let mut workers = Workers {
            queues: Vec::with_capacity(n),
            done: Vec::with_capacity(n),
        };
        for i in 0..n.max(1) {
            let (tx, rx) = mpsc::unbounded_channel();
            let (done_tx, done_rx) = oneshot::channel();
            // IO and timers only: the signal and process drivers would be
            // checked on every turn of the loop for nothing.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .map_err(|e| GatewayError::Config(format!("cannot start a runtime: {e}")))?;
            let (proxy, stop, tls) = (proxy.clone(), stop.clone(), tls.clone());
            std::thread::Builder::new()
                .name(format!("gateway-{i}"))
                .spawn(move || {
                    crate::metrics::set_shard(i);
                    crate::lane::set(i);
                    runtime.block_on(worker(rx, proxy, stop, drain, idle, tls));
                    let _ = done_tx.send(());
                })
                .map_err(|e| GatewayError::Config(format!("cannot start a thread: {e}")))?;
            workers.queues.push(tx);
            workers.done.push(done_rx);
        }
        Ok(workers)
    }
}

/// Accepts connections until `stop` turns true, handing them to the
/// workers in turn.
pub(crate) async fn accept(
    listener: TcpListener,
    queues: Vec<mpsc::UnboundedSender<Accepted>>,
    proxy: Arc<Proxy>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off a little.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        proxy.metrics.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        // A worker whose thread is gone is skipped.
        let mut item = (stream, peer);
        for _ in 0..queues.len() {
            let queue = &queues[next % queues.len()];
            next = next.wrapping_add(1);
            match queue.send(item) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => item = back,
            }
        }
    }
}

/// The connection builder. `header_timeout`: hyper's timer on each request
/// head; the serving threads go without (their watchdog closes idle
/// connections and incomplete heads, see `crate::watchdog`), the admin
/// listener keeps it.
fn builder(header_timeout: Option<Duration>) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// One serving thread: serves the connections it is handed until `stop`,
/// then drains.
async fn worker(
    mut connections: mpsc::UnboundedReceiver<Accepted>,
    proxy: Arc<Proxy>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
    idle: Duration,
    tls: Option<TlsServer>,
) {
    let client = proxy.client();
    let watchdog = Watchdog::new(idle);
    let watching = tokio::spawn(watchdog.clone().run());
    let sweeper = tokio::spawn({
        let client = client.clone();
        async move {
            let mut tick = tokio::time::interval(client.sweep_interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                client.sweep();
            }
        }
    });
    let builder = Arc::new(builder(None));
    let own_h1 = crate::downstream::enabled();
    // Every connection's task holds a clone; the drain is over when the
    // receiver sees them all dropped.
    let (live, mut gone) = mpsc::channel::<()>(1);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            next = connections.recv() => match next {
                Some(c) => c,
                None => break,
            },
        };
        let Ok(stream) = TcpStream::from_std(stream) else {
            continue;
        };
        let activity = Arc::new(Activity::default());
        let live = live.clone();
        let conn = Connection {
            proxy: proxy.clone(),
            client: client.clone(),
            peer,
            tls: tls.is_some(),
            activity: activity.clone(),
            builder: builder.clone(),
            own_h1,
        };
        let task = match &tls {
            None => tokio::spawn(async move {
                let _live = live;
                conn.serve(stream, true).await;
            }),
            // The handshake runs in the connection's task (bounded by its
            // own timeout, and by the watchdog like an incomplete head).
            Some(tls) => {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _live = live;
                    let stream = match tls.accept(stream, peer).await {
                        Ok(stream) => stream,
                        Err(e) => {
                            conn.proxy
                                .metrics
                                .tls_handshake_failures
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(error = %e, "TLS handshake with a client failed");
                            return;
                        }
                    };
                    // HTTP/2 by ALPN: hyper's.
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(muster_tls::ALPN_H2);
                    if h2 {
                        conn.hyper(stream).await;
                    } else {
                        conn.serve(stream, true).await;
                    }
                })
            }
        };
        watchdog.watch(activity, task.abort_handle());
    }
    watchdog.drain();
    drop(live);
    if tokio::time::timeout(drain, gone.recv()).await.is_err() {
        tracing::warn!(
            ?drain,
            "connections still busy after the drain timeout; closing them"
        );
    }
    sweeper.abort();
    watching.abort();
}

/// A client connection, as its task serves it.
struct Connection {
    proxy: Arc<Proxy>,
    client: UpstreamClient,
    peer: SocketAddr,
    tls: bool,
    activity: Arc<Activity>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// HTTP/1.1 by the gateway's own codec (`crate::downstream`), else
    /// all by hyper.
    own_h1: bool,
}

impl Connection {
    /// Serves HTTP/1.1 with the gateway's codec, handing the connection to
    /// hyper for what that does not speak (h2c, upgrades). `sniff`: look
    /// for the h2c preface.
    async fn serve<I>(self, io: I, sniff: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if !self.own_h1 {
            return self.hyper(io).await;
        }
        let peer = ClientAddr::new(self.peer, self.tls);
        let ctx = crate::downstream::Ctx {
            proxy: &self.proxy,
            client: &self.client,
            peer: &peer,
            activity: &self.activity,
        };
        // The drain wakes the connection, which looks at the flag itself.
        let served = Drainable::new(
            crate::downstream::serve(io, ctx, sniff),
            self.activity.clone(),
            |_| {},
        )
        .await;
        if let Outcome::Handoff(io, read) = served {
            drop(peer);
            self.hyper(Rewind::new(io, read.freeze())).await;
        }
    }

    /// Serves the connection with hyper (HTTP/1.1 with upgrades, h2c, and
    /// HTTP/2 over TLS).
    async fn hyper<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            proxy,
            client,
            peer,
            tls,
            activity,
            builder,
            ..
        } = self;
        let shared = Arc::new((proxy, client, ClientAddr::new(peer, tls), activity.clone()));
        let service = service_fn(move |req| {
            let shared = shared.clone();
            async move {
                shared.3.start();
                // Counted finished when the body is done, or right away if
                // this future is dropped first (an HTTP/2 stream reset).
                let finished = Finished(shared.3.clone());
                let resp = shared.0.handle(&shared.1, req, &shared.2, None).await;
                let resp = crate::body::into_hyper(resp);
                Ok::<_, Infallible>(resp.map(|body| body.counted(finished)))
            }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let conn = Drainable::new(conn, activity, |c| c.graceful_shutdown());
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// Serves the admin listener (metrics and health only) on the caller's
/// runtime until `stop`.
pub(crate) async fn serve_admin(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    let builder = builder(Some(Duration::from_secs(30)));
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let proxy = proxy.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle_admin(&req)) }
        });
        let conn = graceful.watch(
            builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
}

impl Workers {
    /// The queues the acceptor feeds.
    pub(crate) fn queues(&self) -> Vec<mpsc::UnboundedSender<Accepted>> {
        self.queues.clone()
    }
}
