//! `muster demo`: the whole system in one command.
//!
//! It starts the embedded registry (in memory, on a free port), three
//! `user` service instances (child processes of this binary, each
//! registering itself under a 5 s lease it keeps alive, as in the seed
//! scenario) and the gateway routing `/user` to them. Then it sends traffic
//! and shows:
//!
//! 1. how requests spread over the three instances;
//! 2. an instance killed with SIGKILL mid-traffic: the gateway retries its
//!    requests on the others (no request fails) and the instance leaves the
//!    pool when it is ejected or its lease expires;
//! 3. an instance drained gracefully (SIGTERM: it marks itself draining,
//!    keeps serving through a grace period, then deregisters): no request
//!    fails either.
//!
//! It prints a timeline and exits 0 when no request failed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use muster::{Discovery, DiscoveryConfig, Instance, Registrar, RegistrarConfig};
use muster_gateway::{Gateway, GatewayConfig, Route};
use muster_server::{Server, ServerConfig};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::global::GlobalArgs;

/// The demo's service.
const SERVICE: &str = "user";
/// How many instances it starts.
const INSTANCES: usize = 3;
/// The seed scenario's lease TTL.
const TTL: Duration = Duration::from_secs(5);
/// How long a draining instance keeps serving before it deregisters.
const GRACE: Duration = Duration::from_secs(2);
/// How long to wait for anything that should happen soon.
const DEADLINE: Duration = Duration::from_secs(30);

/// Flags of `muster demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Concurrent requests while traffic flows.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    concurrency: u32,
    /// Requests of the first phase (spreading).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
    requests: u32,
    /// Run as one of the demo's service instances (used by the demo itself).
    #[arg(long, hide = true, value_name = "ID")]
    instance: Option<String>,
}

/// Runs the demo (or, with `--instance`, one of its instances).
pub async fn run(global: &GlobalArgs, args: DemoArgs) -> anyhow::Result<()> {
    if let Some(id) = &args.instance {
        return run_instance(global, id).await;
    }
    Demo::new().run(args).await
}

/// One `user` instance: an HTTP server answering `GET /user` with its id,
/// registered under a 5 s lease; SIGTERM drains it gracefully.
async fn run_instance(global: &GlobalArgs, id: &str) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let etcd = global.connect()?;
    let config = RegistrarConfig::default()
        .with_ttl(TTL)
        .with_grace(GRACE)
        .with_prefix(global.prefix().to_string());
    let registrar = Registrar::start(etcd, config).await?;
    let instance = Instance::new(SERVICE, id, format!("http://{addr}"))
        .with_version("1.0.0")
        .with_zone("local");
    registrar.register(instance).await?;
    let body = format!("{{\"service\":\"{SERVICE}\",\"instance\":\"{id}\"}}\n");
    let app = axum::Router::new().route(
        "/user",
        axum::routing::get(move || {
            let body = body.clone();
            async move { ([("content-type", "application/json")], body) }
        }),
    );
    // The parent waits for this line.
    println!("ready {addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    term.recv().await;
    // Draining, still serving through the grace period, then deregistered.
    registrar.shutdown().await?;
    let _ = stop_tx.send(());
    server.await??;
    Ok(())
}

/// The demo's state: the timeline and the traffic counters.
struct Demo {
    start: Instant,
}

/// One child instance.
struct Child1 {
    id: String,
    addr: SocketAddr,
    child: Child,
}

/// Traffic sent through the gateway.
#[derive(Default)]
struct Traffic {
    sent: AtomicU64,
    failed: AtomicU64,
    by_instance: std::sync::Mutex<BTreeMap<String, u64>>,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Traffic {
    fn take(&self) -> (u64, u64, BTreeMap<String, u64>) {
        let by = std::mem::take(&mut *self.by_instance.lock().expect("traffic lock"));
        (
            self.sent.swap(0, Ordering::Relaxed),
            self.failed.swap(0, Ordering::Relaxed),
            by,
        )
    }
}

impl Demo {
    fn new() -> Demo {
        Demo {
            start: Instant::now(),
        }
    }

    fn say(&self, what: &str, text: impl AsRef<str>) {
        println!(
            "{:>7.2}s  {what:<9} {}",
            self.start.elapsed().as_secs_f64(),
            text.as_ref()
        );
    }

