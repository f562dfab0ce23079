//! The upstream HTTP/1.1 client: one per serving thread, with its own pool
//! of idle connections.
//!
//! Built on hyper's low-level `client::conn::http1` rather than
//! hyper-util's pooled client, which costs a pool lookup under a lock with
//! a hashed key, a cloned client and an extra spawned task per request
//! (to put the connection back once it is ready again). Here a connection
//! is a `SendRequest` plus its connection task, spawned on the serving
//! thread's own runtime (so driving it never wakes another thread); the
//! pool is a short list of idle `SendRequest`s. A connection goes back to
//! the pool when its response body has been read to the end ([`Pooled`]
//! travels with the body); one whose response is abandoned is closed.
//!
//! Idle connections are dropped after the idle timeout (at checkout, and
//! by a sweep). One the upstream closed while idle is skipped at checkout
//! (its connection task has seen the close); if the close races with the
//! request, the request fails with [`SendError::Stale`] and the caller may
//! send it again on a fresh connection.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

use crate::body::UpstreamBody;

type Sender = SendRequest<UpstreamBody>;

/// A serving thread's upstream client. Cheap to clone (shares the pool).
#[derive(Debug, Clone)]
pub(crate) struct UpstreamClient {
    pool: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    /// Idle connections, most recently used last.
    idle: Mutex<Vec<Idle>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    key: Authority,
    sender: Sender,
    since: Instant,
}

/// A connection in use. Give it back with [`Pooled::release`] once the
/// response is read completely; dropping it closes the connection.
#[derive(Debug)]
pub(crate) struct Pooled {
    key: Authority,
    sender: Sender,
    pool: Weak<Pool>,
}

impl Pooled {
    /// Puts the connection back in the pool (unless it is closing).
    pub(crate) fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Idle {
                    key: self.key,
                    sender: self.sender,
                    since: Instant::now(),
                });
        }
    }
}

/// Why a request got no response.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made; nothing was sent (here is the request
    /// back).
    Connect {
        message: String,
        request: Box<Request<UpstreamBody>>,
    },
    /// A pooled connection turned out to be closed by the upstream before
    /// anything came back (it closed it while idle, racing with this
    /// request). Sending again on a fresh connection is safe if the request
    /// is idempotent and its body was not touched.
    Stale(hyper::Error),
    /// The request failed.
    Request(hyper::Error),
}

