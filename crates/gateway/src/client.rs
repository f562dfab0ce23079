//! The upstream HTTP/1.1 client: one per serving thread, with its own pool
//! of idle connections.
//!
//! A request is driven by the task that serves it: the head is written in
//! one `write`, the body (if any) streamed after it, and the response head
//! read and parsed ([`crate::h1`]) in the same task. There is no
//! connection task and no channel between the request and its connection,
//! so a request costs no extra task wake-ups; hyper's client (which
//! this replaces) spent about a third of the gateway's CPU on them. The
//! response body reads from the connection as the client takes it
//! ([`ResponseBody`]), and puts the connection back in the pool once the
//! body is complete; a small body already read with the head completes
//! at once, so the connection is reusable before the answer is even
//! written to the client.
//!
//! Idle connections are dropped after the idle timeout (at checkout, and
//! by a sweep). One the upstream closed while idle is seen at checkout
//! (its socket turned readable); if the close races with the request, the
//! request fails with [`SendError::Stale`] and the caller may send it again
//! on a fresh connection.
//!
//! A connection is plaintext or TLS ([`Io`]), for `https://` instances;
//! pooled connections are keyed by authority and connector, so an
//! instance's TLS connections are reused only with the connector (the
//! CA) that verified them.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::h1::{self, Decoder, Step};
use crate::headers;
use crate::tls::{Io, UpstreamTls};

/// Read buffer size of a connection.
const READ_BUF: usize = 16 * 1024;
/// Initial size of a connection's buffer for request heads (grown as
/// needed, and kept).
const HEAD_BUF: usize = 1024;

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
    conn: Box<Conn>,
    since: Instant,
}

/// An open connection to an upstream.
#[derive(Debug)]
struct Conn {
    key: Authority,
    /// The connector's id ([`UpstreamTls::id`]), 0 for plaintext.
    tls: u64,
    io: Io,
    /// Bytes read and not consumed yet.
    buf: BytesMut,
    /// The request head being sent (reused).
    out: Vec<u8>,
}

/// A request to send: its head already written out.
pub(crate) struct Outbound<'a, B> {
    pub(crate) method: &'a Method,
    /// Writes the request head (with [`crate::headers::write_request_head`])
    /// into the connection's write buffer, which is kept from one request
    /// to the next.
    pub(crate) head: &'a (dyn Fn(&mut Vec<u8>) + Sync),
    /// The body to stream after the head: any [`Body`]; the proxy's
    /// remembers whether it was read, for its retries.
    pub(crate) body: Option<&'a mut B>,
    /// The body is sent with chunked coding (the head says so).
    pub(crate) chunked: bool,
    /// When the request is sent, as the caller read the clock: the pool
    /// goes by it (idle connections' age at checkout, and the idle time of
    /// a connection whose answer came complete with its head), rather than
    /// reading the clock twice more.
    pub(crate) sent: Instant,
}

impl<B> std::fmt::Debug for Outbound<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("method", self.method)
            .field("body", &self.body.is_some())
            .field("chunked", &self.chunked)
            .finish_non_exhaustive()
    }
}

/// An upstream's answer.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    /// End-to-end headers only, as they came.
    pub(crate) headers: h1::RawHeaders,
    pub(crate) body: ResponseBody,
    /// For `101 Switching Protocols`: the protocol and the connection.
    /// Boxed: rare, and the answer is moved several times on its way out.
    pub(crate) upgraded: Option<Box<(HeaderValue, Upgraded)>>,
}

/// The upstream's connection after `101 Switching Protocols`.
#[derive(Debug)]
pub(crate) struct Upgraded {
    pub(crate) io: Io,
    /// Bytes the upstream sent after its head.
    pub(crate) read: Bytes,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be made; nothing was sent.
    #[error("{0}")]
    Connect(String),
    /// The TLS handshake with an `https://` instance failed (or took
    /// longer than the connect timeout); nothing was sent.
    #[error("{0}")]
    Tls(String),
    /// A pooled connection turned out to be closed by the upstream before
    /// anything came back (it closed it while idle, racing with this
    /// request). Sending again on a fresh connection is safe if the request
    /// is idempotent and its body was not touched.
    #[error("pooled connection closed by the upstream: {0}")]
    Stale(String),
    /// The request failed, or the answer is not valid HTTP/1.
    #[error("{0}")]
    Request(String),
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

