//! `dns`: queries at a DNS server (`muster dns`, `muster serve
//! --dns-listen`, or any other), one UDP socket per client, each with one
//! query in flight (a closed loop): throughput and latency from the
//! client's side. Names are picked at random per query among `--dns-name`.
//!
//! Queries are built here (RFC 1035: a header, one question, and an EDNS
//! OPT record with `--dns-edns`); an answer is matched by its id and read
//! only as far as its header: response code, TC bit. NOERROR and NXDOMAIN
//! are answers; SERVFAIL, REFUSED, FORMERR, NOTIMP and no answer within
//! `--dns-timeout` are failures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use rand::RngExt as _;
use serde::Serialize;
use tokio::net::UdpSocket;

use crate::args::{DnsType, Load, Plan};
use crate::clients::{ClosedLoop, closed_loop_report, run_clients};
use crate::error::Error;
use crate::recorder::Recorder;
use crate::report::Report;

/// The fields `dns` adds to the closed-loop ones.
#[derive(Debug, Serialize)]
pub(crate) struct Fields {
    server: SocketAddr,
    names: Vec<String>,
    #[serde(rename = "type")]
    qtype: &'static str,
    /// Answers by response code (`NOERROR`, `NXDOMAIN`, ...).
    rcodes: BTreeMap<String, u64>,
    /// Answers with the TC bit set (cut to fit UDP).
    truncated: u64,
}

/// Runs `dns` for `--duration`.
pub(crate) async fn run(plan: &Plan<'_>) -> Result<Report<ClosedLoop<Fields>>, Error> {
    let args = plan.args;
    let server = args.dns_server;
    let names = args.dns_names.clone();
    let queries: Arc<Vec<Vec<u8>>> = Arc::new(
        names
            .iter()
            .map(|n| encode_query(n, args.dns_type.code(), args.dns_edns))
            .collect::<Result<_, _>>()?,
    );
    if queries.is_empty() {
        return Err(Error::Usage("--dns-name: give at least one name".into()));
    }
    // One probe first: a server that does not answer fails the run at
    // once rather than after --duration of timeouts.
    probe(server, &queries[0], args.dns_timeout).await?;
    let sockets = args.clients as usize;
    let rcodes = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let truncated = Arc::new(AtomicU64::new(0));
    let timeout = args.dns_timeout;
    let run = run_clients(sockets, Some(args.duration), |c, deadline| {
        let queries = queries.clone();
        let rcodes = rcodes.clone();
        let truncated = truncated.clone();
        let mut rng = plan.seed.client(c);
        async move {
            let socket = match connect(server).await {
                Ok(s) => s,
                Err(e) => {
                    let mut rec = Recorder::default();
                    rec.err(format!("cannot open a UDP socket: {e}"));
                    return rec;
                }
            };
            let mut mine: BTreeMap<String, u64> = BTreeMap::new();
            let mut buf = vec![0u8; 65536];
            let mut id: u16 = rng.random();
            // The closed loop, written out: the loop's state outlives it.
            let mut rec = Recorder::default();
            while rec.going(deadline) {
                let mut q = queries[rng.random_range(0..queries.len())].clone();
                id = id.wrapping_add(1);
                q[..2].copy_from_slice(&id.to_be_bytes());
                let started = Instant::now();
                match exchange(&socket, &q, &mut buf, started + timeout).await {
                    Ok(header) => {
                        let rcode = header.rcode();
                        if header.truncated() {
                            truncated.fetch_add(1, Ordering::Relaxed);
                        }
                        if matches!(rcode, 0 | 3) {
                            rec.ok(started);
                        } else {
                            rec.err(format!("answered {}", rcode_name(rcode)));
                        }
                        *mine.entry(rcode_name(rcode)).or_default() += 1;
                    }
                    Err(e) => rec.err(e),
                }
            }
            let mut all = rcodes.lock().unwrap_or_else(PoisonError::into_inner);
            for (k, v) in mine {
                *all.entry(k).or_default() += v;
            }
            rec
        }
    })
    .await?;
    let rcodes = std::mem::take(&mut *rcodes.lock().unwrap_or_else(PoisonError::into_inner));
    let truncated = truncated.load(Ordering::Relaxed);
    let mut lines = vec![format!(
        "dns: answers {}",
        rcodes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    )];
    if truncated > 0 {
        lines.push(format!("dns: {truncated} answers truncated (TC)"));
    }
    let what = format!(
        "{} queries over UDP to {server} for {} name{}, one socket per client",
        args.dns_type.name(),
        names.len(),
        if names.len() == 1 { "" } else { "s" }
    );
    let fields = Fields {
        server,
        names,
        qtype: args.dns_type.name(),
        rcodes,
        truncated,
    };
    let load = Load {
        clients: sockets,
        connections: sockets,
    };
    Ok(closed_loop_report(
        "dns",
        what,
        load,
        run,
        Some(plan.seed),
        (lines, fields),
    ))
}

