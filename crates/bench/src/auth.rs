//! etcd's authentication: one login per endpoint (`Auth.Authenticate`),
//! its simple token attached to every request as gRPC metadata `token`,
//! and a new login, shared by every client of the endpoint, when the
//! server no longer accepts the token.
//!
//! Without credentials the interceptor holds nothing and adds nothing: the
//! request goes out as it would on the bare channel.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use muster_proto as pb;
use pb::auth_client::AuthClient;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::connect::status_text;
use crate::error::Error;

/// The gRPC metadata key etcd reads the token from.
const TOKEN_KEY: &str = "token";

/// Who the benchmark logs in as, on servers with auth enabled.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// Its password.
    pub password: String,
}

impl Credentials {
    /// `user` with `password`.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            user: user.into(),
            password: password.into(),
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// A connection whose requests carry the endpoint's token, if any.
pub(crate) type Intercepted = InterceptedService<Channel, TokenInterceptor>;

/// Attaches the current token of an endpoint's [`Session`] to each
/// request; without a session (no credentials, or auth not enabled on the
/// server), leaves requests alone.
#[derive(Clone, Default)]
pub(crate) struct TokenInterceptor(Option<Arc<Session>>);

impl Interceptor for TokenInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(session) = &self.0 {
            let token = AsciiMetadataValue::clone(&session.token.load());
            request
                .metadata_mut()
                .insert(AsciiMetadataKey::from_static(TOKEN_KEY), token);
        }
        Ok(request)
    }
}

/// What came of a failed request, as far as the token goes.
pub(crate) enum Renewal {
    /// It did not fail for its token.
    NotNeeded,
    /// Its token was refused, and there is a new one: send it again.
    Renewed,
    /// Its token was refused, and logging in again failed (the reason).
    Failed(String),
}

impl TokenInterceptor {
    /// `channel` with this interceptor.
    pub(crate) fn wrap(&self, channel: Channel) -> Intercepted {
        InterceptedService::new(channel, self.clone())
    }

    /// The token requests go out with now (`None` without a session).
    pub(crate) fn token(&self) -> Option<Arc<AsciiMetadataValue>> {
        self.0.as_ref().map(|s| s.token.load_full())
    }

    /// After a request sent with `sent_with` (from [`TokenInterceptor::token`])
    /// failed with `status`: if the server refused the token (expired, or
    /// issued before its users or roles changed), logs in again, once for
    /// every client of the endpoint (those who come later find the new
    /// token and use it). The future borrows nothing (clients' futures
    /// must be `Send` for any lifetime).
    pub(crate) fn renew(
        &self,
        sent_with: Option<Arc<AsciiMetadataValue>>,
        status: &tonic::Status,
    ) -> impl Future<Output = Renewal> + Send + 'static {
        let session = match (&self.0, sent_with) {
            (Some(session), Some(stale)) if token_refused(status) => {
                Some((session.clone(), stale, status_text(status)))
            }
            _ => None,
        };
        async move {
            let Some((session, stale, refused)) = session else {
                return Renewal::NotNeeded;
            };
            session.renew(&stale, refused).await
        }
    }
}

/// One endpoint's login: the token, and what it takes to get a new one.
pub(crate) struct Session {
    channel: Channel,
    credentials: Credentials,
    token: ArcSwap<AsciiMetadataValue>,
    /// Held while logging in again.
    renewing: tokio::sync::Mutex<()>,
    /// Set when logging in again failed: no client tries again.
    failed: std::sync::OnceLock<String>,
    /// New logins of the run, over every endpoint.
    relogins: Arc<AtomicU64>,
}

/// A failed login: the error, and whether the server answered no (wrong
/// user or password) rather than not answering at all.
#[derive(Debug)]
pub(crate) struct LoginFailed {
    pub(crate) error: Error,
    pub(crate) refused: bool,
}

impl From<LoginFailed> for Error {
    fn from(failed: LoginFailed) -> Error {
        failed.error
    }
}

