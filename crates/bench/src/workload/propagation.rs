//! `propagation`: how long a change takes to reach every caller.
//!
//! `--callers` callers each follow one service with their own
//! [`muster::Discovery`] on their own [`muster::Etcd`] handle (one
//! connection and one watch stream each, as separate clients have; with
//! `--callers-per-connection M`, M callers share a handle, each still with
//! its own discovery, table and watch). Then a [`muster::Registrar`]
//! registers an instance, waits until every caller's table shows it,
//! deregisters it, waits again, and so on for `--rounds` rounds, one change
//! at a time, while `--load-clients` clients put random keys of the
//! keyspace. Round 0 is a warm-up (every watch is then live) and is not
//! counted.
//!
//! For each change the clock runs from the registrar's call returning (the
//! registry acknowledged its transaction) to a caller's table showing the
//! change: the caller wakes on its service's version channel (as
//! `Service::wait_for` does), reads the snapshot and takes the moment the
//! discovery published it (`Snapshot::published_at`), when every picker on
//! that table had the change, rather than when its own task got to run
//! (with 1000 callers, a thousand tasks queue behind the tables they
//! watch). Every (caller, change)
//! pair is recorded, and per change the last caller's. A caller may see a
//! change before the registrar's call returns (the watch event overtakes
//! the transaction's reply on its way back through the registrar's task):
//! such a sighting counts as 0 and is reported in `before_ack`.
//!
//! With `--caller-processes P` the callers live in P child processes: this
//! program run again with its own arguments and the hidden
//! `--caller-child SERVICE,CALLERS,FIRST`. Each child follows with its
//! share of the callers, prints `ready`, then one line `seen CALLER CHANGE
//! NANOS` per sighting, until its standard input closes. An `Instant` has
//! no value that could be printed and compared in another process, so
//! across processes both ends stamp with the wall clock (`SystemTime`,
//! nanoseconds since the Unix epoch): processes on one machine read the
//! same clock, and only a step of it (NTP) during the run would skew a
//! figure. Callers in this process use the monotonic clock. The report
//! says which (`clock`).

