//! Restarts on the same data: what was acknowledged is there, compaction
//! across restarts never loses a live key.

use muster_proto as pb;
use muster_server::{Server, ServerConfig};
use pb::kv_client::KvClient;
use tonic::transport::Channel;

use crate::common::channel;

/// A server on `config` and a KV client connected to it.
async fn serve(config: ServerConfig) -> (Server, KvClient<Channel>) {
    let server = Server::start(config).await.unwrap();
    let kv = KvClient::new(channel(&server).await);
    (server, kv)
}

/// A server on the data in `dir`.
async fn start(dir: &std::path::Path) -> (Server, KvClient<Channel>) {
    serve(ServerConfig::persistent(dir)).await
}

fn put_req(key: &str, value: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

fn put_op(key: &str, value: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(put_req(key, value))),
    }
}

/// Puts `key`; the revision of the put.
async fn put(kv: &mut KvClient<Channel>, key: &str, value: &str) -> i64 {
    let resp = kv.put(put_req(key, value)).await.unwrap().into_inner();
    resp.header.unwrap().revision
}

/// Compacts (physically) at `revision`.
async fn compact(kv: &mut KvClient<Channel>, revision: i64) {
    kv.compact(pb::CompactionRequest {
        revision,
        physical: true,
    })
    .await
    .unwrap();
}

/// `key`'s value at `revision` (0: the latest).
async fn get_at(kv: &mut KvClient<Channel>, key: &str, revision: i64) -> Option<String> {
    let resp = kv
        .range(pb::RangeRequest {
            key: key.into(),
            revision,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    resp.kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

async fn get(kv: &mut KvClient<Channel>, key: &str) -> Option<String> {
    get_at(kv, key, 0).await
}

/// Regression: records of one revision were renumbered on restart, so a
/// later compaction deleted a live key's only record.
#[tokio::test]
async fn compaction_across_restarts_keeps_every_live_key() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut kv) = start(dir.path()).await;
    kv.txn(pb::TxnRequest {
        success: vec![put_op("a", "a1"), put_op("b", "b1"), put_op("c", "c1")],
        ..Default::default()
    })
    .await
    .unwrap();
    let rev = put(&mut kv, "a", "a2").await;
    compact(&mut kv, rev).await;
    server.shutdown().await;

    let (server, mut kv) = start(dir.path()).await;
    let rev = put(&mut kv, "c", "c2").await;
    compact(&mut kv, rev).await;
    server.shutdown().await;

    let (_server, mut kv) = start(dir.path()).await;
    assert_eq!(get(&mut kv, "a").await.as_deref(), Some("a2"));
    assert_eq!(get(&mut kv, "b").await.as_deref(), Some("b1"));
    assert_eq!(get(&mut kv, "c").await.as_deref(), Some("c2"));
}

#[tokio::test]
async fn revisions_and_history_continue_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut kv) = start(dir.path()).await;
    for i in 0..10 {
        put(&mut kv, "k", &format!("v{i}")).await;
    }
    server.shutdown().await;
    let (_server, mut kv) = start(dir.path()).await;
    assert_eq!(put(&mut kv, "k", "after").await, 12);
    // History from before the restart is still readable.
    assert_eq!(get_at(&mut kv, "k", 5).await.as_deref(), Some("v3"));
}

#[tokio::test]
async fn auto_compaction_keeps_the_last_revisions() {
    use muster_server::AutoCompaction;
    use std::time::{Duration, Instant};
    let config = ServerConfig::in_memory().with_auto_compaction(AutoCompaction::Revisions {
        keep: 5,
        interval: Duration::from_millis(20),
    });
    let (_server, mut kv) = serve(config).await;
    let mut last = 0;
    for i in 0..20 {
        last = put(&mut kv, "k", &format!("v{i}")).await;
    }
    let at = |revision| pb::RangeRequest {
        key: b"k".to_vec(),
        revision,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match kv.range(at(last - 6)).await {
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
                break;
            }
            Ok(_) => {
                assert!(Instant::now() < deadline, "history was never compacted");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    // The last five revisions are still there.
    let kept = get_at(&mut kv, "k", last - 4).await;
    assert_eq!(kept, Some(format!("v{}", 20 - 5)));
}

/// Every log append and every checkpoint is timed, and `/metrics` carries
/// both histograms with counts that agree with the commit and checkpoint
/// counters.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_time_every_log_append_and_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut kv) = start(dir.path()).await;
    for i in 0..20 {
        put(&mut kv, &format!("k{i}"), "v").await;
    }
    // The checkpointer runs about once a second while changes wait.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.core().storage().stats().checkpoints == 0 {
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let stats = server.core().storage().stats();
    let latencies = server.core().storage().latencies();
    assert!(stats.commits >= 20, "{stats:?}");
    assert_eq!(latencies.wal_append.count(), stats.commits);
    assert!(latencies.wal_append.sum > std::time::Duration::ZERO);
    assert_eq!(latencies.checkpoint.count(), stats.checkpoints);
    let text = muster_server::metrics::render(server.core());
    let value = |name: &str, labels: &[&str]| muster_testkit::metric_value(&text, name, labels);
    let commits = value("muster_storage_commits_total", &[]).unwrap();
    assert!(commits >= 20.0, "{text}");
    assert!(value("muster_storage_wal_append_seconds_count", &[]).unwrap() >= commits);
    let inf = value(
        "muster_storage_wal_append_seconds_bucket",
        &[r#"le="+Inf""#],
    );
    let count = value("muster_storage_wal_append_seconds_count", &[]);
    assert_eq!(inf, count, "{text}");
    assert!(value("muster_storage_checkpoint_seconds_count", &[]).unwrap() >= 1.0);
    assert!(text.contains("# TYPE muster_storage_wal_append_seconds histogram"));

    // In memory there is nothing to time.
    let (server, mut kv) = serve(ServerConfig::in_memory()).await;
    put(&mut kv, "k", "v").await;
    assert_eq!(server.core().storage().latencies(), Default::default());
}
