//! The client side of HTTP/1.1, served by the gateway's own codec rather
//! than hyper's: hyper's server took about a third of the instructions of
//! a proxied request.
//!
//! One task per connection reads request heads into one buffer, parses
//! them with `httparse` ([`head`]), hands each request to
//! [`Proxy::handle`] with a body that reads from the same connection
//! ([`Inbound`]: `Content-Length` or chunked, with `Expect: 100-continue`
//! answered when the body is first read), and writes the answer's head and
//! body straight into one write buffer (its length, chunked coding when it
//! is not known, or the close for HTTP/1.0). Requests are answered one at a
//! time, in order (pipelined ones wait in the buffer). A body the proxy did
//! not read is read and thrown away before the next request, or the
//! connection is closed.
//!
//! What this path does not speak goes to hyper with the bytes already read
//! ([`Outcome::Handoff`], replayed by [`Rewind`]): the h2c preface, and an
//! HTTP/1.1 request carrying `Upgrade` (WebSocket, h2c upgrades), which
//! hyper's upgrade machinery serves as before (`crate::upgrade`).
//!
//! The connection counts its requests for the watchdog (idle and
//! slowloris connections are closed by it, as with hyper) and, when the
//! gateway drains, stops after the answer in progress (`Connection:
//! close`), or at once if it is waiting for a request.

mod head;
mod rewind;

use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::body::GatewayBody;
use crate::client::UpstreamClient;
use crate::h1::{self, Decoder, Step};
use crate::headers::ClientAddr;
use crate::proxy::Proxy;
use crate::watchdog::Activity;

use self::head::{HeadError, Parsed};
pub(crate) use self::rewind::Rewind;

/// Read buffer of a connection (grown as needed).
const READ_BUF: usize = 8 * 1024;
/// Initial write buffer of a connection (grown as needed, and kept).
const WRITE_BUF: usize = 4 * 1024;
/// Data frames up to this size are copied into the write buffer (written
/// with the head in one call); larger ones are written from where they
/// are.
const COPY_MAX: usize = 16 * 1024;
/// Most of a request body nobody read that is read and thrown away to
/// keep the connection; a longer one closes it.
const DRAIN_MAX: u64 = 256 * 1024;
/// The start of an HTTP/2 connection with prior knowledge (h2c).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Whether HTTP/1.1 is served by this module: unless the environment
/// variable `MUSTER_GATEWAY_H1` is `hyper` (hyper's server then serves
/// every connection, as before this module; kept for comparison).
pub(crate) fn enabled() -> bool {
    std::env::var_os("MUSTER_GATEWAY_H1").is_none_or(|v| v != "hyper")
}

/// What serving a connection needs, borrowed from its task.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub(crate) proxy: &'a Proxy,
    pub(crate) client: &'a UpstreamClient,
    pub(crate) peer: &'a ClientAddr,
    pub(crate) activity: &'a Activity,
}

/// How a connection's service ended.
#[derive(Debug)]
pub(crate) enum Outcome<I> {
    /// Done: closed (or to be dropped).
    Closed,
    /// For hyper to serve from here on: the connection and the bytes read
    /// from it and not served (they start with the request hyper is to
    /// answer).
    Handoff(I, BytesMut),
}

/// Whether the `100 Continue` of a request is still to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Continue {
    No,
    /// This much of it written.
    Write(usize),
    Flush,
}