/// A UDP socket connected to `server`.
async fn connect(server: SocketAddr) -> std::io::Result<UdpSocket> {
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    Ok(socket)
}

/// Sends one query and waits for it to be answered.
async fn probe(
    server: SocketAddr,
    query: &[u8],
    timeout: std::time::Duration,
) -> Result<(), Error> {
    let unanswered = |cause: String| Error::Setup {
        doing: "a first DNS query",
        cause: format!("{server}: {cause}"),
    };
    let socket = connect(server)
        .await
        .map_err(|e| unanswered(e.to_string()))?;
    let mut buf = vec![0u8; 65536];
    exchange(
        &socket,
        query,
        &mut buf,
        Instant::now() + timeout.max(std::time::Duration::from_secs(2)),
    )
    .await
    .map(|_| ())
    .map_err(unanswered)
}

/// The header bytes of an answer that matter here.
#[derive(Debug, Clone, Copy)]
struct AnswerHeader([u8; 4]);

impl AnswerHeader {
    fn rcode(self) -> u8 {
        self.0[3] & 0x0f
    }
    fn truncated(self) -> bool {
        self.0[2] & 0x02 != 0
    }
}

/// Sends `query` and reads datagrams until the answer with its id (late
/// answers to earlier, timed-out queries are skipped) or `deadline`.
async fn exchange(
    socket: &UdpSocket,
    query: &[u8],
    buf: &mut [u8],
    deadline: Instant,
) -> Result<AnswerHeader, String> {
    socket.send(query).await.map_err(|e| format!("send: {e}"))?;
    let wait = async {
        loop {
            let n = socket
                .recv(buf)
                .await
                .map_err(|e| format!("receive: {e}"))?;
            // An answer: at least a header, QR set, our id.
            if n >= 12 && buf[2] & 0x80 != 0 && buf[..2] == query[..2] {
                return Ok(AnswerHeader([buf[0], buf[1], buf[2], buf[3]]));
            }
        }
    };
    match tokio::time::timeout_at(deadline.into(), wait).await {
        Ok(result) => result,
        Err(_) => Err("no answer within --dns-timeout".to_string()),
    }
}

/// The wire form of a query for `name` of type `qtype` (class IN,
/// recursion desired, id 0 to be replaced), with an EDNS OPT record
/// offering `edns` bytes if given.
pub(crate) fn encode_query(name: &str, qtype: u16, edns: Option<u16>) -> Result<Vec<u8>, Error> {
    let bad = |why: &str| Error::Usage(format!("--dns-name {name:?}: {why}"));
    let mut q = vec![
        0,
        0,
        0x01,
        0x00,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        u8::from(edns.is_some()),
    ];
    let trimmed = name.trim().trim_end_matches('.');
    if trimmed.is_empty() {
        return Err(bad("empty"));
    }
    let mut len = 1;
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each label must be 1 to 63 bytes"));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
        len += label.len() + 1;
    }
    if len > 255 {
        return Err(bad("longer than 255 bytes"));
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    if let Some(payload) = edns {
        // OPT: root name, type 41, class = payload size, TTL 0, no data.
        q.push(0);
        q.extend_from_slice(&41u16.to_be_bytes());
        q.extend_from_slice(&payload.max(512).to_be_bytes());
        q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    Ok(q)
}

/// A response code's name.
fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

impl DnsType {
    /// The type's code.
    pub(crate) fn code(self) -> u16 {
        match self {
            DnsType::A => 1,
            DnsType::Aaaa => 28,
            DnsType::Srv => 33,
            DnsType::Any => 255,
        }
    }

    /// The type's name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            DnsType::A => "A",
            DnsType::Aaaa => "AAAA",
            DnsType::Srv => "SRV",
            DnsType::Any => "ANY",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_rfc_1035() {
        let q = encode_query("user.service.muster.", 33, None).unwrap();
        let mut expected = vec![0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(b"\x04user\x07service\x06muster\x00\x00\x21\x00\x01");
        assert_eq!(q, expected);
        let e = encode_query("a", 1, Some(1232)).unwrap();
        assert_eq!(e[11], 1, "one additional record");
        assert_eq!(
            &e[e.len() - 11..],
            &[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]
        );
        assert!(encode_query("", 1, None).is_err());
        assert!(encode_query("a..b", 1, None).is_err());
        assert!(encode_query(&"x".repeat(64), 1, None).is_err());
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(9), "RCODE9");
    }
}
