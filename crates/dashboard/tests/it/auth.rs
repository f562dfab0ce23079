//! Logins, against both backends with authentication enabled: the
//! dashboard reads with the credentials of `dash`, a reader of the whole
//! prefix (as `muster --user dash:... dashboard` does), and each visitor
//! logs in as a registry user and sees only what that user may read.

use crate::common;

use std::time::{Duration, Instant};

use common::{Answer, Served, SseStream, call, eventually, find_instance};
use hyper::{Method, StatusCode};
use muster::{Config, Etcd, Instance, Registrar, RegistrarConfig};
use muster_testkit::Registry;

muster_testkit::on_both!(
    login_shows_only_what_the_user_may_read,
    the_event_stream_shows_only_what_the_user_may_read,
    auth_coming_on_ends_anonymous_access,
    a_deleted_user_is_logged_out,
);

const ROOT: &str = "--user=root:rootpw";

/// Runs etcdctl against `endpoint`, expecting success.
async fn etcdctl(endpoint: &str, args: &[&str]) {
    let endpoint = endpoint.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        muster_testkit::etcdctl_ok(&endpoint, &args, "")
    })
    .await
    .unwrap();
}

/// Users: `root`; `dash`, who may read the whole prefix (the dashboard's
/// own client); `alice`, who may read the `web` service only. Auth is on
/// at the end unless `enable` is false.
async fn users(endpoint: &str, enable: bool) {
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "dash"],
        &[
            "role",
            "grant-permission",
            "dash",
            "read",
            "/muster/services/",
            "--prefix=true",
        ],
        &["user", "add", "dash:dashpw"],
        &["user", "grant-role", "dash", "dash"],
        &["role", "add", "web-reader"],
        &[
            "role",
            "grant-permission",
            "web-reader",
            "read",
            "/muster/services/web/",
            "--prefix=true",
        ],
        &["user", "add", "alice:alicepw"],
        &["user", "grant-role", "alice", "web-reader"],
    ] {
        etcdctl(endpoint, args).await;
    }
    if enable {
        etcdctl(endpoint, &["auth", "enable"]).await;
    }
}

fn client_as(endpoint: &str, user: &str, password: &str) -> Etcd {
    let mut config = Config::new(vec![endpoint.to_string()]).with_credentials(user, password);
    config.request_timeout = Duration::from_secs(2);
    config.connect_timeout = Duration::from_millis(500);
    Etcd::connect(config).expect("client")
}

/// A registrar writing as root, with its own lease.
async fn registrar(endpoint: &str) -> Registrar {
    Registrar::start(
        client_as(endpoint, "root", "rootpw"),
        RegistrarConfig::default().with_ttl(Duration::from_secs(10)),
    )
    .await
    .expect("start registrar")
}

/// The dashboard, reading as `dash`.
async fn served(endpoint: &str) -> Served {
    Served::with_client(client_as(endpoint, "dash", "dashpw")).await
}

async fn login(served: &Served, name: &str, password: &str) -> Answer {
    let body = serde_json::json!({ "name": name, "password": password }).to_string();
    call(
        Method::POST,
        &served.url("/api/login"),
        &[("content-type", "application/json")],
        &body,
    )
    .await
}

/// Logs in; the `Cookie` header value that carries the session.
async fn session(served: &Served, name: &str, password: &str) -> String {
    let answer = login(served, name, password).await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "login {name}: {}",
        answer.body
    );
    let set = answer.set_cookies();
    let cookie = set
        .iter()
        .find(|c| c.starts_with("muster_session="))
        .unwrap_or_else(|| panic!("no session cookie in {set:?}"));
    cookie.split(';').next().unwrap().to_string()
}

async fn get_as(served: &Served, path: &str, cookie: Option<&str>) -> Answer {
    let headers: Vec<(&str, &str)> = cookie.map(|c| ("cookie", c)).into_iter().collect();
    call(Method::GET, &served.url(path), &headers, "").await
}

