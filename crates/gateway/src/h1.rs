//! The upstream side of HTTP/1.1, on the wire: a request head written in
//! one pass, a response head parsed with `httparse`, and response bodies
//! framed by `Content-Length`, chunked encoding or the connection's close
//! (RFC 9112).
//!
//! Pure functions over buffers; [`crate::client`] does the I/O.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

/// Most header lines a response may have (as hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;
/// Largest response head accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line (with extensions) accepted.
const MAX_LINE: usize = 4 * 1024;

/// Why an upstream's response cannot be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    /// Not HTTP/1.x, or malformed.
    #[error("malformed response head: {0}")]
    Head(String),
    /// The head is larger than [`MAX_HEAD`] or has too many lines.
    #[error("response head too large")]
    TooLarge,
    /// `Content-Length` is not a number, or several disagree.
    #[error("invalid content-length")]
    ContentLength,
    /// Chunked encoding is broken.
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body (HEAD, 1xx, 204, 304, or `Content-Length: 0`).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    /// End-to-end headers only (hop-by-hop ones are left out), as they
    /// came.
    pub(crate) headers: RawHeaders,
    pub(crate) framing: Framing,
    /// Whether the connection may carry another request afterwards.
    pub(crate) keep_alive: bool,
    /// The `Upgrade` header of a 101 answer.
    pub(crate) upgrade: Option<HeaderValue>,
}

/// The end-to-end header lines of an upstream's answer, ready to be
/// written to an HTTP/1.1 client as they are: a slice of the head the
/// upstream sent when nothing in it had to change (the common case: no
/// allocation, no copy, no header map), else the lines kept, copied.
/// [`to_map`](Self::to_map) makes the header map for hyper's side
/// (HTTP/2, upgrades).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RawHeaders {
    /// Whole lines, each ending with CRLF.
    lines: Bytes,
    /// The `Content-Length` among the lines (one line, digits only).
    pub(crate) length: Option<u64>,
    /// A `Date` line is among them.
    pub(crate) has_date: bool,
    /// A `Trailer` line is among them.
    pub(crate) has_trailer: bool,
}

impl RawHeaders {
    /// The header lines, each ending with CRLF.
    pub(crate) fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// The same headers in a header map.
    pub(crate) fn to_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        let mut at = 0;
        while at < self.lines.len() {
            let rest = &self.lines[at..];
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let line = &rest[..eol];
            if let Some(colon) = line.iter().position(|b| *b == b':') {
                let value = &line[colon + 1..];
                let lead = value.len() - value.trim_ascii_start().len();
                let trimmed = value.trim_ascii();
                let start = at + colon + 1 + lead;
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(&line[..colon]),
                    HeaderValue::from_maybe_shared(self.lines.slice(start..start + trimmed.len())),
                ) {
                    map.append(name, value);
                }
            }
            at += eol + 2;
        }
        map
    }
}

/// Parses a response head at the start of `buf`. `Ok(None)`: incomplete.
/// On success, the head's bytes are consumed from `buf`; the header lines
/// are a slice of them (split off `buf`, neither copied nor allocated)
/// unless some had to be left out.
pub(crate) fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, ParseError> {
    // Most answers have a handful of headers: a small array first (cheap
    // to set up), the full one only if that is not enough.
    let mut few = [httparse::EMPTY_HEADER; 16];
    let mut few_spans = [Span::default(); 16];
    let scanned = match scan(buf, &mut few, &mut few_spans) {
        Err(ParseError::TooLarge) if buf.len() <= MAX_HEAD => {
            let mut many = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut many_spans = vec![Span::default(); MAX_HEADERS];
            let scanned = scan(buf, &mut many, &mut many_spans)?;
            return Ok(match scanned {
                Some(line) => Some(build(buf, line, &many_spans, method)?),
                None => None,
            });
        }
        other => other?,
    };
    Ok(match scanned {
        Some(line) => Some(build(buf, line, &few_spans, method)?),
        None => None,
    })
}

/// A header line found by [`scan`]: where its name and value are in the
/// head, and what the gateway makes of it.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    name: usize,
    name_len: usize,
    value: usize,
    value_len: usize,
    /// Where the line ends (after its CRLF; 0: not CRLF-terminated right
    /// after the value).
    end: usize,
    kind: Kind,
}

