//! The gateway in front of real upstreams registered with muster: routing,
//! balancing, clear errors, retries and ejection, draining, registry
//! outages and hot reload. Every body runs against real etcd and the
//! embedded registry.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use muster::Status;
use muster_gateway::{Gateway, GatewayHandle, Route};
use muster_testkit::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `n` GETs to `path`; counts answers by upstream id.
async fn spread(
    client: &HttpClient,
    gw: std::net::SocketAddr,
    path: &str,
    n: usize,
) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let a = get(client, gw, path).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        *seen.entry(a.body).or_insert(0) += 1;
    }
    seen
}

async fn traffic_spreads_across_instances(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _ups = [
        env.upstream("web", "w-1").await,
        env.upstream("web", "w-2").await,
        env.upstream("web", "w-3").await,
    ];
    let mut config = gateway_config(vec![Route::new("/", "web")]);
    config.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    let gw = Gateway::start(config, env.discovery.clone()).await.unwrap();
    let client = http_client();
    let seen = spread(&client, gw.local_addr(), "/hello", 300).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&n| n >= 30), "uneven: {seen:?}");
    let text = gw.metrics();
    assert_eq!(
        muster_testkit::metric_value(
            &text,
            "muster_gateway_requests_total",
            &["route=\"/\"", "status=\"200\""]
        ),
        Some(300.0),
        "{text}"
    );
    assert!(text.contains(
        "muster_gateway_upstream_duration_seconds_count{service=\"web\",instance=\"w-1\"}"
    ));
    assert!(
        text.contains("muster_gateway_discovery_stale_seconds{service=\"web\"} 0"),
        "{text}"
    );
    // Discovery's own figures for the routed service.
    assert!(
        text.contains("muster_discovery_apply_seconds_bucket{service=\"web\",le=\"+Inf\"}"),
        "{text}"
    );
    assert!(text.contains("muster_discovery_revision_lag{service=\"web\"}"));
    assert!(text.contains("muster_discovery_malformed_total{layout=\"kratos\"} "));
    // The admin listener serves metrics and health, and nothing else.
    let admin = gw.admin_addr().unwrap();
    let a = get(&client, admin, "/metrics").await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.body
            .contains("muster_gateway_requests_total{route=\"/\",status=\"200\"} 300"),
        "{}",
        a.body
    );
    assert_eq!(get(&client, admin, "/healthz").await.body, "ok\n");
    assert_eq!(
        get(&client, admin, "/hello").await.status,
        StatusCode::NOT_FOUND
    );
    gw.shutdown().await;
}

async fn new_instance_gets_traffic_quickly(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _a = env.upstream("web", "w-1").await;
    let gw = env.gateway(vec![Route::new("/", "web")]).await;
    let client = http_client();
    assert_eq!(get(&client, gw.local_addr(), "/").await.body, "w-1");

    let b = Upstream::start("w-2").await;
    env.registrar.register(b.instance("web")).await.unwrap();
    let registered = Instant::now();
    loop {
        let a = get(&client, gw.local_addr(), "/").await;
        assert_eq!(a.status, StatusCode::OK);
        if a.body == "w-2" {
            break;
        }
        assert!(registered.elapsed() < DEADLINE, "w-2 never got traffic");
    }
    let took = registered.elapsed();
    eprintln!("w-2 got its first request {took:?} after registering");
    assert!(
        took < Duration::from_secs(1),
        "w-2 got its first request after {took:?}"
    );
    gw.shutdown().await;
}

async fn clear_answers_for_no_route_no_instance_and_bad_requests(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let gw = env
        .gateway(vec![
            Route::new("/api", "web"),
            Route::new("/empty", "nobody"),
        ])
        .await;
    let _up = env.upstream("web", "w-1").await;
    let client = http_client();
    let addr = gw.local_addr();

    // No route.
    let a = get(&client, addr, "/nowhere").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json()["error"], "no_route");
    assert_eq!(a.headers["content-type"], "application/json");
    // Segment boundaries: /apix is not under /api.
    assert_eq!(
        get(&client, addr, "/apix").await.status,
        StatusCode::NOT_FOUND
    );

    // No instance: 503 naming the service.
    let a = get(&client, addr, "/empty/x").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert_eq!(a.json()["service"], "nobody");
    assert!(a.json()["message"].as_str().unwrap().contains("nobody"));

    // The route works once the instance is seen.
    wait_routed(&client, addr, "/api/x").await;

    // Health.
    let a = get(&client, addr, "/healthz").await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "ok\n"));

    // Garbage and bad request lines: 400 from the gateway, which goes on serving.
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /api HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /api/../secret HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET  HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(raw).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 400"), "{raw:?} got {text:?}");
    }
    assert_eq!(get(&client, addr, "/api/x").await.status, StatusCode::OK);
    gw.shutdown().await;
}

