//! `muster register`: a sidecar that registers an instance for a process
//! that cannot link the library, keeps it alive, optionally health-checks
//! it, and optionally runs the process itself.
//!
//! With `-- CMD ARGS...` the command runs as a child in its own process
//! group (so a Ctrl-C in a terminal reaches it once, forwarded by us, not
//! twice); SIGINT, SIGTERM and SIGHUP are forwarded to it. The first SIGINT
//! or SIGTERM also marks the instance draining while the child shuts down.
//! When the child exits, the instance is deregistered at once and muster
//! exits with the child's code (128 + signal if it was killed).
//!
//! Without a command it runs until SIGINT, SIGTERM or SIGHUP, then drains
//! the instance for `--grace` and deregisters it; a second signal skips the
//! grace period.

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Empty;
use muster::instance::DEFAULT_WEIGHT;
use muster::{Instance, Registrar, RegistrarConfig, Status};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::global::{GlobalArgs, parse_duration};
use crate::output::registry_error;

/// Flags of `muster register`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    muster register user user-1 http://10.0.0.7:8080 --zone eu-1 --check http://10.0.0.7:8080/healthz\n  \
    muster register user user-1 10.0.0.7:8080 --check tcp://10.0.0.7:8080 -- ./user-service --port 8080")]
pub struct RegisterArgs {
    /// The service name.
    pub service: String,
    /// The instance id, unique within the service.
    pub id: String,
    /// Where callers reach it: host:port or a URL.
    pub addr: String,
    /// Lease time-to-live: how long the instance outlives a crash of this
    /// sidecar [default: the layout's: 10s; kratos 15s, go-micro 90s].
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// How long the instance stays visible as draining before it is removed
    /// at shutdown (without a command).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub grace: Duration,
    /// How long to wait for a registry that cannot be reached, retrying
    /// with backoff, before giving up (at start, and for each change of the
    /// instance); 0 gives up at once. A lease lost later is always
    /// recovered, however long the registry is away.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub wait: Duration,
    /// The zone or region it runs in.
    #[arg(long, default_value = "", hide_default_value = true)]
    pub zone: String,
    /// The version it runs.
    #[arg(
        long = "version",
        value_name = "VERSION",
        default_value = "",
        hide_default_value = true
    )]
    pub service_version: String,
    /// Relative weight for weighted balancing (1..=10000).
    #[arg(long, default_value_t = DEFAULT_WEIGHT)]
    pub weight: u32,
    /// A label, e.g. canary (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// A metadata entry as key=value (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_meta)]
    pub meta: Vec<(String, String)>,
    /// Health check: http://host:port/path (healthy on 2xx) or
    /// tcp://host:port (healthy when a connection opens). With a check the
    /// instance starts draining and serves once the check passes.
    #[arg(help_heading = "Health check", long, value_parser = Check::parse)]
    pub check: Option<Check>,
    /// Time between health checks.
    #[arg(help_heading = "Health check", long, default_value = "10s", value_parser = parse_duration, requires = "check")]
    pub check_interval: Duration,
    /// How long one health check may take.
    #[arg(help_heading = "Health check", long, default_value = "2s", value_parser = parse_duration, requires = "check")]
    pub check_timeout: Duration,
    /// Consecutive failed checks that mark the instance draining.
    #[arg(help_heading = "Health check", long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..), requires = "check")]
    pub failures: u32,
    /// Consecutive passed checks that mark it serving again.
    #[arg(help_heading = "Health check", long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), requires = "check")]
    pub successes: u32,
    /// Consecutive failed checks after which the instance is deregistered
    /// altogether; it registers again once healthy.
    #[arg(help_heading = "Health check", long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), requires = "check")]
    pub withdraw_after: Option<u32>,
    /// The command to run as a child (after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not key=value")),
    }
}

/// A health check target.
#[derive(Debug, Clone)]
pub enum Check {
    /// GET this URL; healthy on a 2xx answer.
    Http(http::Uri),
    /// Open a TCP connection to `host:port`.
    Tcp(String),
}

