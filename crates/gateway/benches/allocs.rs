//! Heap allocations per proxied request (`cargo bench -p muster-gateway
//! --bench allocs`).
//!
//! The whole process runs under a counting allocator (`stats_alloc`'s
//! wrapper around the system allocator: no unsafe code here). A gateway
//! with one serving thread routes `/` to one upstream registered in a real
//! etcd (`muster_testkit`). The client and the upstream are plain blocking
//! sockets with fixed buffers, so they allocate nothing per request: what
//! the counter sees while the requests run is the gateway (plus the odd
//! lease renewal of the registrar, far below one per thousand requests).
//!
//! Each scenario sends its requests one after the other on one keep-alive
//! connection, after a warm-up (pools filled, buffers grown), and reports
//! allocations, reallocations and allocated bytes per request.

use std::alloc::System;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use muster::{Config, Discovery, Etcd, Instance, Registrar, RegistrarConfig};
use muster_gateway::{Gateway, GatewayConfig, Route};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Requests per scenario (after the warm-up).
const REQUESTS: usize = 20_000;
const WARM_UP: usize = 2_000;

/// The upstream's answer to every request.
const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok";

fn main() {
    if muster_testkit::require_etcd().is_none() {
        eprintln!("allocs: skipped (no etcd)");
        return;
    }
    let etcd = muster_testkit::EtcdNode::start().expect("etcd");
    let upstream = start_upstream();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (gateway, _registrar) = runtime.block_on(async {
        let mut config = Config::new(vec![etcd.endpoint()]);
        config.request_timeout = Duration::from_secs(5);
        let client = Etcd::connect(config).expect("etcd client");
        let registrar = Registrar::start(client.clone(), RegistrarConfig::default())
            .await
            .expect("registrar");
        registrar
            .register(Instance::new("bench", "u-1", format!("http://{upstream}")))
            .await
            .expect("register");
        let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap());
        config.routes = vec![Route::new("/", "bench")];
        config.workers = 1;
        let gateway = Gateway::start(config, Discovery::new(client))
            .await
            .expect("gateway");
        (gateway, registrar)
    });
    let addr = gateway.local_addr();

    let mut conn = Client::connect(addr);
    println!(
        "heap allocations per request through the gateway (one serving thread, {REQUESTS} requests each):"
    );
    println!("| request | allocations | reallocations | bytes allocated |");
    println!("|---|---|---|---|");
    let get =
        b"GET / HTTP/1.1\r\nhost: bench\r\nuser-agent: allocs\r\naccept: */*\r\n\r\n".to_vec();
    measure(&mut conn, "GET, no body", &get);
    let mut post =
        b"POST / HTTP/1.1\r\nhost: bench\r\ncontent-type: application/octet-stream\r\ncontent-length: 1024\r\n\r\n"
            .to_vec();
    post.extend_from_slice(&[b'x'; 1024]);
    measure(&mut conn, "POST, 1 KiB body (Content-Length)", &post);
    let mut chunked =
        b"POST / HTTP/1.1\r\nhost: bench\r\ntransfer-encoding: chunked\r\n\r\n400\r\n".to_vec();
    chunked.extend_from_slice(&[b'y'; 1024]);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    measure(&mut conn, "POST, 1 KiB body (chunked)", &chunked);

    drop(conn);
    runtime.block_on(gateway.shutdown());
}

/// Sends `request` [`WARM_UP`] then [`REQUESTS`] times and prints the
/// allocations per request of the second run.
fn measure(conn: &mut Client, what: &str, request: &[u8]) {
    for _ in 0..WARM_UP {
        conn.exchange(request);
    }
    let region = Region::new(GLOBAL);
    let start = Instant::now();
    for _ in 0..REQUESTS {
        conn.exchange(request);
    }
    let elapsed = start.elapsed();
    let change = region.change();
    let per = |n: usize| n as f64 / REQUESTS as f64;
    println!(
        "| {what} | {:.2} | {:.2} | {:.0} |",
        per(change.allocations),
        per(change.reallocations),
        per(change.bytes_allocated),
    );
    eprintln!(
        "  ({what}: {:.1} µs per request under the counting allocator)",
        elapsed.as_secs_f64() * 1e6 / REQUESTS as f64
    );
}

/// A blocking keep-alive client with a fixed buffer.
struct Client {
    stream: TcpStream,
    buf: Box<[u8]>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut client = Client {
            stream: TcpStream::connect(addr).expect("connect to the gateway"),
            buf: vec![0; 64 * 1024].into_boxed_slice(),
        };
        client.stream.set_nodelay(true).expect("nodelay");
        // Until discovery has listed the upstream.
        loop {
            let probe = b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n";
            if client.exchange(probe) == 200 {
                return client;
            }
            assert!(Instant::now() < deadline, "the gateway never routed /");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends one request and reads its whole answer; gives the status.
    fn exchange(&mut self, request: &[u8]) -> u16 {
        self.stream.write_all(request).expect("send");
        read_message(&mut self.stream, &mut self.buf, true).expect("an answer")
    }
}

/// Reads one HTTP/1.1 message (a head and its Content-Length or chunked
/// body) into `buf`; gives the status (of an answer; 0 for a request), or
/// `None` if the connection closed first. Allocates nothing. Messages here
/// never arrive pipelined, so the buffer holds exactly one message.
fn read_message(stream: &mut TcpStream, buf: &mut [u8], answer: bool) -> Option<u16> {
    let mut len = 0;
    let head_end = loop {
        len += fill(stream, &mut buf[len..])?;
        if let Some(i) = find(&buf[..len], b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = &buf[..head_end];
    let status = if answer {
        std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()?
    } else {
        0
    };
    let chunked =
        header(head, b"transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case(b"chunked"));
    if chunked {
        while !buf[head_end..len].ends_with(b"0\r\n\r\n") {
            len += fill(stream, &mut buf[len..])?;
        }
    } else {
        let body: usize = header(head, b"content-length")
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
            .unwrap_or(0);
        while len < head_end + body {
            len += fill(stream, &mut buf[len..])?;
        }
    }
    Some(status)
}

/// One read: how many bytes came (`None`: closed or failed).
fn fill(stream: &mut TcpStream, buf: &mut [u8]) -> Option<usize> {
    match stream.read(buf) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

/// The value of header `name` in `head`.
fn header<'h>(head: &'h [u8], name: &[u8]) -> Option<&'h [u8]> {
    head.split(|b| *b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|b| *b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name)
            .then(|| line[colon + 1..].trim_ascii())
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An upstream on a plain thread per connection: reads each request whole
/// and answers [`ANSWER`].
fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
    let addr = listener.local_addr().expect("upstream address");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut buf = vec![0u8; 64 * 1024];
                // Until the gateway closes the connection.
                while read_message(&mut stream, &mut buf, false).is_some() {
                    if stream.write_all(ANSWER).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}