async fn headers_are_rewritten(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _up = env.upstream("web", "w-1").await;
    let gw = env
        .gateway(vec![
            Route::new("/api/v1", "web").strip_prefix(),
            Route::new("/", "web"),
        ])
        .await;
    let client = http_client();
    let addr = gw.local_addr();
    let a = get_with(
        &client,
        addr,
        "/api/v1/users/7?x=1",
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["x-upstream-path"], "/users/7?x=1");
    assert_eq!(
        a.headers["x-upstream-x-forwarded-for"],
        "203.0.113.9, 127.0.0.1"
    );
    assert_eq!(a.headers["x-upstream-x-forwarded-proto"], "http");
    assert_eq!(
        a.headers["x-upstream-forwarded"],
        format!("for=127.0.0.1;proto=http;host=\"127.0.0.1\"")
    );
    assert_eq!(a.headers["x-upstream-host"], addr.to_string());
    // Hop-by-hop headers went, both ways.
    assert!(
        !a.headers.contains_key("x-upstream-x-hop"),
        "{:?}",
        a.headers
    );
    assert!(!a.headers.contains_key("x-secret"), "{:?}", a.headers);
    // The prefix alone becomes /; unstripped routes keep the path.
    assert_eq!(
        get(&client, addr, "/api/v1").await.headers["x-upstream-path"],
        "/"
    );
    assert_eq!(
        get(&client, addr, "/other/p").await.headers["x-upstream-path"],
        "/other/p"
    );
    gw.shutdown().await;
}

async fn consistent_hashing_by_header_is_sticky(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _ups = [
        env.upstream("cart", "c-1").await,
        env.upstream("cart", "c-2").await,
        env.upstream("cart", "c-3").await,
    ];
    let gw = env
        .gateway(vec![
            Route::new("/cart", "cart").hash_by_header("x-user"),
            Route::new("/session", "cart").hash_by_cookie("sid"),
        ])
        .await;
    let client = http_client();
    let addr = gw.local_addr();
    eventually("all three instances are known", || async {
        metric(
            &gw,
            "muster_gateway_instances",
            &["service=\"cart\"", "state=\"eligible\""],
        ) == Some(3.0)
    })
    .await;
    let mut owners = BTreeMap::new();
    for round in 0..3 {
        for user in 0..40 {
            let user = format!("user-{user}");
            let a = get_with(&client, addr, "/cart", &[("x-user", &user)])
                .await
                .unwrap();
            assert_eq!(a.status, StatusCode::OK);
            let owner = owners.entry(user.clone()).or_insert_with(|| a.body.clone());
            assert_eq!(*owner, a.body, "{user} moved in round {round}");
        }
    }
    let distinct: BTreeSet<_> = owners.values().collect();
    assert!(distinct.len() >= 2, "every key on one instance: {owners:?}");
    // By cookie too.
    let first = get_with(&client, addr, "/session", &[("cookie", "a=1; sid=abc")])
        .await
        .unwrap()
        .body;
    for _ in 0..10 {
        let a = get_with(&client, addr, "/session", &[("cookie", "sid=abc; b=2")])
            .await
            .unwrap();
        assert_eq!(a.body, first);
    }
    gw.shutdown().await;
}