impl Check {
    fn parse(s: &str) -> Result<Check, String> {
        let uri: http::Uri = s.parse().map_err(|e| {
            format!("'{s}' is not a URL ({e}); write http://host:port/path or tcp://host:port")
        })?;
        let authority = uri.authority().ok_or_else(|| {
            format!("'{s}' has no host; write http://host:port/path or tcp://host:port")
        })?;
        match uri.scheme_str() {
            Some("http") => Ok(Check::Http(uri)),
            Some("tcp") => {
                if authority.port_u16().is_none() {
                    return Err(format!("'{s}' has no port; write tcp://host:port"));
                }
                Ok(Check::Tcp(authority.to_string()))
            }
            Some("https") => Err("https checks are not supported; use http:// or tcp://".into()),
            _ => Err(format!(
                "'{s}': unknown check; write http://host:port/path or tcp://host:port"
            )),
        }
    }

    /// Runs the check once; `Err` says why it failed.
    async fn run(&self, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.probe()).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    async fn probe(&self) -> Result<(), String> {
        match self {
            Check::Tcp(addr) => tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map(drop)
                .map_err(|e| format!("connect {addr}: {e}")),
            Check::Http(uri) => {
                let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
                let host = uri.host().unwrap_or_default();
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let port = uri.port_u16().unwrap_or(80);
                let stream = tokio::net::TcpStream::connect((host, port))
                    .await
                    .map_err(|e| format!("connect {authority}: {e}"))?;
                let _ = stream.set_nodelay(true);
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("{uri}: {e}"))?;
                let conn = tokio::spawn(async move {
                    let _ = conn.await;
                });
                let path = uri.path_and_query().map_or("/", |p| p.as_str());
                let req = http::Request::get(path)
                    .header(http::header::HOST, authority)
                    .header(http::header::USER_AGENT, "muster-health-check")
                    .header(http::header::CONNECTION, "close")
                    .body(Empty::<Bytes>::new())
                    .map_err(|e| format!("{uri}: {e}"))?;
                let result = sender.send_request(req).await;
                conn.abort();
                let status = result.map_err(|e| format!("{uri}: {e}"))?.status();
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("{uri} answered {status}"))
                }
            }
        }
    }
}

/// Consecutive-result thresholds turned into the state to publish.
#[derive(Debug)]
struct Health {
    failures: u32,
    successes: u32,
    healthy: bool,
    withdrawn: bool,
    fail_threshold: u32,
    pass_threshold: u32,
    withdraw_after: Option<u32>,
}

impl Health {
    /// Starts unhealthy: an instance serves once its check has passed.
    fn new(fail_threshold: u32, pass_threshold: u32, withdraw_after: Option<u32>) -> Health {
        Health {
            failures: 0,
            successes: 0,
            healthy: false,
            withdrawn: false,
            fail_threshold,
            pass_threshold,
            withdraw_after,
        }
    }

