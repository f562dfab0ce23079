//! Why a benchmark could not run, or ran and saw requests fail.

/// A benchmark's failure, worded for the person running it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No endpoint to connect to.
    #[error("no endpoint given (--endpoints host:port)")]
    NoEndpoints,
    /// A flag is out of its range.
    #[error("{0}")]
    Usage(String),
    /// The TLS settings could not be loaded.
    #[error(transparent)]
    Tls(muster_tls::Error),
    /// An endpoint is not a URL tonic can connect to.
    #[error("invalid endpoint {url}")]
    InvalidEndpoint {
        /// The endpoint as given.
        url: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },
    /// Nothing answered at an endpoint.
    #[error("cannot connect to {url}: {cause}")]
    Connect {
        /// The endpoint.
        url: String,
        /// The transport error and its causes, on one line.
        cause: String,
    },
    /// An endpoint answered, but not as etcd's KV service.
    #[error("{url} does not answer etcd's KV.Range: {status}")]
    NotEtcd {
        /// The endpoint.
        url: String,
        /// The gRPC status it answered.
        status: String,
    },
    /// Logging in failed: wrong user or password, or the server refused.
    #[error("cannot log in to {url} as {user}: {cause}")]
    Auth {
        /// The endpoint.
        url: String,
        /// The user name.
        user: String,
        /// The gRPC status (etcd's message), on one line.
        cause: String,
    },
    /// An endpoint has auth enabled and refused the bench's Range: no
    /// credentials were given, or the user may not read the bench's keys.
    #[error("{url} refused a Range of {key}: {status} ({hint})")]
    NotAllowed {
        /// The endpoint.
        url: String,
        /// The key asked for.
        key: String,
        /// The gRPC status it answered.
        status: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// An endpoint accepted the connection but did not answer a Range.
    #[error("{url} did not answer a Range within 10 s")]
    Unresponsive {
        /// The endpoint.
        url: String,
    },
    /// A request the workload needs before measuring failed.
    #[error("{doing}: {cause}")]
    Setup {
        /// What the request was for ("granting a lease").
        doing: &'static str,
        /// The gRPC status (or other reason) it failed with, on one line.
        cause: String,
    },
    /// `watch`: the watchers were not all created in time.
    #[error("watchers were not all created within 60 s")]
    WatchersNotCreated,
    /// `ready`: the endpoint did not answer in time.
    #[error(
        "{url}: no successful Range within {timeout:?} ({attempts} attempts); last error: {last_error}"
    )]
    NotReady {
        /// The endpoint.
        url: String,
        /// `--ready-timeout`.
        timeout: std::time::Duration,
        /// Ranges tried.
        attempts: u64,
        /// The last attempt's error (empty if every attempt timed out).
        last_error: String,
    },
    /// A task of the benchmark panicked or was cancelled.
    #[error("{what} failed")]
    Task {
        /// Which task ("a client task").
        what: &'static str,
        /// The task's end.
        #[source]
        source: tokio::task::JoinError,
    },
    /// The report could not be written.
    #[error("cannot write the report")]
    Write(#[source] std::io::Error),
    /// The benchmark ran and wrote its report, but requests failed.
    #[error("bench {workload}: {failure}")]
    Failed {
        /// The workload.
        workload: &'static str,
        /// How many requests failed, and the first error.
        failure: String,
    },
}
