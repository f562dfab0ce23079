//! Malformed and flooding input: no crash, bounded connections, and the
//! server keeps answering.

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use muster::Instance;
use muster_dns::DnsConfig;
use muster_testkit::{Registry, on_both};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::common::*;

on_both!(
    malformed_packets_change_nothing,
    tcp_connections_are_limited_and_closed_when_idle
);

/// Still answering over both transports.
async fn still_answers(addr: std::net::SocketAddr) {
    assert_eq!(a_now(addr, "ok.service.muster.").await, ["192.0.2.30"]);
    let m = tcp(addr, &query("ok.service.muster.", RecordType::A, None)).await;
    assert_eq!(addresses(&m), ["192.0.2.30"]);
}

async fn malformed_packets_change_nothing(registry: Box<dyn Registry>) {
    let etcd = client(&*registry);
    let server = dns(&etcd).await;
    let addr = server.local_addr();
    put_instance(&etcd, &Instance::new("ok", "k-1", "192.0.2.30:53")).await;
    caught_up(&server, revision(&etcd).await).await;
    still_answers(addr).await;

    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let random = |rng: &mut fastrand::Rng, max: usize| -> Vec<u8> {
        let len = rng.usize(0..max);
        (0..len).map(|_| rng.u8(..)).collect()
    };

    // UDP: random datagrams, some with a plausible query header, sent as
    // fast as the socket takes them (a bounded flood), from four sockets.
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    for i in 0..8_000 {
        let mut bytes = random(&mut rng, 700);
        if i % 3 == 0 && bytes.len() >= 12 {
            bytes[2] &= 0x7f; // QR = 0: a query
            bytes[4] = 0;
            bytes[5] = 1; // one question
        }
        let _ = sockets[i % 4].send_to(&bytes, addr).await;
    }
    // A valid query that claims more than it holds, and one that is
    // only a header.
    // (Datagrams past the socket's buffer are the kernel's to drop while
    // the flood is worked off: asked until answered.)
    let header_only = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    let start = std::time::Instant::now();
    let formerr = loop {
        if let Some(answer) = udp_raw(addr, &header_only).await {
            break answer;
        }
        assert!(
            start.elapsed() < muster_testkit::DEADLINE,
            "a query that is only a header is never answered"
        );
    };
    assert_eq!(formerr[..2], [0x12, 0x34], "same id");
    assert_eq!(formerr[3] & 0x0f, 1, "FORMERR");
    still_answers(addr).await;

    // TCP: unframed junk, random frames, a frame cut short, a frame
    // longer than its length says, and a connection that sends half a
    // length and hangs up.
    let mut junk = TcpStream::connect(addr).await.unwrap();
    let _ = junk.write_all(&random(&mut rng, 4000)).await;
    drop(junk);
    let mut frames = TcpStream::connect(addr).await.unwrap();
    for _ in 0..200 {
        let body = random(&mut rng, 300);
        let mut framed = (body.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        if frames.write_all(&framed).await.is_err() {
            break; // the server closed it: fine
        }
    }
    drop(frames);
    let mut cut = TcpStream::connect(addr).await.unwrap();
    let _ = cut.write_all(&[0xff, 0xff, 1, 2, 3]).await;
    drop(cut);
    let mut half = TcpStream::connect(addr).await.unwrap();
    let _ = half.write_all(&[0x00]).await;
    drop(half);
    still_answers(addr).await;

    // Pipelined queries on one connection are answered in order.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    for name in [
        "ok.service.muster.",
        "nope.service.muster.",
        "ok.service.muster.",
    ] {
        let m = tcp_on(&mut stream, &query(name, RecordType::A, None))
            .await
            .expect("answer on a reused connection");
        let expected = if name.starts_with("ok") {
            ResponseCode::NoError
        } else {
            ResponseCode::NXDomain
        };
        assert_eq!(m.metadata.response_code, expected);
    }

    let metrics = server.render_metrics();
    assert!(
        metric_value(
            &metrics,
            "muster_dns_dropped_total",
            &["reason=\"malformed\""]
        )
        .is_some_and(|n| n > 0.0),
        "{metrics}"
    );
    assert!(
        metric_value(&metrics, "muster_dns_queries_total", &["rcode=\"FORMERR\""])
            .is_some_and(|n| n > 0.0),
        "{metrics}"
    );
}

async fn tcp_connections_are_limited_and_closed_when_idle(registry: Box<dyn Registry>) {
    let etcd = client(&*registry);
    let config = DnsConfig::new(([127, 0, 0, 1], 0).into())
        .with_max_tcp_connections(3)
        .with_tcp_idle_timeout(Duration::from_millis(500));
    let server = dns_with(&etcd, config).await;
    let addr = server.local_addr();
    put_instance(&etcd, &Instance::new("ok", "k-1", "192.0.2.30:53")).await;
    caught_up(&server, revision(&etcd).await).await;

    let gauge = |server: &muster_dns::DnsServer, name: &str| {
        metric_value(&server.render_metrics(), name, &[]).unwrap_or(-1.0)
    };
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    eventually("three connections are open", || async {
        gauge(&server, "muster_dns_tcp_connections") == 3.0
    })
    .await;
    // The fourth is accepted by the kernel, then closed by the server.
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), fourth.read(&mut buf))
        .await
        .expect("the server closes the fourth connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(
        gauge(&server, "muster_dns_tcp_connections_refused_total"),
        1.0
    );
    // UDP is not affected.
    assert_eq!(a_now(addr, "ok.service.muster.").await, ["192.0.2.30"]);
    // The idle ones are closed after the idle timeout, freeing the slots.
    for stream in &mut idle {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the server closes an idle connection");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    eventually("the slots are free again", || async {
        gauge(&server, "muster_dns_tcp_connections") == 0.0
    })
    .await;
    let m = tcp(addr, &query("ok.service.muster.", RecordType::A, None)).await;
    assert_eq!(addresses(&m), ["192.0.2.30"]);
}