    /// Sends `req` to `authority` (over TLS with `tls`) on an idle pooled
    /// connection (unless `fresh`), or a new one, and reads the answer's
    /// head.
    pub(crate) async fn send<B>(
        &self,
        authority: &Authority,
        tls: Option<&UpstreamTls>,
        req: Outbound<'_, B>,
        fresh: bool,
    ) -> Result<Answer, SendError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let pooled = if fresh {
            None
        } else {
            self.checkout(authority, tls.map_or(0, |t| t.id), req.sent)
        };
        let reused = pooled.is_some();
        let mut conn = match pooled {
            Some(conn) => conn,
            // Boxed: the cold path stays out of the request's future.
            None => Box::pin(self.connect(authority, tls)).await?,
        };
        let failed = |what: &str, e: io::Error, reused: bool| {
            let message = format!("{what}: {e}");
            if reused
                && matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::UnexpectedEof
                )
            {
                SendError::Stale(message)
            } else {
                SendError::Request(message)
            }
        };
        let conn_ref = &mut *conn;
        conn_ref.out.clear();
        (req.head)(&mut conn_ref.out);
        let wrote = match conn_ref.io.write_all(&conn_ref.out).await {
            // A body follows at once: flushed after it.
            Ok(()) if req.body.is_some() => Ok(()),
            Ok(()) => conn.io.flush_tls().await,
            Err(e) => Err(e),
        };
        if let Err(e) = wrote {
            return Err(failed("sending the request", e, reused));
        }
        // An upstream may answer before it has read the whole body (a 413,
        // say) and close: its answer is relayed rather than the failure to
        // send the rest, and the connection is not reused.
        let mut unsent: Option<SendError> = None;
        if let Some(body) = req.body {
            match write_body(&mut conn.io, body, req.chunked).await {
                Ok(()) => {}
                Err(BodyError::Upstream(e)) => unsent = Some(e),
                // The client's body failed: nothing to wait for.
                Err(BodyError::Client(e)) => return Err(e),
            }
        }
        let head = loop {
            // Nothing to parse before the first read.
            let parsed = if conn.buf.is_empty() {
                Ok(None)
            } else {
                h1::parse_head(&mut conn.buf, req.method)
            };
            match parsed {
                // Interim answers (100 Continue and the like) are skipped.
                Ok(Some(head))
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    continue;
                }
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(e) => return Err(unsent.unwrap_or(SendError::Request(e.to_string()))),
            }
            let nothing_yet = conn.buf.is_empty();
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_BUF);
            }
            let e = match conn.io.read_buf(&mut conn.buf).await {
                Ok(0) => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a complete response head",
                ),
                Ok(_) => continue,
                Err(e) => e,
            };
            return Err(
                unsent.unwrap_or_else(|| failed("reading the response", e, reused && nothing_yet))
            );
        };
        let keep_alive = head.keep_alive && unsent.is_none();
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            let Some(protocol) = head.upgrade else {
                return Err(SendError::Request(
                    "101 Switching Protocols without Upgrade".into(),
                ));
            };
            let conn = *conn;
            return Ok(Answer {
                status: head.status,
                headers: head.headers,
                body: ResponseBody::empty(),
                upgraded: Some(Box::new((
                    protocol,
                    Upgraded {
                        io: conn.io,
                        read: conn.buf.freeze(),
                    },
                ))),
            });
        }
        let body = ResponseBody::new(
            conn,
            Decoder::new(head.framing),
            keep_alive,
            Arc::downgrade(&self.pool),
            req.sent,
        );
        Ok(Answer {
            status: head.status,
            headers: head.headers,
            body,
            upgraded: None,
        })
    }

    /// The most recently used idle connection to `key` that is still open.
    fn checkout(&self, key: &Authority, tls: u64, now: Instant) -> Option<Box<Conn>> {
        let mut idle = self
            .pool
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Exact bytes: cheaper than `Authority`'s case-insensitive equality.
        while let Some(i) = idle
            .iter()
            .rposition(|i| i.conn.key.as_str() == key.as_str() && i.conn.tls == tls)
        {
            let mut entry = idle.swap_remove(i);
            if now.saturating_duration_since(entry.since) < self.pool.idle_timeout
                && entry.conn.is_idle_open()
            {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Drops the connections idle for longer than the idle timeout, or
    /// closed by their upstream.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let timeout = self.pool.idle_timeout;
        // Closed after the lock is released.
        let gone: Vec<Idle> = self
            .pool
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extract_if(.., |i| {
                now.saturating_duration_since(i.since) >= timeout || !i.conn.is_idle_open()
            })
            .collect();
        drop(gone);
    }

    /// How often [`sweep`](Self::sweep) should run.
    pub(crate) fn sweep_interval(&self) -> Duration {
        (self.pool.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }

    /// A new connection; with `tls`, the handshake is done too (both
    /// within the connect timeout).
    async fn connect(
        &self,
        authority: &Authority,
        tls: Option<&UpstreamTls>,
    ) -> Result<Box<Conn>, SendError> {
        let timeout = self.pool.connect_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let tcp = tokio::time::timeout_at(deadline, tcp_connect(authority))
            .await
            .map_err(|_| {
                SendError::Connect(format!(
                    "connect to {authority} timed out after {timeout:?}"
                ))
            })?
            .map_err(|e| SendError::Connect(format!("connect to {authority}: {e}")))?;
        let (io, id) = match tls {
            None => (Io::Plain(tcp), 0),
            Some(tls) => {
                let host = unbracket(authority.host());
                let stream = tokio::time::timeout_at(
                    deadline,
                    tls.connector.handshake(tcp, host, authority.as_str()),
                )
                .await
                .map_err(|_| {
                    SendError::Tls(format!(
                        "TLS handshake with {authority} did not finish within the connect timeout ({timeout:?})"
                    ))
                })?
                .map_err(|e| SendError::Tls(e.to_string()))?;
                (Io::Tls(Box::new(stream)), tls.id)
            }
        };
        Ok(Box::new(Conn {
            key: authority.clone(),
            tls: id,
            io,
            buf: BytesMut::with_capacity(READ_BUF),
            out: Vec::with_capacity(HEAD_BUF),
        }))
    }
}

impl Conn {
    /// Whether an idle connection is still open (see [`Io::is_idle_open`]).
    fn is_idle_open(&mut self) -> bool {
        self.io.is_idle_open()
    }
}

/// A host without the brackets of an IPv6 literal.
fn unbracket(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Which side failed while a request body was streamed.
enum BodyError {
    Client(SendError),
    Upstream(SendError),
}

/// Streams the client's body upstream, chunk-coded if `chunked`.
async fn write_body<B>(io: &mut Io, body: &mut B, chunked: bool) -> Result<(), BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let write_error = |e: io::Error| {
        BodyError::Upstream(SendError::Request(format!("sending the request body: {e}")))
    };
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| {
            BodyError::Client(SendError::Request(format!(
                "reading the client's body: {e}"
            )))
        })?;
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            let (line, n) = h1::chunk_size_line(data.len());
            let mut out = Buf::chain(Buf::chain(&line[..n], data), &b"\r\n"[..]);
            io.write_all_buf(&mut out).await.map_err(write_error)?;
        } else {
            io.write_all(&data).await.map_err(write_error)?;
        }
        // Over TLS, what is written is on its way before the next chunk
        // is waited for.
        io.flush_tls().await.map_err(write_error)?;
    }
    // A body sent with its length has no room for trailers: they go.
    match trailers {
        _ if !chunked => {}
        None => io.write_all(b"0\r\n\r\n").await.map_err(write_error)?,
        Some(trailers) => {
            let mut end = b"0\r\n".to_vec();
            for (name, value) in &trailers {
                if headers::is_relayed_trailer(name) {
                    end.extend_from_slice(name.as_str().as_bytes());
                    end.extend_from_slice(b": ");
                    end.extend_from_slice(value.as_bytes());
                    end.extend_from_slice(b"\r\n");
                }
            }
            end.extend_from_slice(b"\r\n");
            io.write_all(&end).await.map_err(write_error)?;
        }
    }
    io.flush_tls().await.map_err(write_error)?;
    Ok(())
}

