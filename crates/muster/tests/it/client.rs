//! The connection layer against a real etcd: etcd's statuses arrive as typed
//! errors, and etcd's answers for leases come through unchanged.

use crate::common;

use common::*;
use muster::Error;
use muster_testkit::Registry;

async fn statuses_map_to_typed_errors(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    for i in 0..5 {
        put(&etcd, "/k", format!("{i}").as_bytes()).await;
    }
    let rev = etcd.status().await.unwrap().header.unwrap().revision;
    etcd.compact(rev - 1, true).await.unwrap();

    let range_at = |revision| muster_proto::RangeRequest {
        key: b"/k".to_vec(),
        revision,
        ..Default::default()
    };
    let err = etcd.range(range_at(rev - 3)).await.unwrap_err();
    assert!(matches!(err, Error::Compacted { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("required revision has been compacted"),
        "{err}"
    );
    let err = etcd.range(range_at(rev + 100)).await.unwrap_err();
    assert!(matches!(err, Error::FutureRevision), "{err}");
    assert!(err.to_string().contains("future revision"), "{err}");

    let err = etcd.lease_revoke(0x1234_5678).await.unwrap_err();
    assert!(matches!(err, Error::LeaseNotFound), "{err}");

    // An empty key is etcd's InvalidArgument, kept as the raw status.
    let err = etcd
        .put(muster_proto::PutRequest::default())
        .await
        .unwrap_err();
    match err {
        Error::Grpc(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(status.message(), "etcdserver: key is not provided");
        }
        other => panic!("expected InvalidArgument, got {other}"),
    }
}

async fn lease_answers_come_through_unchanged(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let lease = etcd.lease_grant(30).await.unwrap();
    assert_eq!(lease.ttl, 30);
    let leases = etcd.lease_leases().await.unwrap();
    assert!(leases.leases.iter().any(|l| l.id == lease.id));

    // An unknown lease: TimeToLive answers TTL -1, keep-alive answers TTL 0.
    let ttl = etcd.lease_time_to_live(0x1234_5678, false).await.unwrap();
    assert_eq!(ttl.ttl, -1);
    let (_tx, mut stream) = etcd.lease_keep_alive(0x1234_5678).await.unwrap();
    let resp = stream.message().await.unwrap().expect("an answer");
    assert_eq!(resp.ttl, 0);

    let members = etcd.member_list().await.unwrap();
    assert_eq!(members.members.len(), 1);
    let status = etcd.status().await.unwrap();
    assert!(status.version.starts_with("3."), "{}", status.version);
}

muster_testkit::on_both!(
    statuses_map_to_typed_errors,
    lease_answers_come_through_unchanged,
);