use std::ffi::OsString;
use std::io::{Read as _, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use muster::{Config, Discovery, DiscoveryConfig, Etcd, Instance, Registrar, RegistrarConfig};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::args::Plan;
use crate::clients::KvWorker;
use crate::error::Error;
use crate::recorder::{Latencies, Recorder, Summary};
use crate::report::{Format, Report};
use crate::units::three_decimals;

/// How long one change may take to reach every caller.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long setting up every caller may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Caller connections set up at once.
const SETUP_PARALLELISM: usize = 32;
/// The address every registered instance has (a documentation address:
/// never dialed).
const ADDR: &str = "192.0.2.1:8080";

/// The JSON fields of `propagation`.
#[derive(Debug, Serialize)]
pub(crate) struct Fields {
    callers: usize,
    caller_processes: usize,
    callers_per_connection: usize,
    caller_connections: usize,
    rounds: usize,
    changes: usize,
    /// `monotonic` (callers in this process) or `wall` (in child
    /// processes).
    clock: &'static str,
    sightings: u64,
    expected: u64,
    before_ack: u64,
    load_clients: usize,
    load_connections: usize,
    load_ops: u64,
    #[serde(serialize_with = "three_decimals")]
    load_ops_per_sec: f64,
    load_errors: u64,
    last_caller_latency_ms: Option<Summary>,
    each_caller_latency_ms: Option<Summary>,
    last_caller_since_call_ms: Option<Summary>,
    each_caller_since_call_ms: Option<Summary>,
    registrar_latency_ms: Option<Summary>,
    load_latency_ms: Option<Summary>,
}

/// Runs `propagation` once per `--callers` value, writing each report as
/// it is done; fails at the end if a run failed. As a caller process
/// (`--caller-child`), follows and prints sightings instead.
pub(crate) async fn run(plan: &Plan<'_>, format: Format, mut out: impl Write) -> Result<(), Error> {
    if let Some(spec) = &plan.args.caller_child {
        return child(plan, spec, out).await;
    }
    let mut failed = None;
    for (row, &callers) in plan.args.callers.iter().enumerate() {
        let report = run_one(plan, callers as usize, row).await?;
        match crate::finish(report, plan, format, &mut out) {
            Ok(()) => {}
            Err(e @ Error::Failed { .. }) => {
                failed.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Which clock a [`Stamp`] was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// `Instant`, as nanoseconds since the run's base instant.
    Monotonic,
    /// `SystemTime`, as nanoseconds since the Unix epoch.
    Wall,
}

/// A moment on one of the clocks, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    clock: Clock,
    nanos: i64,
}

/// Reads the clocks against one base instant.
#[derive(Debug, Clone, Copy)]
struct Clocks {
    base: Instant,
}

impl Clocks {
    fn new() -> Clocks {
        Clocks {
            base: Instant::now(),
        }
    }

    fn now(&self, clock: Clock) -> Stamp {
        let nanos = match clock {
            Clock::Monotonic => i64::try_from(self.base.elapsed().as_nanos()).unwrap_or(i64::MAX),
            Clock::Wall => wall_nanos(),
        };
        Stamp { clock, nanos }
    }

    /// `at`, a moment in the past, on `clock` (on the wall clock: now less
    /// the time since).
    fn at(&self, clock: Clock, at: Instant) -> Stamp {
        let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        let nanos = match clock {
            Clock::Monotonic => nanos(at.saturating_duration_since(self.base)),
            Clock::Wall => wall_nanos().saturating_sub(nanos(at.elapsed())),
        };
        Stamp { clock, nanos }
    }

    /// Now on both clocks, read back to back.
    fn ack(&self) -> Ack {
        Ack {
            monotonic: self.now(Clock::Monotonic).nanos,
            wall: self.now(Clock::Wall).nanos,
        }
    }
}

/// Nanoseconds since the Unix epoch (0 for a clock set before it).
fn wall_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// When the registrar's call returned, on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ack {
    monotonic: i64,
    wall: i64,
}

impl Ack {
    fn on(&self, clock: Clock) -> i64 {
        match clock {
            Clock::Monotonic => self.monotonic,
            Clock::Wall => self.wall,
        }
    }
}

/// Sightings against one reference moment per change: every (caller,
/// change) pair, and per change its last caller.
#[derive(Debug, Default)]
struct Spread {
    each: Latencies,
    last: Latencies,
    /// Sightings stamped before the reference (counted as 0).
    early: u64,
}

impl Spread {
    /// One change, whose reference moment is `from`, seen at `seen` (one
    /// stamp per caller that saw it).
    fn change(&mut self, from: Ack, seen: &[Stamp]) {
        let mut last = None;
        for stamp in seen {
            let delay = stamp.nanos.saturating_sub(from.on(stamp.clock));
            let delay = u64::try_from(delay).unwrap_or_else(|_| {
                self.early += 1;
                0
            });
            self.each.record_nanos(delay);
            last = Some(last.map_or(delay, |l: u64| l.max(delay)));
        }
        if let Some(last) = last {
            self.last.record_nanos(last);
        }
    }
}

/// The statistics of a run: from the registrar's call returning (the
/// acknowledgement), and from its start.
#[derive(Debug, Default)]
struct Tally {
    from_ack: Spread,
    from_call: Spread,
}

impl Tally {
    /// One change: the registrar's call started at `call` and returned at
    /// `ack`; the callers saw it at `seen`.
    fn change(&mut self, call: Ack, ack: Ack, seen: &[Stamp]) {
        self.from_ack.change(ack, seen);
        self.from_call.change(call, seen);
    }
}

/// The instance change `k` is about: round `k / 2`'s.
fn instance_id(change: usize) -> String {
    format!("p{}", change / 2)
}

/// Whether `snapshot` shows change `k`: a registration (even `k`) adds its
/// instance, the deregistration after it (odd `k`) removes it.
#[cfg(test)]
fn shows(snapshot: &muster::discovery::Snapshot, change: usize) -> bool {
    shown(change, snapshot.get(&instance_id(change)).is_some())
}

/// Whether change `k` is shown by a table that has (`present`) or lacks
/// its instance.
fn shown(change: usize, present: bool) -> bool {
    present == change.is_multiple_of(2)
}

/// What callers (here or in child processes) tell the coordinator.
#[derive(Debug)]
enum Msg {
    /// Caller `caller` saw change `change` at `at`.
    Seen {
        caller: usize,
        change: usize,
        at: Stamp,
    },
    /// A caller process has every caller following.
    Ready,
    /// A caller process ended or spoke nonsense.
    Failed(String),
}

/// Counts the sightings of the change being made, so that the coordinator
/// is woken once per change, by its last sighting, rather than by every
/// one: with 1000 callers, a wake-up per sighting is work on the very
/// cores the change is propagating on.
#[derive(Debug)]
struct Progress {
    /// The change being made.
    change: AtomicUsize,
    /// Its sightings so far.
    seen: AtomicUsize,
    /// Sightings that complete a change.
    callers: usize,
    done: Notify,
}

impl Progress {
    fn new(callers: usize) -> Arc<Progress> {
        Arc::new(Progress {
            change: AtomicUsize::new(usize::MAX),
            seen: AtomicUsize::new(0),
            callers,
            done: Notify::new(),
        })
    }

    /// Change `change` is being made; none of its sightings is counted yet.
    fn begin(&self, change: usize) {
        self.seen.store(0, Ordering::Release);
        self.change.store(change, Ordering::Release);
    }

    /// Counts a sighting of `change` (already queued for the coordinator).
    fn saw(&self, change: usize) {
        if self.change.load(Ordering::Acquire) == change
            // `>=`: a sighting of the previous change that raced with
            // `begin` may have been counted; the coordinator then wakes
            // one sighting early, finds one missing and waits again.
            && self.seen.fetch_add(1, Ordering::AcqRel) + 1 >= self.callers
        {
            self.done.notify_one();
        }
    }

    /// Wakes the coordinator to look at its queue (a failure, a caller
    /// stopping).
    fn wake(&self) {
        self.done.notify_one();
    }
}

/// Where callers report: the coordinator's queue, and the count that
/// wakes it.
#[derive(Debug, Clone)]
struct Reporter {
    tx: mpsc::UnboundedSender<Msg>,
    progress: Arc<Progress>,
}

impl Reporter {
    /// Queues `msg` for the coordinator; false once it is gone.
    fn send(&self, msg: Msg) -> bool {
        match msg {
            Msg::Seen { change, .. } => {
                let sent = self.tx.send(msg).is_ok();
                self.progress.saw(change);
                sent
            }
            msg => {
                let sent = self.tx.send(msg).is_ok();
                self.progress.wake();
                sent
            }
        }
    }
}

/// One caller: waits on its service's version channel and reports each
/// change its table shows, in order, until it has seen `changes` of them,
/// each at the moment the table showing it was published (when a picker
/// on that table would have had it), not when this task got to look.
async fn follow(
    service: muster::Service,
    caller: usize,
    changes: usize,
    clock: Clock,
    clocks: Clocks,
    reporter: Reporter,
) {
    let mut version = service.version();
    let mut next = 0;
    // The id change `next` is about, made once per change rather than on
    // every look at the table.
    let mut id = instance_id(next);
    loop {
        let snapshot = service.snapshot();
        let at = match snapshot.published_at() {
            Some(published) => clocks.at(clock, published),
            None => clocks.now(clock),
        };
        while next < changes && shown(next, snapshot.get(&id).is_some()) {
            if !reporter.send(Msg::Seen {
                caller,
                change: next,
                at,
            }) {
                return;
            }
            next += 1;
            if next.is_multiple_of(2) {
                id = instance_id(next);
            }
        }
        if next == changes {
            return;
        }
        if version.changed().await.is_err() {
            // The discovery is gone: the coordinator sees the queue close
            // once every caller is.
            reporter.progress.wake();
            return;
        }
    }
}

/// The library's client configuration for the plan's endpoints.
fn client_config(plan: &Plan<'_>) -> Config {
    let mut config = Config::new(plan.endpoints.iter().cloned());
    config.tls = plan.client_tls.clone();
    if let Some(c) = &plan.credentials {
        config = config.with_credentials(c.user.clone(), c.password.clone());
    }
    config
}

fn setup_error(doing: &'static str) -> impl FnOnce(muster::Error) -> Error {
    move |e| Error::Setup {
        doing,
        cause: e.to_string(),
    }
}

/// Callers `first..first + count` following `service` in this process,
/// `per_connection` to a handle; returns their tasks and how many
/// connections they use.
#[allow(clippy::too_many_arguments)]
async fn start_callers(
    config: &Config,
    service: &str,
    first: usize,
    count: usize,
    per_connection: usize,
    changes: usize,
    clock: Clock,
    clocks: Clocks,
    reporter: &Reporter,
) -> Result<(JoinSet<()>, usize), Error> {
    let per_connection = per_connection.max(1);
    let connections = count.div_ceil(per_connection);
    let mut tasks = JoinSet::new();
    let setup = async {
        let mut setups = JoinSet::new();
        let mut next = 0;
        loop {
            while setups.len() < SETUP_PARALLELISM && next < connections {
                let callers = next * per_connection..((next + 1) * per_connection).min(count);
                next += 1;
                let config = config.clone();
                let service = service.to_string();
                setups.spawn(async move {
                    let etcd = Etcd::connect(config).map_err(setup_error("connecting a caller"))?;
                    let mut followed = Vec::with_capacity(callers.len());
                    for caller in callers {
                        let discovery =
                            Discovery::with_config(etcd.clone(), DiscoveryConfig::default())
                                .map_err(setup_error("configuring discovery"))?;
                        let svc = discovery
                            .service(&service)
                            .await
                            .map_err(setup_error("following the service"))?;
                        followed.push((first + caller, svc));
                    }
                    Ok::<_, Error>(followed)
                });
            }
            let Some(joined) = setups.join_next().await else {
                return Ok::<(), Error>(());
            };
            let followed = joined.map_err(|source| Error::Task {
                what: "a caller's setup",
                source,
            })??;
            for (caller, svc) in followed {
                tasks.spawn(follow(
                    svc,
                    caller,
                    changes,
                    clock,
                    clocks,
                    reporter.clone(),
                ));
            }
        }
    };
    match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(Error::Setup {
                doing: "following the service",
                cause: format!("the callers were not all following within {SETUP_TIMEOUT:?}"),
            });
        }
    }
    Ok((tasks, connections))
}