/// Loads the gateway from `workers` tasks until `stop`; counts answers by
/// body and failures.
struct Load {
    ok: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    total: Arc<AtomicU64>,
    /// Requests each worker has finished, so a caller can wait until every
    /// request in flight at some moment has been counted.
    done: Arc<Vec<AtomicU64>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr, path: &'static str, workers: usize) -> Load {
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let ok = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let total = Arc::new(AtomicU64::new(0));
        let done: Arc<Vec<AtomicU64>> = Arc::new((0..workers).map(|_| AtomicU64::new(0)).collect());
        let tasks = (0..workers)
            .map(|w| {
                let (ok, failures, total, done, stop_rx) = (
                    ok.clone(),
                    failures.clone(),
                    total.clone(),
                    done.clone(),
                    stop_rx.clone(),
                );
                tokio::spawn(async move {
                    let client = http_client();
                    while !*stop_rx.borrow() {
                        match get_with(&client, addr, path, &[]).await {
                            Ok(a) if a.status == StatusCode::OK => {
                                *ok.lock().unwrap().entry(a.body).or_insert(0) += 1;
                            }
                            Ok(a) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{}: {}", a.status, a.body)),
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                        total.fetch_add(1, Ordering::Relaxed);
                        done[w].fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            ok,
            failures,
            total,
            done,
            stop,
            tasks,
        }
    }

    /// Waits until every worker has finished a request begun after this
    /// call: anything in flight when it was called has been counted.
    async fn settle(&self) {
        let marks: Vec<u64> = self
            .done
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect();
        eventually("every request in flight is counted", || async {
            self.done
                .iter()
                .zip(&marks)
                .all(|(d, m)| d.load(Ordering::Relaxed) >= m + 2)
        })
        .await;
    }

    fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn count(&self, id: &str) -> u64 {
        self.ok.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    async fn wait_more(&self, n: u64) {
        let target = self.total() + n;
        eventually("more requests", || async { self.total() >= target }).await;
    }

    async fn finish(self) -> (BTreeMap<String, u64>, Vec<String>) {
        self.stop.send_replace(true);
        for t in self.tasks {
            t.await.unwrap();
        }
        let ok = self.ok.lock().unwrap().clone();
        let failures = self.failures.lock().unwrap().clone();
        (ok, failures)
    }
}

async fn killed_instance_is_retried_around_and_ejected(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _a = env.upstream("web", "w-1").await;
    let _b = env.upstream("web", "w-2").await;
    let mut c = env.upstream("web", "w-3").await;
    let gw = env.gateway(vec![Route::new("/", "web")]).await;
    let client = http_client();
    assert_eq!(spread(&client, gw.local_addr(), "/", 60).await.len(), 3);

    let load = Load::start(gw.local_addr(), "/", 8);
    eventually("w-3 serves under load", || async { load.count("w-3") > 20 }).await;
    // Abrupt death: listener and every connection gone, lease still alive.
    c.kill();
    eventually("w-3 is ejected", || async {
        metric(&gw, "muster_gateway_ejections_total", &["instance=\"w-3\""]).unwrap_or(0.0) >= 1.0
    })
    .await;
    // A response w-3 wrote just before it died may still be on its way to a
    // worker; count it before taking the baseline.
    load.settle().await;
    let before = load.count("w-3");
    load.wait_more(300).await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        ok.get("w-3").copied().unwrap_or(0),
        before,
        "w-3 answered after dying?"
    );
    assert!(ok["w-1"] > 50 && ok["w-2"] > 50, "{ok:?}");
    // It left the pool although discovery still lists it.
    assert_eq!(
        metric(
            &gw,
            "muster_gateway_instances",
            &["service=\"web\"", "state=\"ejected\""]
        ),
        Some(1.0)
    );
    assert!(metric(&gw, "muster_gateway_retries_total", &[]).unwrap() >= 1.0);
    gw.shutdown().await;
}

async fn draining_instance_loses_traffic_without_errors(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _a = env.upstream("web", "w-1").await;
    let b = env.upstream("web", "w-2").await;
    let gw = env.gateway(vec![Route::new("/", "web")]).await;
    let load = Load::start(gw.local_addr(), "/", 4);
    eventually("both serve", || async {
        load.count("w-1") > 10 && load.count("w-2") > 10
    })
    .await;

    env.registrar
        .set_status(b.instance("web"), Status::Draining)
        .await
        .unwrap();
    // Once drained, w-2 gets nothing more.
    let mut last = b.served();
    let mut quiet_since = Instant::now();
    eventually("w-2 gets no more requests", || {
        let served = b.served();
        if served != last {
            last = served;
            quiet_since = Instant::now();
        }
        let quiet = quiet_since.elapsed() > Duration::from_millis(300);
        async move { quiet }
    })
    .await;
    env.registrar.deregister("web", "w-2").await.unwrap();
    load.wait_more(200).await;
    drop(b);
    load.wait_more(200).await;
    let (ok, failures) = load.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(ok["w-1"] > 400, "{ok:?}");
    gw.shutdown().await;
}

async fn registry_outage_keeps_last_known_instances(mut registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _a = env.upstream("web", "w-1").await;
    let _b = env.upstream("web", "w-2").await;
    let gw = env.gateway(vec![Route::new("/", "web")]).await;
    let client = http_client();
    eventually("both known", || async {
        metric(&gw, "muster_gateway_instances", &["state=\"eligible\""]) == Some(2.0)
    })
    .await;
    registry.kill();
    eventually("discovery notices the outage", || async {
        metric(
            &gw,
            "muster_gateway_discovery_stale_seconds",
            &["service=\"web\""],
        )
        .unwrap_or(0.0)
            > 0.0
    })
    .await;
    let seen = spread(&client, gw.local_addr(), "/", 100).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    gw.shutdown().await;
}

async fn routes_file_is_hot_reloaded(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _a = env.upstream("alpha", "a-1").await;
    let _b = env.upstream("beta", "b-1").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    std::fs::write(&file, "[[route]]\nprefix = \"/a\"\nservice = \"alpha\"\n").unwrap();
    let mut config = gateway_config(vec![Route::new("/fixed", "beta")]);
    config.routes_file = Some(file.clone());
    let gw = Gateway::start(config, env.discovery.clone()).await.unwrap();
    let client = http_client();
    let addr = gw.local_addr();
    assert_eq!(get(&client, addr, "/a").await.body, "a-1");
    assert_eq!(get(&client, addr, "/fixed").await.body, "b-1");
    assert_eq!(
        get(&client, addr, "/b/x").await.status,
        StatusCode::NOT_FOUND
    );

    std::fs::write(
        &file,
        "[defaults]\ntimeout = \"5s\"\n\n[[route]]\nprefix = \"/a\"\nservice = \"alpha\"\n\n\
         [[route]]\nprefix = \"/b\"\nservice = \"beta\"\nstrip_prefix = true\n",
    )
    .unwrap();
    wait_routed(&client, addr, "/b/x").await;
    assert_eq!(
        get(&client, addr, "/b/x").await.headers["x-upstream-path"],
        "/x"
    );

    // A broken file is refused; the routes stay.
    std::fs::write(&file, "[[route]]\nprefix = \"/a\"\n").unwrap();
    eventually("the bad file is refused", || async {
        metric(
            &gw,
            "muster_gateway_route_reloads_total",
            &["result=\"error\""],
        ) == Some(1.0)
    })
    .await;
    assert_eq!(get(&client, addr, "/a").await.body, "a-1");
    assert_eq!(get(&client, addr, "/b/x").await.body, "b-1");
    assert_eq!(get(&client, addr, "/fixed").await.body, "b-1");

    // Removing a route takes effect too.
    std::fs::write(&file, "[[route]]\nprefix = \"/a\"\nservice = \"alpha\"\n").unwrap();
    eventually("/b is gone", || async {
        get(&client, addr, "/b/x").await.status == StatusCode::NOT_FOUND
    })
    .await;
    gw.shutdown().await;
}

/// A gateway with `/slow/...` under a 300 ms route timeout (prefix
/// stripped) and everything else under the default one, both to `web`.
async fn slow_route_gateway(env: &Env) -> GatewayHandle {
    env.gateway(vec![
        Route::new("/slow", "web")
            .strip_prefix()
            .timeout(Duration::from_millis(300)),
        Route::new("/", "web"),
    ])
    .await
}

async fn slow_upstream_times_out_and_5xx_passes_through(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _a = env.upstream("web", "w-1").await;
    let gw = slow_route_gateway(&env).await;
    let client = http_client();
    let addr = gw.local_addr();
    // 5xx answers pass through unchanged.
    let a = get(&client, addr, "/status/503").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.body, "w-1");
    // A route timeout gives 504 (the upstream answers headers only after
    // reading a body that never ends).
    let (tx, body) = channel_body();
    let req = http::Request::post(format!("http://{addr}/slow/upload"))
        .body(body)
        .unwrap();
    let started = Instant::now();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(5));
    let _ = tx
        .send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"x",
        ))))
        .await;
    gw.shutdown().await;
}

