//! Header rewriting: hop-by-hop headers removed, `X-Forwarded-*` and
//! `Forwarded` added.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes the hop-by-hop headers, and those named in `Connection`. With
/// `keep_upgrade`, `Upgrade` and `Connection: upgrade` stay (for a
/// protocol upgrade passing through).
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // The common case, none of them: one pass over the (few) names costs
    // less than a lookup per hop-by-hop name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    // Names listed in Connection (rare; the common values are keep-alive,
    // close and upgrade).
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',') {
            let token = token.trim();
            if token.is_empty()
                || token.eq_ignore_ascii_case("close")
                || token.eq_ignore_ascii_case("keep-alive")
                || token.eq_ignore_ascii_case("upgrade")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in named {
        headers.remove(name);
    }
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    for name in &HOP_BY_HOP {
        // Checking first is cheaper than removing (which hashes and may
        // shift entries) for the common case of absent headers.
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// A client's address as the forwarding headers write it, worked out once
/// per connection.
#[derive(Debug)]
pub(crate) struct ClientAddr {
    /// `X-Forwarded-For` when the request has none.
    xff: HeaderValue,
    /// The same text, to append to an existing `X-Forwarded-For`.
    ip_text: String,
    /// `for=...;proto=http`, this hop's `Forwarded` element without host.
    hop: String,
}

impl ClientAddr {
    pub(crate) fn new(peer: SocketAddr) -> Self {
        let ip = peer.ip();
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let ip_text = ip.to_string();
        let hop = match ip {
            IpAddr::V4(_) => format!("for={ip_text};proto=http"),
            IpAddr::V6(_) => format!("for=\"[{ip_text}]\";proto=http"),
        };
        ClientAddr {
            xff: HeaderValue::from_str(&ip_text).expect("an IP address is a valid header value"),
            ip_text,
            hop,
        }
    }
}

/// Adds `X-Forwarded-For` (appending the client's address),
/// `X-Forwarded-Proto`, `X-Forwarded-Host` (if absent) and `Forwarded`
/// (appending this hop).
pub(crate) fn add_forwarded(headers: &mut HeaderMap, client: &ClientAddr, host: Option<&str>) {
    match join(headers, &X_FORWARDED_FOR) {
        Some(prev) => {
            if let Ok(v) = HeaderValue::from_str(&format!("{prev}, {}", client.ip_text)) {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
        None => {
            headers.insert(X_FORWARDED_FOR.clone(), client.xff.clone());
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    if let Some(host) = host
        && !headers.contains_key(&X_FORWARDED_HOST)
        && let Ok(v) = HeaderValue::from_str(host)
    {
        headers.insert(X_FORWARDED_HOST.clone(), v);
    }

    let prev = join(headers, &header::FORWARDED);
    let mut forwarded = String::with_capacity(
        prev.as_ref().map_or(0, |p| p.len() + 2)
            + client.hop.len()
            + host.map_or(0, |h| h.len() + 8),
    );
    if let Some(prev) = &prev {
        forwarded.push_str(prev);
        forwarded.push_str(", ");
    }
    forwarded.push_str(&client.hop);
    if let Some(host) = host
        && !host.contains(['"', '\\'])
    {
        forwarded.push_str(";host=\"");
        forwarded.push_str(host);
        forwarded.push('"');
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded)) {
        headers.insert(header::FORWARDED, v);
    }
}

/// All values of a header joined with `, `.
fn join(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let Ok(v) = v.to_str() else { continue };
        match &mut out {
            Some(s) => {
                s.push_str(", ");
                s.push_str(v);
            }
            None => out = Some(v.to_string()),
        }
    }
    out
}

/// Whether `Connection` lists `token`.
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(header::ACCEPT, "*/*".parse().unwrap());
        let mut up = h.clone();
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::ACCEPT));
        remove_hop_by_hop(&mut up, true);
        assert_eq!(up.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(up.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(!up.contains_key("x-secret"));
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1".parse().unwrap());
        h.insert(header::FORWARDED, "for=1.1.1.1".parse().unwrap());
        add_forwarded(
            &mut h,
            &ClientAddr::new("10.0.0.2:5000".parse().unwrap()),
            Some("example.com:8080"),
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "1.1.1.1, 10.0.0.2");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "example.com:8080");
        assert_eq!(
            h.get(header::FORWARDED).unwrap(),
            "for=1.1.1.1, for=10.0.0.2;proto=http;host=\"example.com:8080\""
        );
        let mut h = HeaderMap::new();
        add_forwarded(
            &mut h,
            &ClientAddr::new("[::1]:5000".parse().unwrap()),
            None,
        );
        assert_eq!(
            h.get(header::FORWARDED).unwrap(),
            "for=\"[::1]\";proto=http"
        );
    }
}
