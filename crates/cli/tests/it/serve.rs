//! `muster serve` as a real process: ready line, crash safety under
//! concurrent writes (SIGKILL), graceful shutdown on SIGTERM.

use crate::common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use muster_proto as pb;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use tonic::transport::Channel;

use common::{Serve, free_port};

fn serve(dir: &Path, port: u16) -> Serve {
    common::serve(port, &[OsStr::new("--data-dir"), dir.as_os_str()])
}

async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = serve(dir.path(), port);
    let ch = channel(port).await;
    let lease = LeaseClient::new(ch.clone())
        .lease_grant(pb::LeaseGrantRequest { ttl: 600, id: 0 })
        .await
        .unwrap()
        .into_inner();

    // 16 writers put as fast as they can; each acknowledged put is recorded.
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut kv = KvClient::new(ch.clone());
        let acked = acked.clone();
        let lease_id = lease.id;
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("/crash/{w:02}/{i:06}");
                let req = pb::PutRequest {
                    key: key.clone().into_bytes(),
                    value: key.clone().into_bytes(),
                    lease: if i % 2 == 0 { lease_id } else { 0 },
                    ..Default::default()
                };
                match kv.put(req).await {
                    Ok(resp) => {
                        let rev = resp.into_inner().header.unwrap().revision;
                        acked.lock().unwrap().push((key, rev));
                    }
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    // Kill it mid-stream once a good number of writes were acknowledged.
    let start = Instant::now();
    while acked.lock().unwrap().len() < 2000 {
        assert!(start.elapsed() < Duration::from_secs(60), "writes too slow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.0.kill().unwrap(); // SIGKILL
    server.0.wait().unwrap();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    let last_acked = acked.iter().map(|(_, r)| *r).max().unwrap();
    drop(server);

    let _server = serve(dir.path(), port);
    let ch = channel(port).await;
    let mut kv = KvClient::new(ch.clone());
    let all = kv
        .range(pb::RangeRequest {
            key: b"/crash/".to_vec(),
            range_end: b"/crash0".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let present: std::collections::HashMap<Vec<u8>, i64> = all
        .kvs
        .iter()
        .map(|kv| (kv.key.clone(), kv.mod_revision))
        .collect();
    for (key, rev) in &acked {
        assert_eq!(
            present.get(key.as_bytes()),
            Some(rev),
            "acknowledged write {key} at revision {rev} is missing or changed after the crash"
        );
    }
    let header_rev = all.header.unwrap().revision;
    assert!(
        header_rev >= last_acked,
        "revision went back: {header_rev} < {last_acked}"
    );

    // Revisions continue; the lease is back with its keys.
    let next = kv
        .put(pb::PutRequest {
            key: b"/after".to_vec(),
            value: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.header.unwrap().revision, header_rev + 1);
    let ttl = LeaseClient::new(ch)
        .lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: lease.id,
            keys: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ttl.granted_ttl, 600);
    assert!(
        ttl.ttl > 590,
        "a restored lease gets its full TTL again: {}",
        ttl.ttl
    );
    let leased_acked = acked
        .iter()
        .filter(|(k, _)| k.rsplit('/').next().unwrap().parse::<u64>().unwrap() % 2 == 0)
        .count();
    assert!(
        ttl.keys.len() >= leased_acked,
        "{} < {leased_acked}",
        ttl.keys.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_metrics_and_health_then_shuts_down_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = serve(dir.path(), port);
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&server.1).expect("HTTP address");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let metrics = get("/metrics");
    assert!(metrics.contains("200 OK"), "{metrics}");
    assert!(
        metrics.contains("# TYPE muster_registry_revision gauge"),
        "{metrics}"
    );
    assert!(metrics.contains("muster_registry_keys 0"), "{metrics}");
    assert!(get("/health").contains("\"health\":\"true\""));
    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A simple token for `name` from Authenticate.
async fn token(port: u16, name: &str, password: &str) -> String {
    pb::auth_client::AuthClient::new(channel(port).await)
        .authenticate(pb::AuthenticateRequest {
            name: name.into(),
            password: password.into(),
        })
        .await
        .expect("authenticate")
        .into_inner()
        .token
}

/// `--metrics-require-token`: /metrics is open while auth is off; once it
/// is on, only a request with `Authorization: Bearer <token>` of a live
/// token (any user's) gets it, else 401. /health stays open. Without the
/// flag /metrics stays open with auth on, as etcd's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_require_a_token_when_asked() {
    let port = free_port();
    let serve = common::serve(
        port,
        &[
            OsStr::new("--in-memory"),
            OsStr::new("--metrics-require-token"),
        ],
    );
    let addr = serve.1.clone();
    let get = |headers: Vec<(String, String)>, path: &'static str| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            common::http(&addr, "GET", path, &headers, "")
        })
    };
    let open = get(vec![], "/metrics").await.unwrap();
    assert_eq!(open.status, 200, "auth is off: {}", open.body);
    assert!(open.body.contains("# TYPE"));

    let endpoint = format!("127.0.0.1:{port}");
    tokio::task::spawn_blocking(move || common::enable_auth(&endpoint))
        .await
        .unwrap();
    let refused = get(vec![], "/metrics").await.unwrap();
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert!(
        refused.header_values("www-authenticate")[0].starts_with("Bearer"),
        "{:?}",
        refused.headers
    );
    assert!(!refused.body.contains("# TYPE"), "{}", refused.body);
    let bearer = |t: &str| vec![("Authorization".to_string(), format!("Bearer {t}"))];
    let forged = get(bearer("abcdefghijklmnop.1"), "/metrics").await.unwrap();
    assert_eq!(forged.status, 401);
    // Not a token but the password, or a token without "Bearer": no.
    let basic = get(
        vec![(
            "Authorization".to_string(),
            "Basic cm9vdDpyb290cHc=".to_string(),
        )],
        "/metrics",
    )
    .await
    .unwrap();
    assert_eq!(basic.status, 401);

    // Any user's token will do: alice may read one service only.
    let alice = token(port, "alice", "alicepw").await;
    let answer = get(bearer(&alice), "/metrics").await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        answer
            .body
            .contains("# TYPE muster_registry_revision gauge"),
        "{}",
        answer.body
    );
    let no_prefix = get(
        vec![("Authorization".to_string(), alice.clone())],
        "/metrics",
    )
    .await
    .unwrap();
    assert_eq!(no_prefix.status, 401, "Bearer is required");
    let health = get(vec![], "/health").await.unwrap();
    assert_eq!(health.status, 200);

    // A dead token (alice deleted) no longer opens it.
    let endpoint = format!("127.0.0.1:{port}");
    tokio::task::spawn_blocking(move || {
        common::etcdctl(
            &endpoint,
            &["--user=root:rootpw", "user", "delete", "alice"],
        )
    })
    .await
    .unwrap();
    let dead = get(bearer(&alice), "/metrics").await.unwrap();
    assert_eq!(dead.status, 401);

    // Without the flag, /metrics stays open with auth on.
    let plain_port = free_port();
    let plain = common::serve(plain_port, &[OsStr::new("--in-memory")]);
    let endpoint = format!("127.0.0.1:{plain_port}");
    tokio::task::spawn_blocking(move || common::enable_auth(&endpoint))
        .await
        .unwrap();
    let plain_addr = plain.1.clone();
    let open =
        tokio::task::spawn_blocking(move || common::http(&plain_addr, "GET", "/metrics", &[], ""))
            .await
            .unwrap();
    assert_eq!(open.status, 200, "{}", open.body);
}