/// The caller processes of one run.
struct Children {
    processes: Vec<tokio::process::Child>,
    connections: usize,
}

impl Children {
    /// Closes their standard input (they stop), and waits a little for
    /// them to exit before killing them.
    async fn stop(mut self) {
        for p in &mut self.processes {
            drop(p.stdin.take());
        }
        for p in &mut self.processes {
            if tokio::time::timeout(Duration::from_secs(10), p.wait())
                .await
                .is_err()
            {
                let _ = p.kill().await;
            }
        }
    }
}

/// Starts `processes` caller processes sharing `count` callers, each
/// reporting to `reporter`, and waits until every one is following.
async fn start_children(
    plan: &Plan<'_>,
    service: &str,
    count: usize,
    processes: usize,
    reporter: &Reporter,
    rx: &mut mpsc::UnboundedReceiver<Msg>,
) -> Result<Children, Error> {
    let failed = |cause: String| Error::Setup {
        doing: "starting caller processes",
        cause,
    };
    let exe = std::env::current_exe()
        .map_err(|e| failed(format!("cannot find this program to run it again: {e}")))?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let per_connection = (plan.args.callers_per_connection as usize).max(1);
    let mut children = Children {
        processes: Vec::with_capacity(processes),
        connections: 0,
    };
    let mut first = 0;
    for p in 0..processes {
        let share = count / processes + usize::from(p < count % processes);
        let mut process = tokio::process::Command::new(&exe)
            .args(&args)
            .arg("--caller-child")
            .arg(format!("{service},{share},{first}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failed(format!("cannot run {}: {e}", exe.display())))?;
        let stdout = process.stdout.take().expect("stdout is piped");
        tokio::spawn(read_child(p, stdout, reporter.clone()));
        children.processes.push(process);
        children.connections += share.div_ceil(per_connection);
        first += share;
    }
    let mut ready = 0;
    let deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
    while ready < processes {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Msg::Ready)) => ready += 1,
            Ok(Some(Msg::Failed(cause))) => return Err(failed(cause)),
            Ok(Some(Msg::Seen { .. })) => {}
            Ok(None) => return Err(failed("the caller processes ended".into())),
            Err(_) => {
                return Err(failed(format!(
                    "{ready} of {processes} caller processes were following within {SETUP_TIMEOUT:?}"
                )));
            }
        }
    }
    Ok(children)
}

