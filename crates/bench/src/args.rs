//! The flags of `muster bench`, and the plan a workload runs from them.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use muster::parse_duration;

use crate::auth::Credentials;
use crate::connect::Channels;
use crate::error::Error;
use crate::keys::{KeySpace, Seed};

/// Flags of `muster bench`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Examples:
  muster bench put --clients 64 --duration 10s
  muster bench --endpoints 127.0.0.1:2379 range --keys 100000 -o json
  muster bench watch --watchers 1000 --puts 200 --put-interval 20ms
  muster bench propagation --callers 1,10,100,1000 --rounds 200 --load-clients 8
  muster bench propagation --callers 1000 --caller-processes 4 --callers-per-connection 10
  muster bench keepalive --leases 1000 --clients 64 --rate 0
  muster bench populate --keys 100000 --key-size 32 --value-size 256
  muster bench ready --ready-timeout 30s
  muster bench robustness --duration 60s --faults kill,cut,compact
  muster bench robustness --registry etcd --duration 20s --seed 7
  muster bench dns --dns-server 127.0.0.1:8600 --dns-name user.service.muster --dns-type srv --clients 16")]
pub struct BenchArgs {
    /// The workload to run.
    #[arg(value_enum)]
    pub(crate) workload: Workload,
    /// Concurrent clients (put, range, txn, populate) or keep-alive streams
    /// (keepalive).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) clients: u32,
    /// HTTP/2 connections [default: one per 8 clients; watch: one per
    /// stream].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub(crate) conns: Option<u32>,
    /// How long put, range, txn and keepalive run (e.g. 10s, 500ms, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// Key size in bytes: the prefix, then the key's zero-padded index.
    #[arg(long, default_value_t = 32)]
    pub(crate) key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub(crate) value_size: usize,
    /// Keyspace: put, range and txn pick among this many keys; populate
    /// writes them all.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) keys: u64,
    /// Prefix of every key written.
    #[arg(long, default_value = "bench/")]
    pub(crate) key_prefix: String,
    /// Seed of the random keys and values [default: from the clock]; the
    /// report prints it, so that a run can pick the same keys again.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// range: serializable reads (etcd serves them without a consensus
    /// round); default linearizable, as etcdctl.
    #[arg(long)]
    pub(crate) serializable: bool,
    /// keepalive: leases granted, then kept alive (revoked at the end).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) leases: u32,
    /// keepalive: TTL of the leases, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) lease_ttl: i64,
    /// keepalive: keep-alives per second over all streams, paced; 0: as
    /// fast as possible, one in flight per stream.
    #[arg(long, default_value_t = 0)]
    pub(crate) rate: u64,
    /// watch: watchers on the key.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) watchers: u32,
    /// watch: streams the watchers are spread over.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) watch_streams: u32,
    /// watch: puts to the watched key.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) puts: u32,
    /// watch: pause between the starts of two puts.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    pub(crate) put_interval: Duration,
    /// propagation: watching callers, each following one service with its
    /// own discovery (its own connection and watch stream unless
    /// `--callers-per-connection` says otherwise); a comma-separated list
    /// runs one row per value.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100",
        value_parser = clap::value_parser!(u32).range(1..=100_000),
        help_heading = "propagation"
    )]
    pub(crate) callers: Vec<u32>,
    /// propagation: callers sharing one connection (one `Etcd` handle, one
    /// watch stream), each still with its own discovery and watch.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), help_heading = "propagation")]
    pub(crate) callers_per_connection: u32,
    /// propagation: host the callers in this many child processes (this
    /// program run again) instead of this one; 0: in this process.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=256), help_heading = "propagation")]
    pub(crate) caller_processes: u32,
    /// propagation: registrations, each followed by its deregistration, one
    /// change at a time (after a warm-up pair that is not counted).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..), help_heading = "propagation")]
    pub(crate) rounds: u32,
    /// propagation: clients putting random keys of the keyspace meanwhile
    /// (closed loop, over `--conns` connections).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000), help_heading = "propagation")]
    pub(crate) load_clients: u32,
    /// propagation, internal: run as a caller process of a parent bench
    /// (`SERVICE,CALLERS,FIRST`).
    #[arg(long, hide = true)]
    pub(crate) caller_child: Option<String>,
    /// ready: give up after this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(crate) ready_timeout: Duration,
    /// robustness: faults injected while the traffic runs, any of
    /// `kill` (kill -9 and restart on the same data), `cut` (every client
    /// connection cut and held), `compact`, `drop-watch` (the watcher's
    /// stream dropped); or `none`.
    #[arg(
        long,
        default_value = "kill,cut,compact,drop-watch",
        help_heading = "robustness"
    )]
    pub(crate) faults: muster_robustness::run::FaultList,
    /// robustness, `--registry muster` only: also run the registry with
    /// `muster serve --faults SPEC`, the fault injection users get
    /// (`latency=2ms±2ms,drop-watch=2/s,unavailable=200ms/5s,compact=1s`);
    /// everything but `lease-expire-early`, which breaks the lease TTL
    /// guarantee the run checks.
    #[arg(long, value_name = "SPEC", help_heading = "robustness")]
    pub(crate) serve_faults: Option<String>,
    /// robustness: mean time between two faults.
    #[arg(long, default_value = "3s", value_parser = parse_duration, help_heading = "robustness")]
    pub(crate) fault_every: Duration,
    /// robustness: the registry the run starts and breaks: `muster`
    /// (this program's `serve`) or `etcd` (the control).
    #[arg(long, value_enum, default_value_t = RobustnessRegistry::Muster, help_heading = "robustness")]
    pub(crate) registry: RobustnessRegistry,
    /// robustness: the etcd binary for `--registry etcd`.
    #[arg(long, default_value = "etcd", help_heading = "robustness")]
    pub(crate) etcd_binary: std::path::PathBuf,
    /// robustness: concurrent traffic clients (each on its own connection).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256), help_heading = "robustness")]
    pub(crate) traffic_clients: u32,
    /// robustness: requests per second across the traffic clients (0: as
    /// fast as the registry answers). The check's time grows with the
    /// history's length.
    #[arg(long, default_value_t = 1000, help_heading = "robustness")]
    pub(crate) traffic_rate: u32,
    /// robustness: also keep-alive every abandoned short lease right at
    /// its expected expiry and, when answered TTL 0, put onto it (which
    /// must fail): catches a registry that says a lease is gone before it
    /// revoked it.
    #[arg(long, help_heading = "robustness")]
    pub(crate) lease_edge_probes: bool,
    /// robustness: give the linearizability check at most this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration, help_heading = "robustness")]
    pub(crate) check_timeout: Duration,
    /// robustness: where the data, logs, history and report go [default:
    /// muster-robustness-SEED in the temporary directory].
    #[arg(long, help_heading = "robustness")]
    pub(crate) out: Option<std::path::PathBuf>,
    /// dns: the DNS server queried (UDP); `--clients` sockets, each with
    /// one query in flight.
    #[arg(long, default_value = "127.0.0.1:8600", help_heading = "dns")]
    pub(crate) dns_server: std::net::SocketAddr,
    /// dns: names asked, comma-separated; each query picks one at random.
    #[arg(
        long = "dns-name",
        value_delimiter = ',',
        default_value = "user.service.muster",
        help_heading = "dns"
    )]
    pub(crate) dns_names: Vec<String>,
    /// dns: the question type.
    #[arg(long, value_enum, default_value_t = DnsType::A, help_heading = "dns")]
    pub(crate) dns_type: DnsType,
    /// dns: send EDNS offering answers of this many bytes [default: no
    /// EDNS: answers of 512 bytes at most].
    #[arg(long, value_name = "BYTES", help_heading = "dns")]
    pub(crate) dns_edns: Option<u16>,
    /// dns: a query unanswered this long counts as failed.
    #[arg(long, default_value = "1s", value_parser = parse_duration, help_heading = "dns")]
    pub(crate) dns_timeout: Duration,
}