/// An upstream's response body, read from its connection as it is asked
/// for. The connection goes back to the pool once the body is complete,
/// and is closed if the body is dropped before.
#[derive(Debug)]
pub(crate) struct ResponseBody {
    /// Data decoded ahead (with the head) and not handed out yet: the
    /// first frame, and any after it.
    ready: Option<Bytes>,
    more: VecDeque<Bytes>,
    /// Trailers decoded ahead, handed out after the data.
    /// Boxed: rare, and the body is moved with the response.
    trailers: Option<Box<HeaderMap>>,
    /// The connection, while the body is being read.
    conn: Option<Box<Conn>>,
    decoder: Decoder,
    keep_alive: bool,
    pool: Weak<Pool>,
}

impl ResponseBody {
    fn empty() -> Self {
        ResponseBody {
            ready: None,
            more: VecDeque::new(),
            trailers: None,
            conn: None,
            decoder: Decoder::Done,
            keep_alive: false,
            pool: Weak::new(),
        }
    }

    /// `sent`: when the request was sent, the idle time's start of a
    /// connection whose answer is complete with its head (one round trip
    /// early at most, against the pool's idle timeout).
    fn new(
        mut conn: Box<Conn>,
        mut decoder: Decoder,
        keep_alive: bool,
        pool: Weak<Pool>,
        sent: Instant,
    ) -> Self {
        // Decode what came with the head: a small body is complete now,
        // and its connection free for the next request.
        let mut ready = None;
        let mut more = VecDeque::new();
        let mut trailers = None;
        let mut failed = false;
        loop {
            match decoder.step(&mut conn.buf) {
                Ok(Step::Data(data)) if ready.is_none() => ready = Some(data),
                Ok(Step::Data(data)) => more.push_back(data),
                Ok(Step::Trailers(t)) => trailers = Some(Box::new(t)),
                Ok(Step::NeedMore | Step::Done) => break,
                Err(_) => {
                    // Reported when the body is read.
                    failed = true;
                    break;
                }
            }
        }
        let mut body = ResponseBody {
            ready,
            more,
            trailers,
            conn: Some(conn),
            decoder,
            keep_alive,
            pool,
        };
        if !failed && body.decoder == Decoder::Done {
            body.release_at(sent);
        }
        body
    }

