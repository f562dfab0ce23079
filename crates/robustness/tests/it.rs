//! The robustness check in its short form, on both backends: random
//! conflicting traffic while the registry is killed and restarted and the
//! clients' connections are cut and the history compacted, then the recorded history checked for
//! linearizability and every watch response validated against it. Real
//! etcd is the control: if it fails there, the checker is wrong.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use muster_robustness::lease::Outage;
use muster_robustness::linearizability::CheckOptions;
use muster_robustness::report::Report;
use muster_robustness::traffic::{self, Target, TrafficConfig};
use muster_testkit::{Registry, TcpProxy};

/// The seed: `MUSTER_ROBUSTNESS_SEED` to repeat a failing run, else new.
fn seed() -> u64 {
    std::env::var("MUSTER_ROBUSTNESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(clock_seed)
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

fn check(recorded: &traffic::Recorded, outages: &[Outage], seed: u64, what: &str) {
    let ops = recorded.history.operations.len();
    let unknown = recorded
        .history
        .operations
        .iter()
        .filter(|op| !op.is_known())
        .count();
    let started = Instant::now();
    let report = Report::with_outages(
        &recorded.history,
        &recorded.watches,
        outages,
        CheckOptions::default(),
    );
    eprintln!(
        "{what}: {ops} operations ({unknown} unknown; {} answers lost, {:?}), {} watch streams, \
         {} leases expired ({} timed, at most {:+.2} s past their TTL); {} (checked in {:?}; seed {seed})",
        recorded.lost_answers,
        recorded.pinned,
        recorded.watches.len(),
        report.leases.expired,
        report.leases.timed,
        report.leases.max_over_ttl.unwrap_or(0.0),
        report.line(),
        started.elapsed()
    );
    assert!(ops > 100, "{what}: too little traffic to check: {ops}");
    // Short leases really expired during the run.
    assert!(
        report.leases.expired > 0,
        "{what}: no lease expired: {:?}",
        report.leases
    );
    // The check can fail: the same history with one read's answer changed
    // is caught.
    let mut corrupted = recorded.history.clone();
    let read = corrupted
        .operations
        .iter_mut()
        .find_map(|op| match &mut op.outcome {
            muster_robustness::history::Outcome::Response(
                muster_robustness::history::Response {
                    body: muster_robustness::history::ResponseBody::Get { kv: Some(kv) },
                    ..
                },
            ) => Some(kv),
            _ => None,
        });
    if let Some(kv) = read {
        kv.value = "never written".into();
        let caught = Report::new(&corrupted, &[], CheckOptions::default());
        assert!(
            !caught.ok(),
            "{what}: a corrupted read passed: {}",
            caught.line()
        );
    }
    if !report.ok() {
        let dir = std::env::temp_dir().join(format!("muster-robustness-{seed}"));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("history.json"), recorded.history.to_json());
        let _ = std::fs::write(dir.join("report.json"), report.to_json());
        panic!(
            "{what}: {} (seed {seed}; history and report in {})",
            report.line(),
            dir.display()
        );
    }
}

/// What the run is doing, for the message if it never ends.
type Phase = Arc<Mutex<&'static str>>;

fn enter(phase: &Phase, what: &'static str) {
    *phase.lock().unwrap_or_else(PoisonError::into_inner) = what;
}

async fn traffic_stays_linearizable_through_kills_and_cuts(node: Box<dyn Registry>) {
    // Every wait inside is bounded; this bounds them all, so that a wait
    // that is not fails here, saying where, instead of holding the suite.
    const WHOLE_RUN: Duration = Duration::from_secs(300);
    let name = node.name().to_string();
    let phase: Phase = Arc::new(Mutex::new("starting"));
    let run = kills_and_cuts(node, phase.clone());
    if tokio::time::timeout(WHOLE_RUN, run).await.is_err() {
        let phase = *phase.lock().unwrap_or_else(PoisonError::into_inner);
        panic!("{name}: not done after {WHOLE_RUN:?}, while {phase}");
    }
}

async fn kills_and_cuts(mut node: Box<dyn Registry>, phase: Phase) {
    let seed = seed();
    let proxy = TcpProxy::start(node.client_port()).unwrap();
    let target = Target {
        endpoint: proxy.endpoint(),
        watch_endpoint: None,
    };
    let config = TrafficConfig {
        clients: 6,
        duration: Duration::from_secs(20),
        seed,
        // Paced, so that the debug build checks the history in seconds.
        rate: 400,
        ..TrafficConfig::default()
    };
    let base = Instant::now();
    let now = move || base.elapsed().as_nanos() as u64;
    let run = tokio::spawn(async move { traffic::run(&target, &config, base).await });
    // The fault schedule (the traffic's timeline, not a wait for a
    // condition): crash and restart, cut and restore, compaction, twice.
    let direct = format!("http://127.0.0.1:{}", node.client_port());
    let mut outages = Vec::new();
    for _ in 0..2 {
        enter(&phase, "running traffic");
        tokio::time::sleep(Duration::from_secs(2)).await;
        enter(&phase, "killing and restarting the registry");
        let start = now();
        node.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        node.restart().unwrap();
        enter(&phase, "waiting for the restarted registry to answer");
        muster_robustness::run::answering(&direct, Duration::from_secs(30)).await;
        outages.push(Outage {
            kind: "kill".into(),
            start,
            end: now(),
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        enter(&phase, "cutting the connections");
        let start = now();
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.restore();
        outages.push(Outage {
            kind: "cut".into(),
            start,
            end: now(),
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        enter(&phase, "compacting");
        muster_robustness::run::compact(&direct).await;
    }
    enter(&phase, "waiting for the traffic and its watch to end");
    let recorded = run.await.unwrap().unwrap();
    enter(&phase, "checking the history");
    check(&recorded, &outages, seed, node.name());
}

muster_testkit::on_both!(traffic_stays_linearizable_through_kills_and_cuts);