fn service_names(v: &serde_json::Value) -> Vec<String> {
    v["services"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

async fn login_shows_only_what_the_user_may_read(registry: Box<dyn Registry>) {
    let ep = registry.endpoint();
    users(&ep, true).await;
    let web = registrar(&ep).await;
    web.register(Instance::new("web", "web-1", "http://127.0.0.1:8001"))
        .await
        .unwrap();
    let billing = registrar(&ep).await;
    billing
        .register(Instance::new("billing", "billing-1", "10.0.0.9:9000"))
        .await
        .unwrap();
    let served = served(&ep).await;

    // Without a session: 401 JSON on every API route; the page itself
    // loads (it shows the login form).
    for path in [
        "/api/services",
        "/api/status",
        "/api/events",
        "/api/session",
    ] {
        let answer = get_as(&served, path, None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(answer.json()["login"], true, "{path}: {}", answer.body);
    }
    for path in ["/", "/assets/app.js", "/assets/style.css"] {
        assert_eq!(get_as(&served, path, None).await.status, StatusCode::OK);
    }
    let page = get_as(&served, "/", None).await.body;
    assert!(
        page.contains("type=\"password\"") && page.contains("autocomplete=\"current-password\""),
        "a password field on the page"
    );

    // A wrong password: the registry's refusal, no cookie.
    let wrong = login(&served, "alice", "nope").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{}", wrong.body);
    let error = wrong.json()["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("authentication failed"), "{error}");
    assert!(wrong.set_cookies().is_empty(), "{:?}", wrong.set_cookies());
    assert!(!wrong.body.contains("nope"), "the password is never echoed");
    let unknown = login(&served, "mallory", "x").await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    // This browser's address is slowed down now, whatever the registry's
    // own throttle sees. (Whether the second attempt had to wait depends
    // on how soon it came; the growing delays are the throttle's unit
    // tests.)
    let throttle = served.dashboard.login_throttle();
    assert_eq!(throttle.failures(), 2);
    assert_eq!(throttle.peers(), 1);
    // Only JSON: a cross-site form cannot log anyone in.
    let form = call(
        Method::POST,
        &served.url("/api/login"),
        &[("content-type", "application/x-www-form-urlencoded")],
        "name=alice&password=alicepw",
    )
    .await;
    assert_eq!(form.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(form.set_cookies().is_empty());
    let text = call(
        Method::POST,
        &served.url("/api/login"),
        &[("content-type", "text/plain")],
        r#"{"name":"alice","password":"alicepw"}"#,
    )
    .await;
    assert_eq!(text.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // alice logs in: an HttpOnly, SameSite=Strict session cookie.
    let answer = login(&served, "alice", "alicepw").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.json()["user"], "alice");
    assert!(!answer.body.contains("alicepw"));
    let set = answer.set_cookies();
    assert_eq!(set.len(), 1, "{set:?}");
    let attributes: Vec<&str> = set[0].split(';').map(str::trim).collect();
    assert!(attributes.contains(&"HttpOnly"), "{set:?}");
    assert!(attributes.contains(&"SameSite=Strict"), "{set:?}");
    assert!(attributes.contains(&"Path=/"), "{set:?}");
    assert!(!attributes.contains(&"Secure"), "plain HTTP here: {set:?}");
    let id = attributes[0]
        .strip_prefix("muster_session=")
        .expect("the session cookie");
    assert!(id.len() >= 32, "a long random id: {id}");
    assert!(!set[0].contains("alicepw"));
    let alice = attributes[0].to_string();
    assert_eq!(throttle.peers(), 0, "a success ends the slowdown");

    let me = get_as(&served, "/api/session", Some(&alice)).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(
        me.json(),
        serde_json::json!({ "auth": true, "user": "alice" })
    );

    // Only the web service, whose prefix alice may read.
    let v = get_as(&served, "/api/services", Some(&alice)).await.json();
    assert_eq!(service_names(&v), ["web"], "{v}");
    assert_eq!(v["instances"], 1, "{v}");
    assert!(find_instance(&v, "web", "web-1").is_some());
    // The key counts are not hers to see; the rest of the status is.
    let status = get_as(&served, "/api/status", Some(&alice)).await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.body);
    let status = status.json();
    assert!(status["keys"].is_null(), "{status}");
    assert!(status["prefix_keys"].is_null(), "{status}");
    assert!(status["revision"].as_i64().unwrap() > 0, "{status}");

    // root sees everything, counts included; its session is its own.
    let root = session(&served, "root", "rootpw").await;
    assert_ne!(root, alice);
    let v = get_as(&served, "/api/services", Some(&root)).await.json();
    assert_eq!(service_names(&v), ["billing", "web"], "{v}");
    let status = get_as(&served, "/api/status", Some(&root)).await.json();
    assert_eq!(status["prefix_keys"], 2, "{status}");
    // The dashboard's own client (dash) may not count every key.
    assert!(status["keys"].is_null(), "{status}");
    assert_eq!(served.dashboard.sessions(), 2);

    // A revoked permission hides the service within a few seconds.
    etcdctl(
        &ep,
        &[
            ROOT,
            "role",
            "revoke-permission",
            "web-reader",
            "/muster/services/web/",
            "--prefix=true",
        ],
    )
    .await;
    let start = Instant::now();
    eventually("web hidden from alice", || async {
        let v = get_as(&served, "/api/services", Some(&alice)).await.json();
        service_names(&v).is_empty()
    })
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );

    // Logout ends the session and clears the cookie.
    let out = call(
        Method::POST,
        &served.url("/api/logout"),
        &[("cookie", &alice)],
        "",
    )
    .await;
    assert_eq!(out.status, StatusCode::OK);
    assert!(
        out.set_cookies()
            .iter()
            .any(|c| c.starts_with("muster_session=;") && c.contains("Max-Age=0")),
        "{:?}",
        out.set_cookies()
    );
    for path in ["/api/services", "/api/session", "/api/events"] {
        let answer = get_as(&served, path, Some(&alice)).await;
        assert_eq!(
            answer.status,
            StatusCode::UNAUTHORIZED,
            "{path} after logout"
        );
    }
    assert_eq!(served.dashboard.sessions(), 1);
    // root's session is untouched.
    let v = get_as(&served, "/api/services", Some(&root)).await.json();
    assert_eq!(service_names(&v), ["billing", "web"], "{v}");
    // A made-up session id is no session.
    let forged = get_as(
        &served,
        "/api/services",
        Some("muster_session=0000000000000000000000000000000000000000000000000000000000000000"),
    )
    .await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    web.shutdown().await.unwrap();
    billing.shutdown().await.unwrap();
}

async fn the_event_stream_shows_only_what_the_user_may_read(registry: Box<dyn Registry>) {
    let ep = registry.endpoint();
    users(&ep, true).await;
    let web = registrar(&ep).await;
    web.register(Instance::new("web", "web-1", "http://127.0.0.1:8001"))
        .await
        .unwrap();
    let billing = registrar(&ep).await;
    billing
        .register(Instance::new("billing", "billing-1", "10.0.0.9:9000"))
        .await
        .unwrap();
    let served = served(&ep).await;
    let root = session(&served, "root", "rootpw").await;
    let all = get_as(&served, "/api/services", Some(&root)).await.json();
    let lease_of = |service: &str, id: &str| {
        find_instance(&all, service, id).expect("listed")["lease"]
            .as_str()
            .expect("a lease")
            .to_string()
    };
    let (web_lease, billing_lease) = (lease_of("web", "web-1"), lease_of("billing", "billing-1"));
    assert_ne!(web_lease, billing_lease, "one lease per registrar");

    let alice = session(&served, "alice", "alicepw").await;
    let url = served.url("/api/events");
    let mut stream = SseStream::open_with(&url, &[("cookie", &alice)]).await;
    let snapshot = stream.until("snapshot", |e| e.event == "snapshot").await;
    assert_eq!(service_names(&snapshot.data), ["web"], "{}", snapshot.data);
    assert!(
        !snapshot.data.to_string().contains("billing"),
        "{}",
        snapshot.data
    );

    // billing-2 first, then web-2: a leak of billing-2 would come first.
    billing
        .register(Instance::new("billing", "billing-2", "10.0.0.10:9000"))
        .await
        .unwrap();
    web.register(Instance::new("web", "web-2", "http://127.0.0.1:8002"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    stream
        .until("web-2", |e| {
            seen.push(e.clone());
            e.event == "changes" && e.data["upserts"].to_string().contains("web-2")
        })
        .await;
    // The lease times that follow are web's only.
    stream
        .until("web's lease time", |e| {
            seen.push(e.clone());
            e.event == "leases" && e.data["leases"].get(&web_lease).is_some()
        })
        .await;
    for e in &seen {
        let text = e.data.to_string();
        assert!(
            !text.contains("billing") && !text.contains(&billing_lease),
            "alice saw billing: {} {text}",
            e.event
        );
    }

    // Revoked: a new snapshot without web.
    etcdctl(
        &ep,
        &[
            ROOT,
            "role",
            "revoke-permission",
            "web-reader",
            "/muster/services/web/",
            "--prefix=true",
        ],
    )
    .await;
    let empty = stream
        .until("a snapshot without web", |e| e.event == "snapshot")
        .await;
    assert_eq!(
        empty.data["services"],
        serde_json::json!([]),
        "{}",
        empty.data
    );
    assert_eq!(
        empty.data["events"],
        serde_json::json!([]),
        "{}",
        empty.data
    );

    // Granted again (now billing): it shows.
    etcdctl(
        &ep,
        &[
            ROOT,
            "role",
            "grant-permission",
            "web-reader",
            "read",
            "/muster/services/billing/",
            "--prefix=true",
        ],
    )
    .await;
    let granted = stream
        .until("a snapshot with billing", |e| {
            e.event == "snapshot" && !e.data["services"].as_array().unwrap().is_empty()
        })
        .await;
    assert_eq!(
        service_names(&granted.data),
        ["billing"],
        "{}",
        granted.data
    );

    // Logout ends the open stream.
    let out = call(
        Method::POST,
        &served.url("/api/logout"),
        &[("cookie", &alice)],
        "",
    )
    .await;
    assert_eq!(out.status, StatusCode::OK);
    let deadline = Instant::now() + common::DEADLINE;
    while stream.next_before(deadline).await.is_some() {}
    assert!(Instant::now() < deadline, "the stream did not end");
    web.shutdown().await.unwrap();
    billing.shutdown().await.unwrap();
}

/// Auth off: no login. Auth turned on: the anonymous stream ends and the
/// API wants a login.
async fn auth_coming_on_ends_anonymous_access(registry: Box<dyn Registry>) {
    let ep = registry.endpoint();
    users(&ep, false).await;
    let served = served(&ep).await;
    let me = get_as(&served, "/api/session", None).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.body);
    assert_eq!(
        me.json(),
        serde_json::json!({ "auth": false, "user": null })
    );
    assert_eq!(
        get_as(&served, "/api/services", None).await.status,
        StatusCode::OK
    );
    let no_need = login(&served, "alice", "alicepw").await;
    assert_eq!(no_need.status, StatusCode::BAD_REQUEST, "{}", no_need.body);
    assert!(no_need.set_cookies().is_empty());

    let mut stream = SseStream::open(&served.url("/api/events")).await;
    stream.until("snapshot", |e| e.event == "snapshot").await;
    etcdctl(&ep, &["auth", "enable"]).await;
    let deadline = Instant::now() + common::DEADLINE;
    while stream.next_before(deadline).await.is_some() {}
    assert!(
        Instant::now() < deadline,
        "the anonymous stream did not end"
    );
    let answer = get_as(&served, "/api/services", None).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.body);
    let alice = session(&served, "alice", "alicepw").await;
    let v = get_as(&served, "/api/services", Some(&alice)).await;
    assert_eq!(v.status, StatusCode::OK);
}

/// Deleting a user drops its tokens: the session ends (the page asks for
/// a login again) within the permission window, and the user can no
/// longer log in. Other sessions go on.
async fn a_deleted_user_is_logged_out(registry: Box<dyn Registry>) {
    let ep = registry.endpoint();
    users(&ep, true).await;
    let served = served(&ep).await;
    let alice = session(&served, "alice", "alicepw").await;
    let root = session(&served, "root", "rootpw").await;
    let mut stream = SseStream::open_with(&served.url("/api/events"), &[("cookie", &alice)]).await;
    stream.until("snapshot", |e| e.event == "snapshot").await;
    assert_eq!(
        get_as(&served, "/api/services", Some(&alice)).await.status,
        StatusCode::OK
    );
    etcdctl(&ep, &[ROOT, "user", "delete", "alice"]).await;
    eventually("alice's session ends", || async {
        get_as(&served, "/api/services", Some(&alice)).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
    let deadline = Instant::now() + common::DEADLINE;
    while stream.next_before(deadline).await.is_some() {}
    assert!(Instant::now() < deadline, "alice's stream did not end");
    assert_eq!(served.dashboard.sessions(), 1);
    assert_eq!(
        login(&served, "alice", "alicepw").await.status,
        StatusCode::UNAUTHORIZED
    );
    let v = get_as(&served, "/api/services", Some(&root)).await;
    assert_eq!(v.status, StatusCode::OK, "{}", v.body);
}