    /// The body is complete: the connection goes back to the pool if it
    /// can carry another request.
    fn release(&mut self) {
        self.release_at(Instant::now());
    }

    /// [`release`](Self::release), idle since `since`.
    fn release_at(&mut self, since: Instant) {
        let Some(conn) = self.conn.take() else { return };
        if !self.keep_alive || !conn.buf.is_empty() {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Idle { conn, since });
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(data) = this.ready.take().or_else(|| this.more.pop_front()) {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.step(&mut conn.buf) {
                Ok(Step::Data(data)) => {
                    if this.decoder == Decoder::Done {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::Trailers(trailers)) => {
                    this.release();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Step::Done) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, e))));
                }
            }
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_BUF);
            }
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.buf
            )) {
                Ok(0) if this.decoder == Decoder::Close => {
                    this.decoder = Decoder::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed the connection before the end of the body",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none()
            && self.more.is_empty()
            && self.trailers.is_none()
            && self.decoder == Decoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        let ready: u64 = self
            .ready
            .iter()
            .chain(&self.more)
            .map(|b| b.len() as u64)
            .sum();
        // Trailers need a chunked answer to an HTTP/1.1 client: no exact
        // size then, which would make it a Content-Length one.
        match self.decoder.remaining().filter(|_| self.trailers.is_none()) {
            Some(n) => SizeHint::with_exact(ready + n),
            None => {
                let mut hint = SizeHint::new();
                hint.set_lower(ready);
                hint
            }
        }
    }
}

