//! Bodies and connections through the gateway: 50 MiB uploads and
//! downloads streamed (never buffered whole), WebSocket upgrades, and h2c
//! clients. Every body runs against real etcd and the embedded registry.

use crate::common;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use muster_gateway::Route;
use muster_testkit::Registry;

const SIZE: u64 = 50 * 1024 * 1024;

/// How much more memory the process may hold while a body of [`SIZE`]
/// streams through: less than half of it.
const MEMORY_LIMIT: u64 = 24 * 1024 * 1024;

async fn large_upload_streams_through(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let up = env.upstream("files", "f-1").await;
    let (gw, client) = env.routed(vec![Route::new("/", "files")], "/x").await;
    let addr = gw.local_addr();

    // The first chunk must reach the upstream before the client sends the
    // rest: a gateway that buffered the body would deadlock here.
    let (tx, body) = channel_body();
    let req = http::Request::post(format!("http://{addr}/upload"))
        .body(body)
        .unwrap();
    let mut memory = Growth::start();
    let send = tokio::spawn({
        let client = client.clone();
        async move { client.request(req).await }
    });
    let mut expected = Fnv::new();
    let first = pattern(0, CHUNK);
    expected.write(&first);
    tx.send(Ok(Frame::data(first))).await.unwrap();
    let mut progress = up.upload_progress.clone();
    tokio::time::timeout(DEADLINE, progress.wait_for(|n| *n > 0))
        .await
        .expect("the first chunk reached the upstream before the rest was sent")
        .unwrap();
    let mut sent = CHUNK as u64;
    while sent < SIZE {
        let chunk = pattern(sent, CHUNK.min((SIZE - sent) as usize));
        expected.write(&chunk);
        sent += chunk.len() as u64;
        tx.send(Ok(Frame::data(chunk))).await.unwrap();
        if sent.is_multiple_of(4 * 1024 * 1024) {
            memory.sample();
        }
    }
    drop(tx);
    let resp = tokio::time::timeout(DEADLINE * 3, send)
        .await
        .expect("upload finished")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("{SIZE} {:x}", expected.0)
    );
    memory.assert_below(MEMORY_LIMIT, "a 50 MiB upload");
    gw.shutdown().await;
}

async fn large_download_streams_through(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let up = env.upstream("files", "f-1").await;
    let (gw, client) = env.routed(vec![Route::new("/", "files")], "/x").await;
    let addr = gw.local_addr();

    // The upstream sends the first 64 KiB and then waits until the client
    // has received bytes: a buffering gateway would never answer.
    let req = http::Request::get(format!("http://{addr}/download/{SIZE}?gated"))
        .body(empty())
        .unwrap();
    let mut memory = Growth::start();
    let resp = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .expect("headers before the body is complete")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut received = 0u64;
    let mut got = Fnv::new();
    let mut want = Fnv::new();
    while let Some(frame) = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("the body keeps coming")
    {
        let frame = frame.unwrap();
        if let Some(data) = frame.data_ref() {
            if received == 0 {
                up.open_gate();
            }
            want.write(&pattern(received, data.len()));
            got.write(data);
            received += data.len() as u64;
            if received % (4 * 1024 * 1024) < data.len() as u64 {
                memory.sample();
            }
        }
    }
    assert_eq!(received, SIZE);
    assert_eq!(got.0, want.0, "the body changed on the way");
    memory.assert_below(MEMORY_LIMIT, "a 50 MiB download");
    gw.shutdown().await;
}

async fn websocket_echo_through_the_gateway(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _up = env.upstream("chat", "c-1").await;
    let (gw, _) = env.routed(vec![Route::new("/ws", "chat")], "/ws").await;
    let addr = gw.local_addr();
    let (mut ws, resp) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/room")),
    )
    .await
    .unwrap()
    .expect("websocket handshake through the gateway");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    common::assert_echoes(&mut ws, 20).await;
    gw.shutdown().await;
}

