//! Flags every subcommand shares, as etcdctl's and consul's: where the
//! registry is, who we are, under which prefix services live, how long to
//! wait, and how to print.

use std::time::Duration;

use anyhow::{Context, bail};
use muster::{Config, Etcd};

/// Global flags; accepted before or after the subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalArgs {
    /// etcd v3 endpoints (host:port or http://host:port), comma-separated.
    #[arg(
        long,
        global = true,
        env = "MUSTER_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// Username and password for etcd auth, as `name:password`
    /// (or `name` with the password in MUSTER_PASSWORD).
    #[arg(long, global = true, env = "MUSTER_USER")]
    pub user: Option<String>,
    /// Key prefix under which services live.
    #[arg(long, global = true, env = "MUSTER_PREFIX", default_value = muster::instance::DEFAULT_PREFIX)]
    pub prefix: String,
    /// How long one request to the registry may take (e.g. 5s, 500ms).
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable lines and tables.
    #[value(alias = "text")]
    Table,
    /// JSON (one object per line for streams).
    Json,
}

impl GlobalArgs {
    /// The endpoints as `http://host:port` URLs.
    pub fn endpoint_urls(&self) -> anyhow::Result<Vec<String>> {
        normalize_endpoints(&self.endpoints)
    }

    /// The client configuration these flags describe.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::new(self.endpoint_urls()?).with_request_timeout(self.timeout);
        config.connect_timeout = self.timeout.min(config.connect_timeout);
        if let Some(user) = &self.user {
            let (name, password) = match user.split_once(':') {
                Some((name, password)) => (name.to_string(), password.to_string()),
                None => (
                    user.clone(),
                    std::env::var("MUSTER_PASSWORD").with_context(|| {
                        format!("--user {user:?} has no password: write name:password or set MUSTER_PASSWORD")
                    })?,
                ),
            };
            if name.is_empty() {
                bail!("--user: the user name is empty");
            }
            config = config.with_credentials(name, password);
        }
        muster::instance::validate_prefix(&self.prefix)
            .with_context(|| format!("--prefix {:?}", self.prefix))?;
        Ok(config)
    }

    /// A handle on the registry (connects lazily; the first call reports an
    /// unreachable registry).
    pub fn connect(&self) -> anyhow::Result<Etcd> {
        Etcd::connect(self.config()?).context("cannot set up the registry client")
    }
}

/// Installs the SIGINT and SIGTERM handlers now; the future resolves on
/// the first signal.
pub fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Parses `10s`, `500ms`, `1m`, `1.5h`: the library's syntax, shared by
/// every flag and the gateway's routes file.
pub use muster::parse_duration;

/// Endpoints as `http://host:port` URLs.
pub fn normalize_endpoints(endpoints: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for endpoint in endpoints {
        let endpoint = endpoint.trim();
        if endpoint.is_empty() {
            continue;
        }
        if endpoint.starts_with("https://") {
            bail!("endpoint {endpoint}: TLS is not supported yet; use http://");
        }
        let url = if endpoint.starts_with("http://") {
            endpoint.trim_end_matches('/').to_string()
        } else {
            format!("http://{endpoint}")
        };
        tonic::transport::Endpoint::from_shared(url.clone())
            .with_context(|| format!("invalid endpoint {endpoint:?}"))?;
        out.push(url);
    }
    if out.is_empty() {
        bail!("no endpoint given (--endpoints host:port)");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let urls = normalize_endpoints(&["127.0.0.1:2379".into(), "http://h:1/".into()]).unwrap();
        assert_eq!(urls, ["http://127.0.0.1:2379", "http://h:1"]);
        assert!(normalize_endpoints(&[" ".into()]).is_err());
        assert!(normalize_endpoints(&["https://h:1".into()]).is_err());
    }
}
