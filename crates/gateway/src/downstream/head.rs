//! Request heads from clients, parsed with `httparse` (RFC 9112): the
//! method, target, version and headers of a [`http::Request`], and what
//! the connection needs to know (framing of the body, keep-alive,
//! `Expect: 100-continue`, `TE: trailers`).

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};

use crate::h1::{Framing, MAX_HEAD, MAX_HEADERS, parse_length};

/// Why a request head cannot be served. Either way the connection is
/// answered and closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeadError {
    /// Malformed (400).
    #[error("malformed request: {0}")]
    Bad(&'static str),
    /// Larger than [`MAX_HEAD`] or with more than [`MAX_HEADERS`] lines
    /// (431).
    #[error("request head too large")]
    TooLarge,
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) version: Version,
    /// All of the client's headers (the proxy drops the hop-by-hop ones
    /// as it writes the head upstream).
    pub(crate) headers: HeaderMap,
    /// How the body is delimited: [`Framing::Empty`], `Length` or
    /// `Chunked`.
    pub(crate) body: Framing,
    /// Whether the connection may carry another request afterwards.
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1).
    pub(crate) expect_continue: bool,
    /// `TE: trailers`: the client takes trailer fields in the answer.
    pub(crate) trailers: bool,
}

/// What [`parse`] found at the start of the buffer.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "returned once per request and unpacked at once; a box would be an allocation per request"
)]
pub(crate) enum Parsed {
    /// A complete head, consumed from the buffer.
    Head(RequestHead),
    /// An HTTP/1.1 request carrying `Upgrade`: left in the buffer, for
    /// hyper to serve (with the rest of the connection).
    Upgrade,
}

/// A header line found by [`scan`]: its name, and where its value is.
type Span = Option<(HeaderName, usize, usize)>;

/// What [`scan`] found besides the headers.
#[derive(Debug, Clone, Copy)]
struct RequestLine {
    /// The head's length.
    len: usize,
    /// Where the method and the target are in the head.
    method: (usize, usize),
    target: (usize, usize),
    http10: bool,
    lines: usize,
    upgrade: bool,
}

/// Parses a request head at the start of `buf`. `Ok(None)`: incomplete.
/// A complete head is consumed from `buf` (its header values are slices
/// of it: neither copied nor allocated), unless it asks for an upgrade.
pub(crate) fn parse(buf: &mut BytesMut) -> Result<Option<Parsed>, HeadError> {
    // A small array first (cheap to set up), the full one only if that is
    // not enough.
    let mut few = [httparse::EMPTY_HEADER; 16];
    let mut few_spans = [const { None }; 16];
    match scan(buf, &mut few, &mut few_spans) {
        Err(HeadError::TooLarge) if buf.len() <= MAX_HEAD => {
            let mut many = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut many_spans = vec![None; MAX_HEADERS];
            match scan(buf, &mut many, &mut many_spans)? {
                Some(line) => build(buf, line, &mut many_spans).map(Some),
                None => Ok(None),
            }
        }
        Ok(Some(line)) => build(buf, line, &mut few_spans).map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    }
}

fn offset(base: &[u8], part: &[u8], len: usize) -> Result<(usize, usize), HeadError> {
    // httparse's slices point into the head.
    (part.as_ptr() as usize)
        .checked_sub(base.as_ptr() as usize)
        .filter(|start| start + part.len() <= len)
        .map(|start| (start, part.len()))
        .ok_or(HeadError::Bad("invalid request head"))
}

fn scan<'b>(
    buf: &'b [u8],
    lines: &mut [httparse::Header<'b>],
    spans: &mut [Span],
) -> Result<Option<RequestLine>, HeadError> {
    let mut req = httparse::Request::new(lines);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Bad("unsupported HTTP version")),
        Err(_) => return Err(HeadError::Bad("malformed request head")),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(HeadError::Bad("malformed request line"));
    };
    let method = offset(buf, method.as_bytes(), len)?;
    let target = offset(buf, target.as_bytes(), len)?;
    let http10 = req.version == Some(0);
    let mut upgrade = false;
    for (line, span) in req.headers.iter().zip(spans.iter_mut()) {
        let name = HeaderName::from_bytes(line.name.as_bytes())
            .map_err(|_| HeadError::Bad("invalid header name"))?;
        upgrade |= name == header::UPGRADE;
        let (start, n) = offset(buf, line.value, len)?;
        *span = Some((name, start, n));
    }
    Ok(Some(RequestLine {
        len,
        method,
        target,
        http10,
        lines: req.headers.len(),
        upgrade: upgrade && !http10,
    }))
}

