//! Connections to the endpoints (logged in, with credentials), the probe
//! that checks they speak etcd's KV API, and gRPC failures as one line of
//! text.

use std::fmt::Write as _;
use std::time::Duration;

use muster_proto as pb;
use pb::kv_client::KvClient;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use crate::args::Plan;
use crate::auth::{Intercepted, TokenInterceptor, log_in, not_allowed};
use crate::error::Error;

/// HTTP/2 connections, spread over the endpoints, each with its endpoint's
/// token; client `c` uses connection `c` modulo their number.
#[derive(Clone)]
pub(crate) struct Channels(Vec<(Channel, TokenInterceptor)>);

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels")
            .field("connections", &self.0.len())
            .finish()
    }
}

impl Channels {
    /// Opens `n` connections (at least one), spread over the plan's
    /// endpoints, logs in once per endpoint (with the plan's credentials),
    /// and checks that each endpoint answers a Range.
    pub(crate) async fn open(plan: &Plan<'_>, n: usize) -> Result<Channels, Error> {
        let endpoints = plan.endpoints;
        if endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        let n = n.max(1);
        let mut set = JoinSet::new();
        for i in 0..n {
            let url = endpoints[i % endpoints.len()].clone();
            let tls = plan.tls.clone();
            set.spawn(async move { (i, connect_one(&url, tls.as_ref()).await) });
        }
        let mut channels: Vec<Option<Channel>> = vec![None; n];
        while let Some(joined) = set.join_next().await {
            let (i, channel) = joined.map_err(|source| Error::Task {
                what: "a connecting task",
                source,
            })?;
            channels[i] = Some(channel?);
        }
        let channels: Vec<Channel> = channels.into_iter().flatten().collect();
        // Connection i goes to endpoint i modulo their number: the first
        // connection to each logs in for all of that endpoint's.
        let mut logins = Vec::with_capacity(endpoints.len().min(n));
        for (channel, url) in channels.iter().zip(endpoints) {
            let auth = log_in(url, channel, plan.credentials.as_ref(), &plan.relogins).await?;
            probe(auth.wrap(channel.clone()), url, plan).await?;
            logins.push(auth);
        }
        let channels = channels
            .into_iter()
            .enumerate()
            .map(|(i, channel)| (channel, logins[i % logins.len()].clone()))
            .collect();
        Ok(Channels(channels))
    }

    /// The connection of client `client`.
    pub(crate) fn get(&self, client: usize) -> Intercepted {
        let (channel, auth) = &self.0[client % self.0.len()];
        auth.wrap(channel.clone())
    }

    /// The token of client `client`'s connection (for logging in again).
    pub(crate) fn auth(&self, client: usize) -> TokenInterceptor {
        self.0[client % self.0.len()].1.clone()
    }
}

/// One connection to `url`; `https://` ones dial through `tls` (tonic is
/// given the `http://` form so that it leaves TLS to the dialer, as the
/// library does).
pub(crate) async fn connect_one(
    url: &str,
    tls: Option<&muster_tls::TlsConnector>,
) -> Result<Channel, Error> {
    let invalid = |source| Error::InvalidEndpoint {
        url: url.to_string(),
        source,
    };
    let secure = url.starts_with("https://");
    let dial = if secure {
        url.replacen("https://", "http://", 1)
    } else {
        url.to_string()
    };
    let endpoint = Endpoint::from_shared(dial)
        .map_err(invalid)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let connected = match tls {
        Some(tls) if secure => {
            let origin = Endpoint::from_shared(url.to_string()).map_err(invalid)?;
            endpoint
                .origin(origin.uri().clone())
                .connect_with_connector(tls.clone())
                .await
        }
        _ => endpoint.connect().await,
    };
    connected.map_err(|e| Error::Connect {
        url: url.to_string(),
        cause: error_chain(&e),
    })
}

/// The key the probe reads: under the bench's prefix, so that a user
/// allowed the bench's keys may read it (and outside the keyspace's
/// indexes and the watched key).
pub(crate) fn probe_key(plan: &Plan<'_>) -> Vec<u8> {
    format!("{}probe", plan.args.key_prefix).into_bytes()
}

/// Fails unless `url` answers a Range within a few seconds.
async fn probe(channel: Intercepted, url: &str, plan: &Plan<'_>) -> Result<(), Error> {
    let key = probe_key(plan);
    let request = pb::RangeRequest {
        key: key.clone(),
        count_only: true,
        ..Default::default()
    };
    match tokio::time::timeout(
        Duration::from_secs(10),
        KvClient::new(channel).range(request),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) if not_allowed(&status) => Err(Error::NotAllowed {
            url: url.to_string(),
            key: String::from_utf8_lossy(&key).into_owned(),
            status: status_text(&status),
            hint: if plan.credentials.is_none() {
                "the server has auth enabled: log in with --user name:password"
            } else {
                "the user needs read and write permission on the bench's keys, --key-prefix"
            },
        }),
        Ok(Err(status)) => Err(Error::NotEtcd {
            url: url.to_string(),
            status: status_text(&status),
        }),
        Err(_) => Err(Error::Unresponsive {
            url: url.to_string(),
        }),
    }
}

/// An error with its sources, on one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            let _ = write!(text, ": {more}");
        }
        source = e.source();
    }
    text
}

/// A gRPC status on one line: code, message, transport cause.
pub(crate) fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{:?}", status.code());
    if !status.message().is_empty() {
        let _ = write!(text, ": {}", status.message());
    }
    if let Some(source) = std::error::Error::source(status) {
        let cause = error_chain(source);
        if !text.contains(&cause) {
            let _ = write!(text, " ({cause})");
        }
    }
    text
}

/// A failed setup request as an [`Error`]: what it was for, and its status.
pub(crate) fn setup_failed(doing: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |status| Error::Setup {
        doing,
        cause: status_text(&status),
    }
}
