//! A `user` service instance: an HTTP server that registers itself in etcd
//! with muster and deregisters cleanly on shutdown.
//!
//! This is the seed scenario (a Go user-service putting `/user ->
//! http://localhost:8080` under a 5 s lease it keeps alive) done properly:
//!
//! * it binds first, then registers its *real* address
//!   (`http://<bound addr>`, so `--listen 127.0.0.1:0` works) as instance
//!   `--id` of service `user` under `/muster/services/user/<id>`, with a 5 s
//!   lease that the [`Registrar`] keeps alive and re-creates after any loss;
//! * it serves `GET /` (`hello from <id>`) and `GET /health` (`ok`);
//! * on Ctrl-C or SIGTERM it marks itself draining, keeps serving for the
//!   grace period so callers move away, revokes its lease (the key is gone at
//!   once, not after the TTL), stops the HTTP server gracefully and exits 0.
//!
//! It prints one line `listening on http://ADDR as ID` to stdout once it is
//! registered; logs go to stderr (`RUST_LOG` filters them).
//!
//! ```sh
//! etcd --data-dir /tmp/muster-etcd &
//! cargo run -p muster --example user-service -- --listen 127.0.0.1:8080
//! cargo run -p muster --example user-service -- --listen 127.0.0.1:0 --id user-b
//! ```

#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use muster::{Config, Etcd, Instance, Registrar, RegistrarConfig, RegistrarState};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

const USAGE: &str = "\
usage: user-service [options]

  --listen ADDR       address to bind (default 127.0.0.1:8080; port 0 picks a free one)
  --id ID             instance id (default user-<port>)
  --ttl DURATION      lease TTL, whole seconds (default 5s)
  --grace DURATION    how long to stay visible as draining on shutdown (default 1s)
  --endpoints LIST    comma-separated etcd endpoints
                      (default $MUSTER_ENDPOINTS, else 127.0.0.1:2379)
  -h, --help          show this help

DURATION is a number and a unit: 500ms, 2s, 1m.";

#[derive(Debug)]
struct Args {
    listen: String,
    id: Option<String>,
    ttl: Duration,
    grace: Duration,
    endpoints: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:8080".into(),
        id: None,
        ttl: Duration::from_secs(5),
        grace: Duration::from_secs(1),
        endpoints: Config::endpoints_from_env(),
    };
    support::parse_flags(USAGE, |name, value| {
        match name {
            "--listen" => args.listen = value()?,
            "--id" => args.id = Some(value()?),
            "--ttl" => args.ttl = support::duration(name, value()?)?,
            "--grace" => args.grace = support::duration(name, value()?)?,
            "--endpoints" => args.endpoints = Config::parse_endpoints(&value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
        Ok(())
    })?;
    if args.ttl < Duration::from_secs(1) {
        return Err("--ttl must be at least 1s".into());
    }
    if args.endpoints.is_empty() {
        return Err("no etcd endpoint given".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("user-service: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Bind first: the registered address is the one actually bound.
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let local = listener.local_addr()?;
    if local.ip().is_unspecified() {
        tracing::warn!(%local, "bound to a wildcard address; callers on other hosts cannot use it as registered");
    }
    let id = args.id.unwrap_or_else(|| format!("user-{}", local.port()));
    let addr = format!("http://{local}");

    // Install the signal handlers before registering, so a signal arriving
    // right after registration still deregisters cleanly.
    let mut sigterm = signal(SignalKind::terminate())?;
    let ctrl_c = tokio::signal::ctrl_c();

    let etcd = Etcd::connect(Config::new(args.endpoints.clone()))?;
    let config = RegistrarConfig::default()
        .with_ttl(args.ttl)
        .with_grace(args.grace);
    let registrar = Registrar::start(etcd, config)
        .await
        .map_err(|e| format!("cannot reach etcd at {}: {e}", args.endpoints.join(",")))?;
    log_state_changes(&registrar);
    registrar
        .register(Instance::new("user", id.as_str(), addr.as_str()))
        .await
        .map_err(|e| format!("cannot register user/{id}: {e}"))?;

    let name: Arc<str> = id.as_str().into();
    let app = Router::new()
        .route(
            "/",
            get(move || {
                let name = name.clone();
                async move { format!("hello from {name}\n") }
            }),
        )
        .route("/health", get(|| async { "ok" }));
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = http_stopped.await;
            })
            .await
    });

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {addr} as {id}")?;
    stdout.flush()?;
    drop(stdout);

    let signal_name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = ctrl_c => "SIGINT",
        result = &mut server => {
            // The server only stops by itself on an error.
            result??;
            return Err("the HTTP server stopped unexpectedly".into());
        }
    };
    tracing::info!(
        signal = signal_name,
        grace = ?args.grace,
        "shutting down: draining, then deregistering"
    );
    // Still serving while draining: requests callers already sent succeed.
    let deregistered = registrar.shutdown().await;
    let _ = stop_http.send(());
    server.await??;
    deregistered.map_err(|e| format!("could not deregister cleanly: {e}"))?;
    tracing::info!(%id, "deregistered and stopped");
    Ok(())
}

/// Logs every state change of the registrar (registered, recovering after
/// a lost lease or an etcd outage, draining, stopped).
fn log_state_changes(registrar: &Registrar) {
    let mut states = registrar.subscribe();
    tokio::spawn(async move {
        loop {
            let state = states.borrow_and_update().clone();
            match state {
                RegistrarState::Registered { lease } => {
                    tracing::info!(lease = format_args!("{lease:x}"), "registrar: registered")
                }
                RegistrarState::Recovering { reason } => {
                    tracing::warn!(%reason, "registrar: recovering")
                }
                RegistrarState::Draining => tracing::info!("registrar: draining"),
                RegistrarState::Stopped => tracing::info!("registrar: stopped"),
            }
            if states.changed().await.is_err() {
                return;
            }
        }
    });
}
