//! The etcd v3 gRPC services over the [`Core`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use muster_proto as pb;
use pb::watch_request::RequestUnion;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Access, AuthError, Caller};
use crate::core::Core;

/// The slack etcd gives gRPC above `--max-request-bytes`.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
/// The largest message the transport decodes at all; anything between the
/// configured limits and this gets etcd's own errors.
pub const TRANSPORT_LIMIT_BYTES: usize = 64 * 1024 * 1024;

/// Responses a watch stream may have queued before its watchers fall back
/// to catching up from history.
const WATCH_STREAM_BUFFER: usize = 1024;

/// The services of one server.
#[derive(Clone, Debug)]
pub struct Services {
    core: Arc<Core>,
    endpoint: String,
    progress_interval: Duration,
    cert_identity: bool,
}

impl Services {
    /// Services over `core`, advertising `endpoint` as the client URL.
    pub fn new(core: Arc<Core>, endpoint: String, progress_interval: Duration) -> Services {
        Services {
            core,
            endpoint,
            progress_interval,
            cert_identity: false,
        }
    }

    /// With `on`, a request without a token is the user named by its
    /// verified client certificate's Common Name (etcd's
    /// `--client-cert-auth` with auth enabled).
    pub fn with_cert_identity(mut self, on: bool) -> Services {
        self.cert_identity = on;
        self
    }

    /// The user the request's client certificate names, when certificates
    /// name users.
    fn cert_user<T>(&self, req: &Request<T>) -> Option<Arc<str>> {
        if !self.cert_identity {
            return None;
        }
        let certs = req.peer_certs()?;
        let cn = muster_tls::common_name(certs.first()?.as_ref())?;
        Some(Arc::from(cn))
    }

    /// Who sends `req`: the user of its token (gRPC metadata `token`, or
    /// `authorization` with or without `Bearer `), else, when client
    /// certificates name users, the certificate's common name, else
    /// nobody. An unknown or expired token is etcd's "invalid auth token",
    /// whether auth is on or not (as etcd's).
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        // The certificate is parsed only when it could name the caller:
        // no token, and auth on (otherwise every request under mutual TLS
        // would pay for an X.509 parse).
        caller_of(&self.core, req.metadata(), || {
            self.core
                .auth_enabled()
                .then(|| self.cert_user(req))
                .flatten()
        })
    }

    /// The request's message, or etcd's two answers to a large request:
    /// past the limit plus gRPC's overhead allowance the transport refuses
    /// it; past the limit alone the server does.
    fn sized<M: Message>(&self, req: Request<M>) -> Result<M, Status> {
        let msg = req.into_inner();
        let len = msg.encoded_len();
        let max = self.core.config().max_request_bytes;
        if len > max + GRPC_OVERHEAD_BYTES {
            return Err(Status::resource_exhausted(format!(
                "grpc: received message larger than max ({len} vs. {})",
                max + GRPC_OVERHEAD_BYTES
            )));
        }
        if len > max {
            return Err(Status::invalid_argument("etcdserver: request is too large"));
        }
        Ok(msg)
    }
}

/// The token in `metadata`, if any (see [`Services::caller`]).
fn token_of(metadata: &tonic::metadata::MetadataMap) -> Option<Result<&str, Status>> {
    let value = metadata
        .get("token")
        .or_else(|| metadata.get("authorization"))?;
    Some(
        value
            .to_str()
            .map(|t| t.strip_prefix("Bearer ").unwrap_or(t).trim())
            .map_err(|_| AuthError::InvalidAuthToken.status()),
    )
}