fn build(buf: &mut BytesMut, found: RequestLine, spans: &mut [Span]) -> Result<Parsed, HeadError> {
    if found.upgrade {
        return Ok(Parsed::Upgrade);
    }
    let raw = buf.split_to(found.len).freeze();
    let (m, n) = found.method;
    let method =
        Method::from_bytes(&raw[m..m + n]).map_err(|_| HeadError::Bad("invalid method"))?;
    let (t, n) = found.target;
    let uri = Uri::from_maybe_shared(raw.slice(t..t + n))
        .map_err(|_| HeadError::Bad("invalid request target"))?;
    let http10 = found.http10;
    let mut headers = HeaderMap::with_capacity(found.lines);
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let (mut close, mut keep_alive) = (false, false);
    let (mut expect_continue, mut trailers) = (false, false);
    for (name, start, n) in spans[..found.lines].iter_mut().filter_map(Option::take) {
        let bytes = raw.slice(start..start + n);
        if name == header::CONTENT_LENGTH {
            let n = parse_length(&bytes).map_err(|_| HeadError::Bad("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::Bad("conflicting content-length"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            // Chunked must be the last coding (RFC 9112 6.3); a request
            // body cannot be delimited otherwise.
            let last = bytes.rsplit(|b| *b == b',').next().unwrap_or(&[]);
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            for token in bytes.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name == header::EXPECT {
            expect_continue |= bytes.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name == header::TE {
            trailers |= bytes.split(|b| *b == b',').any(|t| {
                t.split(|b| *b == b';')
                    .next()
                    .unwrap_or(&[])
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"trailers")
            });
        }
        let value =
            HeaderValue::from_maybe_shared(bytes).map_err(|_| HeadError::Bad("invalid header"))?;
        headers.append(name, value);
    }
    let body = match (chunked, length) {
        // Both: a request smuggling attempt, or a broken client.
        (Some(_), Some(_)) => {
            return Err(HeadError::Bad("both content-length and transfer-encoding"));
        }
        (Some(_), None) if http10 => {
            return Err(HeadError::Bad("transfer-encoding in an HTTP/1.0 request"));
        }
        (Some(true), None) => Framing::Chunked,
        (Some(false), None) => return Err(HeadError::Bad("unsupported transfer-encoding")),
        (None, Some(0) | None) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
    };
    Ok(Parsed::Head(RequestHead {
        method,
        uri,
        version: if http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        },
        headers,
        body,
        keep_alive: !close && (!http10 || keep_alive),
        expect_continue: expect_continue && !http10,
        trailers,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<(RequestHead, BytesMut)>, HeadError> {
        let mut buf = BytesMut::from(raw);
        Ok(parse(&mut buf)?.map(|p| match p {
            Parsed::Head(h) => (h, buf),
            Parsed::Upgrade => panic!("an upgrade"),
        }))
    }

    fn ok(raw: &str) -> (RequestHead, BytesMut) {
        head(raw).unwrap().expect("a complete head")
    }

    #[test]
    fn heads_parse_with_framing_and_keep_alive() {
        let (h, rest) = ok("GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\nnext");
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.uri, "/a?b=1");
        assert_eq!(h.version, Version::HTTP_11);
        assert_eq!(h.headers["host"], "x");
        assert_eq!(h.headers.get_all("x-a").iter().count(), 2);
        assert_eq!((h.body, h.keep_alive), (Framing::Empty, true));
        assert_eq!(&rest[..], b"next");

        let (h, _) = ok("POST / HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n");
        assert_eq!((h.body, h.keep_alive), (Framing::Length(5), false));
        let (h, _) = ok("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(h.body, Framing::Chunked);
        let (h, _) = ok("GET / HTTP/1.0\r\n\r\n");
        assert!(!h.keep_alive);
        assert_eq!(h.version, Version::HTTP_10);
        let (h, _) = ok("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(h.keep_alive);
        let (h, _) = ok(
            "PUT / HTTP/1.1\r\nExpect: 100-Continue\r\nTE: trailers\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(h.expect_continue && h.trailers);
        assert_eq!(h.body, Framing::Empty);
        // Blank lines before a request line are skipped.
        let (h, _) = ok("\r\nGET /x HTTP/1.1\r\n\r\n");
        assert_eq!(h.uri, "/x");
    }

    #[test]
    fn upgrades_stay_in_the_buffer() {
        let raw = "GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
        let mut buf = BytesMut::from(raw);
        assert!(matches!(parse(&mut buf), Ok(Some(Parsed::Upgrade))));
        assert_eq!(&buf[..], raw.as_bytes());
    }

    #[test]
    fn bad_heads_are_errors() {
        assert!(head("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(matches!(head("GARBAGE\r\n\r\n"), Err(HeadError::Bad(_))));
        assert!(matches!(
            head("GET / HTTP/2.0\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(matches!(head(bad), Err(HeadError::Bad(_))), "{bad}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            head(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap_err(),
            HeadError::TooLarge
        );
        let huge = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(MAX_HEAD + 1));
        assert_eq!(head(&huge).unwrap_err(), HeadError::TooLarge);
    }
}