    fn observe(&mut self, passed: bool) {
        if passed {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            if !self.healthy && self.successes >= self.pass_threshold {
                self.healthy = true;
                self.withdrawn = false;
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            if self.healthy && self.failures >= self.fail_threshold {
                self.healthy = false;
            }
            if self.withdraw_after.is_some_and(|n| self.failures >= n) {
                self.withdrawn = true;
            }
        }
    }

    /// What the registry should show: `None` = not registered.
    fn desired(&self) -> Option<Status> {
        if self.withdrawn {
            None
        } else if self.healthy {
            Some(Status::Serving)
        } else {
            Some(Status::Draining)
        }
    }
}

/// The registration and what of it is in the registry.
struct Sidecar {
    registrar: Registrar,
    instance: Instance,
    /// What the registry shows as far as we know: `None` = not registered.
    published: Option<Status>,
}

impl Sidecar {
    /// Moves the registry to `desired`; on failure logs and keeps the old
    /// state, so the next check result retries.
    async fn apply(&mut self, desired: Option<Status>) -> muster::Result<()> {
        if desired == self.published {
            return Ok(());
        }
        let result = match desired {
            Some(status) => {
                self.registrar
                    .set_status(self.instance.clone(), status)
                    .await
            }
            None => match self
                .registrar
                .deregister(&self.instance.service, &self.instance.id)
                .await
            {
                Err(muster::Error::NotRegistered { .. }) => Ok(()),
                other => other,
            },
        };
        match &result {
            Ok(()) => {
                match desired {
                    Some(status) => tracing::debug!(
                        service = %self.instance.service,
                        id = %self.instance.id,
                        addr = %self.instance.addr,
                        %status,
                        "registered"
                    ),
                    None => tracing::info!(
                        service = %self.instance.service,
                        id = %self.instance.id,
                        "deregistered"
                    ),
                }
                self.published = desired;
            }
            Err(e) => tracing::warn!(error = %e, "could not update the registry; retrying"),
        }
        result
    }
}

/// Runs `muster register`; the exit code is the child's when there is one.
pub async fn run(global: &GlobalArgs, args: RegisterArgs) -> anyhow::Result<ExitCode> {
    let mut instance = Instance::new(&args.service, &args.id, &args.addr)
        .with_zone(&args.zone)
        .with_version(&args.service_version)
        .with_weight(args.weight);
    instance.tags = args.tags.clone();
    instance.metadata = args.meta.iter().cloned().collect();
    instance.validate()?;
    let ttl = args
        .ttl
        .unwrap_or_else(|| global.layout.layout().default_ttl());
    if ttl < Duration::from_secs(1) {
        bail!("--ttl must be at least 1s");
    }

    // Signal handlers first: from here on a signal never kills us with the
    // instance left behind.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;

    let etcd = global.connect()?;
    let config = RegistrarConfig::default()
        .with_source(global.source())
        .with_ttl(ttl)
        .with_grace(args.grace)
        .with_wait(args.wait);
    let registrar = Registrar::start(etcd.clone(), config)
        .await
        .map_err(|e| registry_error(&etcd, e))?;
    let mut health = args
        .check
        .as_ref()
        .map(|_| Health::new(args.failures, args.successes, args.withdraw_after));
    let mut sidecar = Sidecar {
        registrar,
        instance,
        published: None,
    };
    let initial = health
        .as_ref()
        .map_or(Some(Status::Serving), Health::desired);
    if let Err(e) = sidecar.apply(initial).await {
        let _ = sidecar.registrar.shutdown().await;
        return Err(registry_error(&etcd, e));
    }

    let mut child = match args.command.split_first() {
        None => None,
        Some((program, rest)) => {
            let mut command = tokio::process::Command::new(program);
            command.args(rest).process_group(0);
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                // In a background process group, reading the terminal
                // would stop the child (SIGTTIN).
                command.stdin(std::process::Stdio::null());
            }
            match command.spawn() {
                Ok(child) => Some(child),
                Err(e) => {
                    let name = program.to_string_lossy();
                    eprintln!("muster: cannot run {name}: {e}");
                    deregister_now(sidecar).await;
                    return Ok(ExitCode::from(match e.kind() {
                        std::io::ErrorKind::PermissionDenied => 126,
                        _ => 127,
                    }));
                }
            }
        }
    };