fn caller_of(
    core: &Core,
    metadata: &tonic::metadata::MetadataMap,
    cert_user: impl FnOnce() -> Option<Arc<str>>,
) -> Result<Caller, Status> {
    match token_of(metadata) {
        Some(Ok(token)) if core.is_internal_token(token) => Ok(Caller::System),
        Some(token) => match core.tokens().resolve(token?) {
            Some(user) => Ok(Caller::User(user)),
            None => Err(AuthError::InvalidAuthToken.status()),
        },
        None => Ok(cert_user().map_or(Caller::Anonymous, Caller::User)),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::kv_server::Kv for Services {
    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let caller = self.caller(&req)?;
        let req = self.sized(req)?;
        self.core.range(&req, &caller).map(Response::new)
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let caller = self.caller(&req)?;
        let req = self.sized(req)?;
        self.core.put(req, &caller).await.map(Response::new)
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let caller = self.caller(&req)?;
        let req = self.sized(req)?;
        self.core
            .delete_range(req, &caller)
            .await
            .map(Response::new)
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let caller = self.caller(&req)?;
        let req = self.sized(req)?;
        self.core.txn(req, &caller).await.map(Response::new)
    }

    async fn compact(
        &self,
        req: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        // etcd resolves the token of every request it applies.
        self.caller(&req)?;
        self.core
            .compact(req.into_inner().revision)
            .await
            .map(Response::new)
    }
}

#[tonic::async_trait]
impl pb::lease_server::Lease for Services {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        // No permission is needed (as etcd 3.4's), but a token that is
        // sent must be valid.
        self.caller(&req)?;
        let req = req.into_inner();
        self.core
            .lease_grant(req.id, req.ttl)
            .await
            .map(Response::new)
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .lease_revoke(req.into_inner().id, &caller)
            .await
            .map(Response::new)
    }

    type LeaseKeepAliveStream = BoxStream<pb::LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let core = self.core.clone();
        core.counters
            .keepalive_streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stream = req.into_inner().then(move |msg| {
            let core = core.clone();
            async move {
                let r = msg?;
                core.counters
                    .keepalive_messages
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(core.lease_keep_alive(r.id).await)
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(
            self.core.lease_time_to_live(req.id, req.keys),
        ))
    }

    async fn lease_leases(
        &self,
        _req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        Ok(Response::new(self.core.lease_leases()))
    }
}

#[tonic::async_trait]
impl pb::watch_server::Watch for Services {
    type WatchStream = BoxStream<pb::WatchResponse>;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // etcd reads the stream's token at every create.
        let metadata = req.metadata().clone();
        let cert_user = self.cert_user(&req);
        let inbound = req.into_inner();
        self.core
            .counters
            .watch_streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(WATCH_STREAM_BUFFER);
        tokio::spawn(serve_watch_stream(
            self.core.clone(),
            (metadata, cert_user),
            inbound,
            tx,
            self.progress_interval,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}

/// Whether the stream's caller may watch `create`'s range; etcd's cancel
/// reason if not.
fn watch_permitted(
    core: &Core,
    (metadata, cert_user): &StreamIdentity,
    create: &pb::WatchCreateRequest,
) -> Result<(), String> {
    let caller = caller_of(core, metadata, || cert_user.clone())
        .map_err(|_| go_status_text(AuthError::InvalidAuthToken))?;
    // etcd reads an empty key as "\0", the smallest key.
    let key: &[u8] = if create.key.is_empty() {
        &[0]
    } else {
        &create.key
    };
    core.check_access(&caller, Access::Read, key, &create.range_end)
        .map_err(|e| match e {
            AuthError::InvalidAuthToken | AuthError::UserEmpty => go_status_text(e),
            _ => go_status_text(AuthError::PermissionDenied),
        })
}

/// A gRPC status as Go's `status.Error` prints it, which is what etcd puts
/// in a refused watch's `cancel_reason`: `rpc error: code = PermissionDenied
/// desc = etcdserver: permission denied`.
fn go_status_text(e: AuthError) -> String {
    let code = match e.status().code() {
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::Unauthenticated => "Unauthenticated",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        _ => "Unknown",
    };
    format!("rpc error: code = {code} desc = {e}")
}

/// What names a watch stream's caller: its metadata (the token) and its
/// client certificate's user.
type StreamIdentity = (tonic::metadata::MetadataMap, Option<Arc<str>>);

/// Progress requests of a stream waiting for its watchers to be current
/// (see [`crate::watch::WatchHub::progress`]).
struct DeferredProgress {
    /// How many requests to answer (etcd 3.4 answers each).
    count: usize,
    /// The revision the answer must reach: the committed one when the
    /// last request came.
    at_least: i64,
    /// Changes when the answer may be ready.
    signal: tokio::sync::watch::Receiver<u64>,
}

/// Until `deferred`'s signal changes; forever without one.
async fn progress_may_be_ready(deferred: &mut Option<DeferredProgress>) {
    if let Some(d) = deferred
        && d.signal.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

async fn serve_watch_stream(
    core: Arc<Core>,
    metadata: StreamIdentity,
    mut inbound: Streaming<pb::WatchRequest>,
    tx: mpsc::Sender<pb::WatchResponse>,
    progress_interval: Duration,
) {
    let hub = core.hub().clone();
    let stream = hub.new_stream();
    let mut next_auto_id: i64 = 0;
    let mut deferred: Option<DeferredProgress> = None;
    let mut progress = tokio::time::interval(progress_interval);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    progress.tick().await;
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Ok(Some(req)) = msg else { break };
                match req.request_union {
                    Some(RequestUnion::CreateRequest(create)) => {
                        if let Err(reason) = watch_permitted(&core, &metadata, &create) {
                            let refused = pb::WatchResponse {
                                header: core.header(core.committed()),
                                watch_id: -1,
                                created: true,
                                canceled: true,
                                cancel_reason: reason,
                                ..Default::default()
                            };
                            if tx.send(refused).await.is_err() {
                                break;
                            }
                            continue;
                        }
                        let mut id = create.watch_id;
                        if id == 0 && crate::watch::check_range(&create).is_ok() {
                            // etcd's AutoWatchID: the next id not in use.
                            while hub.contains((stream, next_auto_id)) {
                                next_auto_id += 1;
                            }
                            id = next_auto_id;
                            next_auto_id += 1;
                        }
                        match hub.register((stream, id), &create, tx.clone(), core.committed()) {
                            Ok(rev) => {
                                let created = pb::WatchResponse {
                                    header: core.header(rev),
                                    watch_id: id,
                                    created: true,
                                    ..Default::default()
                                };
                                if tx.send(created).await.is_err() {
                                    break;
                                }
                                hub.start((stream, id));
                            }
                            Err(e) => {
                                let refused = pb::WatchResponse {
                                    header: core.header(core.committed()),
                                    // etcd answers a refused create with id -1.
                                    watch_id: -1,
                                    created: true,
                                    canceled: true,
                                    cancel_reason: e.to_string(),
                                    ..Default::default()
                                };
                                if tx.send(refused).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    Some(RequestUnion::CancelRequest(cancel)) if hub.cancel((stream, cancel.watch_id)) => {
                        let canceled = pb::WatchResponse {
                            header: core.header(core.committed()),
                            watch_id: cancel.watch_id,
                            canceled: true,
                            ..Default::default()
                        };
                        if tx.send(canceled).await.is_err() {
                            break;
                        }
                    }
                    Some(RequestUnion::CancelRequest(_)) => {}
                    Some(RequestUnion::ProgressRequest(_)) => {
                        // Answered below once the stream's watchers are
                        // current; subscribed before the first check.
                        let at_least = core.committed();
                        match &mut deferred {
                            Some(d) => {
                                d.count += 1;
                                d.at_least = d.at_least.max(at_least);
                            }
                            None => {
                                deferred = Some(DeferredProgress {
                                    count: 1,
                                    at_least,
                                    signal: hub.progress_signal(),
                                });
                            }
                        }
                    }
                    None => {}
                }
            }
            () = progress_may_be_ready(&mut deferred) => {}
            _ = progress.tick() => {
                let (rev, ids) = hub.progress_notify_targets(stream);
                for id in ids {
                    let _ = tx.try_send(pb::WatchResponse {
                        header: core.header(rev),
                        watch_id: id,
                        ..Default::default()
                    });
                }
            }
            _ = tx.closed() => break,
        }
        // Answers to progress requests: watch id -1 (clientv3 hands it to
        // every watcher of the stream), header only.
        if let Some(d) = &deferred
            && let Some(rev) = hub.progress(stream, d.at_least)
        {
            let count = d.count;
            deferred = None;
            for _ in 0..count {
                let resp = pb::WatchResponse {
                    header: core.header(rev),
                    watch_id: -1,
                    ..Default::default()
                };
                if tx.send(resp).await.is_err() {
                    break;
                }
            }
        }
    }
    hub.remove_stream(stream);
}

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for Services {
    type SnapshotStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>,
    >;

    async fn alarm(
        &self,
        req: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        self.core.alarm(req.get_ref()).await.map(Response::new)
    }

    async fn defragment(
        &self,
        req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core.defragment(&caller).await.map(Response::new)
    }

    async fn hash(
        &self,
        req: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core.hash_all(&caller).map(Response::new)
    }

    async fn hash_kv(
        &self,
        req: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        let caller = self.caller(&req)?;
        let revision = req.get_ref().revision;
        self.core.hash_kv(revision, &caller).map(Response::new)
    }

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        // Copy under the read lock, encode off the runtime, then stream
        // 32 KiB blobs of the encoded snapshot (format: crate::snapshot).
        let caller = self.caller(&req)?;
        let core = self.core.clone();
        let (revision, bytes) = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let view = core.snapshot_view(&caller)?;
            let copied = started.elapsed();
            let bytes = crate::snapshot::encode(&view);
            tracing::info!(
                revision = view.revision,
                records = view.events.len(),
                bytes = bytes.len(),
                copy_ms = copied.as_secs_f64() * 1e3,
                encode_ms = (started.elapsed() - copied).as_secs_f64() * 1e3,
                "snapshot: sending"
            );
            Ok::<_, Status>((view.revision, bytes))
        })
        .await
        .map_err(|e| Status::internal(format!("snapshot task failed: {e}")))??;
        let header = self.core.header(revision);
        let bytes = Arc::new(bytes);
        let total = bytes.len();
        let chunks = total.div_ceil(crate::snapshot::CHUNK_BYTES);
        let stream = tokio_stream::iter((0..chunks).map(move |i| {
            let start = i * crate::snapshot::CHUNK_BYTES;
            let end = (start + crate::snapshot::CHUNK_BYTES).min(total);
            Ok(pb::SnapshotResponse {
                header,
                remaining_bytes: (total - end) as u64,
                blob: bytes[start..end].to_vec(),
            })
        }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        let caller = self.caller(&req)?;
        let target = req.get_ref().target_id;
        self.core.move_leader(target, &caller).map(Response::new)
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let committed = self.core.committed();
        let stats = self.core.storage().stats();
        let info = self.core.header_info();
        Ok(Response::new(pb::StatusResponse {
            header: self.core.header(committed),
            version: crate::ETCD_API_VERSION.to_string(),
            db_size: stats.file_bytes as i64,
            leader: info.member_id,
            raft_index: committed as u64,
            raft_term: 1,
            raft_applied_index: committed as u64,
            errors: self
                .core
                .alarms()
                .iter()
                .map(crate::alarm::status_error)
                .collect(),
            db_size_in_use: self.core.data_bytes() as i64,
            is_learner: false,
        }))
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for Services {
    async fn member_list(
        &self,
        _req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let info = self.core.header_info();
        Ok(Response::new(pb::MemberListResponse {
            header: self.core.header(self.core.committed()),
            members: vec![pb::Member {
                id: info.member_id,
                name: "muster".into(),
                peer_ur_ls: Vec::new(),
                client_ur_ls: vec![self.endpoint.clone()],
                is_learner: false,
            }],
        }))
    }
}

#[tonic::async_trait]
impl pb::auth_server::Auth for Services {
    async fn auth_enable(
        &self,
        req: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core.auth_enable(&caller).await.map(Response::new)
    }

    async fn auth_disable(
        &self,
        req: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core.auth_disable(&caller).await.map(Response::new)
    }

    async fn auth_status(
        &self,
        req: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core.auth_status(&caller).map(Response::new)
    }

    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let req = req.into_inner();
        self.core
            .authenticate(&req.name, &req.password, peer)
            .await
            .map(Response::new)
    }

    async fn user_add(
        &self,
        req: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .user_add(&caller, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn user_get(
        &self,
        req: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .user_get(&caller, req.get_ref())
            .map(Response::new)
    }

    async fn user_list(
        &self,
        req: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core.user_list(&caller).map(Response::new)
    }

    async fn user_delete(
        &self,
        req: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .user_delete(&caller, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn user_change_password(
        &self,
        req: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .user_change_password(&caller, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn user_grant_role(
        &self,
        req: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .user_grant_role(&caller, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn user_revoke_role(
        &self,
        req: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .user_revoke_role(&caller, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn role_add(
        &self,
        req: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .role_add(&caller, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn role_get(
        &self,
        req: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .role_get(&caller, req.get_ref())
            .map(Response::new)
    }

    async fn role_list(
        &self,
        req: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core.role_list(&caller).map(Response::new)
    }

    async fn role_delete(
        &self,
        req: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .role_delete(&caller, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn role_grant_permission(
        &self,
        req: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .role_grant_permission(&caller, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn role_revoke_permission(
        &self,
        req: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        let caller = self.caller(&req)?;
        self.core
            .role_revoke_permission(&caller, req.into_inner())
            .await
            .map(Response::new)
    }
}
