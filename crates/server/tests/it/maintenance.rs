//! The Maintenance service's checks, with the same body against a real
//! etcd 3.4 and the embedded server: HashKV and its revision errors, a
//! hash that survives a restart, and MoveLeader on a single member.
//!
//! The hash values themselves differ between the two (etcd hashes its
//! bbolt records); what both promise is that the same history gives the
//! same hash, and that is what these check.

use muster_proto as pb;
use pb::kv_client::KvClient;
use pb::maintenance_client::MaintenanceClient;
use tonic::transport::Channel;

use muster_testkit::{DEADLINE, Registry};

muster_testkit::on_both!(
    hash_kv_hashes_the_history_up_to_a_revision,
    hash_kv_is_the_same_after_a_restart,
    move_leader_on_a_single_member,
);

async fn connect(endpoint: &str) -> Channel {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        match Channel::from_shared(endpoint.to_string())
            .expect("endpoint")
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("connect to {endpoint}: {e}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

async fn put(kv: &mut KvClient<Channel>, key: &str, value: &str) -> i64 {
    kv.put(pb::PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    })
    .await
    .expect("put")
    .into_inner()
    .header
    .expect("header")
    .revision
}

async fn hash_kv(
    m: &mut MaintenanceClient<Channel>,
    revision: i64,
) -> Result<pb::HashKvResponse, tonic::Status> {
    m.hash_kv(pb::HashKvRequest { revision })
        .await
        .map(tonic::Response::into_inner)
}

async fn hash_kv_hashes_the_history_up_to_a_revision(r: Box<dyn Registry>) {
    let ch = connect(&r.endpoint()).await;
    let mut kv = KvClient::new(ch.clone());
    let mut m = MaintenanceClient::new(ch);
    put(&mut kv, "/h/a", "1").await;
    let at = put(&mut kv, "/h/b", "2").await;

    let now = hash_kv(&mut m, 0).await.expect("hashkv");
    assert_eq!(now.header.as_ref().map(|h| h.revision), Some(at));
    assert_eq!(now.compact_revision, -1, "no compaction yet");
    let explicit = hash_kv(&mut m, at).await.expect("hashkv at the revision");
    assert_eq!(explicit.hash, now.hash, "revision 0 is the current one");

    // A later write changes the current hash, not the hash up to `at`.
    let later = put(&mut kv, "/h/a", "3").await;
    let after = hash_kv(&mut m, 0).await.unwrap();
    assert_ne!(after.hash, now.hash, "a write changes the history's hash");
    assert_eq!(after.header.as_ref().map(|h| h.revision), Some(later));
    assert_eq!(hash_kv(&mut m, at).await.unwrap().hash, now.hash);

    let future = hash_kv(&mut m, later + 10).await.unwrap_err();
    assert_eq!(future.code(), tonic::Code::OutOfRange);
    assert_eq!(
        future.message(),
        "etcdserver: mvcc: required revision is a future revision"
    );

    kv.compact(pb::CompactionRequest {
        revision: at,
        physical: true,
    })
    .await
    .expect("compact");
    for rev in [at - 1, at] {
        let compacted = hash_kv(&mut m, rev).await.unwrap_err();
        assert_eq!(compacted.code(), tonic::Code::OutOfRange, "at {rev}");
        assert_eq!(
            compacted.message(),
            "etcdserver: mvcc: required revision has been compacted"
        );
    }
    let compacted = hash_kv(&mut m, 0).await.unwrap();
    assert_eq!(compacted.compact_revision, at);
    assert_eq!(
        hash_kv(&mut m, later).await.unwrap().hash,
        compacted.hash,
        "the current revision given or as 0"
    );
}

async fn hash_kv_is_the_same_after_a_restart(mut r: Box<dyn Registry>) {
    let ch = connect(&r.endpoint()).await;
    let mut kv = KvClient::new(ch.clone());
    let mut m = MaintenanceClient::new(ch);
    for i in 0..50 {
        put(&mut kv, &format!("/r/{}", i % 7), &format!("v{i}")).await;
    }
    let before = hash_kv(&mut m, 0).await.unwrap();
    drop((kv, m));
    r.restart().expect("restart");
    let ch = connect(&r.endpoint()).await;
    let mut m = MaintenanceClient::new(ch);
    // The restarted server may take a moment to answer.
    let deadline = std::time::Instant::now() + DEADLINE;
    let after = loop {
        match hash_kv(&mut m, 0).await {
            Ok(resp) => break resp,
            Err(e) if std::time::Instant::now() > deadline => panic!("hashkv after restart: {e}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    assert_eq!(
        after.hash,
        before.hash,
        "{}: same history, same hash",
        r.name()
    );
    assert_eq!(
        after.header.map(|h| h.revision),
        before.header.map(|h| h.revision)
    );
}

async fn move_leader_on_a_single_member(r: Box<dyn Registry>) {
    let ch = connect(&r.endpoint()).await;
    let mut m = MaintenanceClient::new(ch);
    let status = m
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let me = status.header.expect("header").member_id;
    assert_eq!(status.leader, me, "a single member leads");

    m.move_leader(pb::MoveLeaderRequest { target_id: me })
        .await
        .expect("moving leadership to the leader itself succeeds");

    let other = m
        .move_leader(pb::MoveLeaderRequest {
            target_id: me.wrapping_add(1),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::FailedPrecondition);
    assert_eq!(other.message(), "etcdserver: bad leader transferee");
}
