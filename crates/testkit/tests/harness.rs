//! Tests of the etcd harness against a real etcd (skipped if etcd is absent).

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use muster_testkit::{EtcdCluster, EtcdNode, EtcdOptions, require_etcd};

mod common;
use common::{eventually, ok};

fn get(node: &EtcdNode, key: &str) -> String {
    ok(node.etcdctl(&["get", key, "--print-value-only"]).unwrap())
        .trim()
        .to_owned()
}

fn cluster_id(node: &EtcdNode) -> String {
    let json = ok(node.etcdctl(&["endpoint", "status", "-w", "json"]).unwrap());
    let start = json.find("\"cluster_id\":").expect("cluster_id in status") + 13;
    json[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect()
}

fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

#[test]
fn node_starts_healthy_and_serves_requests() {
    let Some(()) = require_etcd() else { return };
    let mut node = EtcdNode::start().unwrap();
    assert!(node.is_running());
    assert!(node.is_healthy());
    assert_eq!(
        node.endpoint(),
        format!("http://127.0.0.1:{}", node.client_port())
    );
    ok(node.etcdctl(&["put", "hello", "world"]).unwrap());
    assert_eq!(get(&node, "hello"), "world");
    assert!(!node.log_tail(5).is_empty());
}

#[test]
fn kill_restart_keeps_data_and_wipe_clears_it() {
    let Some(()) = require_etcd() else { return };
    let mut node = EtcdNode::start().unwrap();
    let port = node.client_port();
    ok(node.etcdctl(&["put", "k", "v1"]).unwrap());
    let id = cluster_id(&node);

    node.kill();
    node.kill(); // idempotent
    assert!(!node.is_running());
    assert!(!node.is_healthy());
    assert!(!accepts(port));

    node.restart().unwrap();
    assert!(node.is_running());
    assert!(node.is_healthy());
    assert_eq!(node.client_port(), port);
    assert_eq!(get(&node, "k"), "v1", "data must survive a restart");
    assert_eq!(cluster_id(&node), id);

    // restart() while running kills first
    node.restart().unwrap();
    assert_eq!(get(&node, "k"), "v1");

    node.wipe();
    assert!(!node.is_running());
    node.restart().unwrap();
    assert_eq!(node.client_port(), port);
    assert_eq!(get(&node, "k"), "", "data must be gone after wipe");
    assert_ne!(cluster_id(&node), id, "wipe must create a new cluster");
}

#[test]
fn drop_stops_the_process_and_removes_temp_dir() {
    let Some(()) = require_etcd() else { return };
    let node = EtcdNode::start().unwrap();
    let port = node.client_port();
    let dir = node.temp_dir().to_owned();
    assert!(accepts(port));
    assert!(dir.exists());
    drop(node);
    eventually("port closed after drop", Duration::from_secs(5), || {
        !accepts(port)
    });
    assert!(!dir.exists());
}

#[test]
fn options_are_applied() {
    let Some(()) = require_etcd() else { return };
    let node = EtcdNode::start_with(EtcdOptions {
        heartbeat_ms: 100,
        election_ms: 1000,
        auto_compaction_mode: Some("revision".into()),
        auto_compaction_retention: Some("1000".into()),
        extra_args: vec!["--quota-backend-bytes=104857600".into()],
        ..EtcdOptions::default()
    })
    .unwrap();
    ok(node.etcdctl(&["put", "a", "b"]).unwrap());
    let log = node.log_tail(1000);
    assert!(log.contains("104857600"), "quota not in log:\n{log}");
}

#[test]
fn cluster_of_three_survives_losing_a_member() {
    let Some(()) = require_etcd() else { return };
    let mut cluster = EtcdCluster::start(3).unwrap();
    assert_eq!(cluster.len(), 3);
    assert!(!cluster.is_empty());
    let eps = cluster.endpoints();
    assert_eq!(eps.len(), 3);
    for i in 0..3 {
        assert!(cluster.is_member_healthy(i));
    }
    ok(cluster.etcdctl(&["put", "k", "v1"]).unwrap());

    cluster.kill_member(0);
    assert!(!cluster.is_member_running(0));
    assert_eq!(cluster.running_endpoints().len(), 2);
    // A request in flight while the leader dies is dropped by etcd (the
    // client sees a timeout), so retry with a short timeout until the two
    // remaining members have elected a new leader.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cluster
            .etcdctl(&["--command-timeout=1s", "put", "k", "v2"])
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "put never succeeded on the surviving members: {}\nm1 log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.log_tail(1, 30)
        );
    }
    cluster.wait_healthy().unwrap();
    assert!(cluster.is_member_healthy(1) && cluster.is_member_healthy(2));

    cluster.restart_member(0).unwrap();
    assert!(cluster.is_member_healthy(0));
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", cluster.member_endpoint(0)))
        .args(["get", "k", "--print-value-only"])
        .output()
        .unwrap();
    assert_eq!(ok(out).trim(), "v2", "restarted member catches up");
}

#[test]
fn cluster_member_restart_without_quorum_does_not_hang() {
    let Some(()) = require_etcd() else { return };
    let mut cluster = EtcdCluster::start(3).unwrap();
    ok(cluster.etcdctl(&["put", "k", "v"]).unwrap());
    cluster.kill_member(1);
    cluster.kill_member(2);
    // Only 2 of 3 up after this: no quorum until the second restart.
    cluster.restart_member(1).unwrap();
    cluster.restart_member(2).unwrap();
    cluster.wait_healthy().unwrap();
    for i in 0..3 {
        assert!(cluster.is_member_running(i));
        assert!(cluster.is_member_healthy(i));
    }
    let out = ok(cluster
        .etcdctl(&["get", "k", "--print-value-only"])
        .unwrap());
    assert_eq!(out.trim(), "v");
}

#[test]
fn cluster_drop_stops_all_members() {
    let Some(()) = require_etcd() else { return };
    let cluster = EtcdCluster::start(3).unwrap();
    let ports: Vec<u16> = cluster
        .endpoints()
        .iter()
        .map(|e| e.rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    drop(cluster);
    for port in ports {
        eventually("member port closed", Duration::from_secs(5), || {
            !accepts(port)
        });
    }
}

#[test]
fn zero_member_cluster_is_rejected() {
    let err = EtcdCluster::start(0).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn restart_reports_error_with_log_when_port_is_taken() {
    let Some(()) = require_etcd() else { return };
    let mut node = EtcdNode::start().unwrap();
    ok(node.etcdctl(&["put", "k", "v"]).unwrap());
    node.kill();
    // Block the peer port (the client port would make the /health probe
    // hang on a listener that never answers, which only slows the test).
    let blocker = std::net::TcpListener::bind(("127.0.0.1", node.peer_port())).unwrap();
    let err = node.restart().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("exited"), "{msg}");
    assert!(msg.contains("address already in use"), "{msg}");
    assert!(!node.is_running());
    // Once the port is free again, restart works and the data is still there.
    drop(blocker);
    node.restart().unwrap();
    assert_eq!(get(&node, "k"), "v");
}
