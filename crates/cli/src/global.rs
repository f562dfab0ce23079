//! Flags every subcommand shares, as etcdctl's and consul's: where the
//! registry is, who we are, under which prefix services live, how long to
//! wait, and how to print.

use std::time::Duration;

use anyhow::{Context, bail};
use muster::{Config, Etcd};

/// Global flags; accepted before or after the subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct GlobalArgs {
    /// etcd v3 endpoints (host:port, http://host:port or
    /// https://host:port), comma-separated. A bare host:port is TLS when a
    /// TLS flag is given.
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
    /// Verify the registry's certificate with this CA bundle (PEM); without
    /// it, https endpoints are verified against the system's CAs.
    #[arg(long, global = true, env = "MUSTER_CACERT", value_name = "FILE")]
    pub cacert: Option<std::path::PathBuf>,
    /// Present this client certificate (PEM), for registries that require
    /// one (etcd's --client-cert-auth).
    #[arg(
        long,
        global = true,
        env = "MUSTER_CERT",
        value_name = "FILE",
        requires = "key"
    )]
    pub cert: Option<std::path::PathBuf>,
    /// The key of --cert (PEM).
    #[arg(
        long,
        global = true,
        env = "MUSTER_KEY",
        value_name = "FILE",
        requires = "cert"
    )]
    pub key: Option<std::path::PathBuf>,
    /// Accept any server certificate: encrypted, but the registry is not
    /// authenticated. For first steps only.
    #[arg(long, global = true)]
    pub insecure_skip_tls_verify: bool,
    /// Key prefix under which services live [default: the layout's:
    /// /muster/services, /microservices for kratos, /micro/registry for
    /// go-micro, none for etcd-naming and go-zero].
    #[arg(
        long = "prefix",
        global = true,
        env = "MUSTER_PREFIX",
        value_name = "PREFIX"
    )]
    pub prefix_flag: Option<String>,
    /// How entries are spelled under the prefix: muster, etcd-naming,
    /// kratos, go-zero, go-micro (what their Go libraries write), or auto
    /// (read any of them, per key).
    #[arg(
        long,
        global = true,
        env = "MUSTER_LAYOUT",
        default_value = "muster",
        value_name = "LAYOUT"
    )]
    pub layout: muster::LayoutKind,
    /// Also follow services in this layout and prefix (`LAYOUT` for its
    /// library's default prefix, or `LAYOUT:PREFIX`), besides --layout and
    /// --prefix: ls, watch, dashboard, gateway and dns then show one table
    /// over a mixed fleet, e.g. `--also kratos`. Repeatable.
    #[arg(long, global = true, value_name = "LAYOUT[:PREFIX]")]
    pub also: Vec<muster::Source>,
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
    /// The key prefix: `--prefix`, or the layout's default.
    pub fn prefix(&self) -> &str {
        self.prefix_flag
            .as_deref()
            .unwrap_or(self.layout.default_prefix())
    }

    /// The prefix and its layout.
    pub fn source(&self) -> muster::Source {
        muster::Source::with_prefix(self.layout, self.prefix())
    }

    /// Every source to follow: [`GlobalArgs::source`], then `--also`.
    pub fn sources(&self) -> Vec<muster::Source> {
        let mut sources = vec![self.source()];
        sources.extend(self.also.iter().cloned());
        sources
    }

    /// The endpoints as `http://host:port` or `https://host:port` URLs.
    pub fn endpoint_urls(&self) -> anyhow::Result<Vec<String>> {
        normalize_endpoints(&self.endpoints, self.tls_flags())
    }

    /// Whether a TLS flag was given.
    fn tls_flags(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some() || self.insecure_skip_tls_verify
    }

    /// The TLS settings the flags describe, when the endpoints are TLS.
    pub fn tls(&self) -> anyhow::Result<Option<muster::ClientTls>> {
        let urls = self.endpoint_urls()?;
        Ok(self.tls_for(&urls))
    }

    /// [`GlobalArgs::tls`] for endpoints already turned into `urls`.
    fn tls_for(&self, urls: &[String]) -> Option<muster::ClientTls> {
        if !urls.iter().any(|u| u.starts_with("https://")) {
            return None;
        }
        let mut tls =
            muster::ClientTls::new().with_insecure_skip_verify(self.insecure_skip_tls_verify);
        if let Some(ca) = &self.cacert {
            tls = tls.with_ca(ca.as_path());
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.with_identity(cert.as_path(), key.as_path());
        }
        Some(tls)
    }

    /// `--user` as (name, password): `name:password`, or `name` with the
    /// password in MUSTER_PASSWORD; `None` without `--user`.
    pub fn credentials(&self) -> anyhow::Result<Option<(String, String)>> {
        let Some(user) = &self.user else {
            return Ok(None);
        };
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
        Ok(Some((name, password)))
    }

    /// The client configuration these flags describe.
    pub fn config(&self) -> anyhow::Result<Config> {
        let urls = self.endpoint_urls()?;
        let mut config = Config::new(&urls).with_request_timeout(self.timeout);
        config.tls = self.tls_for(&urls);
        config.connect_timeout = self.timeout.min(config.connect_timeout);
        if let Some((name, password)) = self.credentials()? {
            config = config.with_credentials(name, password);
        }
        self.source()
            .validate()
            .with_context(|| format!("--prefix {:?}", self.prefix()))?;
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

/// Endpoints as URLs, the library's way ([`Config::urls`]): bare
/// `host:port` becomes `https://` when `tls`, else `http://`; mixing
/// plaintext and TLS endpoints is an error. Empty entries are skipped.
pub fn normalize_endpoints(endpoints: &[String], tls: bool) -> anyhow::Result<Vec<String>> {
    let given: Vec<&str> = endpoints
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .collect();
    if given.is_empty() {
        bail!("no endpoint given (--endpoints host:port)");
    }
    let mut config = Config::new(given);
    config.tls = tls.then(muster::ClientTls::new);
    config
        .urls()
        .map_err(|e| anyhow::anyhow!("--endpoints: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let urls =
            normalize_endpoints(&["127.0.0.1:2379".into(), "http://h:1/".into()], false).unwrap();
        assert_eq!(urls, ["http://127.0.0.1:2379", "http://h:1"]);
        assert!(normalize_endpoints(&[" ".into()], false).is_err());
        let tls = normalize_endpoints(&["h:1".into(), "https://h:2".into()], true).unwrap();
        assert_eq!(tls, ["https://h:1", "https://h:2"]);
        let mixed = normalize_endpoints(&["https://h:1".into(), "http://h:2".into()], false);
        assert!(mixed.unwrap_err().to_string().contains("mixes"));
        assert!(normalize_endpoints(&["ftp://h:1".into()], false).is_err());
    }
}