/// The headers that matter to the gateway, by name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Kind {
    #[default]
    Other,
    ContentLength,
    TransferEncoding,
    Connection,
    Upgrade,
    /// Hop-by-hop, besides the above.
    Hop,
    Date,
    Trailer,
}

fn kind(name: &[u8]) -> Kind {
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    match name.len() {
        2 if is("te") => Kind::Hop,
        4 if is("date") => Kind::Date,
        7 if is("upgrade") => Kind::Upgrade,
        7 if is("trailer") => Kind::Trailer,
        10 if is("connection") => Kind::Connection,
        10 if is("keep-alive") => Kind::Hop,
        14 if is("content-length") => Kind::ContentLength,
        16 if is("proxy-connection") => Kind::Hop,
        17 if is("transfer-encoding") => Kind::TransferEncoding,
        18 if is("proxy-authenticate") => Kind::Hop,
        19 if is("proxy-authorization") => Kind::Hop,
        _ => Kind::Other,
    }
}

/// What [`scan`] found besides the headers.
#[derive(Debug, Clone, Copy)]
struct StatusLine {
    /// The head's length.
    len: usize,
    code: u16,
    http10: bool,
    /// Header lines found.
    lines: usize,
}

/// Parses the head with room for `lines.len()` header lines, recording
/// each line's position and kind in `spans`.
fn scan<'b>(
    buf: &'b [u8],
    lines: &mut [httparse::Header<'b>],
    spans: &mut [Span],
) -> Result<Option<StatusLine>, ParseError> {
    let mut res = httparse::Response::new(lines);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(ParseError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ParseError::TooLarge),
        Err(e) => return Err(ParseError::Head(e.to_string())),
    };
    if len > MAX_HEAD {
        return Err(ParseError::TooLarge);
    }
    let head = &buf[..len];
    let base = buf.as_ptr() as usize;
    // httparse's names and values are slices of the head.
    let at = |part: &[u8]| {
        (part.as_ptr() as usize)
            .checked_sub(base)
            .filter(|start| start + part.len() <= len)
            .ok_or_else(|| ParseError::Head("invalid header line".into()))
    };
    for (line, span) in res.headers.iter().zip(spans.iter_mut()) {
        let name = at(line.name.as_bytes())?;
        let value = at(line.value)?;
        if value < name + line.name.len() {
            return Err(ParseError::Head("invalid header line".into()));
        }
        let after = value + line.value.len();
        let end = if head.get(after..after + 2) == Some(b"\r\n") {
            after + 2
        } else {
            0
        };
        *span = Span {
            name,
            name_len: line.name.len(),
            value,
            value_len: line.value.len(),
            end,
            kind: kind(line.name.as_bytes()),
        };
    }
    Ok(Some(StatusLine {
        len,
        code: res.code.unwrap_or(0),
        http10: res.version == Some(0),
        lines: res.headers.len(),
    }))
}

