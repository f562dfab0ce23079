//! The space quota, alarms and defragmentation (issue 17): the same body
//! against a real etcd 3.4 started with `--quota-backend-bytes` and the
//! embedded server with the same quota; then what only muster can show
//! (the alarm across a restart, the file shrinking on defragment).

use std::time::{Duration, Instant};

use muster_proto as pb;
use muster_server::{Server, ServerConfig};
use muster_testkit::{EtcdNode, EtcdOptions, require_tool};
use pb::alarm_request::AlarmAction;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::maintenance_client::MaintenanceClient;
use tonic::transport::Channel;

use crate::common::{channel, watch};

/// The quota both servers get: small, but several of bbolt's growth steps.
const QUOTA: u64 = 4 << 20;
/// Value size of the filling puts.
const VALUE: usize = 128 << 10;
const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";

async fn connect(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn put_req(key: &str, value: Vec<u8>) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value,
        ..Default::default()
    }
}

async fn alarms(m: &mut MaintenanceClient<Channel>) -> Vec<pb::AlarmMember> {
    m.alarm(pb::AlarmRequest {
        action: AlarmAction::Get as i32,
        member_id: 0,
        alarm: pb::AlarmType::None as i32,
    })
    .await
    .unwrap()
    .into_inner()
    .alarms
}

fn assert_no_space(status: &tonic::Status) {
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), NO_SPACE, "{status:?}");
}

