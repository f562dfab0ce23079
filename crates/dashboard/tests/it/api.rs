//! The dashboard's HTTP API against both backends: real etcd and muster's
//! embedded registry.

use crate::common;

use std::time::Duration;

use common::{Served, SseStream, eventually, find_instance, get, get_json, request};
use hyper::{Method, StatusCode};
use muster::{Instance, Registrar, RegistrarConfig};
use muster_testkit::Registry;

muster_testkit::on_both!(
    services_reflect_registrations,
    event_stream_delivers_registrations_and_removals,
    lease_loss_shows_as_expired,
    status_answers,
    nothing_mutates,
    page_and_assets_are_served,
    registry_outage_keeps_the_last_state,
);

fn user(id: &str) -> Instance {
    Instance::new("user", id, "http://127.0.0.1:8080")
        .with_zone("eu-1")
        .with_version("1.4.2")
        .with_weight(70)
        .with_tag("canary")
}

async fn registrar(registry: &dyn Registry) -> Registrar {
    Registrar::start(
        common::client(&registry.endpoint()),
        RegistrarConfig::default().with_ttl(Duration::from_secs(5)),
    )
    .await
    .expect("start registrar")
}

async fn services_reflect_registrations(registry: Box<dyn Registry>) {
    let served = Served::start(&registry.endpoint()).await;
    let empty = get_json(&served.url("/api/services")).await;
    assert_eq!(empty["services"], serde_json::json!([]));
    assert_eq!(empty["prefix"], muster::instance::DEFAULT_PREFIX);

    let registrar = registrar(registry.as_ref()).await;
    registrar.register(user("user-1")).await.unwrap();
    registrar
        .register(Instance::new("billing", "billing-1", "10.0.0.9:9000"))
        .await
        .unwrap();

    let url = served.url("/api/services");
    eventually("both services listed", || async {
        let v = get_json(&url).await;
        find_instance(&v, "user", "user-1").is_some()
            && find_instance(&v, "billing", "billing-1").is_some()
    })
    .await;
    let v = get_json(&url).await;
    assert_eq!(v["instances"], 2);
    let names: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["billing", "user"], "sorted by name");
    let inst = find_instance(&v, "user", "user-1").unwrap();
    assert_eq!(inst["addr"], "http://127.0.0.1:8080");
    assert_eq!(inst["zone"], "eu-1");
    assert_eq!(inst["version"], "1.4.2");
    assert_eq!(inst["weight"], 70);
    assert_eq!(inst["status"], "serving");
    assert_eq!(inst["tags"], serde_json::json!(["canary"]));
    assert!(
        inst["lease"].as_str().is_some_and(|l| !l.is_empty()),
        "{inst}"
    );
    let left = inst["lease_left_ms"].as_u64().expect("lease time left");
    assert!(left > 0 && left <= 5_000, "lease left {left} ms");
    assert!(inst["registered_at_ms"].as_u64().is_some(), "{inst}");
    let age = inst["age_ms"].as_u64().expect("age");
    assert!(age < 60_000, "age {age} ms");
    assert!(inst["create_revision"].as_i64().unwrap() > 0);
    let service = &v["services"].as_array().unwrap()[1];
    assert_eq!(
        (&service["serving"], &service["draining"]),
        (&1.into(), &0.into())
    );

    // Draining shows in the counts, deregistering removes it.
    registrar
        .set_status(user("user-1"), muster::Status::Draining)
        .await
        .unwrap();
    eventually("user-1 draining", || async {
        let v = get_json(&url).await;
        find_instance(&v, "user", "user-1").is_some_and(|i| i["status"] == "draining")
    })
    .await;
    let v = get_json(&url).await;
    let service = &v["services"].as_array().unwrap()[1];
    assert_eq!(
        (&service["serving"], &service["draining"]),
        (&0.into(), &1.into())
    );

    registrar.deregister("user", "user-1").await.unwrap();
    eventually("user-1 gone", || async {
        let v = get_json(&url).await;
        find_instance(&v, "user", "user-1").is_none()
    })
    .await;
    let v = get_json(&url).await;
    assert_eq!(v["instances"], 1);
    registrar.shutdown().await.unwrap();
}

