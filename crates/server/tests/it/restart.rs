//! Restarts on the same data: what was acknowledged is there, compaction
//! across restarts never loses a live key.

use muster_proto as pb;
use muster_server::{Server, ServerConfig};
use pb::kv_client::KvClient;
use tonic::transport::Channel;

async fn start(dir: &std::path::Path) -> (Server, KvClient<Channel>) {
    let server = Server::start(ServerConfig::persistent(dir)).await.unwrap();
    let channel = Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    (server, KvClient::new(channel))
}

fn put_op(key: &str, value: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })),
    }
}

async fn put(kv: &mut KvClient<Channel>, key: &str, value: &str) -> i64 {
    let resp = kv
        .put(pb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    resp.header.unwrap().revision
}

async fn get(kv: &mut KvClient<Channel>, key: &str) -> Option<String> {
    let resp = kv
        .range(pb::RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    resp.kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
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
    kv.compact(pb::CompactionRequest {
        revision: rev,
        physical: true,
    })
    .await
    .unwrap();
    server.shutdown().await;

    let (server, mut kv) = start(dir.path()).await;
    let rev = put(&mut kv, "c", "c2").await;
    kv.compact(pb::CompactionRequest {
        revision: rev,
        physical: true,
    })
    .await
    .unwrap();
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
    let old = kv
        .range(pb::RangeRequest {
            key: b"k".to_vec(),
            revision: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.kvs[0].value, b"v3");
}

#[tokio::test]
async fn auto_compaction_keeps_the_last_revisions() {
    use muster_server::AutoCompaction;
    use std::time::{Duration, Instant};
    let config = ServerConfig::in_memory().with_auto_compaction(AutoCompaction::Revisions {
        keep: 5,
        interval: Duration::from_millis(20),
    });
    let server = Server::start(config).await.unwrap();
    let channel = Channel::from_shared(server.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut kv = KvClient::new(channel);
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
    let kept = kv.range(at(last - 4)).await.unwrap().into_inner();
    assert_eq!(kept.kvs[0].value, format!("v{}", 20 - 5).into_bytes());
}
