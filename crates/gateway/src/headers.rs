//! Header rewriting on the way upstream: hop-by-hop headers removed,
//! `X-Forwarded-*` and `Forwarded` added, written straight into the
//! request head.

use std::net::{IpAddr, SocketAddr};

use http::Method;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never forwarded (RFC 9110 7.6.1).
/// `Trailer` is end to end: it announces trailer fields, which are relayed.
#[cfg(test)]
pub(crate) const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Fields that must not come in a trailer section (RFC 9110 6.5.1: framing,
/// routing, authentication, request modifiers and how the content is to be
/// processed): dropped when relaying trailers.
const NOT_IN_TRAILERS: [HeaderName; 12] = [
    header::AUTHORIZATION,
    header::CACHE_CONTROL,
    header::CONTENT_ENCODING,
    header::CONTENT_LENGTH,
    header::CONTENT_RANGE,
    header::CONTENT_TYPE,
    header::EXPECT,
    header::HOST,
    header::MAX_FORWARDS,
    header::SET_COOKIE,
    header::TRAILER,
    header::PROXY_AUTHORIZATION,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A client's address as the forwarding headers write it, worked out once
/// per connection.
#[derive(Debug)]
pub(crate) struct ClientAddr {
    /// The same text, to append to an existing `X-Forwarded-For`.
    ip_text: String,
    /// `for=...;proto=http` (or `https`), this hop's `Forwarded` element
    /// without host.
    hop: String,
    /// Whether the client came over TLS (`X-Forwarded-Proto: https`).
    tls: bool,
}

impl ClientAddr {
    /// A client at `peer`; `tls`: it connected over TLS.
    pub(crate) fn new(peer: SocketAddr, tls: bool) -> Self {
        let ip = peer.ip();
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let ip_text = ip.to_string();
        let proto = if tls { "https" } else { "http" };
        let hop = match ip {
            IpAddr::V4(_) => format!("for={ip_text};proto={proto}"),
            IpAddr::V6(_) => format!("for=\"[{ip_text}]\";proto={proto}"),
        };
        ClientAddr { ip_text, hop, tls }
    }
}

/// Whether `name` is a hop-by-hop header.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    // By text: `HOP_BY_HOP.contains` made (and dropped) the array at each
    // call, for every header of every request and answer.
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Whether a trailer field named `name` is relayed: end to end, and allowed
/// in a trailer section.
pub(crate) fn is_relayed_trailer(name: &HeaderName) -> bool {
    !is_hop_by_hop(name) && !NOT_IN_TRAILERS.contains(name)
}

/// A request as it goes upstream: what [`write_request_head`] needs.
#[derive(Debug)]
pub(crate) struct Outgoing<'a> {
    pub(crate) method: &'a Method,
    /// Origin-form target.
    pub(crate) target: &'a str,
    /// The client's headers, unchanged.
    pub(crate) headers: &'a HeaderMap,
    pub(crate) client: &'a ClientAddr,
    /// The host the client asked for (without port), if any.
    pub(crate) host: Option<&'a str>,
    /// `Host` to send when the client sent none (the authority of an
    /// absolute-form or HTTP/2 request, else the upstream's).
    pub(crate) default_host: &'a str,
    /// A protocol upgrade passes through (`Upgrade` and `Connection:
    /// upgrade` are kept).
    pub(crate) upgrade: bool,
    /// How the body is framed.
    pub(crate) framing: RequestFraming,
}

/// How a request body is delimited on the way upstream. The client's own
/// framing headers are not forwarded: its body arrives decoded (from
/// chunks, or HTTP/2 frames) and is framed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestFraming {
    /// No body and no framing header (GET and the like).
    None,
    /// `Content-Length` (0 for a POST without a body).
    Length(u64),
    /// Chunked: the length is not known in advance.
    Chunked,
}

