//! Shared helpers for the gateway's integration tests: a registry per test
//! (real etcd and the embedded one), upstream servers that answer with
//! their instance id, a gateway in front of them, an HTTP client, and
//! polling with generous deadlines (no fixed sleeps).
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use muster::{Config, Discovery, Etcd, Instance, Registrar, RegistrarConfig};
use muster_gateway::{Gateway, GatewayConfig, GatewayHandle, HealthConfig, Route};
use muster_testkit::{EmbeddedNode, EtcdNode, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A generous deadline for anything that should happen "soon".
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "muster=info,muster_gateway=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Which registry a test body runs against.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// A real etcd.
    Etcd,
    /// muster's embedded registry.
    Embedded,
}

/// A fresh registry of that kind; `None` (skipped loudly) for etcd when it
/// is not installed.
pub fn registry(backend: Backend) -> Option<Box<dyn Registry>> {
    init_tracing();
    match backend {
        Backend::Etcd => {
            muster_testkit::require_etcd()?;
            Some(Box::new(EtcdNode::start().expect("start etcd")))
        }
        Backend::Embedded => Some(Box::new(
            EmbeddedNode::start().expect("start the embedded registry"),
        )),
    }
}

/// Runs each named `async fn(Box<dyn Registry>)` as two tests,
/// `<name>::etcd` and `<name>::embedded`.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn etcd() {
                    if let Some(r) = $crate::common::registry($crate::common::Backend::Etcd) {
                        super::$name(r).await
                    }
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    if let Some(r) = $crate::common::registry($crate::common::Backend::Embedded) {
                        super::$name(r).await
                    }
                }
            }
        )*
    };
}

/// Client settings for tests: short timeouts so outages are noticed fast.
pub fn client(endpoint: &str) -> Etcd {
    let mut c = Config::new(vec![endpoint.to_string()]);
    c.request_timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_millis(500);
    Etcd::connect(c).expect("client")
}

/// Polls `cond` every 20 ms until it holds or `DEADLINE` passes.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Everything a gateway test needs: registry client, registrar, discovery.
pub struct Env {
    pub etcd: Etcd,
    pub registrar: Registrar,
    pub discovery: Discovery,
}

impl Env {
    pub async fn new(registry: &dyn Registry) -> Env {
        let etcd = client(&registry.endpoint());
        let registrar = Registrar::start(
            etcd.clone(),
            RegistrarConfig::default()
                .with_ttl(Duration::from_secs(30))
                .with_grace(Duration::from_millis(200)),
        )
        .await
        .expect("registrar");
        let discovery = Discovery::new(etcd.clone());
        Env {
            etcd,
            registrar,
            discovery,
        }
    }

    /// Starts an upstream `id` of `service` and registers it.
    pub async fn upstream(&self, service: &str, id: &str) -> Upstream {
        let up = Upstream::start(id).await;
        self.registrar
            .register(up.instance(service))
            .await
            .expect("register");
        up
    }

    /// A gateway with these routes and fast passive health settings.
    pub async fn gateway(&self, routes: Vec<Route>) -> GatewayHandle {
        Gateway::start(gateway_config(routes), self.discovery.clone())
            .await
            .expect("start the gateway")
    }
}

/// Gateway settings for tests: any port, quick ejection.
pub fn gateway_config(routes: Vec<Route>) -> GatewayConfig {
    let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap());
    config.routes = routes;
    config.health = HealthConfig {
        failures: 2,
        base_ejection: Duration::from_secs(5),
        max_ejection: Duration::from_secs(30),
    };
    config.reload_interval = Duration::from_millis(200);
    config.metrics_path = Some("/metrics".into());
    config
}

// ---------------------------------------------------------------------------
// Upstreams