impl UpstreamClient {
    pub(crate) fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        UpstreamClient {
            pool: Arc::new(Pool {
                idle: Mutex::new(Vec::new()),
                connect_timeout,
                idle_timeout,
            }),
        }
    }

    /// Sends `req` (origin-form URI, `Host` set) to `authority` on an idle
    /// pooled connection (unless `fresh`), or a new one.
    pub(crate) async fn send(
        &self,
        authority: &Authority,
        mut req: Request<UpstreamBody>,
        fresh: bool,
    ) -> Result<(Response<Incoming>, Pooled), SendError> {
        while let Some((key, mut sender)) = (!fresh).then(|| self.checkout(authority)).flatten() {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.pooled(key, sender))),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection was closing. Next.
                    Some(back) => req = back,
                    None => {
                        let error = e.into_error();
                        return Err(if is_stale(&error) {
                            SendError::Stale(error)
                        } else {
                            SendError::Request(error)
                        });
                    }
                },
            }
        }
        // Boxed: the cold path stays out of the request's future.
        let mut sender = match Box::pin(self.connect(authority)).await {
            Ok(sender) => sender,
            Err(message) => {
                return Err(SendError::Connect {
                    message,
                    request: Box::new(req),
                });
            }
        };
        match sender.send_request(req).await {
            Ok(resp) => Ok((resp, self.pooled(authority.clone(), sender))),
            Err(e) => Err(SendError::Request(e)),
        }
    }

    /// `key` moves from the idle entry to the connection in use and back, so
    /// that a request clones no `Authority` (whose reference count every
    /// serving thread would share).
    fn pooled(&self, key: Authority, sender: Sender) -> Pooled {
        Pooled {
            key,
            sender,
            pool: Arc::downgrade(&self.pool),
        }
    }

    /// The most recently used idle connection to `key` that is still open.
    fn checkout(&self, key: &Authority) -> Option<(Authority, Sender)> {
        let mut idle = self
            .pool
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while let Some(i) = idle.iter().rposition(|i| i.key == *key) {
            let entry = idle.remove(i);
            if !entry.sender.is_closed()
                && now.saturating_duration_since(entry.since) < self.pool.idle_timeout
            {
                return Some((entry.key, entry.sender));
            }
        }
        None
    }

    /// Drops the connections idle for longer than the idle timeout.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let timeout = self.pool.idle_timeout;
        let expired: Vec<Idle> = {
            let mut idle = self
                .pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let (expired, kept) = std::mem::take(&mut *idle).into_iter().partition(|i| {
                i.sender.is_closed() || now.saturating_duration_since(i.since) >= timeout
            });
            *idle = kept;
            expired
        };
        drop(expired);
    }

    /// How often [`sweep`](Self::sweep) should run.
    pub(crate) fn sweep_interval(&self) -> Duration {
        (self.pool.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }

    /// A new connection, its connection task spawned on this thread.
    async fn connect(&self, authority: &Authority) -> Result<Sender, String> {
        let stream = tokio::time::timeout(self.pool.connect_timeout, tcp_connect(authority))
            .await
            .map_err(|_| {
                format!(
                    "connect to {authority} timed out after {:?}",
                    self.pool.connect_timeout
                )
            })?
            .map_err(|e| format!("connect to {authority}: {e}"))?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake with {authority}: {e}"))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// Whether a failure on a reused connection means the upstream had closed
/// it (nothing of a response came back).
fn is_stale(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() {
        return true;
    }
    // A reset or broken pipe while writing the request.
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        source = s.source();
    }
    false
}

/// Connects to `host:port` (trying each address it resolves to), with
/// `TCP_NODELAY` and keepalive.
async fn tcp_connect(authority: &Authority) -> std::io::Result<TcpStream> {
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let addrs: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port)).await?.collect(),
    };
    let mut last = None;
    for addr in addrs {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_nodelay(true)?;
        socket.set_keepalive(true)?;
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address found")))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// An upstream that answers `answers` requests on each connection, then
    /// reads one more and closes without answering (`answers` = 1 and a
    /// pause first: it closes while the connection is idle).
    async fn upstream(
        answers: usize,
        close_idle: bool,
    ) -> (Authority, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..answers {
                        if s.read(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                    }
                    if !close_idle {
                        let _ = s.read(&mut buf).await;
                    }
                    // Dropped: closed.
                });
            }
        });
        (authority, task)
    }

    fn get(authority: &Authority) -> Request<UpstreamBody> {
        Request::builder()
            .uri("/")
            .header(http::header::HOST, authority.as_str())
            .body(UpstreamBody::Empty)
            .unwrap()
    }

    async fn ok(
        client: &UpstreamClient,
        authority: &Authority,
        fresh: bool,
    ) -> Result<(), SendError> {
        let (resp, pooled) = client.send(authority, get(authority), fresh).await?;
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        assert_eq!(body.to_bytes(), "ok");
        pooled.release();
        Ok(())
    }

    #[tokio::test]
    async fn connections_are_reused() {
        let (authority, _up) = upstream(100, false).await;
        let client = UpstreamClient::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..5 {
            ok(&client, &authority, false).await.unwrap();
        }
        assert_eq!(client.pool.idle.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn connection_closed_while_idle_is_skipped() {
        let (authority, _up) = upstream(1, true).await;
        let client = UpstreamClient::new(Duration::from_secs(1), Duration::from_secs(60));
        ok(&client, &authority, false).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The pooled connection was closed by the upstream: a new one.
        ok(&client, &authority, false).await.unwrap();
    }

    #[tokio::test]
    async fn close_racing_with_a_request_is_stale() {
        let (authority, _up) = upstream(1, false).await;
        let client = UpstreamClient::new(Duration::from_secs(1), Duration::from_secs(60));
        ok(&client, &authority, false).await.unwrap();
        // The upstream takes the request and closes without an answer.
        match ok(&client, &authority, false).await {
            Err(SendError::Stale(_)) => {}
            other => panic!("expected a stale connection, got {other:?}"),
        }
        // The caller sends again on a fresh connection.
        ok(&client, &authority, true).await.unwrap();
    }

    #[tokio::test]
    async fn refused_connection_gives_the_request_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        drop(listener);
        let client = UpstreamClient::new(Duration::from_secs(1), Duration::from_secs(60));
        match client.send(&authority, get(&authority), false).await {
            Err(SendError::Connect { request, .. }) => {
                assert_eq!(request.headers()[http::header::HOST], authority.as_str());
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}
