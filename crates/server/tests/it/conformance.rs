//! The embedded registry driven over the wire: by etcd's own etcdctl, and
//! with bad input that must get etcd's errors while the server keeps serving.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use muster_proto as pb;
use muster_server::{Server, ServerConfig};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use tonic::transport::Channel;

use crate::common::channel;
use muster_testkit::require_tool;

/// Loudly skipped without etcdctl, unless MUSTER_REQUIRE_ETCD=1.
fn require_etcdctl() -> bool {
    require_tool(
        "etcdctl",
        "version",
        "the etcdctl test",
        "apt-get install etcd-client",
    )
}

/// etcdctl (API v3) against `endpoint`, a URL as users give it (for
/// `endpoint status` and the maintenance commands etcdctl 3.4 then sends
/// the URL as the HTTP/2 `:authority`, which the server accepts as etcd
/// does: see the server's `authority` module).
fn etcdctl_command(endpoint: &str) -> Command {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"));
    cmd
}

/// Runs etcdctl `args` against `endpoint` (see [`etcdctl_command`]), with
/// `stdin` as its input: whether it succeeded, its stdout and stderr.
fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut cmd = etcdctl_command(endpoint);
    cmd.arg("--command-timeout=5s")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("etcdctl runs");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn server() -> Server {
    Server::start(ServerConfig::in_memory().with_min_lease_ttl(1))
        .await
        .expect("server starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_drives_the_embedded_registry() {
    if !require_etcdctl() {
        return;
    }
    let server = server().await;
    let ep = server.endpoint();
    let ep = ep.as_str();
    let run = |args: &[&str]| {
        let (ok, out, err) = etcdctl(ep, args, None);
        assert!(ok, "etcdctl {args:?} failed: {err}");
        out
    };
    let ep_owned = ep.to_string();
    let (ok, out, err) =
        tokio::task::spawn_blocking(move || etcdctl(&ep_owned, &["put", "/svc/user/a", "1"], None))
            .await
            .unwrap();
    assert!(ok && out.trim() == "OK", "{out} {err}");
    assert_eq!(run(&["put", "/svc/user/b", "2"]).trim(), "OK");
    assert_eq!(run(&["put", "/svc/user_admin/c", "3"]).trim(), "OK");
    assert_eq!(
        run(&["get", "--prefix", "/svc/user/"]),
        "/svc/user/a\n1\n/svc/user/b\n2\n"
    );
    assert_eq!(
        run(&["get", "--prefix", "--keys-only", "/svc/"])
            .split_whitespace()
            .count(),
        3
    );
    let count = run(&["get", "--prefix", "--write-out=fields", "/svc/"]);
    assert!(count.contains("\"Count\" : 3"), "{count}");
    assert_eq!(run(&["del", "/svc/user/b"]).trim(), "1");

    // A transaction, as etcdctl reads it from stdin.
    let (ok, out, err) = etcdctl(
        ep,
        &["txn"],
        Some(
            "value(\"/svc/user/a\") = \"1\"\n\nput /svc/user/a 10\nput /svc/user/z 26\n\nput /svc/failed x\n\n",
        ),
    );
    assert!(ok, "{err}");
    assert_eq!(out, "SUCCESS\n\nOK\n\nOK\n");
    assert_eq!(
        run(&["get", "/svc/user/a", "--print-value-only"]).trim(),
        "10"
    );
    assert_eq!(run(&["get", "/svc/failed"]), "");

    // Leases: grant, attach, keep-alive, time-to-live, revoke.
    let out = run(&["lease", "grant", "30"]);
    let id = out.split_whitespace().nth(1).expect("lease id").to_string();
    assert!(out.contains("granted with TTL(30s)"), "{out}");
    assert_eq!(
        run(&["put", "--lease", &id, "/svc/leased", "v"]).trim(),
        "OK"
    );
    let out = run(&["lease", "keep-alive", "--once", &id]);
    assert!(out.contains("keepalived with TTL(30)"), "{out}");
    let out = run(&["lease", "timetolive", "--keys", &id]);
    assert!(
        out.contains("granted with TTL(30s)") && out.contains("/svc/leased"),
        "{out}"
    );
    assert!(run(&["lease", "list"]).contains(&id));
    assert!(run(&["lease", "revoke", &id]).contains("revoked"));
    assert_eq!(run(&["get", "/svc/leased"]), "");
    let (ok, _, err) = etcdctl(ep, &["lease", "revoke", &id], None);
    assert!(!ok && err.contains("requested lease not found"), "{err}");

    // Watch: a background etcdctl sees a put made after it started.
    let mut watcher = etcdctl_command(ep)
        .args(["watch", "--prefix", "/w/"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = watcher.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut seen = String::new();
        let mut buf = [0u8; 256];
        while !seen.contains("hello") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        seen
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() && Instant::now() < deadline {
        run(&["put", "/w/k", "hello"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watcher.kill().ok();
    watcher.wait().ok();
    let seen = reader.join().unwrap();
    assert!(seen.contains("PUT\n/w/k\nhello"), "{seen:?}");

    let status = run(&["endpoint", "status", "--write-out=table"]);
    assert!(
        status.contains(ep.trim_start_matches("http://")),
        "{status}"
    );
    let health = etcdctl(ep, &["endpoint", "health"], None);
    assert!(health.0, "{}", health.2);
    let members = run(&["member", "list"]);
    assert!(members.contains("muster"), "{members}");
    let hashkv = run(&["endpoint", "hashkv", "--write-out=json"]);
    assert!(hashkv.contains("\"hash\":"), "{hashkv}");
    // Leadership to the one member, the leader (its id in hex, as etcdctl
    // prints member ids).
    let id = members.split(',').next().unwrap_or_default().trim();
    let (ok, out, err) = etcdctl(ep, &["move-leader", id], None);
    assert!(ok, "move-leader {id}: {out} {err}");
    let (ok, _, err) = etcdctl(ep, &["compaction", "3"], None);
    assert!(ok, "{err}");
}

async fn clients(server: &Server) -> (KvClient<Channel>, LeaseClient<Channel>) {
    let channel = channel(server).await;
    (KvClient::new(channel.clone()), LeaseClient::new(channel))
}

fn put(key: &str, value: &[u8]) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            ..Default::default()
        })),
    }
}

/// Asserts that `r` is the error `code` with a message containing `msg`.
#[track_caller]
fn expect<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
    msg: &str,
) {
    let status = r.unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(msg), "{status:?}");
}