/// Takes the head [`scan`] found off `buf` and makes the [`Head`].
fn build(
    buf: &mut BytesMut,
    found: StatusLine,
    spans: &[Span],
    method: &Method,
) -> Result<Head, ParseError> {
    let raw = buf.split_to(found.len).freeze();
    let (code, http10) = (found.code, found.http10);
    let status = StatusCode::from_u16(code)
        .map_err(|_| ParseError::Head(format!("invalid status code {code}")))?;
    let spans = &spans[..found.lines];
    let value = |s: &Span| &raw[s.value..s.value + s.value_len];
    let mut length: Option<u64> = None;
    let mut length_lines = 0usize;
    let mut length_plain = true;
    let mut chunked = false;
    let mut transfer_coded = false;
    let mut close = http10;
    let mut upgrade = None;
    // Names listed in Connection (rare).
    let mut named: Vec<&[u8]> = Vec::new();
    for s in spans {
        match s.kind {
            Kind::ContentLength => {
                let v = value(s);
                let n = parse_length(v)?;
                if length.is_some_and(|l| l != n) {
                    return Err(ParseError::ContentLength);
                }
                length = Some(n);
                length_lines += 1;
                length_plain &= v.iter().all(u8::is_ascii_digit);
            }
            Kind::TransferEncoding => {
                transfer_coded = true;
                // Chunked must be the last coding; anything else is read
                // to the close.
                chunked = value(s)
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
            Kind::Connection => {
                for token in value(s).split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        if http10 {
                            close = false;
                        }
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"upgrade") {
                        named.push(token);
                    }
                }
            }
            Kind::Upgrade => {
                upgrade = Some(
                    HeaderValue::from_maybe_shared(raw.slice(s.value..s.value + s.value_len))
                        .map_err(|_| ParseError::Head("invalid value of header upgrade".into()))?,
                );
            }
            _ => {}
        }
    }
    let bodyless = status.is_informational() || status == StatusCode::NO_CONTENT;
    let framing = if method == Method::HEAD || bodyless || status == StatusCode::NOT_MODIFIED {
        Framing::Empty
    } else if transfer_coded {
        if chunked {
            Framing::Chunked
        } else {
            close = true;
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => {
                close = true;
                Framing::Close
            }
        }
    };
    // Content-Length goes with Transfer-Encoding (which overrides it, RFC
    // 9112 6.3) and from 1xx and 204 answers (which must not have it);
    // several lines, or a list, become one line.
    let keep_length = !transfer_coded && !bodyless;
    let forwarded_length = length.filter(|_| keep_length);
    let rewrite_length = keep_length && length.is_some() && (length_lines > 1 || !length_plain);
    let kept = |s: &Span| match s.kind {
        Kind::Other => {
            named.is_empty() || {
                let name = &raw[s.name..s.name + s.name_len];
                !named.iter().any(|n| n.eq_ignore_ascii_case(name))
            }
        }
        Kind::Date | Kind::Trailer => true,
        Kind::ContentLength => keep_length,
        _ => false,
    };
    let mut has_date = false;
    let mut has_trailer = false;
    // One run of whole lines, each CRLF-terminated right after its
    // value: forwarded as a slice of the head.
    let mut run: Option<(usize, usize)> = None;
    let mut contiguous = !rewrite_length;
    for s in spans {
        if !kept(s) {
            continue;
        }
        has_date |= s.kind == Kind::Date;
        has_trailer |= s.kind == Kind::Trailer;
        if s.end == 0 {
            contiguous = false;
        }
        if !contiguous {
            continue;
        }
        run = match run {
            None => Some((s.name, s.end)),
            Some((start, end)) if end == s.name => Some((start, s.end)),
            Some(_) => {
                contiguous = false;
                None
            }
        };
    }
    let lines = if contiguous {
        run.map_or_else(Bytes::new, |(start, end)| raw.slice(start..end))
    } else {
        let mut out = Vec::with_capacity(raw.len());
        let mut length_written = false;
        for s in spans.iter().filter(|s| kept(s)) {
            if s.kind == Kind::ContentLength && rewrite_length {
                if !length_written && let Some(n) = forwarded_length {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(n.to_string().as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                length_written = true;
                continue;
            }
            out.extend_from_slice(&raw[s.name..s.value + s.value_len]);
            out.extend_from_slice(b"\r\n");
        }
        Bytes::from(out)
    };
    Ok(Head {
        status,
        headers: RawHeaders {
            lines,
            length: forwarded_length,
            has_date,
            has_trailer,
        },
        framing,
        keep_alive: !close,
        upgrade: (status == StatusCode::SWITCHING_PROTOCOLS)
            .then_some(upgrade)
            .flatten(),
    })
}

pub(crate) fn parse_length(v: &[u8]) -> Result<u64, ParseError> {
    // Several values in one line must agree ("5, 5").
    let mut out: Option<u64> = None;
    for part in v.split(|b| *b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(ParseError::ContentLength);
        }
        let n = part
            .iter()
            .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        if out.is_some_and(|o| o != n) {
            return Err(ParseError::ContentLength);
        }
        out = Some(n);
    }
    out.ok_or(ParseError::ContentLength)
}

/// Where a body decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoder {
    /// This many bytes of a `Content-Length` body left.
    Length(u64),
    /// Chunked: expecting a chunk-size line.
    ChunkSize,
    /// Chunked: this many bytes of the current chunk left.
    ChunkData(u64),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// Chunked: the trailer section, up to an empty line.
    Trailers,
    /// Until the connection closes.
    Close,
    /// Complete.
    Done,
}

/// What a decoding step gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Body bytes.
    Data(Bytes),
    /// The trailer fields that end a chunked body (the relayed ones, never
    /// empty); the body is complete.
    Trailers(HeaderMap),
    /// Nothing more can be decoded from the buffer: read more.
    NeedMore,
    /// The body is complete.
    Done,
}