/// The upstream client writes and reads HTTP/1.1 itself: a body with a
/// length, `Expect: 100-continue`, HEAD, answers without a body and
/// chunked answers, one after another over pooled connections.
async fn methods_and_framings_pass_through(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let up = env.upstream("web", "w-1").await;
    let (gw, client) = env.routed(vec![Route::new("/", "web")], "/x").await;
    let addr = gw.local_addr();
    let send = |method: http::Method, path: &str, body: &'static str, headers: &[(&str, &str)]| {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(full(body)).unwrap();
        let client = client.clone();
        async move {
            let resp = tokio::time::timeout(DEADLINE, client.request(req))
                .await
                .expect("an answer in time")
                .expect("an answer");
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            (status, headers, body)
        }
    };
    let served = up.served.load(std::sync::atomic::Ordering::Relaxed);
    for round in 0..3 {
        // A body with a Content-Length, and one with Expect: 100-continue.
        let (status, _, body) = send(http::Method::POST, "/upload", "hello", &[]).await;
        assert_eq!(status, StatusCode::OK, "round {round}");
        let mut fnv = Fnv::new();
        fnv.write(b"hello");
        assert_eq!(body, format!("5 {:x}", fnv.0));
        let (status, _, body) = send(
            http::Method::PUT,
            "/upload",
            "hello",
            &[("expect", "100-continue")],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, format!("5 {:x}", fnv.0));
        // HEAD: the headers of a GET, no body.
        let (status, headers, body) = send(http::Method::HEAD, "/x", "", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-upstream-id"], "w-1");
        assert!(body.is_empty());
        // No body by status.
        let (status, _, body) = send(http::Method::GET, "/status/204", "", &[]).await;
        assert_eq!((status, body.len()), (StatusCode::NO_CONTENT, 0));
        let (status, _, body) = send(http::Method::GET, "/status/304", "", &[]).await;
        assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
        // A chunked answer.
        let (status, _, body) = send(http::Method::GET, "/download/100000", "", &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, pattern(0, 100_000));
    }
    assert_eq!(
        up.served.load(std::sync::atomic::Ordering::Relaxed) - served,
        18,
        "six requests a round, each served once"
    );
    gw.shutdown().await;
}

