//! Serving an axum [`Router`] over plain TCP or TLS: `muster serve`'s
//! /metrics, /health and dashboard, and `muster dashboard`'s page.
//!
//! With TLS the listener offers ALPN `http/1.1` only (axum is built with
//! HTTP/1 alone here), re-reads its certificate files every
//! [`ServerTls::reload_interval`] while it serves, and answers a plaintext
//! request with `400 Client sent an HTTP request to an HTTPS server`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use muster_tls::server::ServerStream;
use muster_tls::{ServerTls, TlsServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A bound HTTP or HTTPS listener, not yet serving.
#[derive(Debug)]
pub struct HttpListener {
    tcp: TcpListener,
    addr: SocketAddr,
    tls: Option<TlsServer>,
}

impl HttpListener {
    /// Binds `addr`; with `tls`, loads its files now (an error names the
    /// file at fault).
    pub async fn bind(addr: SocketAddr, tls: Option<&ServerTls>) -> anyhow::Result<HttpListener> {
        let tls = match tls {
            Some(tls) => Some(
                tls.clone()
                    .with_alpn(&[muster_tls::ALPN_HTTP11])
                    .build()
                    .context("cannot set up HTTPS")?,
            ),
            None => None,
        };
        let tcp = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
        let addr = tcp.local_addr()?;
        Ok(HttpListener { tcp, addr, tls })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://host:port` with TLS, else `http://host:port`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The listener's TLS (certificate, reload counters), when on.
    pub fn tls(&self) -> Option<&TlsServer> {
        self.tls.as_ref()
    }

    /// Serves `app` until `shutdown` resolves, then lets requests in
    /// flight finish. The certificate reloader runs as long as this does.
    pub async fn serve(
        self,
        app: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        match self.tls {
            // The peer's address reaches handlers (the dashboard's login
            // throttle).
            None => {
                axum::serve(
                    self.tcp,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(shutdown)
                .await
            }
            Some(tls) => {
                let _reloader = AbortOnDrop(tls.spawn_reloader());
                let listener = TlsListener {
                    incoming: tls.incoming(self.tcp).into_inner(),
                    addr: self.addr,
                };
                // tap_io: what gives axum's connect info a listener's
                // own address type.
                axum::serve(
                    axum::serve::ListenerExt::tap_io(listener, |_| {}),
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(shutdown)
                .await
            }
        }
    }
}

/// Aborts a task when dropped (the serving future may be dropped, not
/// finished, e.g. when its own task is aborted).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Established TLS connections, as axum's listener. Handshakes happen in
/// [`TlsServer::incoming`]'s accept loop, concurrently, so a slow client
/// holds up nobody; failed ones are logged there.
struct TlsListener {
    incoming: mpsc::Receiver<io::Result<ServerStream>>,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = ServerStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ServerStream, SocketAddr) {
        loop {
            match self.incoming.recv().await {
                Some(Ok(stream)) => {
                    let peer = stream.get_ref().0.peer_addr().unwrap_or(self.addr);
                    return (stream, peer);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "accept failed"),
                // The accept loop ended (it does not while we hold the
                // receiver): nothing more will come.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}