/// Writes the request head sent upstream, in one pass over the client's
/// headers: hop-by-hop headers (and those `Connection` names) and
/// `Expect` (the gateway answers it) are left out; `X-Forwarded-For` and
/// `Forwarded` get this hop appended, `X-Forwarded-Proto` is set,
/// `X-Forwarded-Host` and `Host` are added when absent; the framing is
/// `r.framing`.
pub(crate) fn write_request_head(out: &mut Vec<u8>, r: &Outgoing<'_>) {
    out.extend_from_slice(r.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(r.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // Names listed in Connection (rare; the common values are keep-alive,
    // close and upgrade), and `TE: trailers`: one pass over the headers,
    // cheaper than two lookups in a map of a few (each hashes its name).
    let mut named: Vec<HeaderName> = Vec::new();
    let mut trailers = false;
    for (name, value) in r.headers {
        if *name == header::TE {
            trailers |= lists_token(value, "trailers");
        }
        if *name != header::CONNECTION {
            continue;
        }
        for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
            if !token.is_empty()
                && !token.eq_ignore_ascii_case("close")
                && !token.eq_ignore_ascii_case("keep-alive")
                && !token.eq_ignore_ascii_case("upgrade")
                && let Ok(name) = HeaderName::from_bytes(token.as_bytes())
            {
                named.push(name);
            }
        }
    }
    let mut xff: Option<Vec<u8>> = None;
    let mut forwarded: Option<Vec<u8>> = None;
    let (mut has_host, mut has_xfh) = (false, false);
    for (name, value) in r.headers {
        if *name == X_FORWARDED_FOR || *name == header::FORWARDED {
            let joined = if *name == X_FORWARDED_FOR {
                &mut xff
            } else {
                &mut forwarded
            };
            let joined = joined.get_or_insert_with(Vec::new);
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(value.as_bytes());
            continue;
        }
        if (is_hop_by_hop(name) && !(r.upgrade && name == header::UPGRADE))
            || name == header::EXPECT
            || name == header::CONTENT_LENGTH
            || *name == X_FORWARDED_PROTO
            || named.contains(name)
        {
            continue;
        }
        has_host |= name == header::HOST;
        has_xfh |= *name == X_FORWARDED_HOST;
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !has_host {
        line(out, b"host", r.default_host.as_bytes());
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = &xff {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(r.client.ip_text.as_bytes());
    out.extend_from_slice(if r.client.tls {
        b"\r\nx-forwarded-proto: https\r\n"
    } else {
        b"\r\nx-forwarded-proto: http\r\n"
    });
    if let Some(host) = r.host
        && !has_xfh
    {
        line(out, b"x-forwarded-host", host.as_bytes());
    }
    out.extend_from_slice(b"forwarded: ");
    if let Some(prev) = &forwarded {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(r.client.hop.as_bytes());
    if let Some(host) = r.host
        && !host.contains(['"', '\\'])
        && !host.bytes().any(|b| b.is_ascii_control())
    {
        out.extend_from_slice(b";host=\"");
        out.extend_from_slice(host.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b"\r\n");
    if trailers {
        // TE is hop-by-hop; only its `trailers` token is passed on.
        out.extend_from_slice(b"te: trailers\r\n");
    }
    if r.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    match r.framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa(n, &mut [0u8; 20]));
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal, in `buf`.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Whether `Connection` lists `token`.
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    lists(headers, header::CONNECTION, token)
}

/// Whether the comma-separated values of `name` list `token` (ignoring
/// case and any `;` parameters).
fn lists(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| lists_token(v, token))
}

/// Whether the comma-separated `value` lists `token` (see [`lists`]).
fn lists_token(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|v| {
        v.split(',').any(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case(token)
        })
    })
}

/// Most headers a map may have for [`find`] to scan it rather than look
/// the name up.
const SCAN_MAX: usize = 8;

/// `headers.get(name)`: a scan of a small map (a client's request has a
/// handful of headers; comparing those names is cheaper than hashing one,
/// about 80-140 instructions a lookup), a lookup in a larger one.
pub(crate) fn find<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h HeaderValue> {
    if headers.len() > SCAN_MAX {
        return headers.get(name);
    }
    headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_is_get_for_small_and_large_maps() {
        for n in [0, 3, SCAN_MAX, SCAN_MAX + 5] {
            let mut map = HeaderMap::new();
            for i in 0..n {
                map.append(
                    HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                    HeaderValue::from(i),
                );
            }
            map.append(header::HOST, HeaderValue::from_static("a"));
            map.append(header::HOST, HeaderValue::from_static("b"));
            assert_eq!(find(&map, &header::HOST), map.get(header::HOST), "{n}");
            assert_eq!(find(&map, &header::HOST).unwrap(), "a");
            assert_eq!(find(&map, &header::UPGRADE), None);
        }
    }

    #[test]
    fn hop_by_hop_by_text_is_the_list() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in ["host", "te-x", "x-upgrade", "content-length", "trailer"] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    fn head(
        headers: &HeaderMap,
        client: &str,
        host: Option<&str>,
        upgrade: bool,
        framing: RequestFraming,
    ) -> String {
        let client = ClientAddr::new(client.parse().unwrap(), false);
        let mut out = Vec::new();
        write_request_head(
            &mut out,
            &Outgoing {
                method: &Method::GET,
                target: "/p?q=1",
                headers,
                client: &client,
                host,
                default_host: "10.0.0.9:80",
                upgrade,
                framing,
            },
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::EXPECT, "100-continue".parse().unwrap());
        h.insert(header::ACCEPT, "*/*".parse().unwrap());
        h.insert(header::HOST, "api.example".parse().unwrap());
        assert_eq!(
            head(&h, "10.0.0.2:5000", None, false, RequestFraming::Chunked),
            "GET /p?q=1 HTTP/1.1\r\naccept: */*\r\nhost: api.example\r\n\
             x-forwarded-for: 10.0.0.2\r\nx-forwarded-proto: http\r\n\
             forwarded: for=10.0.0.2;proto=http\r\nte: trailers\r\n\
             transfer-encoding: chunked\r\n\r\n"
        );
        // Of TE, only `trailers` passes (the gateway relays trailers).
        h.insert(header::TE, "gzip;q=1, deflate".parse().unwrap());
        let other = head(&h, "10.0.0.2:5000", None, false, RequestFraming::None);
        assert!(!other.contains("te:"), "{other}");
        h.insert(header::TE, "deflate, Trailers;q=0.5".parse().unwrap());
        let mixed = head(&h, "10.0.0.2:5000", None, false, RequestFraming::None);
        assert!(mixed.contains("\r\nte: trailers\r\n"), "{mixed}");
        let up = head(&h, "10.0.0.2:5000", None, true, RequestFraming::None);
        assert!(up.contains("upgrade: websocket\r\n"), "{up}");
        assert!(up.contains("connection: upgrade\r\n"), "{up}");
        assert!(!up.contains("x-secret"), "{up}");
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1".parse().unwrap());
        h.append("x-forwarded-for", "2.2.2.2".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert(header::FORWARDED, "for=1.1.1.1".parse().unwrap());
        let out = head(
            &h,
            "10.0.0.2:5000",
            Some("example.com"),
            false,
            RequestFraming::None,
        );
        assert_eq!(
            out,
            "GET /p?q=1 HTTP/1.1\r\nhost: 10.0.0.9:80\r\n\
             x-forwarded-for: 1.1.1.1, 2.2.2.2, 10.0.0.2\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: example.com\r\n\
             forwarded: for=1.1.1.1, for=10.0.0.2;proto=http;host=\"example.com\"\r\n\r\n"
        );
        let out = head(
            &HeaderMap::new(),
            "[::1]:5000",
            None,
            false,
            RequestFraming::Length(1234567),
        );
        assert!(
            out.contains("forwarded: for=\"[::1]\";proto=http\r\n"),
            "{out}"
        );
        assert!(out.contains("x-forwarded-for: ::1\r\n"), "{out}");
        assert!(out.ends_with("content-length: 1234567\r\n\r\n"), "{out}");
    }

    #[test]
    fn tls_clients_are_forwarded_as_https() {
        let mut h = HeaderMap::new();
        // A client's own claim is replaced, whichever way it goes.
        h.insert("x-forwarded-proto", "http".parse().unwrap());
        let client = ClientAddr::new("10.0.0.2:5000".parse().unwrap(), true);
        let mut out = Vec::new();
        write_request_head(
            &mut out,
            &Outgoing {
                method: &Method::GET,
                target: "/",
                headers: &h,
                client: &client,
                host: None,
                default_host: "10.0.0.9:80",
                upgrade: false,
                framing: RequestFraming::None,
            },
        );
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains("\r\nx-forwarded-proto: https\r\n"), "{out}");
        assert!(!out.contains("x-forwarded-proto: http\r\n"), "{out}");
        assert!(
            out.contains("forwarded: for=10.0.0.2;proto=https\r\n"),
            "{out}"
        );
    }
}