    let (results_tx, mut results) = mpsc::channel(1);
    let checker = args.check.clone().map(|check| {
        let (interval, timeout) = (args.check_interval, args.check_timeout);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if results_tx.send(check.run(timeout).await).await.is_err() {
                    return;
                }
            }
        })
    });

    let mut stopping = false;
    let outcome = loop {
        tokio::select! {
            status = wait(&mut child) => break Some(status),
            Some(result) = results.recv(), if !stopping => {
                let Some(health) = health.as_mut() else { continue };
                let was = health.desired();
                match &result {
                    Ok(()) => tracing::debug!("health check passed"),
                    Err(reason) => tracing::warn!(
                        consecutive = health.failures + 1,
                        %reason,
                        "health check failed"
                    ),
                }
                health.observe(result.is_ok());
                if health.desired() != was {
                    tracing::info!(
                        from = ?was.map(|s| s.to_string()),
                        to = ?health.desired().map(|s| s.to_string()),
                        "health changed"
                    );
                }
                let _ = sidecar.apply(health.desired()).await;
            }
            _ = sigint.recv() => {
                if !on_signal(&mut child, &mut sidecar, &mut stopping, nix::sys::signal::SIGINT).await {
                    break None;
                }
            }
            _ = sigterm.recv() => {
                if !on_signal(&mut child, &mut sidecar, &mut stopping, nix::sys::signal::SIGTERM).await {
                    break None;
                }
            }
            _ = sighup.recv() => {
                if let Some(child) = &child {
                    forward(child, nix::sys::signal::SIGHUP);
                } else {
                    break None;
                }
            }
        }
    };
    if let Some(checker) = checker {
        checker.abort();
    }

    match outcome {
        Some(status) => {
            let code = exit_code(&status);
            tracing::info!(%status, "child exited; deregistering");
            deregister_now(sidecar).await;
            Ok(ExitCode::from(code))
        }
        None => {
            tracing::info!(grace = ?args.grace, "stopping: draining, then deregistering");
            let shutdown = sidecar.registrar.shutdown();
            tokio::select! {
                result = shutdown => result.map_err(|e| {
                    anyhow::anyhow!("could not deregister ({e}); the instance expires with its lease within {ttl:?}")
                })?,
                _ = sigint.recv() => tracing::warn!("second signal: exiting without waiting out the grace period"),
                _ = sigterm.recv() => tracing::warn!("second signal: exiting without waiting out the grace period"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Handles SIGINT/SIGTERM; `false` when the sidecar itself should stop.
async fn on_signal(
    child: &mut Option<tokio::process::Child>,
    sidecar: &mut Sidecar,
    stopping: &mut bool,
    sig: nix::sys::signal::Signal,
) -> bool {
    let Some(child) = child else {
        return false;
    };
    forward(child, sig);
    if !*stopping {
        *stopping = true;
        if sidecar.published.is_some() {
            tracing::info!("marking the instance draining while the child stops");
            let _ = sidecar.apply(Some(Status::Draining)).await;
        }
    }
    true
}

fn forward(child: &tokio::process::Child, sig: nix::sys::signal::Signal) {
    let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return; // already reaped
    };
    tracing::info!(signal = %sig, pid, "forwarding signal to the child");
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        tracing::warn!(error = %e, "could not forward the signal");
    }
}

async fn wait(child: &mut Option<tokio::process::Child>) -> std::process::ExitStatus {
    match child {
        Some(child) => match child.wait().await {
            Ok(status) => status,
            Err(e) => {
                tracing::error!(error = %e, "cannot wait for the child");
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// The shell's convention: the exit code, or 128 + the signal that killed it.
fn exit_code(status: &std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        (None, None) => 1,
    }
}

/// Removes the instance at once (its process is gone) and revokes the lease.
async fn deregister_now(mut sidecar: Sidecar) {
    if let Err(e) = sidecar.apply(None).await {
        tracing::warn!(error = %e, "could not deregister; revoking the lease");
    }
    if let Err(e) = sidecar.registrar.shutdown().await {
        tracing::warn!(error = %e, "could not revoke the lease; the instance expires with it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let mut h = Health::new(2, 2, Some(4));
        assert_eq!(h.desired(), Some(Status::Draining));
        h.observe(true);
        assert_eq!(h.desired(), Some(Status::Draining));
        h.observe(true);
        assert_eq!(h.desired(), Some(Status::Serving));
        h.observe(false);
        assert_eq!(h.desired(), Some(Status::Serving));
        h.observe(false);
        assert_eq!(h.desired(), Some(Status::Draining));
        h.observe(false);
        h.observe(false);
        assert_eq!(h.desired(), None);
        h.observe(true);
        assert_eq!(h.desired(), None, "stays withdrawn until healthy");
        h.observe(true);
        assert_eq!(h.desired(), Some(Status::Serving));
    }

    #[test]
    fn checks_parse() {
        assert!(matches!(
            Check::parse("http://127.0.0.1:8080/healthz"),
            Ok(Check::Http(_))
        ));
        assert!(
            matches!(Check::parse("tcp://127.0.0.1:8080"), Ok(Check::Tcp(a)) if a == "127.0.0.1:8080")
        );
        assert!(Check::parse("tcp://127.0.0.1").is_err());
        assert!(Check::parse("https://h/x").is_err());
        assert!(Check::parse("ftp://h:1").is_err());
        assert!(Check::parse("not a url").is_err());
        assert_eq!(parse_meta("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_meta("=b").is_err());
        assert!(parse_meta("ab").is_err());
    }
}