/// Forwards the lines of caller process `p` to the coordinator.
async fn read_child(p: usize, stdout: tokio::process::ChildStdout, reporter: Reporter) {
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let msg = match lines.next_line().await {
            Ok(Some(line)) => match parse_line(&line) {
                Some(msg) => msg,
                None => Msg::Failed(format!("caller process {p} said {line:?}")),
            },
            Ok(None) => Msg::Failed(format!("caller process {p} ended (see its errors above)")),
            Err(e) => Msg::Failed(format!("reading caller process {p}: {e}")),
        };
        let last = matches!(msg, Msg::Failed(_));
        if !reporter.send(msg) || last {
            return;
        }
    }
}

/// A line of a caller process: `ready`, or `seen CALLER CHANGE NANOS`.
fn parse_line(line: &str) -> Option<Msg> {
    if line == "ready" {
        return Some(Msg::Ready);
    }
    let mut words = line.strip_prefix("seen ")?.split(' ');
    let caller = words.next()?.parse().ok()?;
    let change = words.next()?.parse().ok()?;
    let nanos = words.next()?.parse().ok()?;
    words.next().is_none().then_some(Msg::Seen {
        caller,
        change,
        at: Stamp {
            clock: Clock::Wall,
            nanos,
        },
    })
}

/// A caller process: follows with its share of the callers, prints
/// `ready`, then its sightings, until its standard input closes.
async fn child(plan: &Plan<'_>, spec: &str, mut out: impl Write) -> Result<(), Error> {
    let usage = || {
        Error::Usage(format!(
            "--caller-child {spec:?}: expected SERVICE,CALLERS,FIRST"
        ))
    };
    let mut parts = spec.split(',');
    let (Some(service), Some(count), Some(first), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(usage());
    };
    let count: usize = count.parse().map_err(|_| usage())?;
    let first: usize = first.parse().map_err(|_| usage())?;
    let changes = changes(plan);
    let (tx, mut rx) = mpsc::unbounded_channel();
    // Sightings go to the parent as lines; nothing here waits for a count.
    let reporter = Reporter {
        tx,
        progress: Progress::new(usize::MAX),
    };
    let (_callers, _) = start_callers(
        &client_config(plan),
        service,
        first,
        count,
        plan.args.callers_per_connection as usize,
        changes,
        Clock::Wall,
        Clocks::new(),
        &reporter,
    )
    .await?;
    drop(reporter);
    // Standard input closing (the parent is done, or gone) stops it.
    let (eof_tx, mut eof) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = eof_tx.send(());
    });
    let write = |out: &mut dyn Write, text: &str| {
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_ok()
    };
    if !write(&mut out, "ready\n") {
        return Ok(());
    }
    let mut lines = String::new();
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else {
                    // Every caller has seen every change.
                    let _ = eof.await;
                    return Ok(());
                };
                lines.clear();
                let mut next = Some(msg);
                while let Some(msg) = next {
                    if let Msg::Seen { caller, change, at } = msg {
                        lines.push_str(&format!("seen {caller} {change} {}\n", at.nanos));
                    }
                    next = rx.try_recv().ok();
                }
                if !write(&mut out, &lines) {
                    return Ok(());
                }
            }
            _ = &mut eof => return Ok(()),
        }
    }
}