/// The registry `muster bench robustness` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RobustnessRegistry {
    /// `muster serve`, this program.
    Muster,
    /// etcd, as the control.
    Etcd,
}

/// A DNS question type of `muster bench dns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DnsType {
    /// IPv4 addresses.
    A,
    /// IPv6 addresses.
    Aaaa,
    /// Services: port and target.
    Srv,
    /// Anything.
    Any,
}

/// What `muster bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Concurrent puts of random keys.
    Put,
    /// Concurrent single-key gets (populates the keyspace first if needed).
    Range,
    /// Compare-and-put transactions: compare the key's version, then put.
    Txn,
    /// Leases kept alive on keep-alive streams.
    Keepalive,
    /// Watchers on one key, then paced puts: put-to-watcher latency.
    Watch,
    /// Callers following one service, then registrations and
    /// deregistrations: registrar's ack to every caller's table.
    Propagation,
    /// Starts a registry of its own and checks it under random traffic and
    /// faults: linearizability of the history, and every watch response.
    Robustness,
    /// Writes the whole keyspace once, in transactions of up to 128 puts.
    Populate,
    /// Waits for the first successful Range (for restart measurements).
    Ready,
    /// DNS queries over UDP at a DNS server (`--dns-*` flags).
    Dns,
}

impl BenchArgs {
    /// The workload these flags run.
    pub fn workload(&self) -> Workload {
        self.workload
    }