/// Fills the store at `endpoint` (quota [`QUOTA`]) until a put is refused,
/// then checks what still works, and that delete + compact + defragment +
/// disarm restore writes.
async fn fill_refuse_recover(endpoint: &str) {
    let ch = connect(endpoint).await;
    let mut kv = KvClient::new(ch.clone());
    let mut lease = LeaseClient::new(ch.clone());
    let mut maint = MaintenanceClient::new(ch.clone());
    let (_watch_tx, mut events) = watch(ch.clone(), b"q/", b"q0").await;
    assert!(alarms(&mut maint).await.is_empty());
    let lease_id = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;

    // Fill until refused: well past the quota at most.
    let mut acked = 0usize;
    let mut last_rev = 0;
    let refused = loop {
        assert!(
            acked * VALUE < 16 * QUOTA as usize,
            "{acked} puts of {VALUE} bytes never hit a {QUOTA}-byte quota"
        );
        match kv
            .put(put_req(&format!("q/{acked:05}"), vec![b'x'; VALUE]))
            .await
        {
            Ok(resp) => {
                last_rev = resp.into_inner().header.unwrap().revision;
                acked += 1;
            }
            Err(status) => break status,
        }
    };
    assert_no_space(&refused);
    assert!(acked > 0);

    // The alarm is listed, for this member.
    let listed = alarms(&mut maint).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].alarm, pb::AlarmType::Nospace as i32);
    let status = maint
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.errors,
        vec![format!("memberID:{} alarm:NOSPACE ", listed[0].member_id)]
    );

    // Refused: puts, txns with a put, lease grants; whatever the size now.
    assert_no_space(&kv.put(put_req("small", b"v".to_vec())).await.unwrap_err());
    let txn_put = pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(put_req(
                "small",
                b"v".to_vec(),
            ))),
        }],
        ..Default::default()
    };
    assert_no_space(&kv.txn(txn_put.clone()).await.unwrap_err());
    assert_no_space(
        &lease
            .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 0 })
            .await
            .unwrap_err(),
    );

    // Disarmed while still full: the next write that does not fit raises
    // the alarm again (etcd 3.4's `quotaKVServer.check`). (A small one
    // might fit: muster counts the bytes it keeps, not its file.)
    for alarm in alarms(&mut maint).await {
        maint
            .alarm(pb::AlarmRequest {
                action: AlarmAction::Deactivate as i32,
                member_id: alarm.member_id,
                alarm: alarm.alarm,
            })
            .await
            .unwrap();
    }
    assert!(alarms(&mut maint).await.is_empty());
    assert_no_space(&kv.put(put_req("big", vec![b'x'; VALUE])).await.unwrap_err());
    assert_eq!(alarms(&mut maint).await, listed);

    // Still working: reads (every acknowledged put is there), txns without
    // puts, watches, keep-alives, revokes.
    let count = count(&mut kv, b"q/", b"q0").await;
    // Every acknowledged put is there. etcd may have applied the refused
    // one too: its quotaApplierV3 applies a put that passed the check at
    // the front, then answers NOSPACE if the store crossed the quota
    // meanwhile. muster refuses before applying.
    let applied = usize::try_from(count).unwrap();
    assert!(
        applied == acked || applied == acked + 1,
        "{applied} puts applied, {acked} acknowledged"
    );
    let txn_read = pb::TxnRequest {
        success: vec![
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                    key: b"q/00000".to_vec(),
                    ..Default::default()
                })),
            },
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestDeleteRange(
                    pb::DeleteRangeRequest {
                        key: b"absent".to_vec(),
                        ..Default::default()
                    },
                )),
            },
        ],
        ..Default::default()
    };
    kv.txn(txn_read).await.unwrap();
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen < applied {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, events.message())
            .await
            .expect("watch events of every acknowledged put")
            .unwrap()
            .unwrap();
        seen += msg.events.len();
    }
    assert_eq!(seen, applied);
    lease
        .lease_revoke(pb::LeaseRevokeRequest { id: lease_id })
        .await
        .unwrap();

    // Free space, then disarm: writes go through again.
    let deleted = kv
        .delete_range(pb::DeleteRangeRequest {
            key: b"q/".to_vec(),
            range_end: b"q0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted, count);
    let rev = deleted.header.unwrap().revision;
    assert!(rev > last_rev);
    kv.compact(pb::CompactionRequest {
        revision: rev,
        physical: true,
    })
    .await
    .unwrap();
    maint.defragment(pb::DefragmentRequest {}).await.unwrap();
    for alarm in alarms(&mut maint).await {
        let resp = maint
            .alarm(pb::AlarmRequest {
                action: AlarmAction::Deactivate as i32,
                member_id: alarm.member_id,
                alarm: alarm.alarm,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.alarms, vec![alarm]);
    }
    assert!(alarms(&mut maint).await.is_empty());
    kv.put(put_req("small", b"v".to_vec())).await.unwrap();
    kv.txn(txn_put).await.unwrap();
    let status = maint
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.errors.is_empty(), "{status:?}");
}

/// ACTIVATE, GET and DEACTIVATE with etcd's member-id and NONE semantics.
async fn alarm_calls(endpoint: &str) {
    let ch = connect(endpoint).await;
    let mut kv = KvClient::new(ch.clone());
    let mut maint = MaintenanceClient::new(ch);
    let call = |action: AlarmAction, member_id: u64, alarm: pb::AlarmType| pb::AlarmRequest {
        action: action as i32,
        member_id,
        alarm: alarm as i32,
    };
    let nospace = |member_id| pb::AlarmMember {
        member_id,
        alarm: pb::AlarmType::Nospace as i32,
    };
    // etcd answers alarm calls without a header. An alarm of type NONE is
    // stored, listed, and caps nothing.
    let none = pb::AlarmMember {
        member_id: 7,
        alarm: pb::AlarmType::None as i32,
    };
    let resp = maint
        .alarm(call(AlarmAction::Activate, 7, pb::AlarmType::None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.header, None);
    assert_eq!(resp.alarms, vec![none]);
    assert_eq!(alarms(&mut maint).await, vec![none]);
    kv.put(put_req("k", b"v".to_vec())).await.unwrap();
    let resp = maint
        .alarm(call(AlarmAction::Deactivate, 7, pb::AlarmType::None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.alarms, vec![none]);
    // Any member id, 0 included, is taken as given.
    for member in [7, 0, 7] {
        let resp = maint
            .alarm(call(AlarmAction::Activate, member, pb::AlarmType::Nospace))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.alarms, vec![nospace(member)]);
    }
    let mut listed = alarms(&mut maint).await;
    listed.sort_by_key(|a| a.member_id);
    assert_eq!(listed, vec![nospace(0), nospace(7)]);
    let by_type = maint
        .alarm(call(AlarmAction::Get, 0, pb::AlarmType::Corrupt))
        .await
        .unwrap()
        .into_inner();
    assert!(by_type.alarms.is_empty(), "{by_type:?}");
    // A raised NOSPACE caps writes, whatever the size.
    assert_no_space(&kv.put(put_req("k", b"v".to_vec())).await.unwrap_err());
    // Deactivating another member's or type's alarm changes nothing.
    for (member, alarm) in [(9, pb::AlarmType::Nospace), (7, pb::AlarmType::Corrupt)] {
        let resp = maint
            .alarm(call(AlarmAction::Deactivate, member, alarm))
            .await
            .unwrap()
            .into_inner();
        assert!(resp.alarms.is_empty(), "{resp:?}");
    }
    for member in [0, 7] {
        let resp = maint
            .alarm(call(
                AlarmAction::Deactivate,
                member,
                pb::AlarmType::Nospace,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.alarms, vec![nospace(member)]);
    }
    assert!(alarms(&mut maint).await.is_empty());
    kv.put(put_req("k", b"v".to_vec())).await.unwrap();
}

fn etcd_with_quota() -> Option<EtcdNode> {
    if !require_tool(
        "etcd",
        "--version",
        "the quota tests against etcd",
        "apt-get install etcd-server",
    ) {
        return None;
    }
    Some(
        EtcdNode::start_with(EtcdOptions {
            extra_args: vec![format!("--quota-backend-bytes={QUOTA}")],
            ..EtcdOptions::default()
        })
        .unwrap(),
    )
}

/// A persistent server on `dir` (with `quota`), once the previous one let go
/// of the directory: a server just shut down may still be dropping its
/// last connection tasks, which hold the database open.
async fn reopen(dir: &std::path::Path, quota: u64) -> Server {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let config = ServerConfig::persistent(dir).with_quota_backend_bytes(quota);
        match Server::start(config).await {
            Ok(server) => return server,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "the directory is still open; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot reopen {dir:?}: {e}"),
        }
    }
}

async fn muster_with_quota(dir: &std::path::Path) -> Server {
    reopen(dir, QUOTA).await
}

/// Each body against etcd 3.4 and muster serve, both with the test's
/// quota, on a fresh data directory: `NAME::etcd` and `NAME::embedded`.
macro_rules! with_quota_on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread")]
                async fn etcd() {
                    let Some(etcd) = super::etcd_with_quota() else {
                        return;
                    };
                    super::$name(&etcd.endpoint()).await;
                }

                #[tokio::test(flavor = "multi_thread")]
                async fn embedded() {
                    let dir = tempfile::tempdir().unwrap();
                    let server = super::muster_with_quota(dir.path()).await;
                    super::$name(&server.endpoint()).await;
                }
            }
        )*
    };
}

