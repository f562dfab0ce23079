//! A caller (the seed scenario's gateway): discovers the `user` service
//! through muster and calls its instances round-robin over HTTP.
//!
//! * It lists the service once (id, address, status) and then follows it: a
//!   background task prints every change live as etcd reports it
//!   (`+ added`, `- removed`, `~ updated`, e.g. an instance going draining).
//! * Every `--interval` it picks a serving instance round-robin from a
//!   balancer kept current by discovery (never waiting on etcd) and sends
//!   `GET /` to it, printing `<id> -> <body>`.
//! * With no serving instance it says so and keeps trying; when the watch
//!   on etcd is broken it says how stale its table is (it keeps using the
//!   last known instances meanwhile).
//!
//! `--count N` exits 0 after N successful calls; otherwise it runs until
//! Ctrl-C. Logs go to stderr (default level `warn`; `RUST_LOG` changes it).
//!
//! ```sh
//! cargo run -p muster --example caller
//! cargo run -p muster --example caller -- --interval 200ms --count 10
//! ```

#[path = "support/mod.rs"]
mod support;

use std::process::ExitCode;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use muster::balance::{BalancerKind, Filter};
use muster::discovery::{Change, Snapshot, Update, Updates};
use muster::{Config, Discovery, Etcd, Instance};

const USAGE: &str = "\
usage: caller [options]

  --service NAME      service to call (default user)
  --interval DURATION time between calls (default 1s)
  --count N           exit 0 after N successful calls (default: run until Ctrl-C)
  --endpoints LIST    comma-separated etcd endpoints
                      (default $MUSTER_ENDPOINTS, else 127.0.0.1:2379)
  -h, --help          show this help

DURATION is a number and a unit: 100ms, 2s, 1m.";

/// How long one HTTP call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Args {
    service: String,
    interval: Duration,
    count: Option<u64>,
    endpoints: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        service: "user".into(),
        interval: Duration::from_secs(1),
        count: None,
        endpoints: Config::endpoints_from_env(),
    };
    support::parse_flags(USAGE, |name, value| {
        match name {
            "--service" => args.service = value()?,
            "--interval" => args.interval = support::duration(name, value()?)?,
            "--count" => {
                let v = value()?;
                let n = v
                    .parse()
                    .map_err(|_| format!("--count: {v:?} is not a number"))?;
                args.count = Some(n);
            }
            "--endpoints" => args.endpoints = Config::parse_endpoints(&value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
        Ok(())
    })?;
    if args.interval.is_zero() {
        return Err("--interval must be positive".into());
    }
    if args.endpoints.is_empty() {
        return Err("no etcd endpoint given".into());
    }
    Ok(args)
}

// One thread: the round-robin balancer keeps a cursor per thread, so a
// sequential caller on a single thread walks the instances strictly in turn.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("caller: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caller: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let etcd = Etcd::connect(Config::new(args.endpoints.clone()))?;
    let discovery = Discovery::new(etcd);
    let service = discovery.service(&args.service).await.map_err(|e| {
        format!(
            "cannot discover {:?} via etcd at {}: {e}",
            args.service,
            args.endpoints.join(",")
        )
    })?;
    // Subscribe before printing, so no change is missed in between: the
    // first update is the whole table, the rest are the changes from there.
    let mut updates = service.updates();
    match updates.next().await {
        Some(Update::Reset(snapshot)) => print_table(&snapshot),
        _ => print_table(&service.snapshot()),
    }
    tokio::spawn(print_changes(updates));

    let balancer = service.balancer(BalancerKind::RoundRobin, Filter::new());
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();

    let mut ticks = tokio::time::interval(args.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut succeeded = 0u64;
    let mut was_stale = false;
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = ticks.tick() => {}
        }

        let health = service.health();
        if let Some(stale_for) = health.stale_for {
            println!(
                "discovery is stale: no word from etcd for {:.1}s ({}); using the last known instances",
                stale_for.as_secs_f64(),
                health.last_error.as_deref().unwrap_or("reconnecting"),
            );
            was_stale = true;
        } else if was_stale {
            println!("discovery is live again (revision {})", health.revision);
            was_stale = false;
        }

        let Some(picked) = balancer.pick() else {
            let snapshot = service.snapshot();
            if snapshot.is_empty() {
                println!("no instance of {} is registered; waiting", args.service);
            } else {
                println!(
                    "no instance of {} is serving ({} draining); waiting",
                    args.service,
                    snapshot.len()
                );
            }
            continue;
        };
        match call(&client, &picked).await {
            Ok(body) => {
                println!("{} -> {}", picked.id, body.trim_end());
                succeeded += 1;
                if args.count.is_some_and(|n| succeeded >= n) {
                    return Ok(());
                }
            }
            Err(e) => println!("{} -> error calling {}: {e}", picked.id, picked.addr),
        }
    }
}

/// `GET /` on the instance; the body on a 2xx answer.
async fn call(
    client: &Client<HttpConnector, Empty<Bytes>>,
    instance: &Instance,
) -> Result<String, String> {
    let base = if instance.addr.contains("://") {
        instance.addr.clone()
    } else {
        // Bare `host:port`, as Go programs register it.
        format!("http://{}", instance.addr)
    };
    let uri: hyper::Uri = format!("{}/", base.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("bad address: {e}"))?;
    let request = async {
        let response = client.get(uri).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!("HTTP {status}: {}", body.trim_end()))
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, request)
        .await
        .map_err(|_| format!("no answer within {CALL_TIMEOUT:?}"))?
}

fn print_table(snapshot: &Snapshot) {
    println!(
        "service {}: {} instance(s) at revision {}",
        snapshot.service(),
        snapshot.len(),
        snapshot.revision()
    );
    for i in snapshot.instances() {
        println!("  {:<24} {:<32} {}", i.id, i.addr, i.status);
    }
}

/// Prints every change of the service as it happens.
async fn print_changes(mut updates: Updates) {
    while let Some(update) = updates.next().await {
        match update {
            // Only after falling too far behind to be told each change.
            Update::Reset(snapshot) => {
                println!("(resynchronized)");
                print_table(&snapshot);
            }
            Update::Changes { revision, changes } => {
                for change in changes {
                    match change {
                        Change::Added(i) => {
                            println!(
                                "+ added   {} at {} ({}) @{revision}",
                                i.id, i.addr, i.status
                            )
                        }
                        Change::Removed(i) => println!("- removed {} @{revision}", i.id),
                        Change::Updated { old, new } => {
                            let what = if old.status != new.status {
                                format!("{} -> {}", old.status, new.status)
                            } else if old.addr != new.addr {
                                format!("{} -> {}", old.addr, new.addr)
                            } else {
                                "metadata changed".to_string()
                            };
                            println!("~ updated {}: {what} @{revision}", new.id)
                        }
                    }
                }
            }
        }
    }
}
