//! The listeners: UDP and TCP on one address, and the catalog watchdog.
//!
//! Answering never waits (the index is in memory), so what is in flight is
//! bounded by construction: each UDP task answers one datagram at a time
//! (the kernel's socket buffer holds the rest, and drops past it), and
//! each TCP connection one query at a time (pipelined queries wait in the
//! connection's socket), with at most `max_tcp_connections` connections;
//! further ones are closed at once. A TCP connection that sends nothing
//! for `tcp_idle_timeout`, or takes longer than that to send one query or
//! to take one answer, is closed.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use muster::Catalog;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::answer::Responder;
use crate::index::Index;
use crate::metrics::{CatalogFacts, Drop, Metrics, Proto};

/// The largest UDP query read; longer datagrams are cut by the kernel
/// and answered FORMERR.
const UDP_QUERY_MAX: usize = 4096;
/// How often the watchdog looks at the catalog.
const WATCHDOG_TICK: Duration = Duration::from_secs(1);
/// How often a stale catalog is logged again while it stays stale.
const STALE_LOG_EVERY: Duration = Duration::from_secs(30);

/// What every listener task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) catalog: Catalog,
    pub(crate) responder: Responder,
    pub(crate) metrics: Metrics,
    index: ArcSwap<Index>,
    rebuilding: Mutex<()>,
}

impl Shared {
    pub(crate) fn new(catalog: Catalog, responder: Responder) -> Shared {
        let index = Index::build(catalog.snapshot(), responder.domain());
        Shared {
            catalog,
            responder,
            metrics: Metrics::default(),
            index: ArcSwap::from_pointee(index),
            rebuilding: Mutex::new(()),
        }
    }

    /// The index of the catalog's current snapshot, rebuilt here if the
    /// catalog changed since (by one caller; others keep answering from
    /// the previous index meanwhile).
    pub(crate) fn index(&self) -> Arc<Index> {
        let current = self.index.load_full();
        let snapshot = self.catalog.snapshot();
        if Arc::ptr_eq(&current.source, &snapshot) {
            return current;
        }
        let Ok(_rebuilding) = self.rebuilding.try_lock() else {
            return current;
        };
        let current = self.index.load_full();
        if Arc::ptr_eq(&current.source, &snapshot) {
            return current;
        }
        let index = Arc::new(Index::build(snapshot, self.responder.domain()));
        self.index.store(index.clone());
        index
    }

    /// Answers one query; `None`: no answer is due.
    fn handle(&self, query: &[u8], proto: Proto) -> Option<Vec<u8>> {
        let started = Instant::now();
        let index = self.index();
        match self.responder.answer(&index, query, proto) {
            Ok(answer) => {
                self.metrics.answered(
                    proto,
                    answer.qtype,
                    answer.rcode,
                    answer.truncated,
                    started.elapsed(),
                );
                Some(answer.bytes)
            }
            Err(why) => {
                self.metrics.dropped(why);
                None
            }
        }
    }

    /// The metrics text.
    pub(crate) fn render_metrics(&self) -> String {
        let health = self.catalog.health();
        let index = self.index();
        let mut out = self.metrics.render(CatalogFacts {
            stale_secs: health.stale_for.map_or(0.0, |d| d.as_secs_f64()),
            revision: health.revision,
            counts: index.counts,
        });
        // How fast the catalog applies changes; entries it skipped.
        self.catalog.render_metrics(&mut out);
        out
    }
}

/// Binds UDP and TCP on `addr`; with port 0, on one free port for both.
pub(crate) async fn bind(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), crate::Error> {
    let bind_err = |proto: &'static str, addr: SocketAddr| {
        move |source: io::Error| crate::Error::Bind {
            addr,
            proto,
            source,
        }
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let udp = UdpSocket::bind(addr).await.map_err(bind_err("udp", addr))?;
        let bound = udp.local_addr().map_err(bind_err("udp", addr))?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // The free UDP port is taken for TCP: another one.
            Err(e) if addr.port() == 0 && attempts < 20 => {
                tracing::debug!(error = %e, %bound, "TCP port taken; trying another port");
            }
            Err(e) => return Err(bind_err("tcp", bound)(e)),
        }
    }
}

/// Answers datagrams on `socket` until aborted.
pub(crate) async fn serve_udp(shared: Arc<Shared>, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; UDP_QUERY_MAX];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                // ICMP errors of earlier sends (ECONNREFUSED) and the like
                // are the peer's problem, not the socket's; a pause keeps
                // an error that repeats from spinning a core.
                tracing::debug!(error = %e, "UDP receive error");
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        if peer.port() == 0 {
            shared.metrics.dropped(Drop::Malformed);
            continue;
        }
        if let Some(answer) = shared.handle(&buf[..len], Proto::Udp)
            && let Err(e) = socket.send_to(&answer, peer).await
        {
            tracing::debug!(error = %e, %peer, "cannot send a UDP answer");
        }
    }
}

/// TCP limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TcpLimits {
    pub(crate) max_connections: usize,
    pub(crate) idle_timeout: Duration,
}

/// Accepts connections on `listener` until aborted; aborting it closes
/// every connection it accepted.
pub(crate) async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener, limits: TcpLimits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a little
                // rather than spin.
                tracing::warn!(error = %e, "cannot accept a DNS TCP connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.metrics.tcp_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        connections.spawn(async move {
            shared.metrics.tcp_open.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = connection(&shared, stream, limits.idle_timeout).await {
                tracing::debug!(error = %e, %peer, "DNS TCP connection closed");
            }
            shared.metrics.tcp_open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
}

/// Answers the queries of one connection (RFC 7766: two-byte length, then
/// the message), one at a time, until the peer closes or stalls.
async fn connection(shared: &Shared, mut stream: TcpStream, idle: Duration) -> io::Result<()> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "idle");
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(result) => result?,
        };
        let len = usize::from(u16::from_be_bytes(len));
        buf.resize(len, 0);
        tokio::time::timeout(idle, stream.read_exact(&mut buf))
            .await
            .map_err(|_| timed_out())??;
        let Some(answer) = shared.handle(&buf, Proto::Tcp) else {
            // Not a query: nothing sensible can follow on this stream.
            return Ok(());
        };
        let Ok(answer_len) = u16::try_from(answer.len()) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&answer_len.to_be_bytes());
        framed.extend_from_slice(&answer);
        tokio::time::timeout(idle, stream.write_all(&framed))
            .await
            .map_err(|_| timed_out())??;
        // Keep a large query's buffer from living as long as the
        // connection.
        if buf.capacity() > 4096 {
            buf = Vec::new();
        }
    }
}

/// Keeps the index warm after catalog changes and says, rate-limited,
/// when answers come from a stale catalog.
pub(crate) async fn watchdog(shared: Arc<Shared>) {
    let mut stale_logged: Option<Instant> = None;
    let mut tick = tokio::time::interval(WATCHDOG_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        shared.index();
        let health = shared.catalog.health();
        match (health.stale_for, stale_logged) {
            (Some(stale_for), last) if last.is_none_or(|t| t.elapsed() >= STALE_LOG_EVERY) => {
                tracing::warn!(
                    stale_for = ?stale_for,
                    revision = health.revision,
                    error = health.last_error.as_deref().unwrap_or(""),
                    "the registry is unreachable: DNS answers come from the last known catalog"
                );
                stale_logged = Some(Instant::now());
            }
            (None, Some(_)) => {
                tracing::info!(
                    revision = health.revision,
                    "the registry is reachable again: DNS answers are current"
                );
                stale_logged = None;
            }
            _ => {}
        }
    }
}