async fn event_stream_delivers_registrations_and_removals(registry: Box<dyn Registry>) {
    let served = Served::start(&registry.endpoint()).await;
    let mut stream = SseStream::open(&served.url("/api/events")).await;
    let snapshot = stream.until("snapshot", |e| e.event == "snapshot").await;
    assert_eq!(snapshot.data["services"], serde_json::json!([]));
    assert_eq!(snapshot.data["prefix"], muster::instance::DEFAULT_PREFIX);

    let registrar = registrar(registry.as_ref()).await;
    registrar.register(user("user-7")).await.unwrap();
    let changes = stream
        .until("registration", |e| {
            e.event == "changes" && e.data["events"].to_string().contains("user-7")
        })
        .await;
    let event = &changes.data["events"][0];
    assert_eq!(event["kind"], "registered");
    assert_eq!(event["service"], "user");
    assert_eq!(event["id"], "user-7");
    assert_eq!(event["zone"], "eu-1");
    assert!(event["revision"].as_i64().unwrap() > 0);
    assert!(event["at_ms"].as_u64().unwrap() > 0);
    let upsert = &changes.data["upserts"][0];
    assert_eq!(upsert["id"], "user-7");
    assert_eq!(upsert["addr"], "http://127.0.0.1:8080");
    let lease = upsert["lease"].as_str().expect("lease").to_string();

    // The lease's time left follows.
    let leases = stream
        .until("lease times", |e| {
            e.event == "leases" && e.data["leases"].get(&lease).is_some()
        })
        .await;
    let left = leases.data["leases"][&lease]
        .as_u64()
        .expect("a live lease");
    assert!(left > 0 && left <= 5_000, "lease left {left} ms");
    // And how fast the registration reached the dashboard's table.
    let apply = stream
        .until("propagation figures", |e| {
            e.event == "leases" && e.data["apply"].get("user").is_some()
        })
        .await;
    let user_apply = &apply.data["apply"]["user"];
    assert!(user_apply["count"].as_u64().unwrap() >= 1, "{user_apply}");
    let p99 = user_apply["p99_ms"].as_f64().unwrap();
    assert!(p99 > 0.0 && p99 <= 1_000.0, "p99 {p99} ms");

    registrar.deregister("user", "user-7").await.unwrap();
    let changes = stream
        .until("deregistration", |e| {
            e.event == "changes" && e.data["removes"].to_string().contains("user-7")
        })
        .await;
    assert_eq!(
        changes.data["removes"],
        serde_json::json!([{ "service": "user", "id": "user-7" }])
    );
    assert_eq!(changes.data["events"][0]["kind"], "deregistered");

    // A new stream starts from a snapshot holding the recent events.
    let mut again = SseStream::open(&served.url("/api/events")).await;
    let snapshot = again.until("snapshot", |e| e.event == "snapshot").await;
    let kinds: Vec<&str> = snapshot.data["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["id"] == "user-7")
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["registered", "deregistered"]);

    // Closing the dashboard ends open streams (graceful HTTP shutdown).
    served.dashboard.close();
    let deadline = std::time::Instant::now() + common::DEADLINE;
    while stream.next_before(deadline).await.is_some() {}
    assert!(
        std::time::Instant::now() < deadline,
        "the stream did not end"
    );
    registrar.shutdown().await.unwrap();
}