/// Idle client connections are closed (a kept-alive one after its answer,
/// one whose request head never completes); one whose request takes longer
/// than the idle timeout is not.
async fn idle_client_connections_are_closed(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _up = env.upstream("web", "w-1").await;
    // An instance that takes requests and never answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let (took_tx, mut took) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((mut s, _)) = hole.accept().await {
            let took_tx = took_tx.clone();
            open.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while s.read(&mut buf).await.unwrap_or(0) > 0 {
                    let _ = took_tx.send(());
                }
            }));
        }
    });
    env.registrar
        .register(muster::Instance::new(
            "hole",
            "h-1",
            format!("http://{hole_addr}"),
        ))
        .await
        .unwrap();
    let idle = Duration::from_millis(300);
    let mut config = gateway_config(vec![Route::new("/hole", "hole"), Route::new("/", "web")]);
    config.client_idle_timeout = idle;
    let gw = Gateway::start(config, env.discovery.clone()).await.unwrap();
    let addr = gw.local_addr();
    let client = http_client();
    wait_routed(&client, addr, "/x").await;

    /// Everything the gateway sends until it closes the connection.
    async fn until_closed(mut s: tokio::net::TcpStream) -> String {
        let mut all = Vec::new();
        tokio::time::timeout(DEADLINE, s.read_to_end(&mut all))
            .await
            .expect("the gateway closed the connection")
            .expect("a clean close");
        String::from_utf8_lossy(&all).into_owned()
    }
    let mut head_only = tokio::net::TcpStream::connect(addr).await.unwrap();
    head_only
        .write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    // A request in progress for longer than the idle timeout.
    let (tx, body) = channel_body();
    let req = http::Request::post(format!("http://{addr}/upload"))
        .body(body)
        .unwrap();
    let upload = tokio::spawn({
        let client = client.clone();
        async move { client.request(req).await }
    });
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        b"abc",
    ))))
    .await
    .unwrap();

    // An HTTP/2 connection whose only request was reset by the client
    // while the upstream had not answered is idle too.
    let h2_closed = {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (h2, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        let closed = tokio::spawn(conn);
        let req = http::Request::get(format!("http://{addr}/hole"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        // A second handle keeps the connection open on the client's side.
        let mut sender = h2.clone();
        let pending = tokio::spawn(async move { sender.send_request(req).await });
        // Once the upstream has the request, the client gives up on it.
        tokio::time::timeout(DEADLINE, took.recv())
            .await
            .expect("the request reached the silent instance");
        pending.abort();
        (h2, closed)
    };

    assert_eq!(
        until_closed(head_only).await,
        "",
        "no answer to half a head"
    );
    let (_h2, h2_closed) = h2_closed;
    tokio::time::timeout(DEADLINE, h2_closed)
        .await
        .expect("the gateway closed the h2 connection once its stream was reset")
        .unwrap()
        .ok();
    let answer = until_closed(kept).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("w-1"), "{answer}");
    // Both were closed, so the upload has been going on for longer than
    // the idle timeout; a little more to be sure.
    tokio::time::sleep(idle * 2).await;
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        b"def",
    ))))
    .await
    .unwrap();
    drop(tx);
    let resp = tokio::time::timeout(DEADLINE, upload)
        .await
        .expect("the upload finished")
        .unwrap()
        .expect("the slow request was not cut");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let mut fnv = Fnv::new();
    fnv.write(b"abcdef");
    assert_eq!(body, format!("6 {:x}", fnv.0));
    gw.shutdown().await;
}