/// Logs in over gRPC; the token.
async fn login(ch: &Channel, name: &str, password: &str) -> Result<String, tonic::Status> {
    pb::auth_client::AuthClient::new(ch.clone())
        .authenticate(pb::AuthenticateRequest {
            name: name.into(),
            password: password.into(),
        })
        .await
        .map(|r| r.into_inner().token)
}

/// A range of `key` sent with `token` (none for `None`).
async fn range_as(ch: &Channel, key: &str, token: Option<&str>) -> Result<usize, tonic::Status> {
    let mut req = tonic::Request::new(pb::RangeRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    });
    if let Some(t) = token {
        req.metadata_mut().insert("token", t.parse().unwrap());
    }
    KvClient::new(ch.clone())
        .range(req)
        .await
        .map(|r| r.into_inner().kvs.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = serve(dir.path(), port);
    let endpoint = format!("127.0.0.1:{port}");
    common::etcdctl(&endpoint, &["put", "/muster/services/web/w1", "x"]);
    common::enable_auth(&endpoint);
    let ch = channel(port).await;
    let old = login(&ch, "alice", "alicepw").await.unwrap();
    assert_eq!(
        range_as(&ch, "/muster/services/web/w1", Some(&old))
            .await
            .unwrap(),
        1
    );

    server.0.kill().unwrap(); // SIGKILL
    server.0.wait().unwrap();
    drop(server);
    let _server = serve(dir.path(), port);
    let ch = channel(port).await;

    // Still on: anonymous reads are refused as before the crash.
    let anonymous = range_as(&ch, "/muster/services/web/w1", None)
        .await
        .unwrap_err();
    assert_eq!(anonymous.message(), "etcdserver: user name is empty");
    // Tokens lived in memory (etcd's simple tokens): the old one is gone.
    let stale = range_as(&ch, "/muster/services/web/w1", Some(&old))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::Unauthenticated);
    assert_eq!(stale.message(), "etcdserver: invalid auth token");
    // Users, passwords and roles are intact: alice logs in again and may
    // read what her role allows, and nothing else.
    let new = login(&ch, "alice", "alicepw").await.unwrap();
    assert_eq!(
        range_as(&ch, "/muster/services/web/w1", Some(&new))
            .await
            .unwrap(),
        1
    );
    let denied = range_as(&ch, "/other", Some(&new)).await.unwrap_err();
    assert_eq!(denied.message(), "etcdserver: permission denied");
    let wrong = login(&ch, "alice", "nope").await.unwrap_err();
    assert_eq!(
        wrong.message(),
        "etcdserver: authentication failed, invalid user ID or password"
    );
    assert!(login(&ch, "root", "rootpw").await.is_ok());
}

