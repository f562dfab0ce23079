//! `muster`: service registration and discovery on etcd.
#![forbid(unsafe_code)]

/// The registry's write path frees on the storage thread what request
/// threads allocated; mimalloc handles that without glibc's arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod serve;

use clap::{Parser, Subcommand};

/// Service registration and discovery on etcd.
#[derive(Debug, Parser)]
#[command(name = "muster", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the embedded registry: a single-node server speaking etcd's v3 API.
    Serve(serve::ServeArgs),
    /// Load-test any etcd v3 endpoint: put, range, txn, keepalive, watch, populate.
    Bench(bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("muster: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("muster: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