    async fn run(&self, args: DemoArgs) -> anyhow::Result<()> {
        // 1. The registry.
        let server = Server::start(
            ServerConfig::in_memory().with_listen("127.0.0.1:0".parse().expect("address")),
        )
        .await
        .context("cannot start the embedded registry")?;
        let endpoint = server.endpoint();
        self.say(
            "registry",
            format!("embedded registry on {endpoint} (in memory)"),
        );

        // 2. Three instances, as child processes.
        let mut children = Vec::new();
        for n in 1..=INSTANCES {
            let child = spawn_instance(&endpoint, &format!("{SERVICE}-{n}")).await?;
            self.say(
                "instance",
                format!(
                    "{} serving at http://{} (pid {}), lease TTL {}s",
                    child.id,
                    child.addr,
                    child.child.id().unwrap_or(0),
                    TTL.as_secs()
                ),
            );
            children.push(child);
        }
        let result = self.scenario(&endpoint, &mut children, &args).await;
        for c in &mut children {
            let _ = c.child.start_kill();
            let _ = c.child.wait().await;
        }
        server.shutdown().await;
        result
    }

    async fn scenario(
        &self,
        endpoint: &str,
        children: &mut [Child1],
        args: &DemoArgs,
    ) -> anyhow::Result<()> {
        let etcd = muster::Etcd::connect(muster::Config::new([endpoint.to_string()]))?;
        let discovery = Discovery::with_config(etcd, DiscoveryConfig::default())?;
        let service = discovery.service(SERVICE).await?;
        service
            .wait_for(DEADLINE, |s| s.len() == INSTANCES)
            .await
            .context("the instances did not all register")?;

        // 3. The gateway.
        let config = GatewayConfig::new("127.0.0.1:0".parse().expect("address"))
            .with_route(Route::new("/user", SERVICE));
        let gateway = Gateway::start(config, discovery.clone())
            .await
            .context("cannot start the gateway")?;
        let url = format!("http://{}/user", gateway.local_addr());
        self.say(
            "gateway",
            format!("{url} -> service {SERVICE} (power of two choices)"),
        );

        let traffic = Arc::new(Traffic::default());
        let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();

        // Phase 1: spread.
        self.say(
            "traffic",
            format!("{} requests, {} at a time", args.requests, args.concurrency),
        );
        send_n(&client, &url, args.requests, args.concurrency, &traffic).await;
        let (sent, failed, by) = traffic.take();
        self.say("spread", spread(sent, failed, &by));
        let mut total_failed = failed;

        // Phase 2: kill one instance mid-traffic.
        let pumping = Pump::start(&client, &url, args.concurrency, &traffic).await;
        let victim = &mut children[1];
        victim
            .child
            .start_kill()
            .context("cannot kill an instance")?;
        let _ = victim.child.wait().await;
        let killed = Instant::now();
        self.say(
            "kill",
            format!(
                "SIGKILL {} mid-traffic (no deregistration: its lease must expire)",
                victim.id
            ),
        );
        let victim_id = victim.id.clone();
        let instance_label = format!("instance=\"{victim_id}\"");
        wait_until(|| {
            metric(
                &gateway.metrics(),
                "muster_gateway_ejections_total",
                &instance_label,
            ) >= 1.0
        })
        .await;
        self.say(
            "ejected",
            format!(
                "the gateway ejected {victim_id} after failed connects; {} requests retried on the others",
                metric(&gateway.metrics(), "muster_gateway_retries_total", "")
            ),
        );
        service
            .wait_for(DEADLINE, |s| s.get(&victim_id).is_none())
            .await
            .context("the killed instance never left the registry")?;
        self.say(
            "expired",
            format!(
                "{victim_id}'s lease expired {:.1}s after the kill; it is out of the registry",
                killed.elapsed().as_secs_f64()
            ),
        );
        total_failed += self.stop(pumping, &traffic).await?;

        // Phase 3: drain another gracefully.
        let pumping = Pump::start(&client, &url, args.concurrency, &traffic).await;
        let drained = &mut children[2];
        let pid = drained.child.id().context("the instance already exited")?;
        terminate(pid)?;
        self.say(
            "drain",
            format!(
                "SIGTERM {}: draining for {}s, then deregistering",
                drained.id,
                GRACE.as_secs()
            ),
        );
        let drained_id = drained.id.clone();
        service
            .wait_for(DEADLINE, |s| {
                s.get(&drained_id).is_some_and(|i| !i.is_serving())
            })
            .await
            .ok();
        self.say(
            "draining",
            format!("{drained_id} is draining: no new requests go to it"),
        );
        service
            .wait_for(DEADLINE, |s| s.get(&drained_id).is_none())
            .await
            .context("the drained instance never deregistered")?;
        let status = drained.child.wait().await?;
        self.say(
            "gone",
            format!("{drained_id} deregistered and exited ({status})"),
        );
        total_failed += self.stop(pumping, &traffic).await?;

        gateway.shutdown().await;
        let errors = traffic.errors.lock().expect("errors lock").clone();
        for e in errors.iter().take(5) {
            println!("           error: {e}");
        }
        if total_failed > 0 {
            bail!("{total_failed} requests failed");
        }
        self.say(
            "done",
            "no request failed: a crash and a drain, both invisible to callers",
        );
        Ok(())
    }
}

/// Traffic flowing in the background until stopped.
struct Pump {
    running: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Pump {
    /// Starts sending and waits until 100 requests went out, so what
    /// follows happens mid-traffic.
    async fn start(
        client: &HttpClient,
        url: &str,
        concurrency: u32,
        traffic: &Arc<Traffic>,
    ) -> Pump {
        let running = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(pump(
            client.clone(),
            url.to_string(),
            concurrency,
            traffic.clone(),
            running.clone(),
        ));
        wait_until(|| traffic.sent.load(Ordering::Relaxed) >= 100).await;
        Pump { running, task }
    }
}

impl Demo {
    /// Stops the traffic, prints how it spread; returns the failures.
    async fn stop(&self, pump: Pump, traffic: &Traffic) -> anyhow::Result<u64> {
        pump.running.store(false, Ordering::Relaxed);
        pump.task.await.context("traffic task")?;
        let (sent, failed, by) = traffic.take();
        self.say("traffic", spread(sent, failed, &by));
        Ok(failed)
    }
}

/// Starts one instance child and waits for its `ready ADDR` line.
async fn spawn_instance(endpoint: &str, id: &str) -> anyhow::Result<Child1> {
    let exe = std::env::current_exe().context("cannot find the muster binary")?;
    let mut child = Command::new(exe)
        .args(["demo", "--instance", id, "--endpoints", endpoint])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start an instance")?;
    let stdout = child.stdout.take().context("instance stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(DEADLINE, lines.next_line())
        .await
        .with_context(|| format!("{id} did not start in time"))??
        .with_context(|| format!("{id} exited before it was ready"))?;
    let addr = line
        .strip_prefix("ready ")
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("{id} said {line:?}"))?;
    Ok(Child1 {
        id: id.to_string(),
        addr,
        child,
    })
}

fn terminate(pid: u32) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid = i32::try_from(pid).context("pid out of range")?;
    kill(Pid::from_raw(pid), Signal::SIGTERM).with_context(|| format!("kill -TERM {pid}"))
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// Sends one request; records which instance answered, or the failure.
async fn send(client: &HttpClient, url: &str, traffic: &Traffic) {
    traffic.sent.fetch_add(1, Ordering::Relaxed);
    let result = async {
        let uri: hyper::Uri = url.parse()?;
        let resp = tokio::time::timeout(Duration::from_secs(10), client.get(uri)).await??;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{status}: {}", String::from_utf8_lossy(&body).trim());
        }
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        Ok(v["instance"].as_str().unwrap_or("?").to_string())
    }
    .await;
    match result {
        Ok(instance) => {
            *traffic
                .by_instance
                .lock()
                .expect("traffic lock")
                .entry(instance)
                .or_default() += 1;
        }
        Err(e) => {
            traffic.failed.fetch_add(1, Ordering::Relaxed);
            traffic
                .errors
                .lock()
                .expect("errors lock")
                .push(e.to_string());
        }
    }
}

async fn send_n(client: &HttpClient, url: &str, n: u32, concurrency: u32, traffic: &Arc<Traffic>) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, traffic, next) = (
            client.clone(),
            url.to_string(),
            traffic.clone(),
            next.clone(),
        );
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < u64::from(n) {
                send(&client, &url, &traffic).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Sends requests until `running` turns false, paced to about 200/s so the
/// timeline stays readable.
async fn pump(
    client: HttpClient,
    url: String,
    concurrency: u32,
    traffic: Arc<Traffic>,
    running: Arc<AtomicBool>,
) {
    let pace = Duration::from_millis(5 * u64::from(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, traffic, running) = (
            client.clone(),
            url.clone(),
            traffic.clone(),
            running.clone(),
        );
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(pace);
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                send(&client, &url, &traffic).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sums the samples of the Prometheus metric `name` whose labels contain
/// `label`.
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn spread(sent: u64, failed: u64, by: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = by.iter().map(|(id, n)| format!("{id} {n}")).collect();
    format!("{sent} requests: {}; failed {failed}", parts.join(", "))
}
