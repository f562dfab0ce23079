//! Where an instance is, as DNS can tell it: an instance's `addr` is
//! `host:port` or a URL (`http://10.0.0.1:8080/`, `https://[::1]`,
//! `grpc://api.internal:9000`); DNS needs the host (an IP for A and AAAA,
//! or a name for SRV targets and CNAMEs) and the port (for SRV).

use std::net::{IpAddr, Ipv6Addr};

/// The host part of an instance address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    /// An IP address literal: answered as A or AAAA.
    Ip(IpAddr),
    /// A host name (lowercase, without a trailing dot): a SRV target or a
    /// CNAME, never an A or AAAA answer (this server does not resolve
    /// names).
    Name(String),
}

/// An instance address taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) host: Host,
    /// The port, given or implied by the URL's scheme; `None` when neither
    /// says (no SRV record then).
    pub(crate) port: Option<u16>,
}

/// Takes `addr` apart; `None` when no host can be found in it (empty, or
/// a host that is neither an IP address nor a valid DNS name).
pub(crate) fn parse(addr: &str) -> Option<Target> {
    let addr = addr.trim();
    let (scheme, rest) = match addr.split_once("://") {
        Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
        None => (None, addr),
    };
    // The authority ends at the path, query or fragment.
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // Userinfo (`user:pw@host`) is not the host.
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = split_host_port(authority)?;
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
        None => scheme.as_deref().and_then(default_port),
    };
    let host = match host.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(valid_host_name(host)?),
    };
    Some(Target { host, port })
}

/// `host:port`, `[v6]:port`, `[v6]`, a bare IPv6 address or a bare host.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        // A zone (`fe80::1%eth0`) is meaningless to whoever reads the
        // answer: left out.
        let host = host.split('%').next().unwrap_or(host);
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    if authority.parse::<Ipv6Addr>().is_ok() {
        return Some((authority, None));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host, Some(port))),
        Some(_) => None,
        None => Some((authority, None)),
    }
    .filter(|(host, _)| !host.is_empty())
}

/// The port a URL scheme implies.
fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// `host` lowercased without a trailing dot, if it is a DNS name of
/// letters, digits, hyphens and underscores in labels of 1 to 63 bytes,
/// 253 at most in all.
fn valid_host_name(host: &str) -> Option<String> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(addr: &str) -> (IpAddr, Option<u16>) {
        match parse(addr) {
            Some(Target {
                host: Host::Ip(ip),
                port,
            }) => (ip, port),
            other => panic!("{addr}: {other:?}"),
        }
    }

    #[test]
    fn host_port_and_urls() {
        assert_eq!(
            ip("10.0.0.1:8080"),
            ("10.0.0.1".parse().unwrap(), Some(8080))
        );
        assert_eq!(
            ip("http://10.0.0.1:8080/api?x=1"),
            ("10.0.0.1".parse().unwrap(), Some(8080))
        );
        assert_eq!(
            ip("http://10.0.0.1"),
            ("10.0.0.1".parse().unwrap(), Some(80))
        );
        assert_eq!(ip("https://[::1]/"), ("::1".parse().unwrap(), Some(443)));
        assert_eq!(
            ip("[2001:db8::7]:9000"),
            ("2001:db8::7".parse().unwrap(), Some(9000))
        );
        assert_eq!(
            ip("[fe80::1%eth0]:1"),
            ("fe80::1".parse().unwrap(), Some(1))
        );
        assert_eq!(ip("2001:db8::7"), ("2001:db8::7".parse().unwrap(), None));
        assert_eq!(ip("grpc://10.1.2.3"), ("10.1.2.3".parse().unwrap(), None));
        assert_eq!(
            ip("http://u:pw@10.0.0.9:81"),
            ("10.0.0.9".parse().unwrap(), Some(81))
        );
        assert_eq!(ip(" 10.0.0.1 "), ("10.0.0.1".parse().unwrap(), None));
    }

    #[test]
    fn names() {
        let t = parse("http://API.Internal.:8443").unwrap();
        assert_eq!(t.host, Host::Name("api.internal".into()));
        assert_eq!(t.port, Some(8443));
        assert_eq!(parse("db_1:5432").unwrap().host, Host::Name("db_1".into()));
    }

    #[test]
    fn nonsense_is_none() {
        for bad in [
            "",
            ":80",
            "http://",
            "host:port",
            "host:0",
            "host:70000",
            "a b:1",
            "[::1",
            "[::1]x",
            "x..y:1",
            "1:2:3",
            "ünï:1",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        assert_eq!(parse(&format!("{}:1", "a".repeat(64))), None);
    }
}