impl Decoder {
    pub(crate) fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::ChunkSize,
            Framing::Close => Decoder::Close,
        }
    }

    /// Decodes what it can from `buf`, consuming it.
    pub(crate) fn step(&mut self, buf: &mut BytesMut) -> Result<Step, ParseError> {
        loop {
            match *self {
                Decoder::Done => return Ok(Step::Done),
                Decoder::Length(left) | Decoder::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    *self = match *self {
                        Decoder::Length(_) if left == 0 => Decoder::Done,
                        Decoder::Length(_) => Decoder::Length(left),
                        _ if left == 0 => Decoder::ChunkEnd,
                        _ => Decoder::ChunkData(left),
                    };
                    return Ok(Step::Data(data));
                }
                Decoder::Close => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Decoder::ChunkSize => {
                    let Some(line) = take_line(buf)? else {
                        return Ok(Step::NeedMore);
                    };
                    let size = line[..]
                        .split(|b| *b == b';')
                        .next()
                        .unwrap_or(&[])
                        .trim_ascii();
                    if size.is_empty() || size.len() > 15 {
                        return Err(ParseError::Chunked("invalid chunk size"));
                    }
                    let mut n = 0u64;
                    for d in size {
                        let v = (*d as char)
                            .to_digit(16)
                            .ok_or(ParseError::Chunked("invalid chunk size"))?;
                        n = n * 16 + u64::from(v);
                    }
                    *self = if n == 0 {
                        Decoder::Trailers
                    } else {
                        Decoder::ChunkData(n)
                    };
                }
                Decoder::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ParseError::Chunked("missing CRLF after chunk data"));
                    }
                    buf.advance(2);
                    *self = Decoder::ChunkSize;
                }
                Decoder::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        *self = Decoder::Done;
                        continue;
                    }
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        if buf.len() > MAX_HEAD {
                            return Err(ParseError::Chunked("trailer section too large"));
                        }
                        return Ok(Step::NeedMore);
                    };
                    let section = buf.split_to(end + 4);
                    *self = Decoder::Done;
                    let trailers = parse_trailers(&section)?;
                    if !trailers.is_empty() {
                        return Ok(Step::Trailers(trailers));
                    }
                }
            }
        }
    }

    /// Bytes left, when known.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Length(n) => Some(*n),
            Decoder::Done => Some(0),
            _ => None,
        }
    }
}

/// The relayed fields of a complete trailer section (ending with an empty
/// line): hop-by-hop fields and those a trailer must not carry are left out.
fn parse_trailers(section: &[u8]) -> Result<HeaderMap, ParseError> {
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let fields = match httparse::parse_headers(section, &mut lines) {
        Ok(httparse::Status::Complete((_, fields))) => fields,
        Ok(httparse::Status::Partial) => return Err(ParseError::Chunked("incomplete trailers")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ParseError::Chunked("too many trailer fields"));
        }
        Err(_) => return Err(ParseError::Chunked("malformed trailer field")),
    };
    let mut trailers = HeaderMap::new();
    for field in fields.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Err(ParseError::Chunked("malformed trailer field"));
        };
        if crate::headers::is_relayed_trailer(&name) {
            trailers.append(name, value);
        }
    }
    Ok(trailers)
}

/// One CRLF-terminated line (without the CRLF), consumed from `buf`.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, ParseError> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(i) if i > MAX_LINE => Err(ParseError::Chunked("line too long")),
        Some(i) => {
            let line = buf.split_to(i);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(ParseError::Chunked("line too long")),
        None => Ok(None),
    }
}