/// How many changes a run makes: a registration and a deregistration per
/// round, and the warm-up pair.
fn changes(plan: &Plan<'_>) -> usize {
    2 * (plan.args.rounds as usize + 1)
}

/// The put load of a run: closed-loop clients until stopped.
struct PutLoad {
    clients: usize,
    connections: usize,
    stop: Arc<AtomicBool>,
    tasks: JoinSet<Recorder>,
    started: Instant,
}

impl PutLoad {
    async fn start(plan: &Plan<'_>, clients: usize) -> Result<PutLoad, Error> {
        let (load, channels) = plan.open(clients).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        for c in 0..load.clients {
            let mut w = KvWorker::new(c, &channels, plan);
            let stop = stop.clone();
            tasks.spawn(async move {
                let mut rec = Recorder::default();
                while !stop.load(Ordering::Relaxed) && !rec.gave_up() {
                    w.put_random(&mut rec).await;
                }
                rec
            });
        }
        Ok(PutLoad {
            clients: load.clients,
            connections: load.connections,
            stop,
            tasks,
            started: Instant::now(),
        })
    }

    /// Stops the clients; their records and how long they ran.
    async fn stop(mut self) -> Result<(Recorder, Duration), Error> {
        self.stop.store(true, Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        let mut all = Recorder::default();
        while let Some(joined) = self.tasks.join_next().await {
            all.merge(joined.map_err(|source| Error::Task {
                what: "a load client",
                source,
            })?);
        }
        Ok((all, elapsed))
    }
}

/// One run with `callers` callers (row `row` of the sweep).
async fn run_one(plan: &Plan<'_>, callers: usize, row: usize) -> Result<Report<Fields>, Error> {
    let args = plan.args;
    let callers = callers.max(1);
    let processes = (args.caller_processes as usize).min(callers);
    let per_connection = (args.callers_per_connection as usize).max(1);
    let rounds = args.rounds as usize;
    let changes = changes(plan);
    let service = format!("bench-propagation-{}-{row}", std::process::id());
    let config = client_config(plan);
    let clocks = Clocks::new();

    let registrar = Registrar::start(
        Etcd::connect(config.clone()).map_err(setup_error("connecting the registrar"))?,
        RegistrarConfig::default().with_grace(Duration::ZERO),
    )
    .await
    .map_err(setup_error("starting the registrar"))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let progress = Progress::new(callers);
    let reporter = Reporter {
        tx,
        progress: progress.clone(),
    };
    let (mut _local, mut children, connections, clock) = if processes == 0 {
        let (tasks, connections) = start_callers(
            &config,
            &service,
            0,
            callers,
            per_connection,
            changes,
            Clock::Monotonic,
            clocks,
            &reporter,
        )
        .await?;
        (Some(tasks), None, connections, Clock::Monotonic)
    } else {
        let children =
            start_children(plan, &service, callers, processes, &reporter, &mut rx).await?;
        let connections = children.connections;
        (None, Some(children), connections, Clock::Wall)
    };
    drop(reporter);
    let load = match args.load_clients {
        0 => None,
        k => Some(PutLoad::start(plan, k as usize).await?),
    };

    let mut tally = Tally::default();
    let mut registrar_calls = Latencies::new();
    let mut failure = None;
    let mut seen_by = vec![false; callers];
    let mut stamps = Vec::with_capacity(callers);
    let mut inbox = Vec::with_capacity(callers);
    'changes: for change in 0..changes {
        let what = if change.is_multiple_of(2) {
            "registration"
        } else {
            "deregistration"
        };
        let id = instance_id(change);
        progress.begin(change);
        let started = Instant::now();
        let call = clocks.ack();
        let done = if change.is_multiple_of(2) {
            registrar
                .register(Instance::new(service.as_str(), id.as_str(), ADDR))
                .await
        } else {
            registrar.deregister(&service, &id).await
        };
        let ack = clocks.ack();
        let took = started.elapsed();
        if let Err(e) = done {
            failure = Some(format!("the {what} of {id} failed: {e}"));
            break;
        }
        seen_by.fill(false);
        stamps.clear();
        // One deadline for the whole change, and one wake-up: a timer and
        // a wake-up per sighting would be work on the callers' cores while
        // the change propagates.
        let deadline = tokio::time::Instant::now() + CHANGE_TIMEOUT;
        let collected = tokio::time::timeout_at(deadline, async {
            loop {
                // Woken by the change's last sighting (or a failure): the
                // sightings are then all queued.
                progress.done.notified().await;
                loop {
                    match rx.try_recv() {
                        Ok(msg) => inbox.push(msg),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            if inbox.is_empty() {
                                return Err("every caller stopped".to_string());
                            }
                            break;
                        }
                    }
                }
                for msg in inbox.drain(..) {
                    match msg {
                        Msg::Seen {
                            caller,
                            change: seen,
                            at,
                        } => {
                            if seen == change && caller < callers && !seen_by[caller] {
                                seen_by[caller] = true;
                                stamps.push(at);
                            }
                        }
                        Msg::Ready => {}
                        Msg::Failed(e) => return Err(e),
                    }
                }
                if stamps.len() >= callers {
                    return Ok(());
                }
            }
        })
        .await;
        match collected {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure = Some(e);
                break 'changes;
            }
            Err(_) => {
                failure = Some(format!(
                    "the {what} of {id} reached {} of {callers} callers within {CHANGE_TIMEOUT:?}",
                    stamps.len()
                ));
                break 'changes;
            }
        }
        // The warm-up pair is not counted.
        if change >= 2 {
            registrar_calls.record(took);
            tally.change(call, ack, &stamps);
        }
    }
    let load = match load {
        Some(load) => {
            let (clients, connections) = (load.clients, load.connections);
            let (rec, elapsed) = load.stop().await?;
            Some((clients, connections, rec, elapsed))
        }
        None => None,
    };
    if let Some(children) = children.take() {
        children.stop().await;
    }
    _local.take();
    let _ = registrar.shutdown().await;

    let expected = (callers * 2 * rounds) as u64;
    let sightings = tally.from_ack.each.len();
    let placement = if processes > 0 {
        format!("in {processes} caller processes")
    } else {
        "in this process".to_string()
    };
    let mut text = vec![
        format!(
            "propagation: {callers} callers {placement} over {connections} connections \
             ({per_connection} per connection), {rounds} registrations and {rounds} \
             deregistrations, {} load clients: {sightings} of {expected} sightings",
            args.load_clients
        ),
        format!(
            "propagation: ack -> last caller {}",
            tally.from_ack.last.text()
        ),
        format!(
            "propagation: ack -> each caller {}",
            tally.from_ack.each.text()
        ),
        format!(
            "propagation: call -> last caller {}",
            tally.from_call.last.text()
        ),
        format!("propagation: registrar call {}", registrar_calls.text()),
    ];
    if tally.from_ack.early > 0 {
        text.push(format!(
            "propagation: {} sightings came before the registrar's call returned (counted as 0)",
            tally.from_ack.early
        ));
    }
    let (load_clients, load_connections, load_ops, load_rate, load_errors, load_latency) =
        match &load {
            Some((clients, connections, rec, elapsed)) => {
                let ops = rec.latencies.len();
                let rate = ops as f64 / elapsed.as_secs_f64().max(1e-9);
                text.push(format!(
                    "propagation: load: {clients} clients over {connections} connections, \
                     {ops} puts, {rate:.0} puts/s, {} errors, latency {}",
                    rec.errors,
                    rec.latencies.text()
                ));
                if failure.is_none() {
                    failure = rec.failure();
                }
                (
                    *clients,
                    *connections,
                    ops,
                    rate,
                    rec.errors,
                    rec.latencies.summary(),
                )
            }
            None => (0, 0, 0, 0.0, 0, None),
        };
    Ok(Report {
        workload: "propagation",
        text,
        failure,
        fields: Fields {
            callers,
            caller_processes: processes,
            callers_per_connection: per_connection,
            caller_connections: connections,
            rounds,
            changes: 2 * rounds,
            clock: match clock {
                Clock::Monotonic => "monotonic",
                Clock::Wall => "wall",
            },
            sightings,
            expected,
            before_ack: tally.from_ack.early,
            load_clients,
            load_connections,
            load_ops,
            load_ops_per_sec: load_rate,
            load_errors,
            last_caller_latency_ms: tally.from_ack.last.summary(),
            each_caller_latency_ms: tally.from_ack.each.summary(),
            last_caller_since_call_ms: tally.from_call.last.summary(),
            each_caller_since_call_ms: tally.from_call.each.summary(),
            registrar_latency_ms: registrar_calls.summary(),
            load_latency_ms: load_latency,
        },
        seed: Some(plan.seed),
        relogins: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mono(nanos: i64) -> Stamp {
        Stamp {
            clock: Clock::Monotonic,
            nanos,
        }
    }

    fn wall(nanos: i64) -> Stamp {
        Stamp {
            clock: Clock::Wall,
            nanos,
        }
    }

    #[test]
    fn each_pair_and_the_last_caller_count_from_the_ack_on_its_clock() {
        let mut tally = Tally::default();
        let call = Ack {
            monotonic: 600,
            wall: 1_699_999_999_999_999_500,
        };
        let ack = Ack {
            monotonic: 1_000,
            wall: 1_700_000_000_000_000_000,
        };
        // 500 ns after the ack, before it (0), and 1.5 µs after on the
        // wall clock (exact figures: below 2048 ns the histogram keeps
        // every nanosecond).
        tally.change(
            call,
            ack,
            &[mono(1_500), mono(900), wall(1_700_000_000_000_001_500)],
        );
        let ack = Ack {
            monotonic: 10_000,
            wall: 0,
        };
        tally.change(ack, ack, &[mono(10_100), mono(10_200)]);
        let each = tally.from_ack.each.summary().unwrap();
        assert_eq!(each.samples, 5);
        assert_eq!((each.p50, each.max), (200, 1_500));
        let last = tally.from_ack.last.summary().unwrap();
        assert_eq!(last.samples, 2, "one per change");
        assert_eq!((last.p50, last.max), (200, 1_500));
        assert_eq!(tally.from_ack.early, 1);
        // From the call's start: 900, 300 and 2000 ns, then 100 and 200.
        let since_call = tally.from_call.each.summary().unwrap();
        assert_eq!((since_call.p50, since_call.max), (300, 2_000));
        assert_eq!(tally.from_call.last.summary().unwrap().p50, 200);
        assert_eq!(tally.from_call.early, 0);
        // A change no caller saw adds nothing.
        tally.change(ack, ack, &[]);
        assert_eq!(tally.from_ack.last.len(), 2);
    }

    #[test]
    fn registrations_add_and_deregistrations_remove() {
        let empty = muster::discovery::Snapshot::default();
        assert!(!shows(&empty, 0), "p0 is not registered yet");
        assert!(shows(&empty, 1), "p0 is gone");
        assert!(shown(0, true) && !shown(1, true));
        assert!(shown(4, true) && shown(5, false));
        assert_eq!(instance_id(4), "p2");
        assert_eq!(instance_id(5), "p2");
    }

    #[test]
    fn caller_process_lines() {
        assert!(matches!(parse_line("ready"), Some(Msg::Ready)));
        match parse_line("seen 7 12 1700000000000000123") {
            Some(Msg::Seen { caller, change, at }) => {
                assert_eq!((caller, change), (7, 12));
                assert_eq!(at, wall(1_700_000_000_000_000_123));
            }
            other => panic!("{other:?}"),
        }
        for bad in ["seen 1 2", "seen 1 2 3 4", "seen a 2 3", "hello", ""] {
            assert!(parse_line(bad).is_none(), "{bad:?}");
        }
    }
}