/// `etcdctl --endpoints http://127.0.0.1:PORT ARGS`: etcdctl 3.4 sends the
/// URL itself as `:authority` for some commands (`endpoint status`), which
/// h2 alone refuses.
fn etcdctl_url(endpoint: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("etcdctl");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--command-timeout", "10s"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("etcdctl runs")
}

#[test]
fn etcdctl_with_url_endpoints() {
    let port = free_port();
    let _server = common::serve(port, &[OsStr::new("--in-memory")]);
    let endpoint = format!("http://127.0.0.1:{port}");
    let ok = |args: &[&str]| {
        let out = etcdctl_url(&endpoint, args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}{}",
            common::text(&out.stdout),
            common::text(&out.stderr)
        );
        common::text(&out.stdout) + &common::text(&out.stderr)
    };
    let status = ok(&["endpoint", "status", "-w", "json"]);
    assert!(status.contains(&endpoint), "{status}");
    assert!(status.contains("\"revision\""), "{status}");
    // (etcdctl reports health on stderr.)
    let health = ok(&["endpoint", "health"]);
    assert!(
        health.contains(&format!("{endpoint} is healthy")),
        "{health}"
    );
    assert_eq!(ok(&["put", "/url/a", "one"]).trim(), "OK");
    assert_eq!(ok(&["get", "/url/a"]), "/url/a\none\n");
    let members = ok(&["member", "list"]);
    assert!(members.contains("started"), "{members}");
    // Several commands on one connection (a header block rewritten after
    // the first): the table stays in step.
    let status = ok(&["endpoint", "status", "--cluster", "-w", "json"]);
    assert!(status.contains("\"revision\""), "{status}");
}
