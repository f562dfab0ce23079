//! Watch fan-out under a slow consumer: the writer and the other watchers
//! are never blocked, and the slow watcher later gets everything, in order.

use std::time::Duration;

use muster_proto as pb;
use muster_server::{Server, ServerConfig};
use pb::kv_client::KvClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::common::channel;

async fn watch(
    channel: Channel,
    prefix: &[u8],
) -> (
    mpsc::Sender<pb::WatchRequest>,
    tonic::Streaming<pb::WatchResponse>,
) {
    let mut range_end = prefix.to_vec();
    *range_end.last_mut().unwrap() += 1;
    crate::common::watch(channel, prefix, &range_end).await
}

/// Reads `n` put events from `stream`; returns their values in order.
async fn read_events(stream: &mut tonic::Streaming<pb::WatchResponse>, n: usize) -> Vec<Vec<u8>> {
    let mut values = Vec::with_capacity(n);
    while values.len() < n {
        let resp = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .expect("stream open");
        assert!(!resp.canceled, "{resp:?}");
        values.extend(resp.events.into_iter().map(|e| e.kv.unwrap().value));
    }
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_blocks_nobody_and_catches_up_in_order() {
    let server = Server::start(ServerConfig::in_memory()).await.unwrap();
    let connect = || channel(&server);
    // Separate connections, so that the slow one's flow control is its own.
    let (_slow_tx, mut slow) = watch(connect().await, b"/load/").await;
    let (_fast_tx, mut fast) = watch(connect().await, b"/load/").await;
    let mut kv = KvClient::new(connect().await);

    // Far more than the slow stream's buffers hold: 1 KiB values.
    let n = 4000;
    let writer = tokio::spawn(async move {
        for i in 0..n {
            let mut value = format!("{i:06}").into_bytes();
            value.resize(1024, b'.');
            kv.put(pb::PutRequest {
                key: format!("/load/{}", i % 50).into_bytes(),
                value,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    });
    // The fast watcher keeps up while the slow one reads nothing.
    let fast_values = read_events(&mut fast, n).await;
    writer.await.unwrap();
    assert!(
        server.core().hub().fell_behind() >= 1,
        "the slow watcher never fell behind: the test did not exercise catch-up"
    );
    // Then the slow one gets every event, once, in order.
    let slow_values = read_events(&mut slow, n).await;
    for (i, v) in slow_values.iter().enumerate() {
        assert_eq!(
            &v[..6],
            format!("{i:06}").as_bytes(),
            "event {i} out of order or missing"
        );
    }
    assert_eq!(fast_values, slow_values);
}