async fn h2c_clients_are_served(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _a = env.upstream("web", "w-1").await;
    let _b = env.upstream("web", "w-2").await;
    let gw = env
        .gateway(vec![Route::new("/api", "web").strip_prefix()])
        .await;
    let h2: Client<HttpConnector, _> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let addr = gw.local_addr();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    eventually("both instances answer over h2c", || {
        let h2 = h2.clone();
        let req = http::Request::get(format!("http://{addr}/api/p"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let seen = seen.clone();
        async move {
            let resp = h2.request(req).await.expect("h2c request");
            assert_eq!(resp.version(), http::Version::HTTP_2);
            assert_eq!(resp.status(), StatusCode::OK);
            assert_eq!(resp.headers()["x-upstream-path"], "/p");
            // The upstream spoke HTTP/1.1 and saw the authority as Host.
            assert_eq!(resp.headers()["x-upstream-host"], addr.to_string());
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let mut seen = seen.lock().unwrap();
            seen.insert(String::from_utf8_lossy(&body).into_owned());
            seen.len() == 2
        }
    })
    .await;
    // Many concurrent streams on one connection.
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let h2 = h2.clone();
            tokio::spawn(async move {
                let req = http::Request::get(format!("http://{addr}/api/q"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                h2.request(req).await.unwrap().status()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    gw.shutdown().await;
}

/// `POST /trailers` through the gateway with a body that ends in an
/// `x-checksum` trailer: what the answer's body and trailers were.
async fn post_with_trailers(
    addr: std::net::SocketAddr,
    http2: bool,
    te_trailers: bool,
) -> (StatusCode, Bytes, Option<http::HeaderMap>) {
    let client: Client<HttpConnector, _> = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(HttpConnector::new());
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "42".parse().unwrap());
    let frames = [
        Frame::data(Bytes::from_static(b"first ")),
        Frame::data(Bytes::from_static(b"second")),
        Frame::trailers(trailers),
    ]
    .map(Ok::<_, std::convert::Infallible>);
    let mut req = http::Request::post(format!("http://{addr}/t/trailers"));
    if !http2 {
        // hyper's HTTP/1.1 client sends only the trailers it announced.
        req = req.header("trailer", "x-checksum");
    }
    if te_trailers {
        req = req.header("te", "trailers");
    }
    let req = req
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .expect("answered in time")
        .expect("request");
    let status = resp.status();
    let body = tokio::time::timeout(DEADLINE, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body");
    let trailers = body.trailers().cloned();
    (status, body.to_bytes(), trailers)
}

async fn trailers_pass_through(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let _up = env.upstream("t", "t-1").await;
    let (gw, _) = env
        .routed(vec![Route::new("/t", "t").strip_prefix()], "/t/x")
        .await;
    let addr = gw.local_addr();
    let mut digest = Fnv::new();
    digest.write(&pattern(0, TRAILED_LEN));
    let digest = format!("{:x}", digest.0);
    for http2 in [false, true] {
        // The request's trailer reached the upstream, and the answer's
        // trailers came back after its streamed data.
        let (status, body, trailers) = post_with_trailers(addr, http2, true).await;
        assert_eq!(status, StatusCode::OK, "http2: {http2}");
        assert_eq!(body, pattern(0, TRAILED_LEN), "http2: {http2}");
        let trailers = trailers.unwrap_or_else(|| panic!("no trailers (http2: {http2})"));
        assert_eq!(trailers["x-seen-trailer"], "42", "http2: {http2}");
        assert_eq!(trailers["x-digest"], digest.as_str(), "http2: {http2}");
    }
    // Without `TE: trailers` the upstream sends none; the body is whole.
    let (status, body, trailers) = post_with_trailers(addr, false, false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, pattern(0, TRAILED_LEN));
    assert!(trailers.is_none(), "{trailers:?}");
    gw.shutdown().await;
}

async fn shutdown_lets_requests_in_progress_finish(registry: Box<dyn Registry>) {
    let env = Env::new(&*registry).await;
    let up = env.upstream("files", "f-1").await;
    let (gw, client) = env.routed(vec![Route::new("/", "files")], "/x").await;
    let addr = gw.local_addr();
    const N: u64 = 4 * 1024 * 1024;
    let req = http::Request::get(format!("http://{addr}/download/{N}?gated"))
        .body(empty())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    // Shut down while the body is still coming.
    let shutdown = tokio::spawn(gw.shutdown());
    eventually("the listener is closed", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    up.open_gate();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len() as u64, N);
    tokio::time::timeout(DEADLINE, shutdown)
        .await
        .expect("shutdown returns once the request is done")
        .unwrap();
}

muster_testkit::on_both!(
    shutdown_lets_requests_in_progress_finish,
    large_upload_streams_through,
    large_download_streams_through,
    websocket_echo_through_the_gateway,
    h2c_clients_are_served,
    trailers_pass_through,
);