#[tokio::test]
async fn bad_input_gets_etcds_errors_and_the_server_keeps_serving() {
    let server = server().await;
    let (mut kv, mut lease) = clients(&server).await;
    for (put, code, msg) in [
        (
            pb::PutRequest::default(),
            tonic::Code::InvalidArgument,
            "etcdserver: key is not provided",
        ),
        (
            pb::PutRequest {
                key: b"k".to_vec(),
                lease: 0x7777,
                ..Default::default()
            },
            tonic::Code::NotFound,
            "etcdserver: requested lease not found",
        ),
        (
            pb::PutRequest {
                key: b"k".to_vec(),
                value: vec![0; 1600 * 1024],
                ..Default::default()
            },
            tonic::Code::InvalidArgument,
            "etcdserver: request is too large",
        ),
        (
            pb::PutRequest {
                key: b"k".to_vec(),
                value: vec![0; 3 * 1024 * 1024],
                ..Default::default()
            },
            tonic::Code::ResourceExhausted,
            "grpc: received message larger than max",
        ),
    ] {
        expect(kv.put(put).await, code, msg);
    }
    let too_many = pb::TxnRequest {
        success: (0..129).map(|i| put(&format!("k{i}"), b"v")).collect(),
        ..Default::default()
    };
    expect(
        kv.txn(too_many).await,
        tonic::Code::InvalidArgument,
        "too many operations in txn request",
    );
    let dup = pb::TxnRequest {
        success: vec![put("k", b"1"), put("k", b"2")],
        ..Default::default()
    };
    expect(
        kv.txn(dup).await,
        tonic::Code::InvalidArgument,
        "duplicate key given in txn request",
    );
    let future = pb::RangeRequest {
        key: b"k".to_vec(),
        revision: 1000,
        ..Default::default()
    };
    expect(
        kv.range(future).await,
        tonic::Code::OutOfRange,
        "required revision is a future revision",
    );
    // range_end before key: etcd answers an empty range.
    let empty = kv
        .range(pb::RangeRequest {
            key: b"z".to_vec(),
            range_end: b"a".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(empty.kvs.is_empty());
    // Unknown leases: keep-alive answers TTL 0, TimeToLive TTL -1.
    let ttl = lease
        .lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: 0x7777,
            keys: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.ttl, -1);
    let revoked = lease
        .lease_revoke(pb::LeaseRevokeRequest { id: 0x7777 })
        .await;
    expect(revoked, tonic::Code::NotFound, "requested lease not found");

    // Nothing was written by any of that, and the server still serves.
    let ok = kv
        .put(pb::PutRequest {
            key: b"k".to_vec(),
            value: b"fine".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ok.header.unwrap().revision,
        2,
        "only this put created a revision"
    );
}