    /// `clients` clients over their connections (`--conns`, or one per 8
    /// clients; never more connections than clients).
    pub(crate) fn load(&self, clients: usize) -> Load {
        let clients = clients.max(1);
        Load {
            clients,
            connections: self
                .conns
                .map_or(clients.div_ceil(8), |c| c as usize)
                .clamp(1, clients),
        }
    }
}

/// How many clients, over how many connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) clients: usize,
    pub(crate) connections: usize,
}

/// What a workload is given: the flags, the endpoints, the keyspace and
/// the seed of the run.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    pub(crate) args: &'a BenchArgs,
    pub(crate) endpoints: &'a [String],
    pub(crate) keys: KeySpace,
    pub(crate) seed: Seed,
    /// The dialer for `https://` endpoints.
    pub(crate) tls: Option<muster_tls::TlsConnector>,
    /// Who to log in as, on servers with auth enabled.
    pub(crate) credentials: Option<Credentials>,
    /// The TLS settings, for workloads that connect with the library
    /// (`propagation`); `None`: the system's roots for `https://`.
    pub(crate) client_tls: Option<muster_tls::ClientTls>,
    /// How many times the run logged in again (a token was refused).
    pub(crate) relogins: Arc<AtomicU64>,
}

impl<'a> Plan<'a> {
    /// Checks the flags, and picks the seed (`--seed` or the clock).
    pub(crate) fn new(args: &'a BenchArgs, endpoints: &'a [String]) -> Result<Plan<'a>, Error> {
        if endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        Ok(Plan {
            args,
            endpoints,
            keys: KeySpace::new(&args.key_prefix, args.key_size, args.keys)?,
            seed: Seed::given_or_clock(args.seed),
            tls: None,
            credentials: None,
            client_tls: None,
            relogins: Arc::default(),
        })
    }

    /// Opens the connections of `clients` clients.
    pub(crate) async fn open(&self, clients: usize) -> Result<(Load, Channels), Error> {
        let load = self.args.load(clients);
        let channels = Channels::open(self, load.connections).await?;
        Ok((load, channels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(line: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(line.iter().copied()))
            .unwrap()
            .bench
    }

    #[test]
    fn connections_default_to_one_per_eight_clients() {
        let load = args(&["put", "--clients", "20"]).load(20);
        assert_eq!((load.clients, load.connections), (20, 3));
        let load = args(&["put", "--conns", "50"]).load(4);
        assert_eq!(load.connections, 4, "never more connections than clients");
    }

    #[test]
    fn durations_need_a_unit() {
        assert!(Cli::try_parse_from(["bench", "put", "--duration", "10"]).is_err());
        assert_eq!(
            args(&["watch", "--put-interval", "5ms"]).put_interval,
            Duration::from_millis(5)
        );
    }

    #[test]
    fn a_plan_needs_endpoints_and_room_for_the_keys() {
        let put = args(&["put", "--seed", "9"]);
        assert!(matches!(Plan::new(&put, &[]), Err(Error::NoEndpoints)));
        let endpoints = ["http://127.0.0.1:1".to_string()];
        assert_eq!(Plan::new(&put, &endpoints).unwrap().seed, Seed(9));
        let tight = args(&["put", "--key-size", "4"]);
        let err = Plan::new(&tight, &endpoints).unwrap_err();
        assert!(
            err.to_string().contains("--key-size 4 is too small"),
            "{err}"
        );
    }
}
