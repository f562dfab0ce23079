//! A whole robustness run: start a registry of its own (`muster serve` or
//! etcd) on a fresh data directory, put the traffic through a cuttable
//! proxy, inject faults on a seeded schedule while it runs (kill -9 and
//! restart on the same data, connections cut and held, compaction, the
//! watch stream dropped), then
//! check the history and the watches and leave everything in a directory.
//! `muster bench robustness` is this.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use muster_proto as pb;

use crate::linearizability::CheckOptions;
use crate::proxy::TcpProxy;
use crate::report::Report;
use crate::traffic::{self, Recorded, Target, TrafficConfig};

/// The registry a run starts and breaks.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `EXE serve --data-dir ...` (this program, usually).
    Muster {
        /// The muster binary.
        exe: PathBuf,
        /// `muster serve --faults SPEC`: the registry's own fault injection
        /// (the one users get) on top of the run's faults. Everything but
        /// `lease-expire-early`, which the model does not know.
        faults: Option<String>,
    },
    /// etcd, single member.
    Etcd {
        /// The etcd binary.
        binary: PathBuf,
    },
}

impl Backend {
    /// `muster` or `etcd`.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Muster { .. } => "muster",
            Backend::Etcd { .. } => "etcd",
        }
    }
}

/// A fault a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// kill -9 of the registry, restarted on the same data directory.
    Kill,
    /// Every client connection cut, and new ones refused, for a while.
    Cut,
    /// History compacted at the current revision (watchers behind it are
    /// told so).
    Compact,
    /// The watcher's stream (its connection) dropped: it must resume from
    /// the revision after the last one it was sent.
    DropWatch,
}

impl FaultKind {
    /// Its name in `--faults`.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Cut => "cut",
            FaultKind::Compact => "compact",
            FaultKind::DropWatch => "drop-watch",
        }
    }
}

/// `kill,cut,compact,drop-watch` (any subset, or `none`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultList(pub Vec<FaultKind>);

impl FromStr for FaultList {
    type Err = String;