async fn status_answers(registry: Box<dyn Registry>) {
    let served = Served::start(&registry.endpoint()).await;
    let registrar = registrar(registry.as_ref()).await;
    registrar.register(user("user-1")).await.unwrap();
    let v = get_json(&served.url("/api/status")).await;
    assert_eq!(v["endpoint"], registry.endpoint());
    assert!(v["revision"].as_i64().unwrap() > 1, "{v}");
    assert!(v["keys"].as_i64().unwrap() >= 1, "{v}");
    assert_eq!(v["prefix_keys"], 1, "{v}");
    assert!(v["db_size"].as_i64().unwrap() > 0, "{v}");
    assert!(!v["leader"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(v["is_leader"], true, "a single member leads: {v}");
    assert!(!v["version"].as_str().unwrap().is_empty(), "{v}");
    assert!(v["catalog_stale_ms"].is_null(), "{v}");
    assert!(
        v["quota"].is_null(),
        "etcd's API does not tell the quota: {v}"
    );
    assert_eq!(v["alarms"], serde_json::json!([]), "{v}");

    // An alarm raised on the member shows, and goes once disarmed; a quota
    // the serving process knows shows next to the size.
    served.dashboard.set_quota(1 << 30);
    let etcd = muster::Etcd::connect(muster::Config::new([registry.endpoint()])).unwrap();
    let member = etcd.status().await.unwrap().header.unwrap().member_id;
    let alarm = |action| muster_proto::AlarmRequest {
        action: action as i32,
        member_id: member,
        alarm: muster_proto::AlarmType::Nospace as i32,
    };
    etcd.alarm(alarm(muster_proto::alarm_request::AlarmAction::Activate))
        .await
        .unwrap();
    let v = get_json(&served.url("/api/status")).await;
    assert_eq!(v["alarms"], serde_json::json!(["NOSPACE"]), "{v}");
    assert_eq!(v["quota"], 1u64 << 30, "{v}");
    etcd.alarm(alarm(muster_proto::alarm_request::AlarmAction::Deactivate))
        .await
        .unwrap();
    let v = get_json(&served.url("/api/status")).await;
    assert_eq!(v["alarms"], serde_json::json!([]), "{v}");
    registrar.shutdown().await.unwrap();
}

async fn nothing_mutates(registry: Box<dyn Registry>) {
    let served = Served::start(&registry.endpoint()).await;
    for path in [
        "/",
        "/assets/app.js",
        "/assets/style.css",
        "/api/services",
        "/api/status",
        "/api/events",
    ] {
        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            let resp = request(method.clone(), &served.url(path)).await;
            assert_eq!(
                resp.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
        }
    }
    let (status, _) = get(&served.url("/api/instances/user/user-1")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn page_and_assets_are_served(registry: Box<dyn Registry>) {
    let served = Served::start(&registry.endpoint()).await;
    let resp = request(Method::GET, &served.url("/")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = resp.headers();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let (_, html) = get(&served.url("/")).await;
    assert!(html.contains("assets/app.js") && html.contains("assets/style.css"));
    let (status, js) = get(&served.url("/assets/app.js")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(js.contains("EventSource"));
    assert!(
        !js.contains("innerHTML"),
        "the page never renders data as HTML"
    );
    let (status, css) = get(&served.url("/assets/style.css")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(css.contains(".service"));
}

async fn lease_loss_shows_as_expired(registry: Box<dyn Registry>) {
    let served = Served::start(&registry.endpoint()).await;
    let mut stream = SseStream::open(&served.url("/api/events")).await;
    stream.until("snapshot", |e| e.event == "snapshot").await;
    // A process that dies: its lease goes (revoked here, so the test need
    // not wait for a TTL) without the instance draining first.
    let etcd = common::client(&registry.endpoint());
    let lease = etcd.lease_grant(30).await.unwrap().id;
    let key = user("user-9").key(muster::instance::DEFAULT_PREFIX);
    etcd.put(muster_proto::PutRequest {
        key: key.into_bytes(),
        value: user("user-9").encode().unwrap(),
        lease,
        ..Default::default()
    })
    .await
    .unwrap();
    let changes = stream
        .until("registration", |e| {
            e.event == "changes" && e.data["upserts"].to_string().contains("user-9")
        })
        .await;
    assert_eq!(changes.data["upserts"][0]["lease"], format!("{lease:x}"));
    assert!(
        changes.data["upserts"][0]["registered_at_ms"].is_null(),
        "written without a registration time"
    );
    etcd.lease_revoke(lease).await.unwrap();
    let changes = stream
        .until("expiry", |e| {
            e.event == "changes" && e.data["removes"].to_string().contains("user-9")
        })
        .await;
    assert_eq!(changes.data["events"][0]["kind"], "expired");
}

/// The registry goes down: the page keeps the last known instances and
/// says it is stale; status answers 503 with the reason; after a restart
/// everything is current again.
async fn registry_outage_keeps_the_last_state(mut registry: Box<dyn Registry>) {
    let served = Served::start(&registry.endpoint()).await;
    let registrar = registrar(registry.as_ref()).await;
    registrar.register(user("user-1")).await.unwrap();
    let services = served.url("/api/services");
    eventually("the instance is listed", || async {
        find_instance(&get_json(&services).await, "user", "user-1").is_some()
    })
    .await;

    registry.kill();
    let status = served.url("/api/status");
    eventually("status reports the registry down", || async {
        get(&status).await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let (code, body) = get(&status).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    eventually("the catalog is reported stale", || async {
        served.dashboard.catalog().health().stale_for.is_some()
    })
    .await;
    assert!(
        find_instance(&get_json(&services).await, "user", "user-1").is_some(),
        "the last known instance stays on the page"
    );

    registry.restart().unwrap();
    eventually("status answers again and the catalog is fresh", || async {
        get(&status).await.0 == StatusCode::OK
            && served.dashboard.catalog().health().stale_for.is_none()
    })
    .await;
    drop(registrar);
}