/// Appends a chunk-size line for `len` bytes.
pub(crate) fn chunk_size_line(len: usize) -> ([u8; 18], usize) {
    let mut line = [0u8; 18];
    let hex = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = 0;
    loop {
        digits[i] = hex[n & 0xf];
        i += 1;
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    for (j, d) in digits[..i].iter().rev().enumerate() {
        line[j] = *d;
    }
    line[i] = b'\r';
    line[i + 1] = b'\n';
    (line, i + 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    fn head(raw: &str, method: &Method) -> Result<Option<(Head, BytesMut)>, ParseError> {
        let mut buf = BytesMut::from(raw);
        Ok(parse_head(&mut buf, method)?.map(|h| (h, buf)))
    }

    /// The complete head of an answer to a GET, and what follows it.
    fn get(raw: &str) -> (Head, BytesMut) {
        head(raw, &Method::GET).unwrap().expect("a complete head")
    }

    fn body(framing: Framing, wire: &[&str]) -> Result<(Vec<u8>, bool), ParseError> {
        body_and_trailers(framing, wire).map(|(out, done, _)| (out, done))
    }

    /// The body's bytes, whether it completed, and its trailers.
    fn body_and_trailers(
        framing: Framing,
        wire: &[&str],
    ) -> Result<(Vec<u8>, bool, HeaderMap), ParseError> {
        let mut d = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut trailers = HeaderMap::new();
        for piece in wire {
            buf.extend_from_slice(piece.as_bytes());
            loop {
                match d.step(&mut buf)? {
                    Step::Data(b) => out.extend_from_slice(&b),
                    Step::Trailers(t) => {
                        assert!(trailers.is_empty(), "trailers come once");
                        assert_eq!(d, Decoder::Done);
                        trailers = t;
                    }
                    Step::NeedMore => break,
                    Step::Done => return Ok((out, true, trailers)),
                }
            }
        }
        Ok((out, false, trailers))
    }

    #[test]
    fn heads_parse_with_framing_and_keep_alive() {
        let (h, rest) = get("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nX-A: 2\r\n\r\nok");
        assert_eq!(h.status, 200);
        assert_eq!(h.framing, Framing::Length(2));
        assert!(h.keep_alive);
        assert_eq!(h.headers.to_map().get_all("x-a").iter().count(), 2);
        assert_eq!(&rest[..], b"ok");

        let (h, _) =
            get("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.headers.to_map().contains_key(header::CONTENT_LENGTH));
        assert!(!h.headers.to_map().contains_key(header::TRANSFER_ENCODING));

        let (h, _) = get("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let (h, _) = get("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!h.keep_alive);
        let (h, _) = get("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n");
        assert!(!h.keep_alive);
        assert!(!h.headers.to_map().contains_key(header::CONNECTION));
        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        assert_eq!(h.headers.to_map()[header::CONTENT_LENGTH], "5");
        let (h, _) = get("HTTP/1.1 304 Not Modified\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, true));
    }

    /// `kind` keeps its own list (by length, on the hot path): it must
    /// name every hop-by-hop header of the shared one, in any case.
    #[test]
    fn every_hop_by_hop_name_is_a_dropped_kind() {
        for name in &crate::headers::HOP_BY_HOP {
            for spelled in [
                name.as_str().to_string(),
                name.as_str().to_ascii_uppercase(),
            ] {
                let k = kind(spelled.as_bytes());
                assert!(
                    !matches!(
                        k,
                        Kind::Other | Kind::Date | Kind::Trailer | Kind::ContentLength
                    ),
                    "{spelled}: {k:?}"
                );
            }
        }
        assert_eq!(kind(b"X-Hop"), Kind::Other);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_dropped() {
        let (h, _) = get(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nX-End: 2\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(h.headers.to_map().len(), 2, "{:?}", h.headers.to_map());
        assert!(h.headers.to_map().contains_key("x-end"));
    }

    #[test]
    fn header_lines_pass_as_they_came() {
        // Nothing to leave out: a slice of the head, case and all.
        let (h, _) = get("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nDate: x\r\nX-A:  1\r\n\r\nok");
        assert_eq!(
            h.headers.lines(),
            b"Content-Length: 2\r\nDate: x\r\nX-A:  1\r\n"
        );
        assert_eq!(h.headers.length, Some(2));
        assert!(h.headers.has_date && !h.headers.has_trailer);
        assert_eq!(h.headers.to_map()["x-a"], "1");

        // Hop-by-hop lines are left out: the rest is copied.
        let (h, _) = get(
            "HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nTrailer: x-t\r\nContent-Length: 2\r\n\r\n",
        );
        assert_eq!(
            h.headers.lines(),
            b"X-A: 1\r\nTrailer: x-t\r\nContent-Length: 2\r\n"
        );
        assert!(h.headers.has_trailer && !h.headers.has_date);

        // Trailing white space goes.
        let (h, _) = get("HTTP/1.1 200 OK\r\nX-A: 1 \t\r\n\r\n");
        assert_eq!(h.headers.lines(), b"X-A: 1\r\n");

        // Several lengths become one line; LF-only lines get their CR.
        let (h, _) = get("HTTP/1.1 200 OK\nContent-Length: 3, 3\nContent-Length: 3\nX-B: 2\n\n");
        assert_eq!(h.headers.lines(), b"content-length: 3\r\nX-B: 2\r\n");
        assert_eq!(h.headers.length, Some(3));

        // A 204 must not have a length; chunked answers drop it too.
        let (h, _) = get("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-C: 3\r\n\r\n");
        assert_eq!(
            (h.headers.lines(), h.headers.length),
            (&b"X-C: 3\r\n"[..], None)
        );
        let (h, _) =
            get("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n");
        assert_eq!((h.headers.lines(), h.headers.length), (&b""[..], None));
    }

    #[test]
    fn upgrades_keep_their_protocol() {
        let (h, rest) = get(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x01\x02hi",
        );
        assert_eq!(h.status, 101);
        assert_eq!(h.upgrade.unwrap(), "websocket");
        assert_eq!(&rest[..], b"\x01\x02hi");
    }

    #[test]
    fn bad_heads_are_errors() {
        assert!(head("HTTP/1.1 200 OK\r\n", &Method::GET).unwrap().is_none());
        assert!(matches!(
            head("garbage\r\n\r\n", &Method::GET),
            Err(ParseError::Head(_))
        ));
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", &Method::GET).unwrap_err(),
            ParseError::ContentLength
        );
        assert_eq!(
            head(
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                &Method::GET
            )
            .unwrap_err(),
            ParseError::ContentLength
        );
        let (h, _) = get("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(3));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), &Method::GET).unwrap_err(),
            ParseError::TooLarge
        );
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD + 1));
        assert_eq!(head(&huge, &Method::GET).unwrap_err(), ParseError::TooLarge);
    }

    #[test]
    fn bodies_decode_across_reads() {
        assert_eq!(
            body(Framing::Length(5), &["he", "llo", "extra"]).unwrap(),
            (b"hello".to_vec(), true)
        );
        assert_eq!(
            body(
                Framing::Chunked,
                &[
                    "5\r\nhe",
                    "llo\r\n6;ext=1\r\n world\r",
                    "\n0\r\nx-t: 1\r\n",
                    "\r\n"
                ]
            )
            .unwrap(),
            (b"hello world".to_vec(), true)
        );
        assert_eq!(
            body(Framing::Chunked, &["A\r\n0123456789\r\n0\r\n\r\n"]).unwrap(),
            (b"0123456789".to_vec(), true)
        );
        assert_eq!(
            body(Framing::Close, &["a", "b"]).unwrap(),
            (b"ab".to_vec(), false)
        );
        assert!(body(Framing::Chunked, &["zz\r\n"]).is_err());
        assert!(body(Framing::Chunked, &["1\r\nab\r\n"]).is_err());
        assert!(body(Framing::Chunked, &[&"1".repeat(MAX_LINE + 2)]).is_err());
    }

    #[test]
    fn trailers_are_relayed_without_forbidden_fields() {
        let (out, done, t) = body_and_trailers(
            Framing::Chunked,
            &[
                "2\r\nok\r\n0\r\nGrpc-Status: 0\r\nx-digest: a",
                "bc\r\nContent-Length: 9\r\nConnection: close\r\n",
                "Set-Cookie: s=1\r\nx-digest: def\r\n\r\n",
            ],
        )
        .unwrap();
        assert_eq!((&out[..], done), (&b"ok"[..], true));
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(t["grpc-status"], "0");
        let digests: Vec<_> = t.get_all("x-digest").iter().collect();
        assert_eq!(digests, ["abc", "def"]);

        // Only forbidden fields: nothing to relay, the body just ends.
        let (_, done, t) =
            body_and_trailers(Framing::Chunked, &["0\r\nHost: x\r\n\r", "\n"]).unwrap();
        assert!(done && t.is_empty());

        assert!(body(Framing::Chunked, &["0\r\nno colon\r\n\r\n"]).is_err());
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert!(body(Framing::Chunked, &[&format!("0\r\n{many}\r\n")]).is_err());
        let endless = format!("0\r\nx: {}", "a".repeat(MAX_HEAD + 1));
        assert!(body(Framing::Chunked, &[&endless]).is_err());
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        let (l, n) = chunk_size_line(0);
        assert_eq!(&l[..n], b"0\r\n");
        let (l, n) = chunk_size_line(255);
        assert_eq!(&l[..n], b"ff\r\n");
        let (l, n) = chunk_size_line(usize::MAX);
        assert_eq!(&l[..n], b"ffffffffffffffff\r\n");
    }
}
