//! A tiny, fast upstream for benchmarks and demos: answers every request
//! with `ok` (or its instance id with `--echo-id`) and, given
//! `--endpoints`, registers itself with muster and deregisters on
//! SIGINT/SIGTERM.
//!
//! It prints one line `listening on http://ADDR` to stdout once it serves
//! (and is registered).
//!
//! ```sh
//! cargo run --release -p muster-gateway --example upstream -- \
//!     --listen 127.0.0.1:0 --service bench --id u-1 --endpoints http://127.0.0.1:2379
//! ```

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use muster::{Config, Etcd, Instance, Registrar, RegistrarConfig};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "\
usage: upstream [--listen ADDR] [--service NAME] [--id ID] [--endpoints URLS] [--threads N] [--echo-id]

  --listen ADDR     address to bind (default 127.0.0.1:0)
  --service NAME    service to register as (default bench)
  --id ID           instance id (default u-<port>)
  --endpoints URLS  comma-separated etcd endpoints; without it nothing is registered
  --threads N       runtime worker threads (default 1)
  --echo-id         answer with the instance id instead of ok";

struct Args {
    listen: SocketAddr,
    service: String,
    id: Option<String>,
    endpoints: Vec<String>,
    threads: usize,
    echo_id: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        service: "bench".into(),
        id: None,
        endpoints: Vec::new(),
        threads: 1,
        echo_id: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => args.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
            "--service" => args.service = value()?,
            "--id" => args.id = Some(value()?),
            "--endpoints" => {
                args.endpoints = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        if s.starts_with("http://") {
                            s.to_string()
                        } else {
                            format!("http://{s}")
                        }
                    })
                    .collect()
            }
            "--threads" => {
                args.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?
            }
            "--echo-id" => args.echo_id = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown flag {other}\n\n{USAGE}")),
        }
    }
    Ok(args)
}

fn main() -> std::process::ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upstream: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let id = args.id.unwrap_or_else(|| format!("u-{}", addr.port()));
    let body = Bytes::from(if args.echo_id {
        id.clone()
    } else {
        "ok".into()
    });

    let registrar = if args.endpoints.is_empty() {
        None
    } else {
        let etcd = Etcd::connect(Config::new(args.endpoints.clone()))?;
        let registrar = Registrar::start(
            etcd,
            RegistrarConfig::default().with_grace(Duration::from_millis(500)),
        )
        .await?;
        registrar
            .register(Instance::new(&args.service, &id, format!("http://{addr}")))
            .await?;
        Some(registrar)
    };
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;

    let serve = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let mut resp = Response::new(Full::new(body.clone()));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain"),
                    );
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    };
    tokio::select! {
        () = serve => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    if let Some(r) = registrar {
        r.shutdown().await?;
    }
    Ok(())
}
