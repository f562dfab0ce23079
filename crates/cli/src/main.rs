//! `muster`: service registration and discovery on etcd.
#![forbid(unsafe_code)]

/// The registry's write path frees on the storage thread what request
/// threads allocated; mimalloc handles that without glibc's arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod auth;
mod bench;
mod certs;
mod completions;
mod dashboard;
mod demo;
mod deregister;
mod dns;
mod gateway;
mod get;
mod global;
mod https;
mod ls;
mod output;
mod register;
mod serve;
mod snapshot;
mod watch;

use clap::{Parser, Subcommand};

/// Service registration and discovery on etcd.
#[derive(Debug, Parser)]
#[command(name = "muster", version, about)]
struct Cli {
    #[command(flatten)]
    global: global::GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the embedded registry: a single-node server speaking etcd's v3 API.
    Serve(serve::ServeArgs),
    /// List the services with their instance counts (serving / draining).
    Ls(ls::LsArgs),
    /// Show one service's instances.
    Get(get::GetArgs),
    /// Stream registrations, drains and removals as they happen, until Ctrl-C.
    Watch(watch::WatchArgs),
    /// Register an instance and keep it alive (a sidecar: health checks, `-- CMD`).
    ///
    /// For processes that cannot link the library: registers the instance,
    /// keeps its lease alive while running, optionally health-checks it
    /// (draining it, or withdrawing it, while unhealthy) and optionally runs
    /// the process itself after `--`, forwarding signals to it and exiting
    /// with its exit code.
    Register(register::RegisterArgs),
    /// Delete one instance from the registry.
    Deregister(deregister::DeregisterArgs),
    /// Manage etcd's users: add, delete, get, list, passwd, grant-role, revoke-role.
    #[command(subcommand)]
    User(auth::UserCommand),
    /// Manage etcd's roles and their key permissions (grant-service: a
    /// service's least privilege).
    #[command(subcommand)]
    Role(auth::RoleCommand),
    /// Turn etcd's authentication on or off, or show whether it is on.
    #[command(subcommand)]
    Auth(auth::AuthCommand),
    /// HTTP reverse proxy routing to discovered instances.
    Gateway(gateway::GatewayArgs),
    /// Live web dashboard of the services in any etcd cluster.
    Dashboard(dashboard::DashboardArgs),
    /// DNS server answering with the services in any etcd cluster (Consul's names).
    ///
    /// A, AAAA and SRV answers for `{service}.service.muster` and Consul's
    /// other forms (tags, zones, RFC 2782), from a catalog kept current by
    /// a watch: no registry round-trip per query, and answers keep coming
    /// from the last known catalog while the registry is unreachable.
    Dns(dns::DnsArgs),
    /// See it work: a registry, three instances and a gateway, with traffic.
    Demo(demo::DemoArgs),
    /// Load-test any etcd v3 endpoint (put, range, txn, keepalive, watch, propagation, populate) or a DNS server (dns).
    Bench(bench::BenchArgs),
    /// Write a CA, a server and a client certificate for first steps with TLS.
    Certs(certs::CertsArgs),
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    Completions(completions::CompletionsArgs),
    /// Snapshots: save one from the endpoint, restore one into a new data
    /// directory, check one.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo prints its own timeline; the libraries' info lines would
    // drown it (RUST_LOG=info brings them back).
    let default_level = match cli.command {
        Command::Demo(_) => "error",
        // A bench measures: the library's info lines (one per change and
        // caller in `bench propagation`) would be part of what it times.
        Command::Bench(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
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
        let done = |r: anyhow::Result<()>| r.map(|()| std::process::ExitCode::SUCCESS);
        match cli.command {
            Command::Ls(args) => done(ls::run(&cli.global, args).await),
            Command::Get(args) => done(get::run(&cli.global, args).await),
            Command::Watch(args) => done(watch::run(&cli.global, args).await),
            Command::Register(args) => register::run(&cli.global, args).await,
            Command::Deregister(args) => done(deregister::run(&cli.global, args).await),
            Command::User(command) => done(auth::run_user(&cli.global, command).await),
            Command::Role(command) => done(auth::run_role(&cli.global, command).await),
            Command::Auth(command) => done(auth::run_auth(&cli.global, command).await),
            Command::Completions(args) => done(completions::run::<Cli>(args)),
            Command::Certs(args) => done(certs::run(args)),
            Command::Serve(args) => done(serve::run(&cli.global, args).await),
            Command::Gateway(args) => done(gateway::run(&cli.global, args).await),
            Command::Dashboard(args) => done(dashboard::run(&cli.global, args).await),
            Command::Dns(args) => done(dns::run(&cli.global, args).await),
            Command::Demo(args) => done(demo::run(&cli.global, args).await),
            Command::Bench(args) => done(bench::run(&cli.global, args).await),
            Command::Snapshot(command) => done(snapshot::run(&cli.global, command).await),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) if e.is::<output::BrokenPipe>() => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the error's text holds.
            let line = format!("{e:#}").replace(['\n', '\r'], " ");
            eprintln!("muster: {line}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
