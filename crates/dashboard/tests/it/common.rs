//! Shared helpers for the dashboard's tests: a registry of either kind, the
//! dashboard served on a free loopback port, and a small HTTP client that
//! can read server-sent events with a deadline.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use muster::{Config, Etcd};
use muster_dashboard::Dashboard;

pub use muster_testkit::DEADLINE;

/// A client with short timeouts.
pub fn client(endpoint: &str) -> Etcd {
    let mut config = Config::new(vec![endpoint.to_string()]);
    config.request_timeout = Duration::from_secs(2);
    config.connect_timeout = Duration::from_millis(500);
    Etcd::connect(config).expect("client")
}

/// The dashboard of `endpoint`'s default prefix, served on a free port.
pub struct Served {
    pub addr: SocketAddr,
    pub dashboard: Dashboard,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    pub async fn start(endpoint: &str) -> Served {
        Served::with_client(client(endpoint)).await
    }

    /// The dashboard reading the registry with `etcd`.
    pub async fn with_client(etcd: Etcd) -> Served {
        let dashboard = Dashboard::start(etcd, muster::instance::DEFAULT_PREFIX)
            .await
            .expect("start the dashboard");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let router = dashboard.router();
        let task = tokio::spawn(async move {
            // With the peer's address, as `muster` serves it.
            let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
            axum::serve(listener, app).await.expect("serve");
        });
        Served {
            addr,
            dashboard,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.dashboard.close();
        self.task.abort();
    }
}

pub fn http() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An answer read in full.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.body))
    }

    /// Every `Set-Cookie` header.
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().expect("ASCII cookie").to_string())
            .collect()
    }
}

/// Sends `method url` with `headers` and `body`; the whole answer.
pub async fn call(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut req = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .expect("HTTP request timed out")
        .expect("HTTP request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(DEADLINE, resp.into_body().collect())
        .await
        .expect("body timed out")
        .expect("body")
        .to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).expect("UTF-8 body"),
    }
}

/// Sends a request without a body; the response head.
pub async fn request(method: Method, url: &str) -> Response<Incoming> {
    request_with(method, url, &[]).await
}

/// Sends a request with `headers` and without a body; the response head.
pub async fn request_with(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let mut req = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Empty::new()).expect("request");
    tokio::time::timeout(DEADLINE, http().request(req))
        .await
        .expect("HTTP request timed out")
        .expect("HTTP request")
}

/// `GET url`: status and body.
pub async fn get(url: &str) -> (StatusCode, String) {
    let resp = request(Method::GET, url).await;
    let status = resp.status();
    let body = tokio::time::timeout(DEADLINE, resp.into_body().collect())
        .await
        .expect("body timed out")
        .expect("body")
        .to_bytes();
    (
        status,
        String::from_utf8(body.to_vec()).expect("UTF-8 body"),
    )
}

/// `GET url` as JSON, expecting 200.
pub async fn get_json(url: &str) -> serde_json::Value {
    let (status, body) = get(url).await;
    assert_eq!(status, StatusCode::OK, "GET {url}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: {e}: {body}"))
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub data: serde_json::Value,
}

/// A server-sent event stream being read.
pub struct SseStream {
    body: Incoming,
    buffer: String,
}

impl SseStream {
    pub async fn open(url: &str) -> SseStream {
        SseStream::open_with(url, &[]).await
    }

    /// Opens the stream sending `headers` (a session cookie).
    pub async fn open_with(url: &str, headers: &[(&str, &str)]) -> SseStream {
        let resp = request_with(Method::GET, url, headers).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            content_type.starts_with("text/event-stream"),
            "content-type {content_type}"
        );
        SseStream {
            body: resp.into_body(),
            buffer: String::new(),
        }
    }

    /// The next event (comments and keep-alives skipped), or `None` at the
    /// end of the stream or when `deadline` passes.
    pub async fn next_before(&mut self, deadline: Instant) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim_start().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue; // a comment or a retry hint
                }
                let data = serde_json::from_str(&data)
                    .unwrap_or_else(|e| panic!("event {event}: {e}: {data}"));
                return Some(SseEvent { event, data });
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let frame = match tokio::time::timeout(left, self.body.frame()).await {
                Err(_) => return None,
                Ok(None) => return None,
                Ok(Some(frame)) => frame.expect("SSE body"),
            };
            if let Ok(data) = frame.into_data() {
                self.buffer
                    .push_str(std::str::from_utf8(&data).expect("UTF-8 stream"));
            }
        }
    }

    /// Reads until an event satisfies `pred`; panics after [`DEADLINE`].
    pub async fn until(&mut self, what: &str, mut pred: impl FnMut(&SseEvent) -> bool) -> SseEvent {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.next_before(deadline).await {
                Some(event) if pred(&event) => return event,
                Some(_) => continue,
                None => panic!("no event {what} within {DEADLINE:?}"),
            }
        }
    }
}

pub use muster_testkit::eventually;

/// The instance `service/id` in an `/api/services` answer.
pub fn find_instance<'a>(
    services: &'a serde_json::Value,
    service: &str,
    id: &str,
) -> Option<&'a serde_json::Value> {
    services["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == service)?["instances"]
        .as_array()?
        .iter()
        .find(|i| i["id"] == id)
}