    fn from_str(s: &str) -> Result<FaultList, String> {
        if s.trim() == "none" {
            return Ok(FaultList(Vec::new()));
        }
        let mut out = Vec::new();
        for item in s.split(',').map(str::trim) {
            let kind = match item {
                "kill" => FaultKind::Kill,
                "cut" => FaultKind::Cut,
                "compact" => FaultKind::Compact,
                "drop-watch" => FaultKind::DropWatch,
                other => {
                    return Err(format!(
                        "unknown fault {other:?}; known: kill, cut, compact, drop-watch (or none)"
                    ));
                }
            };
            if !out.contains(&kind) {
                out.push(kind);
            }
        }
        Ok(FaultList(out))
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The registry.
    pub backend: Backend,
    /// The traffic (its seed also drives the fault schedule).
    pub traffic: TrafficConfig,
    /// The faults to choose from; one every `fault_every` on average.
    pub faults: Vec<FaultKind>,
    /// Mean time between faults.
    pub fault_every: Duration,
    /// Where the data directory, logs, history and report go.
    pub dir: PathBuf,
    /// The linearizability check's time budget.
    pub check_timeout: Duration,
}

/// What a run found.
#[derive(Debug)]
pub struct Summary {
    /// Operations in the checked history.
    pub operations: usize,
    /// Of which with unknown outcome (after the watch resolved what it
    /// could).
    pub unknown: usize,
    /// Answers lost (unknown outcome) before the watch resolved them.
    pub lost_answers: usize,
    /// Lost deletes and revokes pinned or dropped by the watch.
    pub pinned: crate::pin::PinStats,
    /// Watch streams recorded.
    pub watches: usize,
    /// Faults injected, in order.
    pub injected: Vec<FaultKind>,
    /// When they interrupted the registry or the watch.
    pub outages: Vec<crate::lease::Outage>,
    /// What the registry's own `--faults` injected, by fault (as its
    /// `/metrics` counted them at the end, since its last restart).
    pub registry_faults: Vec<(String, u64)>,
    /// The verdict.
    pub report: Report,
    /// How long the check took.
    pub checked_in: Duration,
    /// The directory holding everything.
    pub dir: PathBuf,
}

impl Summary {
    /// Faults injected, counted by kind: `kill 3, cut 2, compact 1`.
    pub fn faults_text(&self) -> String {
        let mut parts = Vec::new();
        for kind in [
            FaultKind::Kill,
            FaultKind::Cut,
            FaultKind::Compact,
            FaultKind::DropWatch,
        ] {
            let n = self.injected.iter().filter(|k| **k == kind).count();
            if n > 0 {
                parts.push(format!("{} {n}", kind.name()));
            }
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}

/// A registry process on a fixed port and data directory.
struct Node {
    backend: Backend,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    peer_port: u16,
    http_port: u16,
    child: Option<Child>,
}

impl Node {
    fn new(backend: Backend, dir: &Path) -> Result<Node, String> {
        Ok(Node {
            backend,
            data: dir.join("data"),
            log: dir.join("registry.log"),
            port: free_port()?,
            peer_port: free_port()?,
            http_port: free_port()?,
            child: None,
        })
    }

    fn start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot write {}: {e}", self.log.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot write {}: {e}", self.log.display()))?;
        let client = format!("http://127.0.0.1:{}", self.port);
        let mut cmd = match &self.backend {
            Backend::Muster { exe, faults } => {
                let mut c = Command::new(exe);
                c.arg("serve")
                    .arg("--data-dir")
                    .arg(&self.data)
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{}", self.port))
                    .arg("--http-listen")
                    .arg(format!("127.0.0.1:{}", self.http_port));
                if let Some(spec) = faults {
                    c.arg("--faults").arg(spec);
                }
                c
            }
            Backend::Etcd { binary } => {
                let peer = format!("http://127.0.0.1:{}", self.peer_port);
                let mut c = Command::new(binary);
                c.arg("--name")
                    .arg("robustness")
                    .arg("--data-dir")
                    .arg(&self.data)
                    .arg("--listen-client-urls")
                    .arg(&client)
                    .arg("--advertise-client-urls")
                    .arg(&client)
                    .arg("--listen-peer-urls")
                    .arg(&peer)
                    .arg("--initial-advertise-peer-urls")
                    .arg(&peer)
                    .arg("--initial-cluster")
                    .arg(format!("robustness={peer}"));
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.backend.name()))?;
        self.child = Some(child);
        // Ready once it accepts connections and answers a range.
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                // Its last words (a refused flag, a data directory in use)
                // say more than the status.
                let last = std::fs::read_to_string(&self.log)
                    .ok()
                    .and_then(|log| last_words(&log))
                    .unwrap_or_default();
                return Err(format!(
                    "{} exited ({status}): {last}; see {}",
                    self.backend.name(),
                    self.log.display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not listen within 30 s; see {}",
                    self.backend.name(),
                    self.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `muster_faults_injected_total` by fault, from the registry's
    /// `/metrics` (empty for etcd, or when it cannot be read).
    fn faults_injected(&self) -> Vec<(String, u64)> {
        use std::io::{Read, Write};
        if !matches!(
            self.backend,
            Backend::Muster {
                faults: Some(_),
                ..
            }
        ) {
            return Vec::new();
        }
        let Ok(mut conn) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.http_port)) else {
            return Vec::new();
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut body = String::new();
        if conn
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .and_then(|()| conn.read_to_string(&mut body))
            .is_err()
        {
            return Vec::new();
        }
        parse_injected(&body)
    }

    /// SIGKILL: no shutdown, no flush.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The line of a registry's log that says why it stopped: its last error
/// line (clap's usage hint comes after it), else its last line.
fn last_words(log: &str) -> Option<String> {
    let lines = || log.lines().rev().map(str::trim).filter(|l| !l.is_empty());
    lines()
        .find(|l| l.to_ascii_lowercase().contains("error"))
        .or_else(|| lines().next())
        .map(str::to_owned)
}

/// The `muster_faults_injected_total{fault="NAME"} N` lines of a metrics
/// text, the faults that acted.
fn parse_injected(metrics: &str) -> Vec<(String, u64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("muster_faults_injected_total{fault=\""))
        .filter_map(|rest| {
            let (name, value) = rest.split_once("\"} ")?;
            let n = value.trim().parse::<f64>().ok()? as u64;
            (n > 0).then(|| (name.to_string(), n))
        })
        .collect()
}

/// Waits until the registry at `endpoint` answers a linearizable read, or
/// `within` passed.
pub async fn answering(endpoint: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    let Ok(ch) = tonic::transport::Channel::from_shared(endpoint.to_string()) else {
        return;
    };
    let ch = ch.connect_timeout(Duration::from_secs(1)).connect_lazy();
    let mut kv = pb::kv_client::KvClient::new(ch);
    while tokio::time::Instant::now() < deadline {
        let read = tokio::time::timeout(
            Duration::from_secs(1),
            kv.range(pb::RangeRequest {
                key: b"key-".to_vec(),
                ..Default::default()
            }),
        )
        .await;
        if matches!(read, Ok(Ok(_))) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Compacts at the registry's current revision (`endpoint`:
/// `http://host:port`); false if it could not.
pub async fn compact(endpoint: &str) -> bool {
    let Ok(ch) = tonic::transport::Channel::from_shared(endpoint.to_string()) else {
        return false;
    };
    let Ok(ch) = ch.connect_timeout(Duration::from_secs(1)).connect().await else {
        return false;
    };
    let mut kv = pb::kv_client::KvClient::new(ch);
    let Ok(Ok(r)) = tokio::time::timeout(
        Duration::from_secs(2),
        kv.range(pb::RangeRequest {
            key: b"key-".to_vec(),
            ..Default::default()
        }),
    )
    .await
    else {
        return false;
    };
    let revision = r.into_inner().header.map_or(0, |h| h.revision);
    let compacted = tokio::time::timeout(
        Duration::from_secs(2),
        kv.compact(pb::CompactionRequest {
            revision,
            physical: false,
        }),
    )
    .await;
    matches!(compacted, Ok(Ok(_)))
}

/// Runs, checks, and writes `history.json`, `watches.json` and
/// `report.json` (with a minimal failing excerpt when there is one) into
/// `config.dir`.
pub async fn run(config: &RunConfig) -> Result<Summary, String> {
    // The model starts from an empty registry: a data directory left by an
    // earlier run would start this one mid-history.
    if config.dir.join("data").exists() {
        return Err(format!(
            "{} already holds a run (its data/); choose another directory or remove it",
            config.dir.display()
        ));
    }
    if let Backend::Muster {
        faults: Some(spec), ..
    } = &config.backend
        && spec.contains("lease-expire-early")
    {
        return Err(
            "lease-expire-early cannot be checked: it breaks the lease TTL guarantee on \
             purpose, which the run checks (it would only be reported); leave it out of the \
             registry's faults"
                .into(),
        );
    }
    std::fs::create_dir_all(&config.dir)
        .map_err(|e| format!("cannot create {}: {e}", config.dir.display()))?;
    let mut node = Node::new(config.backend.clone(), &config.dir)?;
    node.start()?;
    let direct = format!("http://127.0.0.1:{}", node.port);
    let proxy = TcpProxy::start(node.port).map_err(|e| format!("cannot start the proxy: {e}"))?;
    let watch_proxy =
        TcpProxy::start(node.port).map_err(|e| format!("cannot start the proxy: {e}"))?;
    let target = Target {
        endpoint: proxy.endpoint(),
        watch_endpoint: Some(watch_proxy.endpoint()),
    };
    let base = Instant::now();
    let traffic_config = config.traffic.clone();
    let traffic = tokio::spawn(async move { traffic::run(&target, &traffic_config, base).await });

    // The fault schedule, seeded: waits of half to one and a half times the
    // mean between faults, none in the last second of traffic.
    let mut rng = fastrand::Rng::with_seed(config.traffic.seed ^ 0x5eed_fa17);
    let mut injected = Vec::new();
    let mut outages = Vec::new();
    let now = || u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let end = base + config.traffic.duration;
    if !config.faults.is_empty() {
        loop {
            let wait = config.fault_every.mul_f64(0.5 + rng.f64());
            if Instant::now() + wait + Duration::from_secs(1) > end {
                break;
            }
            tokio::time::sleep(wait).await;
            let kind = config.faults[rng.usize(..config.faults.len())];
            let start = now();
            match kind {
                FaultKind::Kill => {
                    node.kill();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    tokio::task::block_in_place(|| node.start())?;
                    // Over when it answers a linearizable read (etcd: once
                    // its member is leader, which renews every lease).
                    answering(&direct, Duration::from_secs(30)).await;
                }
                FaultKind::Cut => {
                    proxy.cut();
                    watch_proxy.cut();
                    tokio::time::sleep(Duration::from_millis(300 + rng.u64(..700))).await;
                    proxy.restore();
                    watch_proxy.restore();
                }
                FaultKind::DropWatch => {
                    // Closes the watcher's connection; it reconnects at once.
                    watch_proxy.cut();
                    watch_proxy.restore();
                }
                FaultKind::Compact => {
                    if !compact(&direct).await {
                        continue;
                    }
                }
            }
            if kind != FaultKind::Compact {
                outages.push(crate::lease::Outage {
                    kind: kind.name().to_string(),
                    start,
                    end: now(),
                });
            }
            injected.push(kind);
        }
    }
    let Recorded {
        history,
        watches,
        lost_answers,
        pinned,
    } = traffic
        .await
        .map_err(|e| format!("the traffic panicked: {e}"))??;
    drop(proxy);
    drop(watch_proxy);
    // Read before the kill: the counters live in the process.
    let registry_faults = node.faults_injected();
    node.kill();

    let write = |name: &str, text: String| {
        let path = config.dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write("history.json", history.to_json())?;
    write(
        "watches.json",
        serde_json::to_string_pretty(&watches).unwrap_or_default(),
    )?;
    write(
        "outages.json",
        serde_json::to_string_pretty(&outages).unwrap_or_default(),
    )?;
    let started = Instant::now();
    let options = CheckOptions {
        timeout: Some(config.check_timeout),
        ..CheckOptions::default()
    };
    let report = Report::with_outages(&history, &watches, &outages, options);
    let checked_in = started.elapsed();
    write("report.json", report.to_json())?;
    Ok(Summary {
        operations: history.operations.len(),
        // What the search has to place or leave out: keep-alives of unknown
        // outcome change nothing it sees.
        unknown: history
            .operations
            .iter()
            .filter(|op| {
                !op.is_known()
                    && !matches!(op.request, crate::history::Request::LeaseKeepAlive { .. })
            })
            .count(),
        watches: watches.len(),
        lost_answers,
        pinned,
        injected,
        outages,
        registry_faults,
        report,
        checked_in,
        dir: config.dir.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_registrys_faults_did() {
        let metrics = "# HELP muster_faults_injected_total x\n\
            muster_faults_injected_total{fault=\"drop-watch\"} 3\n\
            muster_faults_injected_total{fault=\"latency\"} 1200\n\
            muster_faults_injected_total{fault=\"compact\"} 0\n\
            muster_faults_unavailable 0\n";
        assert_eq!(
            parse_injected(metrics),
            [("drop-watch".to_string(), 3), ("latency".to_string(), 1200)]
        );
        assert!(parse_injected("").is_empty());
    }

    #[test]
    fn a_registry_that_stopped_says_why() {
        let clap = "error: invalid value 'x' for '--faults <FAULTS>': unknown fault\n\nFor more information, try '--help'.\n";
        assert_eq!(
            last_words(clap).unwrap(),
            "error: invalid value 'x' for '--faults <FAULTS>': unknown fault"
        );
        assert_eq!(last_words("starting\nlistening\n\n").unwrap(), "listening");
        assert_eq!(last_words(""), None);
    }

    #[test]
    fn fault_lists_parse() {
        assert_eq!(
            "kill,cut,compact".parse::<FaultList>().unwrap().0,
            [FaultKind::Kill, FaultKind::Cut, FaultKind::Compact]
        );
        assert_eq!("cut, cut".parse::<FaultList>().unwrap().0, [FaultKind::Cut]);
        assert!("none".parse::<FaultList>().unwrap().0.is_empty());
        let e = "kill,explode".parse::<FaultList>().unwrap_err();
        assert!(e.contains("unknown fault \"explode\""), "{e}");
    }
}
