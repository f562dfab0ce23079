//! The gateway's own HTTP/1.1 server, on the wire: raw sockets writing
//! requests byte for byte (pipelined, chunked, `Expect: 100-continue`,
//! HTTP/1.0, malformed) and reading the answers as they come.

use std::net::SocketAddr;

use http::StatusCode;
use muster_gateway::Route;
use muster_testkit::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{self, DEADLINE, Env, Fnv, pattern};

/// An answer read off the wire.
#[derive(Debug)]
struct Resp {
    status: StatusCode,
    /// Names in lower case, in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Whether the body was chunked.
    chunked: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection, raw.
struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    async fn connect(addr: SocketAddr) -> Wire {
        Wire {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Reads more into the buffer; false at the close.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(DEADLINE, self.s.read(&mut chunk))
            .await
            .expect("the gateway answers in time")
            .expect("a clean read");
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "closed in the middle of an answer");
        }
        self.buf.drain(..n).collect()
    }

    async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.drain(..i + 2).collect::<Vec<u8>>();
                return line[..i].to_vec();
            }
            assert!(self.fill().await, "closed in the middle of a line");
        }
    }

    /// The next answer; `head`: to a HEAD request (no body).
    async fn response(&mut self, head: bool) -> Resp {
        let (status, headers, len) = loop {
            let mut lines = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut lines);
            if let httparse::Status::Complete(len) = parsed.parse(&self.buf).expect("valid head") {
                let status = StatusCode::from_u16(parsed.code.unwrap()).unwrap();
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                break (status, headers, len);
            }
            assert!(self.fill().await, "closed before a complete head");
        };
        self.buf.drain(..len);
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
            chunked: false,
        };
        let bodyless = head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        if bodyless {
            return resp;
        }
        if resp.header("transfer-encoding") == Some("chunked") {
            resp.chunked = true;
            loop {
                let line = self.line().await;
                let size = usize::from_str_radix(std::str::from_utf8(&line).unwrap(), 16).unwrap();
                if size == 0 {
                    // Trailers, up to an empty line.
                    while !self.line().await.is_empty() {}
                    break;
                }
                let data = self.take(size).await;
                resp.body.extend_from_slice(&data);
                assert_eq!(self.take(2).await, b"\r\n");
            }
        } else if let Some(n) = resp.header("content-length") {
            let n: usize = n.parse().unwrap();
            resp.body = self.take(n).await;
        } else {
            while self.fill().await {}
            resp.body = std::mem::take(&mut self.buf);
        }
        resp
    }

    /// Whether the gateway closed the connection (nothing more comes).
    async fn closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(DEADLINE, self.s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => panic!("the connection was neither closed nor used"),
        }
    }
}

fn fnv(bytes: &[u8]) -> String {
    let mut f = Fnv::new();
    f.write(bytes);
    format!("{:x}", f.0)
}