/// The reading side of a connection: its buffer, and where the current
/// request's body stands.
#[derive(Debug)]
struct Reader<I> {
    io: I,
    buf: BytesMut,
    decoder: Decoder,
    cont: Continue,
    /// The body could not be read whole (the client went away, or its
    /// chunked coding is broken): the connection closes after the answer.
    failed: bool,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Reader<I> {
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_BUF);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }

    fn poll_continue(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            match self.cont {
                Continue::No => return Poll::Ready(Ok(())),
                Continue::Write(off) => {
                    let n = ready!(Pin::new(&mut self.io).poll_write(cx, &CONTINUE[off..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                    }
                    self.cont = if off + n == CONTINUE.len() {
                        Continue::Flush
                    } else {
                        Continue::Write(off + n)
                    };
                }
                Continue::Flush => {
                    ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                    self.cont = Continue::No;
                }
            }
        }
    }

    fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        if let Err(e) = ready!(self.poll_continue(cx)) {
            self.failed = true;
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            match self.decoder.step(&mut self.buf) {
                Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Step::Trailers(t)) => return Poll::Ready(Some(Ok(Frame::trailers(t)))),
                Ok(Step::Done) => return Poll::Ready(None),
                Ok(Step::NeedMore) => {}
                Err(e) => {
                    self.failed = true;
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e,
                    ))));
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    self.failed = true;
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the client closed the connection before the end of the body",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    self.failed = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

/// A request's body, read from its connection as the proxy asks for it.
#[derive(Debug)]
pub(crate) struct Inbound<'a, I> {
    reader: &'a mut Reader<I>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Body for Inbound<'_, I> {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.get_mut().reader.poll_body(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.reader.decoder == Decoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.reader.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::new(),
        }
    }
}

/// Counts the request finished on its connection when dropped.
struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Serves HTTP/1.1 on `io` until the client or the gateway closes it, or
/// it needs hyper. `sniff`: an h2c preface at the start goes to hyper.
pub(crate) async fn serve<I>(io: I, ctx: Ctx<'_>, sniff: bool) -> Outcome<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut reader = Reader {
        io,
        buf: BytesMut::with_capacity(READ_BUF),
        decoder: Decoder::Done,
        cont: Continue::No,
        failed: false,
    };
    let mut out: Vec<u8> = Vec::with_capacity(WRITE_BUF);
    // The route timeout's timer, reset for each request (not registered
    // with the timer driver until the first).
    let mut timer = pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
    let mut sniff = sniff;
    loop {
        let head = loop {
            if sniff && !reader.buf.is_empty() {
                let n = reader.buf.len().min(PREFACE.len());
                if reader.buf[..n] != PREFACE[..n] {
                    sniff = false;
                } else if n == PREFACE.len() {
                    return Outcome::Handoff(reader.io, reader.buf);
                }
            }
            if !sniff && !reader.buf.is_empty() {
                match head::parse(&mut reader.buf) {
                    Ok(Some(Parsed::Head(h))) => break h,
                    Ok(Some(Parsed::Upgrade)) => return Outcome::Handoff(reader.io, reader.buf),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(peer = ?ctx.peer, error = %e, "refused a request");
                        refuse(&mut reader.io, &mut out, &e).await;
                        linger(&mut reader.io).await;
                        return Outcome::Closed;
                    }
                }
            }
            // Waiting for a request: a drain ends the connection here.
            let idle = reader.buf.is_empty();
            let read = poll_fn(|cx| {
                if idle && ctx.activity.is_draining() {
                    return Poll::Ready(None);
                }
                reader.poll_fill(cx).map(Some)
            })
            .await;
            match read {
                Some(Ok(n)) if n > 0 => {}
                _ => return Outcome::Closed,
            }
        };
        ctx.activity.start();
        let busy = Busy(ctx.activity);
        reader.decoder = Decoder::new(head.body);
        reader.failed = false;
        reader.cont = if head.expect_continue && reader.decoder != Decoder::Done {
            Continue::Write(0)
        } else {
            Continue::No
        };
        let answer = Answer {
            head: head.method == Method::HEAD,
            http10: head.version == Version::HTTP_10,
            trailers: head.trailers,
            close: false,
        };
        let keep_alive = head.keep_alive;
        let mut req = Request::new(Inbound {
            reader: &mut reader,
        });
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers;
        let resp = ctx
            .proxy
            .handle(ctx.client, req, ctx.peer, Some(timer.as_mut()))
            .await;
        let unread = reader.decoder != Decoder::Done;
        // A body nobody asked for after `Expect: 100-continue` may never
        // come; a long one is not worth reading.
        let close = !keep_alive
            || reader.failed
            || ctx.activity.is_draining()
            || (unread
                && (reader.cont != Continue::No
                    || reader.decoder.remaining().is_some_and(|n| n > DRAIN_MAX)));
        let answer = Answer { close, ..answer };
        let closing = match write_response(&mut reader.io, &mut out, resp, answer).await {
            Ok(closing) => closing,
            Err(e) => {
                tracing::debug!(peer = ?ctx.peer, error = %e, "answer not delivered");
                return Outcome::Closed;
            }
        };
        drop(busy);
        if closing {
            let _ = reader.io.shutdown().await;
            return Outcome::Closed;
        }
        if unread && !drain(&mut reader).await {
            return Outcome::Closed;
        }
    }
}