with_quota_on_both!(fill_refuse_recover, alarm_calls, corrupt_alarm);

#[tokio::test(flavor = "multi_thread")]
async fn muster_in_memory_alarm_calls_and_defragment() {
    let server = Server::start(ServerConfig::in_memory()).await.unwrap();
    alarm_calls(&server.endpoint()).await;
    let mut maint = MaintenanceClient::new(channel(&server).await);
    maint.defragment(pb::DefragmentRequest {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_alarm_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let raise = pb::AlarmRequest {
        action: AlarmAction::Activate as i32,
        member_id: 42,
        alarm: pb::AlarmType::Nospace as i32,
    };
    {
        let server = muster_with_quota(dir.path()).await;
        let mut maint = MaintenanceClient::new(channel(&server).await);
        maint.alarm(raise).await.unwrap();
        server.shutdown().await;
    }
    {
        let server = muster_with_quota(dir.path()).await;
        let ch = channel(&server).await;
        let mut maint = MaintenanceClient::new(ch.clone());
        assert_eq!(
            alarms(&mut maint).await,
            vec![pb::AlarmMember {
                member_id: 42,
                alarm: pb::AlarmType::Nospace as i32,
            }]
        );
        let mut kv = KvClient::new(ch);
        assert_no_space(&kv.put(put_req("k", b"v".to_vec())).await.unwrap_err());
        maint
            .alarm(pb::AlarmRequest {
                action: AlarmAction::Deactivate as i32,
                ..raise
            })
            .await
            .unwrap();
        server.shutdown().await;
    }
    let server = muster_with_quota(dir.path()).await;
    let ch = channel(&server).await;
    assert!(
        alarms(&mut MaintenanceClient::new(ch.clone()))
            .await
            .is_empty()
    );
    KvClient::new(ch)
        .put(put_req("k", b"v".to_vec()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn defragment_shrinks_the_file_after_a_delete_and_a_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let server = reopen(dir.path(), 0).await;
    let ch = channel(&server).await;
    let mut kv = KvClient::new(ch.clone());
    let mut maint = MaintenanceClient::new(ch);
    for i in 0..200 {
        kv.put(put_req(&format!("big/{i:04}"), vec![b'x'; 64 << 10]))
            .await
            .unwrap();
    }
    kv.put(put_req("keep", b"kept".to_vec())).await.unwrap();
    let file = dir.path().join(muster_server::storage::FILE_NAME);
    let size = || std::fs::metadata(&file).unwrap().len();
    // Checkpoints put the 12.5 MiB into the file.
    let deadline = Instant::now() + Duration::from_secs(60);
    while size() < 8 << 20 {
        assert!(
            Instant::now() < deadline,
            "the file stayed at {} bytes",
            size()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = size();
    let in_use = |m: &mut MaintenanceClient<Channel>| {
        let mut m = m.clone();
        async move {
            m.status(pb::StatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .db_size_in_use
        }
    };
    let full = in_use(&mut maint).await;
    assert!(full > 12 << 20, "12.5 MiB kept: {full} bytes in use");
    delete_and_compact(&mut kv, b"big/", b"big0").await;
    // In use drops with the compaction, before any defragment: the quota
    // counts it.
    let freed = in_use(&mut maint).await;
    assert!(freed < 1 << 20, "{freed} bytes in use after the compaction");
    // Defragment checkpoints first, so the file holds all of it, freed.
    maint.defragment(pb::DefragmentRequest {}).await.unwrap();
    let after = size();
    // Freed pages were given back: far less than the 12.5 MiB written.
    assert!(
        after < 4 << 20 && after < before / 2,
        "{before} bytes, then {after}"
    );
    assert_eq!(value(&mut kv, b"keep").await.as_deref(), Some(&b"kept"[..]));
    server.shutdown().await;
    // And nothing was lost: the data reads back after a restart.
    let server = reopen(dir.path(), 0).await;
    let mut kv = KvClient::new(channel(&server).await);
    assert_eq!(value(&mut kv, b"keep").await.as_deref(), Some(&b"kept"[..]));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_the_size_the_quota_and_the_alarms() {
    let server = Server::start(ServerConfig::in_memory().with_quota_backend_bytes(QUOTA))
        .await
        .unwrap();
    let text = muster_server::metrics::render(server.core());
    let value = |name: &str, labels: &[&str]| muster_testkit::metric_value(&text, name, labels);
    assert_eq!(
        value("muster_server_quota_backend_bytes", &[]),
        Some(QUOTA as f64)
    );
    assert_eq!(value("muster_mvcc_db_total_size_in_bytes", &[]), Some(0.0));
    assert_eq!(
        value("muster_server_alarm", &[r#"alarm="NOSPACE""#]),
        Some(0.0)
    );
    MaintenanceClient::new(channel(&server).await)
        .alarm(pb::AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: 1,
            alarm: pb::AlarmType::Nospace as i32,
        })
        .await
        .unwrap();
    let text = muster_server::metrics::render(server.core());
    let value = |name: &str, labels: &[&str]| muster_testkit::metric_value(&text, name, labels);
    assert_eq!(
        value("muster_server_alarm", &[r#"alarm="NOSPACE""#]),
        Some(1.0)
    );
    assert_eq!(
        value("muster_server_alarm", &[r#"alarm="CORRUPT""#]),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_default_quota_is_etcds() {
    let server = Server::start(ServerConfig::in_memory().with_quota_backend_bytes(0))
        .await
        .unwrap();
    assert_eq!(server.core().quota_bytes(), 2 << 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_during_a_defragment_are_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let server = reopen(dir.path(), 0).await;
    let ch = channel(&server).await;
    let mut kv = KvClient::new(ch.clone());
    // Something to compact away, so the defragments have work to do.
    for i in 0..50 {
        kv.put(put_req(&format!("old/{i:03}"), vec![b'o'; 32 << 10]))
            .await
            .unwrap();
    }
    delete_and_compact(&mut kv, b"old/", b"old0").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let mut kv = kv.clone();
        let stop = stop.clone();
        async move {
            let mut acked = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || acked < 20 {
                kv.put(put_req(&format!("new/{acked:05}"), vec![b'n'; 1024]))
                    .await
                    .unwrap();
                acked += 1;
            }
            acked
        }
    });
    let mut maint = MaintenanceClient::new(ch);
    for _ in 0..3 {
        maint.defragment(pb::DefragmentRequest {}).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = writer.await.unwrap();
    drop(kv);
    server.shutdown().await;
    let server = reopen(dir.path(), 0).await;
    let count = count(&mut KvClient::new(channel(&server).await), b"new/", b"new0").await;
    assert_eq!(count, acked as i64);
}

/// A CORRUPT alarm refuses every write (etcd's `applierV3Corrupt`), while
/// reads and read-only transactions go on, until it is disarmed.
async fn corrupt_alarm(endpoint: &str) {
    let ch = connect(endpoint).await;
    let mut kv = KvClient::new(ch.clone());
    let mut lease = LeaseClient::new(ch.clone());
    let mut maint = MaintenanceClient::new(ch);
    kv.put(put_req("k", b"v".to_vec())).await.unwrap();
    let id = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner()
        .id;
    let corrupt = pb::AlarmRequest {
        action: AlarmAction::Activate as i32,
        member_id: 1,
        alarm: pb::AlarmType::Corrupt as i32,
    };
    maint.alarm(corrupt).await.unwrap();
    let refused = |status: tonic::Status| {
        assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
        assert_eq!(
            status.message(),
            "etcdserver: corrupt cluster",
            "{status:?}"
        );
    };
    refused(kv.put(put_req("k", b"w".to_vec())).await.unwrap_err());
    refused(
        kv.delete_range(pb::DeleteRangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    let txn_delete = pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(
                pb::DeleteRangeRequest {
                    key: b"absent".to_vec(),
                    ..Default::default()
                },
            )),
        }],
        ..Default::default()
    };
    refused(kv.txn(txn_delete).await.unwrap_err());
    refused(
        kv.compact(pb::CompactionRequest {
            revision: 1,
            physical: false,
        })
        .await
        .unwrap_err(),
    );
    refused(
        lease
            .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 0 })
            .await
            .unwrap_err(),
    );
    refused(
        lease
            .lease_revoke(pb::LeaseRevokeRequest { id })
            .await
            .unwrap_err(),
    );
    // Reads go on.
    assert_eq!(value(&mut kv, b"k").await.as_deref(), Some(&b"v"[..]));
    let txn_read = pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                key: b"k".to_vec(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    kv.txn(txn_read).await.unwrap();
    maint
        .alarm(pb::AlarmRequest {
            action: AlarmAction::Deactivate as i32,
            ..corrupt
        })
        .await
        .unwrap();
    kv.put(put_req("k", b"w".to_vec())).await.unwrap();
}

/// Deletes `[key, end)` and compacts (physically) at the delete's revision,
/// which it returns.
async fn delete_and_compact(kv: &mut KvClient<Channel>, key: &[u8], end: &[u8]) -> i64 {
    let rev = kv
        .delete_range(pb::DeleteRangeRequest {
            key: key.to_vec(),
            range_end: end.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    kv.compact(pb::CompactionRequest {
        revision: rev,
        physical: true,
    })
    .await
    .unwrap();
    rev
}

/// How many keys `[key, end)` holds.
async fn count(kv: &mut KvClient<Channel>, key: &[u8], end: &[u8]) -> i64 {
    kv.range(pb::RangeRequest {
        key: key.to_vec(),
        range_end: end.to_vec(),
        count_only: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .count
}

/// The value of `key`, if it exists.
async fn value(kv: &mut KvClient<Channel>, key: &[u8]) -> Option<Vec<u8>> {
    kv.range(pb::RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .kvs
    .pop()
    .map(|kv| kv.value)
}