impl Session {
    /// Logs in again, unless another client did since `stale` was
    /// refused (`refused`: how).
    async fn renew(&self, stale: &Arc<AsciiMetadataValue>, refused: String) -> Renewal {
        let _one_at_a_time = self.renewing.lock().await;
        if !Arc::ptr_eq(&self.token.load_full(), stale) {
            return Renewal::Renewed; // another client logged in meanwhile
        }
        if let Some(failed) = self.failed.get() {
            return Renewal::Failed(failed.clone());
        }
        match login(&self.channel, &self.credentials).await {
            Ok(Some(token)) => {
                self.token.store(Arc::new(token));
                self.relogins.fetch_add(1, Ordering::Relaxed);
                Renewal::Renewed
            }
            Ok(None) => Renewal::Failed(format!(
                "{refused}, and logging in again: auth is no longer enabled"
            )),
            Err(cause) => {
                let failed = format!(
                    "{refused}, and logging in again as {} failed: {}",
                    self.credentials.user,
                    status_text(&cause)
                );
                let _ = self.failed.set(failed.clone());
                Renewal::Failed(failed)
            }
        }
    }
}

/// Logs in to `url` over `channel` as `credentials`, and returns the
/// interceptor that attaches the token; without credentials, or when the
/// server has auth disabled (as etcd's own client does), one that adds
/// nothing. Each new login later counts in `relogins`.
pub(crate) async fn log_in(
    url: &str,
    channel: &Channel,
    credentials: Option<&Credentials>,
    relogins: &Arc<AtomicU64>,
) -> Result<TokenInterceptor, LoginFailed> {
    let Some(credentials) = credentials else {
        return Ok(TokenInterceptor::default());
    };
    let token = login(channel, credentials)
        .await
        .map_err(|status| LoginFailed {
            // etcd's "authentication failed, invalid user ID or password"
            // (and the like) is an answer; Unavailable or a timeout is not.
            refused: !matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
            ),
            error: Error::Auth {
                url: url.to_string(),
                user: credentials.user.clone(),
                cause: status_text(&status),
            },
        })?;
    Ok(TokenInterceptor(token.map(|token| {
        Arc::new(Session {
            channel: channel.clone(),
            credentials: credentials.clone(),
            token: ArcSwap::from_pointee(token),
            renewing: tokio::sync::Mutex::new(()),
            failed: std::sync::OnceLock::new(),
            relogins: relogins.clone(),
        })
    })))
}

/// etcd's Authenticate: the token, or `None` if auth is not enabled.
async fn login(
    channel: &Channel,
    credentials: &Credentials,
) -> Result<Option<AsciiMetadataValue>, tonic::Status> {
    let request = pb::AuthenticateRequest {
        name: credentials.user.clone(),
        password: credentials.password.clone(),
    };
    let answer = tokio::time::timeout(
        LOGIN_TIMEOUT,
        AuthClient::new(channel.clone()).authenticate(request),
    )
    .await
    .map_err(|_| tonic::Status::deadline_exceeded(format!("no answer within {LOGIN_TIMEOUT:?}")))?;
    match answer {
        Ok(response) => AsciiMetadataValue::try_from(response.into_inner().token)
            .map(Some)
            .map_err(|_| tonic::Status::internal("the server returned a token that is not ASCII")),
        Err(status)
            if status.code() == tonic::Code::FailedPrecondition
                && status.message().contains("authentication is not enabled") =>
        {
            Ok(None)
        }
        Err(status) => Err(status),
    }
}

/// How long a login may take (bcrypt at a high cost is slow on purpose).
const LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether etcd refused a request for its token, as etcd's client decides
/// to log in again: the token is unknown or expired ("invalid auth
/// token"), or older than the auth store ("revision of auth store is
/// old").
pub(crate) fn token_refused(status: &tonic::Status) -> bool {
    let message = status.message();
    matches!(
        status.code(),
        tonic::Code::Unauthenticated | tonic::Code::InvalidArgument
    ) && (message.contains("invalid auth token")
        || message.contains("revision of auth store is old"))
}