/// Reads the rest of a request body nobody read, up to [`DRAIN_MAX`]
/// bytes: whether it ended (and the connection can go on).
async fn drain<I: AsyncRead + AsyncWrite + Unpin>(reader: &mut Reader<I>) -> bool {
    let mut seen = 0u64;
    poll_fn(|cx| {
        loop {
            match reader.decoder.step(&mut reader.buf) {
                Ok(Step::Data(data)) => {
                    seen += data.len() as u64;
                    if seen > DRAIN_MAX {
                        return Poll::Ready(false);
                    }
                }
                Ok(Step::Trailers(_)) => {}
                Ok(Step::Done) => return Poll::Ready(true),
                Ok(Step::NeedMore) => match ready!(reader.poll_fill(cx)) {
                    Ok(n) if n > 0 => {}
                    _ => return Poll::Ready(false),
                },
                Err(_) => return Poll::Ready(false),
            }
        }
    })
    .await
}

/// Answers a head that cannot be served, and closes.
async fn refuse<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>, e: &HeadError) {
    out.clear();
    out.extend_from_slice(match e {
        HeadError::TooLarge => b"HTTP/1.1 431 Request Header Fields Too Large\r\n".as_slice(),
        HeadError::Bad(_) => b"HTTP/1.1 400 Bad Request\r\n".as_slice(),
    });
    out.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n");
    rewind::write_date(out);
    out.extend_from_slice(b"\r\n");
    if io.write_all(out).await.is_err() || io.flush().await.is_err() {
        return;
    }
    let _ = io.shutdown().await;
}

/// After [`refuse`]: what the client still sends is read (for a moment,
/// up to a bound) before the socket is dropped, so that the close does not
/// reset the connection before the client has read the answer.
async fn linger<I: AsyncRead + Unpin>(io: &mut I) {
    let discard = async {
        let mut sink = [0u8; 4096];
        let mut left = DRAIN_MAX;
        while left > 0 {
            match tokio::io::AsyncReadExt::read(io, &mut sink).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n as u64),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), discard).await;
}

/// What the answer's framing depends on, of its request.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// A HEAD request: no body.
    head: bool,
    /// HTTP/1.0: no chunked coding; keep-alive is said.
    http10: bool,
    /// `TE: trailers`: trailer fields are sent (those the answer's
    /// `Trailer` header announces, as hyper does).
    trailers: bool,
    /// The connection closes after the answer (`Connection: close`).
    close: bool,
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the close (HTTP/1.0, length unknown).
    Close,
}

