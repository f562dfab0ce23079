//! Helpers the areas share: a client channel to a server and a watch on
//! it.

use muster_proto as pb;
use muster_server::Server;
use pb::watch_client::WatchClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// A connected channel to `server`.
pub async fn channel(server: &Server) -> Channel {
    Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the embedded server")
}

/// A watch on `[key, range_end)` (`range_end` empty: the key alone),
/// created: the request sender (dropping it ends the stream) and the
/// stream, its `created` answer already read.
pub async fn watch(
    channel: Channel,
    key: &[u8],
    range_end: &[u8],
) -> (
    mpsc::Sender<pb::WatchRequest>,
    tonic::Streaming<pb::WatchResponse>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: key.to_vec(),
                range_end: range_end.to_vec(),
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut stream = WatchClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let created = stream.message().await.unwrap().unwrap();
    assert!(created.created, "{created:?}");
    (tx, stream)
}
