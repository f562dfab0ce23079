//! Shared helpers: a DNS server over a test registry's catalog, raw
//! queries over UDP and TCP (to see every flag and section), hickory's
//! resolver as a real client, `dig`, and writing instances.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use muster::{Catalog, Config, Etcd, Instance};
use muster_dns::{DnsConfig, DnsServer};
use muster_testkit::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub use muster_testkit::{eventually, metric_value};

/// How long one raw query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A client with short timeouts, so that outages are noticed fast.
pub fn client(registry: &dyn Registry) -> Etcd {
    let mut c = Config::new([registry.endpoint()]);
    c.request_timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_millis(500);
    Etcd::connect(c).expect("client")
}

/// A DNS server on a free loopback port, answering from the catalog of the
/// default prefix of `etcd`'s registry.
pub async fn dns(etcd: &Etcd) -> DnsServer {
    dns_with(etcd, DnsConfig::new(([127, 0, 0, 1], 0).into())).await
}

/// [`dns`] with `config`.
pub async fn dns_with(etcd: &Etcd, config: DnsConfig) -> DnsServer {
    let catalog = Catalog::follow(etcd.clone(), muster::instance::DEFAULT_PREFIX)
        .await
        .expect("catalog");
    DnsServer::start(catalog, config).await.expect("dns server")
}

/// Writes `instance` under the default prefix as a plain put (no lease), as
/// any writer of muster values would.
pub async fn put_instance(etcd: &Etcd, instance: &Instance) {
    etcd.put(muster_proto::PutRequest {
        key: instance.key(muster::instance::DEFAULT_PREFIX).into_bytes(),
        value: instance.encode().expect("encode"),
        ..Default::default()
    })
    .await
    .expect("put");
}

/// Deletes an instance's key.
pub async fn delete_instance(etcd: &Etcd, service: &str, id: &str) {
    etcd.delete_range(muster_proto::DeleteRangeRequest {
        key: muster::instance::instance_key(muster::instance::DEFAULT_PREFIX, service, id)
            .into_bytes(),
        ..Default::default()
    })
    .await
    .expect("delete");
}

/// Waits until the server's catalog has seen the registry's revision
/// `at_least` (a write's header revision), so that answers include it.
pub async fn caught_up(server: &DnsServer, at_least: i64) {
    eventually("the DNS server's catalog catches up", || async {
        server.catalog().health().revision >= at_least
    })
    .await;
}

/// The registry's current revision.
pub async fn revision(etcd: &Etcd) -> i64 {
    etcd.status()
        .await
        .expect("status")
        .header
        .expect("header")
        .revision
}

/// A query for `name` of `qtype`, with EDNS of `payload` bytes if given.
pub fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if let Some(payload) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        q.set_edns(e);
    }
    q
}

/// Sends `query` over UDP; the answer (same id), and its size.
pub async fn udp(addr: SocketAddr, query: &Message) -> (Message, usize) {
    let bytes = udp_raw(addr, &query.to_vec().expect("encode"))
        .await
        .expect("no UDP answer");
    let answer = Message::from_vec(&bytes).expect("answer decodes");
    assert_eq!(answer.metadata.id, query.metadata.id);
    (answer, bytes.len())
}

/// Sends `bytes` in one datagram; the answer's bytes, `None` if none
/// came within a second.
pub async fn udp_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.send_to(bytes, addr).await.expect("send");
    let mut buf = vec![0u8; 65536];
    match tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf)).await {
        Ok(Ok((len, _))) => Some(buf[..len].to_vec()),
        _ => None,
    }
}

/// Sends `query` over a new TCP connection; the answer.
pub async fn tcp(addr: SocketAddr, query: &Message) -> Message {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let answer = tcp_on(&mut stream, query).await.expect("TCP answer");
    assert_eq!(answer.metadata.id, query.metadata.id);
    answer
}

/// Sends `query` on `stream` (length-prefixed) and reads one answer.
pub async fn tcp_on(stream: &mut TcpStream, query: &Message) -> std::io::Result<Message> {
    let bytes = query.to_vec().expect("encode");
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    let exchange = async {
        stream.write_all(&framed).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(QUERY_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no TCP answer"))??;
    Message::from_vec(&buf).map_err(std::io::Error::other)
}

/// The A and AAAA addresses of `message`'s answers, sorted.
pub fn addresses(message: &Message) -> Vec<String> {
    let mut v: Vec<String> = message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// The addresses `name` has now, asked over UDP (`[]` for a negative
/// answer).
pub async fn a_now(addr: SocketAddr, name: &str) -> Vec<String> {
    addresses(&udp(addr, &query(name, RecordType::A, None)).await.0)
}

/// Hickory's resolver, asking only `addr` over UDP (and TCP after a
/// truncated answer), caching nothing.
pub fn resolver(addr: SocketAddr) -> TokioResolver {
    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
    for c in &mut server.connections {
        c.port = addr.port();
    }
    let config = ResolverConfig::from_name_servers(vec![server]);
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    opts.use_hosts_file = ResolveHosts::Never;
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .expect("resolver")
}

/// Whether `dig` is here: fails the test under `MUSTER_REQUIRE_ETCD=1`
/// without it (CI), else skips it loudly.
pub fn require_dig() -> bool {
    muster_testkit::require_tool(
        "dig",
        "-v",
        "the dig tests",
        "apt-get install bind9-dnsutils",
    )
}

/// Runs `dig @addr -p port args...` (off the runtime); its stdout.
pub async fn dig(addr: SocketAddr, args: &[&str]) -> String {
    let mut command = vec![
        format!("@{}", addr.ip()),
        "-p".to_string(),
        addr.port().to_string(),
        "+time=2".to_string(),
        "+tries=1".to_string(),
    ];
    command.extend(args.iter().map(|a| a.to_string()));
    let out = tokio::process::Command::new("dig")
        .args(&command)
        .output()
        .await
        .expect("run dig");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dig {command:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