/// Connects to `host:port` (trying each address it resolves to), with
/// `TCP_NODELAY` and keepalive.
async fn tcp_connect(authority: &Authority) -> io::Result<TcpStream> {
    let port = authority.port_u16().unwrap_or(80);
    let host = unbracket(authority.host());
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
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address found")))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A listener on a free loopback port, and its authority.
    async fn listen() -> (TcpListener, Authority) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        (listener, authority)
    }

    /// An upstream that answers `answers` requests on each connection, then
    /// reads one more and closes without answering (`close_idle`: closes
    /// right after the last answer, while the connection is idle).
    async fn upstream(
        answers: usize,
        close_idle: bool,
    ) -> (Authority, tokio::task::JoinHandle<()>) {
        scripted(
            move |_| Some(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()),
            answers,
            close_idle,
        )
        .await
    }

    /// An upstream answering each request with `answer(n)` (n: the
    /// request's number on its connection; `None`: close).
    async fn scripted(
        answer: impl Fn(usize) -> Option<Vec<u8>> + Send + Sync + Clone + 'static,
        answers: usize,
        close_idle: bool,
    ) -> (Authority, tokio::task::JoinHandle<()>) {
        let (listener, authority) = listen().await;
        let task = tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for n in 0..answers {
                        if s.read(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let Some(bytes) = answer(n) else { return };
                        if s.write_all(&bytes).await.is_err() {
                            return;
                        }
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

    fn head(authority: &Authority) -> Vec<u8> {
        format!("GET / HTTP/1.1\r\nhost: {authority}\r\n\r\n").into_bytes()
    }

    /// The answer to `GET /`, its body not read yet.
    async fn answer(
        client: &UpstreamClient,
        authority: &Authority,
        fresh: bool,
    ) -> Result<Answer, SendError> {
        let head = head(authority);
        let outbound = Outbound::<http_body_util::Empty<Bytes>> {
            method: &Method::GET,
            head: &|out: &mut Vec<u8>| out.extend_from_slice(&head),
            body: None,
            chunked: false,
            sent: Instant::now(),
        };
        client.send(authority, None, outbound, fresh).await
    }

    /// A POST of `body` (with `head`) on a fresh connection, its answer's
    /// body not read yet.
    async fn post<B>(
        client: &UpstreamClient,
        authority: &Authority,
        head: &[u8],
        body: &mut B,
        chunked: bool,
    ) -> Result<Answer, SendError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let outbound = Outbound {
            method: &Method::POST,
            head: &|out: &mut Vec<u8>| out.extend_from_slice(head),
            body: Some(body),
            chunked,
            sent: Instant::now(),
        };
        client.send(authority, None, outbound, true).await
    }

    async fn fetch(
        client: &UpstreamClient,
        authority: &Authority,
        fresh: bool,
    ) -> Result<(StatusCode, Bytes), SendError> {
        let answer = answer(client, authority, fresh).await?;
        let body = answer
            .body
            .collect()
            .await
            .map_err(|e| SendError::Request(e.to_string()))?;
        Ok((answer.status, body.to_bytes()))
    }

    async fn ok(
        client: &UpstreamClient,
        authority: &Authority,
        fresh: bool,
    ) -> Result<(), SendError> {
        let (status, body) = fetch(client, authority, fresh).await?;
        assert_eq!(status, 200);
        assert_eq!(body, "ok");
        Ok(())
    }

    fn client() -> UpstreamClient {
        UpstreamClient::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    #[tokio::test]
    async fn connections_are_reused() {
        let (authority, _up) = upstream(100, false).await;
        let client = client();
        for _ in 0..5 {
            ok(&client, &authority, false).await.unwrap();
        }
        assert_eq!(client.pool.idle.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn connection_closed_while_idle_is_skipped() {
        let (authority, _up) = upstream(1, true).await;
        let client = client();
        ok(&client, &authority, false).await.unwrap();
        // Wait until the close has reached the socket.
        let deadline = Instant::now() + Duration::from_secs(10);
        while client
            .pool
            .idle
            .lock()
            .unwrap()
            .iter_mut()
            .any(|i| i.conn.is_idle_open())
        {
            assert!(Instant::now() < deadline, "the close was never seen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The pooled connection was closed by the upstream: a new one.
        ok(&client, &authority, false).await.unwrap();
    }

    #[tokio::test]
    async fn close_racing_with_a_request_is_stale() {
        let (authority, _up) = upstream(1, false).await;
        let client = client();
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
    async fn refused_connection_is_a_connect_error() {
        let (listener, authority) = listen().await;
        drop(listener);
        assert!(matches!(
            fetch(&client(), &authority, false).await,
            Err(SendError::Connect(_))
        ));
    }

    #[tokio::test]
    async fn chunked_and_close_delimited_bodies_and_interim_answers() {
        let (authority, _up) = scripted(
            |n| {
                Some(match n {
                    0 => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(),
                    _ => b"HTTP/1.1 200 OK\r\n\r\nuntil close".to_vec(),
                })
            },
            2,
            true,
        )
        .await;
        let client = client();
        ok(&client, &authority, false).await.unwrap();
        assert_eq!(
            client.pool.idle.lock().unwrap().len(),
            1,
            "chunked: reusable"
        );
        let (status, body) = fetch(&client, &authority, false).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"until close"[..]));
        assert!(
            client.pool.idle.lock().unwrap().is_empty(),
            "close-delimited: not reusable"
        );
    }

    #[tokio::test]
    async fn trailers_are_relayed_after_the_data() {
        let (authority, _up) = scripted(
            |_| {
                Some(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-digest\r\n\r\n\
                      2\r\nok\r\n0\r\nx-digest: abc\r\nhost: dropped\r\n\r\n"
                        .to_vec(),
                )
            },
            1,
            false,
        )
        .await;
        let client = client();
        let answer = answer(&client, &authority, true).await.unwrap();
        assert_eq!(answer.headers.to_map()["trailer"], "x-digest");
        // Complete with its head, yet not sized: trailers need a chunked
        // answer to an HTTP/1.1 client.
        assert_eq!(answer.body.size_hint().exact(), None);
        assert!(!answer.body.is_end_stream());
        let body = answer.body.collect().await.unwrap();
        let trailers = body.trailers().cloned().expect("trailers");
        assert_eq!(body.to_bytes(), "ok");
        assert_eq!(trailers.len(), 1, "{trailers:?}");
        assert_eq!(trailers["x-digest"], "abc");
        assert_eq!(client.pool.idle.lock().unwrap().len(), 1, "reusable");
    }

    #[tokio::test]
    async fn malformed_and_truncated_answers_are_errors() {
        let (authority, _up) = scripted(|_| Some(b"HTTP/1.1 abc\r\n\r\n".to_vec()), 1, false).await;
        assert!(matches!(
            fetch(&client(), &authority, true).await,
            Err(SendError::Request(_))
        ));
        let (authority, _up) = scripted(
            |_| Some(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort".to_vec()),
            1,
            true,
        )
        .await;
        let client = client();
        assert!(fetch(&client, &authority, true).await.is_err());
        assert!(client.pool.idle.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_body_is_relayed() {
        let (listener, authority) = listen().await;
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Dropped with the body unread: the gateway's writes fail.
        });
        // 64 MiB: more than the socket buffers hold.
        let chunks = futures_util::stream::iter(
            (0..1024).map(|_| Ok::<_, io::Error>(Frame::data(Bytes::from(vec![b'x'; 64 * 1024])))),
        );
        let mut body = http_body_util::StreamBody::new(chunks);
        let client = client();
        let head = b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: 67108864\r\n\r\n";
        let answer = post(&client, &authority, head, &mut body, false)
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(answer.body.collect().await.unwrap().to_bytes(), "big!");
        assert!(client.pool.idle.lock().unwrap().is_empty(), "not reused");
    }

    #[tokio::test]
    async fn a_failing_client_body_fails_the_request_at_once() {
        let (listener, authority) = listen().await;
        // An upstream that reads and never answers.
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            while s.read(&mut buf).await.unwrap_or(0) > 0 {}
        });
        let chunks = futures_util::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Err(io::Error::other("the client went away")),
        ]);
        let mut body = http_body_util::StreamBody::new(chunks);
        let head = b"POST /up HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
        let sent = tokio::time::timeout(
            Duration::from_secs(10),
            post(&client(), &authority, head, &mut body, true),
        )
        .await
        .expect("no wait for an answer");
        match sent {
            Err(SendError::Request(m)) => assert!(m.contains("went away"), "{m}"),
            other => panic!("expected a request error, got {other:?}"),
        }
        // The client's body was read through its failure.
        assert!(body.frame().await.is_none(), "the body was read");
    }
}
