//! `--faults`: each injected fault does what it says, through the gRPC API,
//! and the registry works again once it has acted.

use std::time::{Duration, Instant};

use muster_proto as pb;
use muster_server::faults::FaultSpec;
use muster_server::{Server, ServerConfig};
use muster_testkit::{DEADLINE, eventually};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::common::{channel, watch};

async fn server(spec: &str) -> Server {
    let spec: FaultSpec = spec.parse().expect("a valid spec");
    Server::start(
        ServerConfig::in_memory()
            .with_min_lease_ttl(1)
            .with_faults(spec),
    )
    .await
    .expect("server starts")
}

fn put(key: &str, value: &str, lease: i64) -> pb::PutRequest {
    pb::PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        lease,
        ..Default::default()
    }
}

fn get(key: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// A lease of `ttl` seconds and an open keep-alive stream for it: its id,
/// the request sender and the answers.
async fn lease_kept_alive(
    ch: &tonic::transport::Channel,
    ttl: i64,
) -> (
    i64,
    mpsc::Sender<pb::LeaseKeepAliveRequest>,
    tonic::Streaming<pb::LeaseKeepAliveResponse>,
) {
    let mut lease = LeaseClient::new(ch.clone());
    let id = lease
        .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let (tx, rx) = mpsc::channel(4);
    let answers = lease
        .lease_keep_alive(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (id, tx, answers)
}

/// Reads a watch stream until it ends with an error; returns it.
async fn ended(stream: &mut tonic::Streaming<pb::WatchResponse>) -> tonic::Status {
    let end = tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without an error"),
                Err(status) => return status,
            }
        }
    });
    end.await.expect("the stream is cut within the deadline")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_refuses_requests_cuts_streams_then_ends() {
    // The first window opens 2 s after start, for 1 s.
    let server = server("unavailable=1s/3s").await;
    let ch = channel(&server).await;
    let mut kv = KvClient::new(ch.clone());
    let (_tx, mut stream) = watch(ch.clone(), b"a", b"").await;
    let status = ended(&mut stream).await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("fault injected"), "{status:?}");
    // Inside the window: refused, with the same message.
    let refused = kv.put(put("a", "1", 0)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("--faults unavailable="),
        "{refused:?}"
    );
    // After it: served again, and nothing refused was applied.
    eventually("puts are served after the outage", || {
        let mut kv = kv.clone();
        async move { kv.put(put("b", "1", 0)).await.is_ok() }
    })
    .await;
    let a = kv.range(get("a")).await.unwrap().into_inner();
    assert!(a.kvs.is_empty(), "a refused put was applied: {a:?}");
    let faults = server.core().faults().expect("faults on");
    assert!(faults.injected(muster_server::faults::Fault::Unavailable) >= 2);
    let metrics = muster_server::metrics::render(server.core());
    assert!(
        metrics.contains("muster_faults_injected_total{fault=\"unavailable\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_watch_cuts_watches_and_nothing_else() {
    let server = server("drop-watch=20/s").await;
    let ch = channel(&server).await;
    let mut kv = KvClient::new(ch.clone());
    // A keep-alive stream, opened before the watches, lives through them.
    let (id, ka_tx, mut keepalive) = lease_kept_alive(&ch, 60).await;
    for key in [b"x".as_slice(), b"y"] {
        let (_tx, mut stream) = watch(ch.clone(), key, b"").await;
        let status = ended(&mut stream).await;
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("drop-watch"), "{status:?}");
    }
    kv.put(put("x", "1", 0))
        .await
        .expect("unary requests are served");
    ka_tx.send(pb::LeaseKeepAliveRequest { id }).await.unwrap();
    let answer = keepalive.message().await.unwrap().expect("an answer");
    assert_eq!((answer.id, answer.ttl), (id, 60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_compacts_the_history_while_writes_go_on() {
    let server = server("compact=100ms").await;
    let ch = channel(&server).await;
    let mut kv = KvClient::new(ch.clone());
    for i in 0..5 {
        kv.put(put("k", &i.to_string(), 0)).await.unwrap();
    }
    eventually("an old revision is compacted", || {
        let mut kv = kv.clone();
        async move {
            let old = pb::RangeRequest {
                revision: 2,
                ..get("k")
            };
            match kv.range(old).await {
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
                    assert!(status.message().contains("compacted"), "{status:?}");
                    true
                }
                Ok(_) => false,
            }
        }
    })
    .await;
    // The latest value is untouched.
    let latest = kv.range(get("k")).await.unwrap().into_inner();
    assert_eq!(latest.kvs[0].value, b"4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doomed_lease_expires_although_it_is_kept_alive() {
    let server = server("lease-expire-early=100%").await;
    let ch = channel(&server).await;
    let mut kv = KvClient::new(ch.clone());
    let (id, ka_tx, mut keepalive) = lease_kept_alive(&ch, 3).await;
    kv.put(put("held", "1", id)).await.unwrap();
    // Kept alive every 100 ms, far more often than its 3 s TTL needs.
    let start = Instant::now();
    let ttl = loop {
        ka_tx.send(pb::LeaseKeepAliveRequest { id }).await.unwrap();
        let answer = keepalive.message().await.unwrap().expect("an answer");
        if answer.ttl == 0 {
            break answer.ttl;
        }
        assert!(start.elapsed() < DEADLINE, "the lease was never lost");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ttl, 0, "a lost lease answers TTL 0, as etcd does");
    // Its key goes with it, once the expiry has revoked it.
    eventually("the doomed lease's key is deleted", || {
        let mut kv = kv.clone();
        async move {
            kv.range(get("held"))
                .await
                .unwrap()
                .into_inner()
                .kvs
                .is_empty()
        }
    })
    .await;
    let faults = server.core().faults().expect("faults on");
    assert!(faults.injected(muster_server::faults::Fault::LeaseExpireEarly) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_every_request() {
    let server = server("latency=150ms").await;
    let mut kv = KvClient::new(channel(&server).await);
    for i in 0..3 {
        let start = Instant::now();
        kv.put(put("slow", &i.to_string(), 0)).await.unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "served in {:?}",
            start.elapsed()
        );
    }
    let faults = server.core().faults().expect("faults on");
    assert!(faults.injected(muster_server::faults::Fault::Latency) >= 3);
}