/// Pipelined requests, keep-alive over many requests, HEAD, chunked
/// bodies both ways, `Expect: 100-continue`.
async fn http1_requests_on_the_wire(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _up = env.upstream("web", "w-1").await;
    let (gw, _) = env.routed(vec![Route::new("/", "web")], "/x").await;
    let addr = gw.local_addr();

    // Two requests in one write: answered in order.
    let mut wire = Wire::connect(addr).await;
    wire.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let a = wire.response(false).await;
    let b = wire.response(false).await;
    assert_eq!((a.status, a.text().as_str()), (StatusCode::OK, "w-1"));
    assert_eq!(a.header("x-upstream-path"), Some("/a"));
    assert_eq!(b.header("x-upstream-path"), Some("/b?q=1"));
    // The upstream's hop-by-hop headers stay behind; a Date is there.
    assert!(a.header("x-secret").is_none(), "{a:?}");
    assert!(a.header("date").is_some(), "{a:?}");

    // The same connection for many requests.
    for i in 0..200 {
        wire.send(format!("GET /k/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        let r = wire.response(false).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}");
        assert_eq!(
            r.header("x-upstream-path"),
            Some(format!("/k/{i}").as_str())
        );
    }

    // HEAD: the headers, no body; the next answer follows at once.
    wire.send(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\nGET /after-head HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let h = wire.response(true).await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.header("content-length"), Some("3"), "{h:?}");
    let after = wire.response(false).await;
    assert_eq!(after.header("x-upstream-path"), Some("/after-head"));

    // A chunked request body, split across writes.
    wire.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        .await;
    wire.send(b"lo\r\n6;ext=1\r\n world\r\n0\r\n\r\n").await;
    let up = wire.response(false).await;
    assert_eq!(up.status, StatusCode::OK);
    assert_eq!(up.text(), format!("11 {}", fnv(b"hello world")));

    // A chunked answer (the upstream streams it, length unknown).
    wire.send(b"GET /download/100000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let down = wire.response(false).await;
    assert_eq!(down.status, StatusCode::OK);
    assert!(down.chunked, "{:?}", down.headers);
    assert_eq!(down.body, pattern(0, 100_000));

    // Expect: 100-continue: the interim answer comes before the body is
    // sent, once the request is forwarded and its body asked for.
    wire.send(
        b"PUT /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await;
    let interim = wire.response(false).await;
    assert_eq!(interim.status, StatusCode::CONTINUE);
    wire.send(b"hello").await;
    let done = wire.response(false).await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!(done.text(), format!("5 {}", fnv(b"hello")));

    // A body nobody reads (the gateway's own metrics path answers) is
    // skipped; the connection goes on.
    wire.send(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        .await;
    let r = wire.response(false).await;
    assert_eq!(r.status, StatusCode::OK);
    wire.send(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let last = wire.response(false).await;
    assert_eq!(last.header("x-upstream-path"), Some("/last"));
    assert_eq!(last.header("connection"), Some("close"));
    assert!(wire.closed().await, "closed after Connection: close");
    gw.shutdown().await;
}

/// HTTP/1.0, refused heads, and a client that goes away mid-body.
async fn http1_connections_end_as_they_should(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let up = env.upstream("web", "w-1").await;
    let (gw, client) = env.routed(vec![Route::new("/", "web")], "/x").await;
    let addr = gw.local_addr();

    // HTTP/1.0: closed after the answer, unless keep-alive is asked for.
    let mut wire = Wire::connect(addr).await;
    wire.send(b"GET /old HTTP/1.0\r\n\r\n").await;
    let r = wire.response(false).await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "w-1"));
    assert!(wire.closed().await, "HTTP/1.0 closes");
    let mut wire = Wire::connect(addr).await;
    for i in 0..3 {
        wire.send(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let r = wire.response(false).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}");
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
    // An answer of unknown length to HTTP/1.0 ends with the close.
    wire.send(b"GET /download/70000 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let r = wire.response(false).await;
    assert!(!r.chunked && r.header("content-length").is_none(), "{r:?}");
    assert_eq!(r.body, pattern(0, 70_000));

    // A malformed request line: 400, closed.
    let mut wire = Wire::connect(addr).await;
    wire.send(b"NOT HTTP AT ALL\r\n\r\n").await;
    let r = wire.response(false).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(wire.closed().await);
    // Both framings at once: 400.
    let mut wire = Wire::connect(addr).await;
    wire.send(b"POST /upload HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    assert_eq!(wire.response(false).await.status, StatusCode::BAD_REQUEST);
    assert!(wire.closed().await);
    // Too many header lines, and a head too large: 431, closed.
    let many: String = (0..150).map(|i| format!("x-h{i}: {i}\r\n")).collect();
    let mut wire = Wire::connect(addr).await;
    wire.send(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes())
        .await;
    let r = wire.response(false).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(wire.closed().await);
    let mut wire = Wire::connect(addr).await;
    let huge = format!("GET / HTTP/1.1\r\nx-big: {}", "a".repeat(70 * 1024));
    wire.send(huge.as_bytes()).await;
    let r = wire.response(false).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert!(wire.closed().await);

    // A client that goes away in the middle of its body: the upstream's
    // request is given up, and the gateway serves the next connection.
    let before = up.served();
    let mut wire = Wire::connect(addr).await;
    wire.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n0123456789")
        .await;
    let mut progress = up.upload_progress.clone();
    tokio::time::timeout(DEADLINE, progress.wait_for(|n| *n == 10))
        .await
        .expect("the first bytes reached the upstream")
        .unwrap();
    drop(wire);
    let mut wire = Wire::connect(addr).await;
    wire.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = wire.response(false).await;
    assert_eq!(r.header("x-upstream-path"), Some("/next"));
    assert!(up.served() > before);
    assert_eq!(
        common::get(&client, addr, "/x").await.status,
        StatusCode::OK
    );
    gw.shutdown().await;
}

muster_testkit::on_both!(
    http1_requests_on_the_wire,
    http1_connections_end_as_they_should,
);