/// A test upstream: a hyper server answering with its id.
///
/// * `GET /status/{code}`: answers that status;
/// * `POST /upload`: reads the body, answers `{len} {fnv}`;
/// * `GET /download/{n}`: streams n generated bytes; with `?gated`, only
///   the first 64 KiB until [`Upstream::open_gate`];
/// * a WebSocket upgrade: echoes messages;
/// * anything else: the id, with `x-upstream-*` headers telling what it saw.
///
/// [`Upstream::kill`] aborts the server and every connection at once.
pub struct Upstream {
    pub id: String,
    pub addr: SocketAddr,
    pub served: Arc<AtomicU64>,
    /// Bytes of the current upload received so far.
    pub upload_progress: watch::Receiver<u64>,
    gate: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct UpstreamShared {
    id: String,
    served: Arc<AtomicU64>,
    upload: watch::Sender<u64>,
    gate: watch::Receiver<bool>,
}

impl Upstream {
    pub async fn start(id: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let (upload, upload_progress) = watch::channel(0);
        let (gate, gate_rx) = watch::channel(false);
        let shared = Arc::new(UpstreamShared {
            id: id.to_string(),
            served: served.clone(),
            upload,
            gate: gate_rx,
        });
        let task = tokio::spawn(async move {
            // Owning the connections here: aborting this task drops the set,
            // which aborts every connection too.
            let mut conns = JoinSet::new();
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(a) => a,
                    Err(_) => continue,
                };
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(answer(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Upstream {
            id: id.to_string(),
            addr,
            served,
            upload_progress,
            gate,
            task: Some(task),
        }
    }

    /// The instance to register.
    pub fn instance(&self, service: &str) -> Instance {
        Instance::new(service, &self.id, format!("http://{}", self.addr))
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Lets gated downloads go on.
    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    /// Kills the server and all its connections at once.
    pub fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn full(s: impl Into<Bytes>) -> TestBody {
    http_body_util::Full::new(s.into())
        .map_err(|e| match e {})
        .boxed()
}

async fn answer(shared: Arc<UpstreamShared>, mut req: Request<Incoming>) -> Response<TestBody> {
    shared.served.fetch_add(1, Ordering::Relaxed);
    let path = req.uri().path().to_string();
    if req.headers().contains_key(http::header::UPGRADE) {
        return websocket(&mut req);
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let mut resp = Response::new(full(shared.id.clone()));
        *resp.status_mut() = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::OK);
        return resp;
    }
    if path == "/upload" {
        shared.upload.send_replace(0);
        let mut body = req.into_body();
        let mut len = 0u64;
        let mut fnv = Fnv::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Response::new(full("body error"));
            };
            if let Some(data) = frame.data_ref() {
                len += data.len() as u64;
                fnv.write(data);
                shared.upload.send_replace(len);
            }
        }
        return Response::new(full(format!("{len} {:x}", fnv.0)));
    }
    if let Some(n) = path.strip_prefix("/download/") {
        let n: u64 = n.parse().unwrap_or(0);
        let gated = req.uri().query() == Some("gated");
        let gate = shared.gate.clone();
        let stream = futures_util::stream::unfold(0u64, move |sent| {
            let mut gate = gate.clone();
            async move {
                if sent >= n {
                    return None;
                }
                if gated && sent > 0 {
                    let _ = gate.wait_for(|open| *open).await;
                }
                let chunk = pattern(sent, (n - sent).min(CHUNK as u64) as usize);
                let len = chunk.len() as u64;
                Some((
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk)),
                    sent + len,
                ))
            }
        });
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        resp.headers_mut()
            .insert("x-upstream-id", shared.id.parse().unwrap());
        return resp;
    }
    let mut resp = Response::new(full(shared.id.clone()));
    let seen = |name: &str| req.headers().get(name).cloned();
    let h = resp.headers_mut();
    h.insert("x-upstream-id", shared.id.parse().unwrap());
    h.insert(
        "x-upstream-path",
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("")
            .parse()
            .unwrap(),
    );
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "forwarded",
        "host",
        "connection",
        "x-hop",
    ] {
        if let Some(v) = seen(name) {
            h.insert(
                http::HeaderName::from_bytes(format!("x-upstream-{name}").as_bytes()).unwrap(),
                v,
            );
        }
    }
    // A hop-by-hop header the gateway must not pass back.
    h.insert("connection", "x-secret".parse().unwrap());
    h.insert("x-secret", "leak".parse().unwrap());
    resp
}

fn websocket(req: &mut Request<Incoming>) -> Response<TestBody> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let Some(key) = req.headers().get("sec-websocket-key") else {
        let mut r = Response::new(full("no key"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("connection", "upgrade".parse().unwrap());
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert("sec-websocket-accept", accept.parse().unwrap());
    resp
}

pub const CHUNK: usize = 64 * 1024;

/// Deterministic bytes at `offset..offset+len` of a generated stream.
pub fn pattern(offset: u64, len: usize) -> Bytes {
    (offset..offset + len as u64)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 13)) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Incremental FNV-1a (64 bit).
pub struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

// ---------------------------------------------------------------------------
// Client side

pub type HttpClient = Client<HttpConnector, TestBody>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A finished answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `GET http://{addr}{path}` with extra headers; `Err` on transport errors.
pub async fn get_with(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed())
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

pub async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Answer {
    get_with(client, addr, path, &[])
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// A sample of one metric from the gateway's text.
pub fn metric(gw: &GatewayHandle, name: &str, labels: &[&str]) -> Option<f64> {
    muster_testkit::metric_value(&gw.metrics(), name, labels)
}

/// Resident memory of this process, in bytes.
pub fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
