//! `muster snapshot save|restore|status` and `Maintenance.Snapshot` of
//! `muster serve`: saved with etcdctl and muster, restored into a new data
//! directory, served again and compared; a snapshot taken under write load
//! is one revision's state.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use muster_proto as pb;
use serde_json::Value;

use crate::common::{self, Serve, etcdctl, free_port, text};

fn serve_dir(dir: &Path) -> (Serve, String) {
    let port = free_port();
    let serve = common::serve(port, &[OsStr::new("--data-dir"), dir.as_os_str()]);
    (serve, format!("http://127.0.0.1:{port}"))
}

fn muster(endpoint: &str, args: &[&OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_muster"))
        .env("MUSTER_ENDPOINTS", endpoint)
        .env_remove("MUSTER_USER")
        .env_remove("MUSTER_PASSWORD")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .args(args)
        .output()
        .expect("muster runs")
}

fn muster_ok(endpoint: &str, args: &[&OsStr]) -> String {
    let out = muster(endpoint, args);
    assert!(
        out.status.success(),
        "muster {args:?} failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Every key with its revisions, version and lease, and the header revision.
fn dump(endpoint: &str) -> (i64, Vec<Value>) {
    let out: Value =
        serde_json::from_str(&etcdctl(endpoint, &["get", "", "--from-key", "-w", "json"])).unwrap();
    let revision = out["header"]["revision"].as_i64().unwrap();
    let kvs = out["kvs"].as_array().cloned().unwrap_or_default();
    (revision, kvs)
}

/// Lease ids with their granted TTLs and attached keys.
fn leases(endpoint: &str) -> Vec<(String, String, String)> {
    let list = etcdctl(endpoint, &["lease", "list"]);
    let mut out: Vec<_> = list
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|id| {
            let id = id.trim().to_string();
            let ttl: Value = serde_json::from_str(&etcdctl(
                endpoint,
                &["lease", "timetolive", &id, "--keys", "-w", "json"],
            ))
            .unwrap();
            assert!(ttl["granted-ttl"].is_i64(), "{ttl}");
            (id, ttl["granted-ttl"].to_string(), ttl["keys"].to_string())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn save_restore_serve_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (_original, ep) = serve_dir(&tmp.path().join("original"));

    for i in 0..50 {
        etcdctl(&ep, &["put", &format!("/k/{i:03}"), &format!("value {i}")]);
    }
    for i in 0..10 {
        etcdctl(&ep, &["put", &format!("/k/{i:03}"), &format!("again {i}")]);
    }
    for i in 40..50 {
        etcdctl(&ep, &["del", &format!("/k/{i:03}")]);
    }
    let lease_a = etcdctl(&ep, &["lease", "grant", "600"]);
    let lease_a = lease_a.split_whitespace().nth(1).unwrap().to_string();
    let lease_b = etcdctl(&ep, &["lease", "grant", "900"]);
    let lease_b = lease_b.split_whitespace().nth(1).unwrap().to_string();
    etcdctl(&ep, &["put", "/leased/a1", "x", "--lease", &lease_a]);
    etcdctl(&ep, &["put", "/leased/a2", "y", "--lease", &lease_a]);
    etcdctl(&ep, &["put", "/leased/b1", "z", "--lease", &lease_b]);
    etcdctl(&ep, &["user", "add", "bob:bobpw"]);
    etcdctl(&ep, &["role", "add", "reader"]);
    etcdctl(
        &ep,
        &[
            "role",
            "grant-permission",
            "reader",
            "read",
            "/k/",
            "--prefix",
        ],
    );
    etcdctl(&ep, &["user", "grant-role", "bob", "reader"]);

    let (revision, kvs) = dump(&ep);
    let original_leases = leases(&ep);
    assert_eq!(original_leases.len(), 2);

    // etcdctl saves our stream (it checks the SHA-256 trailer only).
    let by_etcdctl = tmp.path().join("etcdctl.snap");
    etcdctl(&ep, &["snapshot", "save", by_etcdctl.to_str().unwrap()]);
    let by_muster = tmp.path().join("muster.snap");
    let saved = muster_ok(
        &ep,
        &["snapshot".as_ref(), "save".as_ref(), by_muster.as_os_str()],
    );
    assert!(saved.contains("Snapshot saved"), "{saved}");
    assert!(!tmp.path().join("muster.snap.part").exists());
    // The same state, so the same bytes.
    assert_eq!(
        std::fs::read(&by_etcdctl).unwrap(),
        std::fs::read(&by_muster).unwrap()
    );

    // Status, as a table and as JSON.
    let table = muster_ok(
        &ep,
        &[
            "snapshot".as_ref(),
            "status".as_ref(),
            by_muster.as_os_str(),
        ],
    );
    assert!(
        table.contains("HASH") && table.contains("TOTAL KEYS"),
        "{table}"
    );
    assert!(table.contains(&revision.to_string()), "{table}");
    let status: Value = serde_json::from_str(&muster_ok(
        &ep,
        &[
            "-o".as_ref(),
            "json".as_ref(),
            "snapshot".as_ref(),
            "status".as_ref(),
            by_muster.as_os_str(),
        ],
    ))
    .unwrap();
    assert_eq!(status["revision"], revision);
    assert_eq!(status["totalKey"], kvs.len());
    assert_eq!(
        status["totalSize"],
        std::fs::metadata(&by_muster).unwrap().len()
    );

    // A truncated or damaged file is refused, and nothing is written.
    let bytes = std::fs::read(&by_muster).unwrap();
    let bad = tmp.path().join("bad.snap");
    let not_created = tmp.path().join("never");
    for (what, content) in [
        ("truncated", bytes[..bytes.len() - 1].to_vec()),
        ("damaged", {
            let mut b = bytes.clone();
            b[bytes.len() / 2] ^= 1;
            b
        }),
    ] {
        std::fs::write(&bad, &content).unwrap();
        let out = muster(
            &ep,
            &[
                "snapshot".as_ref(),
                "restore".as_ref(),
                bad.as_os_str(),
                "--data-dir".as_ref(),
                not_created.as_os_str(),
            ],
        );
        assert!(!out.status.success(), "{what} snapshot restored");
        let err = text(&out.stderr);
        assert!(err.contains("hash mismatch"), "{what}: {err}");
        assert!(!not_created.exists(), "{what}: the directory was created");
    }
    // A non-empty directory is refused.
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("something"), b"x").unwrap();
    let out = muster(
        &ep,
        &[
            "snapshot".as_ref(),
            "restore".as_ref(),
            by_muster.as_os_str(),
            "--data-dir".as_ref(),
            full.as_os_str(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not empty"),
        "{}",
        text(&out.stderr)
    );

    // Restored (from etcdctl's copy) and served: the same keys, revisions,
    // leases, users and roles.
    let restored = tmp.path().join("restored");
    restore(&ep, &by_etcdctl, &restored);
    let (_copy, ep2) = serve_dir(&restored);
    let (revision2, kvs2) = dump(&ep2);
    assert_eq!(revision2, revision);
    assert_eq!(kvs2, kvs);
    // The same history hashes the same (etcdctl endpoint hashkv).
    let hash = |ep: &str| {
        let out = etcdctl(ep, &["endpoint", "hashkv", "-w", "json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v[0]["HashKV"]["hash"].clone()
    };
    assert!(
        hash(&ep).is_u64(),
        "{}",
        etcdctl(&ep, &["endpoint", "hashkv", "-w", "json"])
    );
    assert_eq!(hash(&ep2), hash(&ep));
    assert_eq!(leases(&ep2), original_leases);
    assert_eq!(
        etcdctl(&ep2, &["user", "get", "bob"]),
        etcdctl(&ep, &["user", "get", "bob"])
    );
    assert_eq!(
        etcdctl(&ep2, &["role", "get", "reader"]),
        etcdctl(&ep, &["role", "get", "reader"])
    );
    // The restored server goes on from the snapshot's revision.
    etcdctl(&ep2, &["put", "/after", "1"]);
    let (revision3, _) = dump(&ep2);
    assert_eq!(revision3, revision + 1);
}

#[test]
fn in_memory_server_snapshots_too() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let _serve = common::serve(port, &[OsStr::new("--in-memory")]);
    let ep = format!("http://127.0.0.1:{port}");
    etcdctl(&ep, &["put", "/a", "1"]);
    let file = tmp.path().join("mem.snap");
    muster_ok(
        &ep,
        &["snapshot".as_ref(), "save".as_ref(), file.as_os_str()],
    );
    let status: Value = serde_json::from_str(&muster_ok(
        &ep,
        &[
            "-o".as_ref(),
            "json".as_ref(),
            "snapshot".as_ref(),
            "status".as_ref(),
            file.as_os_str(),
        ],
    ))
    .unwrap();
    assert_eq!(status["totalKey"], 1);
    assert_eq!(status["revision"], 2);
}

/// 64 writers each put a pair of keys to the same counter in one txn, as
/// fast as they can, and remember each txn's revision; a snapshot taken
/// meanwhile holds, for every writer, both keys at the counter of its last
/// txn at or below the snapshot's revision.
#[test]
fn snapshot_under_write_load_is_one_revision() {
    const WRITERS: usize = 64;
    let tmp = tempfile::tempdir().unwrap();
    let (_serve, ep) = serve_dir(&tmp.path().join("loaded"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _context = runtime.enter();
    let stop = Arc::new(AtomicBool::new(false));
    let etcd = muster::Etcd::connect_to(ep.clone()).unwrap();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let etcd = etcd.clone();
            let stop = stop.clone();
            runtime.spawn(async move {
                let mut revisions = Vec::new();
                let mut i: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let put = |k: &str| pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                            key: format!("/load/{w:02}/{k}").into_bytes(),
                            value: i.to_string().into_bytes(),
                            ..Default::default()
                        })),
                    };
                    let resp = etcd
                        .txn(pb::TxnRequest {
                            success: vec![put("a"), put("b")],
                            ..Default::default()
                        })
                        .await
                        .expect("txn");
                    revisions.push((resp.header.unwrap().revision, i));
                }
                revisions
            })
        })
        .collect();
    // Let every writer get going first.
    // Enough history that the server copies it in several chunks (4096
    // records per hold of its read lock).
    common::wait_for("writes from every writer", || {
        let (revision, kvs) = dump(&ep);
        (kvs.len() == 2 * WRITERS && revision > 6000).then_some(())
    });
    let file = tmp.path().join("loaded.snap");
    muster_ok(
        &ep,
        &["snapshot".as_ref(), "save".as_ref(), file.as_os_str()],
    );
    stop.store(true, Ordering::Relaxed);
    let histories: Vec<Vec<(i64, u64)>> = writers
        .into_iter()
        .map(|h| runtime.block_on(h).unwrap())
        .collect();

    let restored = tmp.path().join("restored");
    restore(&ep, &file, &restored);
    let (_copy, ep2) = serve_dir(&restored);
    let copy = muster::Etcd::connect_to(ep2.clone()).unwrap();
    let resp = runtime
        .block_on(copy.range(pb::RangeRequest {
            key: b"/load/".to_vec(),
            range_end: b"/load0".to_vec(),
            ..Default::default()
        }))
        .unwrap();
    let revision = resp.header.unwrap().revision;
    let kvs = resp.kvs;
    assert_eq!(kvs.len(), 2 * WRITERS);
    let value = |kv: &pb::KeyValue| -> u64 { String::from_utf8_lossy(&kv.value).parse().unwrap() };
    let mut written_after = 0;
    for (w, history) in histories.iter().enumerate() {
        let expected = history
            .iter()
            .filter(|(rev, _)| *rev <= revision)
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        written_after += history.iter().filter(|(rev, _)| *rev > revision).count();
        let a = &kvs[2 * w];
        let b = &kvs[2 * w + 1];
        assert_eq!(a.key, format!("/load/{w:02}/a").into_bytes());
        assert_eq!((value(a), value(b)), (expected, expected), "writer {w}");
        assert_eq!(a.mod_revision, b.mod_revision, "writer {w}");
        assert!(a.mod_revision <= revision);
        assert_eq!(a.version as u64, expected, "writer {w}");
    }
    // The snapshot was taken while the writers wrote.
    assert!(written_after > 0, "no write after the snapshot's revision");
}

/// Against etcd, `save` checks the SHA-256 trailer of its bbolt stream and
/// keeps it as it came: etcdctl reads the file.
#[test]
fn save_from_etcd() {
    let Some(etcd) = common::Backend::etcd() else {
        return;
    };
    let ep = etcd.endpoint();
    etcdctl(&ep, &["put", "/a", "1"]);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("etcd.snap");
    muster_ok(
        &ep,
        &["snapshot".as_ref(), "save".as_ref(), file.as_os_str()],
    );
    let status: Value = serde_json::from_str(&etcdctl(
        &ep,
        &["snapshot", "status", file.to_str().unwrap(), "-w", "json"],
    ))
    .unwrap();
    assert!(status["totalKey"].as_i64().unwrap() >= 1, "{status}");
    // Not ours: status says so instead of misreading it.
    let out = muster(
        &ep,
        &["snapshot".as_ref(), "status".as_ref(), file.as_os_str()],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not a muster snapshot"),
        "{}",
        text(&out.stderr)
    );
}

/// With auth on, a snapshot needs root; the restored server has auth on,
/// with the same users and passwords.
#[test]
fn auth_state_survives_a_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let (_serve, ep) = serve_dir(&tmp.path().join("auth"));
    common::enable_auth(&ep);
    let file = tmp.path().join("auth.snap");
    let save = |user: Option<&str>| {
        let mut args: Vec<&OsStr> = Vec::new();
        if let Some(user) = user {
            args.extend([OsStr::new("--user"), OsStr::new(user)]);
        }
        args.extend([OsStr::new("snapshot"), "save".as_ref(), file.as_os_str()]);
        muster(&ep, &args)
    };
    for user in [None, Some("alice:alicepw")] {
        let out = save(user);
        assert!(!out.status.success(), "{user:?} saved a snapshot");
        assert!(!file.exists());
    }
    let out = save(Some("root:rootpw"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let restored = tmp.path().join("restored");
    restore(&ep, &file, &restored);
    let (_copy, ep2) = serve_dir(&restored);
    // Anonymous requests are refused: auth is on.
    let out = muster_testkit::etcdctl_at(&ep2, &["get", "/x"]).unwrap();
    assert!(!out.status.success(), "auth is off after the restore");
    // The users log in with their passwords and keep their roles.
    let users = etcdctl(&ep2, &["--user", "root:rootpw", "user", "list"]);
    assert_eq!(
        users.split_whitespace().collect::<Vec<_>>(),
        ["alice", "dash", "root"]
    );
    etcdctl(
        &ep2,
        &[
            "--user",
            "alice:alicepw",
            "get",
            "/muster/services/web/",
            "--prefix",
        ],
    );
}

/// `muster snapshot restore FILE --data-dir DIR`, which must succeed.
fn restore(ep: &str, file: &std::path::Path, dir: &std::path::Path) {
    muster_ok(
        ep,
        &[
            "snapshot".as_ref(),
            "restore".as_ref(),
            file.as_os_str(),
            "--data-dir".as_ref(),
            dir.as_os_str(),
        ],
    );
}

/// How many keys under `prefix` the server at `ep` has.
fn count(ep: &str, prefix: &str) -> u64 {
    let out = etcdctl(
        ep,
        &["get", "--prefix", prefix, "--limit", "1", "-w", "json"],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v["count"].as_u64().unwrap_or(0)
}

/// kill -9 of the server in the middle of a snapshot stream and of a
/// defragment: every acknowledged write is there after the restart, the
/// interrupted save leaves no snapshot file (or a whole, valid one, had it
/// finished first), and the server serves writes again.
#[test]
fn kill_9_during_a_snapshot_and_a_defrag_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let keys = 20_000u64;
    let (mut server, ep) = serve_dir(&data);
    let populate = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["bench", "--endpoints", &ep, "populate", "--keys"])
        .arg(keys.to_string())
        .args(["--value-size", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(populate.success(), "populate failed");

    // The save starts streaming (its .part file appears); then kill -9.
    let file = tmp.path().join("cut.snap");
    let part = tmp.path().join("cut.snap.part");
    let mut save = Command::new(env!("CARGO_BIN_EXE_muster"))
        .env("MUSTER_ENDPOINTS", &ep)
        .args(["snapshot".as_ref(), "save".as_ref(), file.as_os_str()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + common::DEADLINE;
    while !part.exists() && !file.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the save never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    server.0.kill().unwrap();
    let saved = save.wait().unwrap();
    if saved.success() {
        let status = muster_ok(
            &ep,
            &["snapshot".as_ref(), "status".as_ref(), file.as_os_str()],
        );
        assert!(status.contains(&keys.to_string()), "{status}");
    } else {
        assert!(!file.exists(), "a failed save left {}", file.display());
    }
    drop(server);

    let (mut server, ep) = serve_dir(&data);
    assert_eq!(
        count(&ep, "bench/"),
        keys,
        "after kill -9 during a snapshot"
    );
    // Work for the defragment: half the keys deleted and compacted away.
    // Keys are bench/ and the index in 26 digits: this prefix is 0..9999.
    let half = format!("bench/{}", "0".repeat(22));
    let deleted: Value =
        serde_json::from_str(&etcdctl(&ep, &["del", "--prefix", &half, "-w", "json"])).unwrap();
    let gone = deleted["deleted"].as_u64().unwrap();
    assert_eq!(gone, 10_000);
    let rev = deleted["header"]["revision"].as_i64().unwrap();
    etcdctl(&ep, &["compaction", "--physical", &rev.to_string()]);
    let mut defrag = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &ep, "defrag"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Where the kill lands (before, during or after the defragment's
    // work) is best effort; what follows holds for each.
    std::thread::sleep(std::time::Duration::from_millis(20));
    server.0.kill().unwrap();
    let _ = defrag.wait();
    drop(server);

    let (_server, ep) = serve_dir(&data);
    assert_eq!(
        count(&ep, "bench/"),
        keys - gone,
        "after kill -9 during a defragment"
    );
    assert_eq!(etcdctl(&ep, &["put", "after", "v"]).trim(), "OK");
}