/// One HTTP/1.1 answer read off a raw connection: its status and body
/// (the gateway's answers here all carry a `Content-Length`).
async fn read_answer(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status: u16 = head[9..12].parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                buf.drain(..end + 4 + len);
                return (status, body);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed; got {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A client connection keeps one timer for the route timeout from one
/// request to the next: a shorter timeout after a longer one still fires
/// on time, one that fired does not fail the next request, and it fires
/// again for the one after.
async fn route_timeout_holds_from_request_to_request(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _a = env.upstream("web", "w-1").await;
    let gw = slow_route_gateway(&env).await;
    let addr = gw.local_addr();
    wait_routed(&http_client(), addr, "/status/200").await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    // The default route's 30 s timeout first.
    s.write_all(b"GET /status/200 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut s, &mut buf).await, (200, "w-1".into()));
    for round in 0..2 {
        // Half a body: the upstream answers only once it has all of it.
        let started = Instant::now();
        s.write_all(b"POST /slow/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
            .await
            .unwrap();
        let (status, _) = read_answer(&mut s, &mut buf).await;
        let took = started.elapsed();
        assert_eq!(status, 504, "round {round}");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(5),
            "round {round}: 504 after {took:?}"
        );
        // The rest of the body, which the gateway reads and drops.
        s.write_all(b"67890").await.unwrap();
        // The timer fired: the next request is not failed by it.
        s.write_all(b"GET /slow/status/200 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_answer(&mut s, &mut buf).await,
            (200, "w-1".into()),
            "round {round}"
        );
    }
    gw.shutdown().await;
}

muster_testkit::on_both!(
    traffic_spreads_across_instances,
    new_instance_gets_traffic_quickly,
    clear_answers_for_no_route_no_instance_and_bad_requests,
    headers_are_rewritten,
    consistent_hashing_by_header_is_sticky,
    killed_instance_is_retried_around_and_ejected,
    draining_instance_loses_traffic_without_errors,
    registry_outage_keeps_last_known_instances,
    routes_file_is_hot_reloaded,
    slow_upstream_times_out_and_5xx_passes_through,
    route_timeout_holds_from_request_to_request,
    methods_and_framings_pass_through,
    idle_client_connections_are_closed,
);