/// Whether etcd refused a request for who sent it: no token while auth is
/// enabled, or a user without the permission.
pub(crate) fn not_allowed(status: &tonic::Status) -> bool {
    let message = status.message();
    matches!(
        status.code(),
        tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
    ) && (message.contains("user name is empty") || message.contains("permission denied"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_tokens_are_told_from_other_failures() {
        let expired = tonic::Status::unauthenticated("etcdserver: invalid auth token");
        assert!(token_refused(&expired));
        let old = tonic::Status::invalid_argument("etcdserver: revision of auth store is old");
        assert!(token_refused(&old));
        let denied = tonic::Status::permission_denied("etcdserver: permission denied");
        assert!(!token_refused(&denied) && not_allowed(&denied));
        let anonymous = tonic::Status::invalid_argument("etcdserver: user name is empty");
        assert!(!token_refused(&anonymous) && not_allowed(&anonymous));
        assert!(!token_refused(&tonic::Status::unavailable(
            "connection refused"
        )));
    }

    #[test]
    fn credentials_keep_the_password_out_of_debug() {
        let c = Credentials::new("bench", "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    use crate::args::{BenchArgs, Plan};
    use crate::connect::Channels;
    use crate::recorder::Recorder;
    use clap::Parser as _;
    use muster_testkit::Registry;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    /// Runs etcdctl against `endpoint`; panics unless it succeeds.
    fn etcdctl(endpoint: &str, args: &[&str]) {
        muster_testkit::etcdctl_ok(endpoint, args, "");
    }

    /// A refused token (here: the user's password changed, which drops
    /// its tokens, as an expiry would) is renewed by one login shared by
    /// every client, and the refused requests go through on the new one.
    async fn a_refused_token_is_renewed_once(registry: Box<dyn Registry>) {
        let endpoint = registry.endpoint();
        for args in [
            &["user", "add", "root:rootpw"][..],
            &["role", "add", "bench"],
            &[
                "role",
                "grant-permission",
                "bench",
                "--prefix=true",
                "readwrite",
                "bench/",
            ],
            &["user", "add", "bench:benchpw"],
            &["user", "grant-role", "bench", "bench"],
            &["auth", "enable"],
        ] {
            etcdctl(&endpoint, args);
        }
        let args = Cli::parse_from(["bench", "put", "--keys", "100"]).bench;
        let endpoints = [endpoint.clone()];
        let mut plan = Plan::new(&args, &endpoints).unwrap();
        plan.credentials = Some(Credentials::new("bench", "benchpw"));
        let channels = Channels::open(&plan, 2).await.unwrap();
        let clients = 8;
        let put_all = || {
            let mut set = tokio::task::JoinSet::new();
            for c in 0..clients {
                let mut kv = KvClient::new(channels.get(c));
                let auth = channels.auth(c);
                set.spawn(async move {
                    let mut rec = Recorder::default();
                    let key = format!("bench/{c}").into_bytes();
                    let request = || pb::PutRequest {
                        key: key.clone(),
                        value: b"v".to_vec(),
                        ..Default::default()
                    };
                    rec.time_kv(&mut kv, &auth, request).await;
                    rec
                });
            }
            async move {
                let mut all = Recorder::default();
                while let Some(rec) = set.join_next().await {
                    all.merge(rec.unwrap());
                }
                all
            }
        };
        let first = put_all().await;
        assert_eq!(first.failure(), None);
        assert_eq!(plan.relogins.load(Ordering::Relaxed), 0);

        // The same password again: etcd drops the user's tokens all the
        // same.
        let channel = crate::connect::connect_one(&endpoint, None).await.unwrap();
        let root = login(&channel, &Credentials::new("root", "rootpw"))
            .await
            .unwrap()
            .expect("auth is enabled");
        let mut change = tonic::Request::new(pb::AuthUserChangePasswordRequest {
            name: "bench".into(),
            password: "benchpw".into(),
        });
        change.metadata_mut().insert(TOKEN_KEY, root);
        AuthClient::new(channel)
            .user_change_password(change)
            .await
            .unwrap();
        // The interceptor still sends the old token: refused.
        let status = KvClient::new(channels.get(0))
            .range(pb::RangeRequest {
                key: b"bench/0".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(token_refused(&status), "{status:?}");

        let again = put_all().await;
        assert_eq!(again.failure(), None, "every refused put was sent again");
        assert_eq!(again.latencies.len(), clients as u64);
        assert_eq!(
            plan.relogins.load(Ordering::Relaxed),
            1,
            "one login for all the clients"
        );
    }

    use pb::kv_client::KvClient;
    muster_testkit::on_both!(a_refused_token_is_renewed_once);
}