/// Writes the answer: gives whether the connection must close afterwards.
async fn write_response<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    resp: Response<GatewayBody>,
    a: Answer,
) -> std::io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let bodyless_status = status.is_informational() || status == StatusCode::NO_CONTENT;
    let no_body = a.head || bodyless_status || status == StatusCode::NOT_MODIFIED;
    let mut length: Option<u64> = None;
    let mut has_date = false;
    let mut announced = false;
    for (name, value) in &parts.headers {
        if *name == header::CONTENT_LENGTH {
            if bodyless_status || length.is_some() {
                continue;
            }
            match h1::parse_length(value.as_bytes()) {
                Ok(n) => length = Some(n),
                Err(_) => continue,
            }
        } else if *name == header::TRANSFER_ENCODING
            || *name == header::CONNECTION
            || *name == header::UPGRADE
        {
            continue;
        }
        has_date |= *name == header::DATE;
        announced |= *name == header::TRAILER;
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // An upstream's header lines, as they came (the proxy left out the
    // hop-by-hop ones, and a Content-Length a 1xx or 204 must not have).
    let raw = body.take_headers();
    if let Some(raw) = &raw {
        out.extend_from_slice(raw.lines());
        if length.is_none() {
            length = raw.length;
        }
        has_date |= raw.has_date;
        announced |= raw.has_trailer;
    }
    let hint = body.size_hint().exact();
    let framing = if no_body {
        // The length a GET would have had, when the gateway knows it.
        if length.is_none()
            && !bodyless_status
            && let Some(n) = hint.filter(|n| *n > 0)
        {
            length_line(out, n);
        }
        Framing::None
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if let Some(n) = hint {
        length_line(out, n);
        Framing::Length(n)
    } else if a.http10 {
        Framing::Close
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    let close = a.close || framing == Framing::Close;
    if !has_date {
        rewind::write_date(out);
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if a.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if framing == Framing::None {
        drop(body);
        return send(io, out).await.map(|()| close);
    }
    let mut sent = 0u64;
    let mut trailers: Option<HeaderMap> = None;
    loop {
        // A frame ready now goes with what is buffered; otherwise that is
        // sent before waiting.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    send(io, out).await?;
                }
                poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let frame = match frame {
            None => break,
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                // Cut short: what was sent stands, the connection goes.
                let _ = send(io, out).await;
                return Err(e);
            }
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers()
                    && framing == Framing::Chunked
                    && a.trailers
                    && announced
                {
                    trailers = Some(t);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        match framing {
            Framing::Length(n) => {
                let room = n - sent;
                if data.len() as u64 > room {
                    data.truncate(room as usize);
                    put(io, out, data).await?;
                    send(io, out).await?;
                    return Err(std::io::Error::other(
                        "the answer's body is longer than its length",
                    ));
                }
                sent += data.len() as u64;
                put(io, out, data).await?;
            }
            Framing::Chunked => {
                let (line, n) = h1::chunk_size_line(data.len());
                out.extend_from_slice(&line[..n]);
                put(io, out, data).await?;
                out.extend_from_slice(b"\r\n");
            }
            _ => put(io, out, data).await?,
        }
    }
    match framing {
        Framing::Length(n) if sent < n => {
            let _ = send(io, out).await;
            return Err(std::io::Error::other(
                "the answer's body is shorter than its length",
            ));
        }
        Framing::Chunked => {
            out.extend_from_slice(b"0\r\n");
            if let Some(t) = trailers {
                match &raw {
                    Some(raw) => write_trailers(out, &raw.to_map(), &t),
                    None => write_trailers(out, &parts.headers, &t),
                }
            }
            out.extend_from_slice(b"\r\n");
        }
        _ => {}
    }
    send(io, out).await?;
    Ok(close)
}

/// The trailer fields `headers` announce in `Trailer`.
fn write_trailers(out: &mut Vec<u8>, headers: &HeaderMap, trailers: &HeaderMap) {
    let announced: Vec<HeaderName> = headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for (name, value) in trailers {
        if announced.contains(name) {
            header_line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// Adds `data` to what is to be written: copied if small, else written
/// now after what is buffered.
async fn put<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    data: Bytes,
) -> std::io::Result<()> {
    if data.len() <= COPY_MAX {
        out.extend_from_slice(&data);
        return Ok(());
    }
    let mut both = Buf::chain(&out[..], data);
    io.write_all_buf(&mut both).await?;
    out.clear();
    Ok(())
}

/// Writes and flushes what is buffered.
async fn send<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>) -> std::io::Result<()> {
    io.write_all(out).await?;
    out.clear();
    io.flush().await
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn length_line(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}
