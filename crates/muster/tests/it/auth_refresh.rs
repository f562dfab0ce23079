//! The client's auth token dies (expires after `--auth-token-ttl` of
//! idleness, is dropped by a password change, an auth disable or a restart)
//! while discovery, the catalog and the registrar keep running: they
//! re-authenticate and carry on. A genuine refusal is a typed error naming
//! the key range, not a retry loop.
//!
//! Every registry here runs with a 2 s token TTL; users are set up with
//! etcdctl against the registry's endpoint, so the same bodies run on both
//! backends.

use crate::common;

use std::time::Duration;

use common::*;
use muster::client::{WatchEvent, WatchOptions};
use muster::{
    Catalog, Discovery, DiscoveryConfig, Error, Etcd, Instance, RegistrarState, instance,
};
use muster_testkit::Registry;

const ROOT: &str = "--user=root:rootpw";
const APP: &str = "app";
const APP_PASSWORD: &str = "apppw";

muster_testkit::on_both!(
    options = muster_testkit::RegistryOptions {
        auth_token_ttl: Some(std::time::Duration::from_secs(2)),
    };
    discovery_follows_across_token_expiry,
    watches_recover_from_a_restart_after_token_expiry,
    registrar_reregisters_after_token_expiry,
    password_reset_drops_the_token_and_the_client_reauthenticates,
    auth_disabled_and_reenabled_while_the_client_holds_a_token,
    a_stale_token_is_refused_after_auth_disable,
    permission_denied_is_a_typed_error_naming_the_range,
);

/// Turns auth on: `root`, and `app` with read-write on `/muster/` only.
async fn enable_auth(endpoint: &str) {
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "app"],
        &[
            "role",
            "grant-permission",
            "app",
            "readwrite",
            "/muster/",
            "--prefix=true",
        ],
        &["user", "add", "app:apppw"],
        &["user", "grant-role", "app", "app"],
        &["auth", "enable"],
    ] {
        etcdctl(endpoint, args).await;
    }
}

/// A client authenticating as `app`.
fn app_client(endpoint: &str) -> Etcd {
    Etcd::connect(config(vec![endpoint.to_string()]).with_credentials(APP, APP_PASSWORD))
        .expect("client")
}

/// Writes `instance` (no lease) with etcdctl as root: a writer that is not
/// the client under test, so it neither uses nor refreshes that client's
/// token.
async fn put_as_root(endpoint: &str, instance: &Instance) {
    let key = instance.key(instance::DEFAULT_PREFIX);
    let value = String::from_utf8(instance.encode().unwrap()).unwrap();
    etcdctl(endpoint, &[ROOT, "put", &key, &value]).await;
}

/// Whether `key` exists, asked with etcdctl as root.
async fn exists_as_root(endpoint: &str, key: &str) -> bool {
    !etcdctl(endpoint, &[ROOT, "get", key, "--keys-only"])
        .await
        .trim()
        .is_empty()
}

/// Outlives the client's token. The one fixed sleep of these tests, and
/// the point of them: etcd drops a simple token left unused for its TTL
/// (2 s here; it checks once a second), so after 4.5 s without a unary
/// call from the client (streams' messages do not count as use) it is gone.
async fn outlive_token() {
    tokio::time::sleep(Duration::from_millis(4500)).await;
}

fn web(id: &str) -> Instance {
    Instance::new("web", id, format!("http://127.0.0.1:{}", 8000 + id.len()))
}

/// (a) An existing watch outlives its token; a watch created after it died
/// (a new service on the same handle) is refused on the old stream, and the
/// hub moves every watch to a new stream with a fresh token: both services
/// see what is registered afterwards.
async fn discovery_follows_across_token_expiry(registry: Box<dyn Registry>) {
    let ep = registry.endpoint();
    enable_auth(&ep).await;
    let etcd = app_client(&ep);
    let discovery = Discovery::new(etcd.clone());
    let web_svc = discovery.service("web").await.unwrap();
    put_as_root(&ep, &web("a")).await;
    web_svc.wait_for(DEADLINE, |s| s.len() == 1).await.unwrap();
    let (auths, streams) = (etcd.authentications(), etcd.watch_streams_opened());
    assert_eq!(streams, 1);

    outlive_token().await;
    // etcd checks the token at watch create only: this watch still streams.
    put_as_root(&ep, &web("b")).await;
    web_svc.wait_for(DEADLINE, |s| s.len() == 2).await.unwrap();
    assert_eq!(etcd.watch_streams_opened(), streams);

    // The list re-authenticates; the watch create, refused on the stream
    // opened with the dead token, moves the watches to a new stream.
    let api = discovery.service("api").await.unwrap();
    assert!(etcd.authentications() > auths, "the list re-authenticated");
    put_as_root(&ep, &Instance::new("api", "x", "http://127.0.0.1:9000")).await;
    api.wait_for(DEADLINE, |s| s.len() == 1).await.unwrap();
    put_as_root(&ep, &web("c")).await;
    web_svc.wait_for(DEADLINE, |s| s.len() == 3).await.unwrap();
    assert!(etcd.watch_streams_opened() > streams);
    // The move is no outage: nothing was stale.
    assert_eq!(web_svc.health().stale_for, None);
    assert_eq!(api.health().stale_for, None);
}

/// (a) After the token died, a restart (which also forgets every token)
/// makes the hub reconnect with the dead token: the creates are refused,
/// it re-authenticates and re-creates them. Discovery and the catalog see
/// what is registered afterwards.
async fn watches_recover_from_a_restart_after_token_expiry(mut registry: Box<dyn Registry>) {
    let ep = registry.endpoint();
    enable_auth(&ep).await;
    let etcd = app_client(&ep);
    let web_svc = follow(&etcd, "web").await;
    let catalog = Catalog::follow(etcd.clone(), instance::DEFAULT_PREFIX)
        .await
        .unwrap();
    put_as_root(&ep, &web("a")).await;
    web_svc.wait_for(DEADLINE, |s| s.len() == 1).await.unwrap();
    let auths = etcd.authentications();

    outlive_token().await;
    registry.restart().unwrap();
    put_as_root(&ep, &web("b")).await;
    web_svc.wait_for(DEADLINE, |s| s.len() == 2).await.unwrap();
    eventually(
        "the catalog sees the registration after the restart",
        || {
            let n = catalog.snapshot().len();
            async move { n == 2 }
        },
    )
    .await;
    eventually("discovery and the catalog are current again", || {
        let fresh = web_svc.health().stale_for.is_none() && catalog.health().stale_for.is_none();
        async move { fresh }
    })
    .await;
    assert!(etcd.authentications() > auths, "the hub re-authenticated");
}

/// (b) A registrar stays registered across several token lifetimes (its
/// keep-alive stream needs no token), and after its lease is revoked from
/// outside it re-registers (lease grant and transaction re-authenticate),
/// with a working watch on its own key (created on a new stream).
async fn registrar_reregisters_after_token_expiry(registry: Box<dyn Registry>) {
    let ep = registry.endpoint();
    enable_auth(&ep).await;
    let etcd = app_client(&ep);
    let a = web("a");
    let key = a.key(instance::DEFAULT_PREFIX);
    let registrar = registered(&etcd, 2, [a]).await;
    let RegistrarState::Registered { lease } = registrar.state() else {
        panic!("not registered: {:?}", registrar.state());
    };
    let auths = etcd.authentications();

    outlive_token().await;
    assert!(
        exists_as_root(&ep, &key).await,
        "kept alive past its lease TTL"
    );
    assert_eq!(registrar.state(), RegistrarState::Registered { lease });

    etcdctl(&ep, &[ROOT, "lease", "revoke", &format!("{lease:x}")]).await;
    let mut state = registrar.subscribe();
    let renewed = tokio::time::timeout(DEADLINE, async {
        loop {
            if let RegistrarState::Registered { lease: new } = *state.borrow_and_update()
                && new != lease
            {
                return new;
            }
            state.changed().await.expect("registrar alive");
        }
    })
    .await
    .expect("re-registered under a new lease");
    assert_ne!(renewed, lease);
    eventually("the instance is back", || {
        let (ep, key) = (ep.clone(), key.clone());
        async move { exists_as_root(&ep, &key).await }
    })
    .await;
    assert!(
        etcd.authentications() > auths,
        "the registrar's calls re-authenticated"
    );

    // Its own-key watch, created after the token died, works: a deletion
    // from outside is undone.
    etcdctl(&ep, &[ROOT, "del", &key]).await;
    eventually("the registrar restores its deleted key", || {
        let (ep, key) = (ep.clone(), key.clone());
        async move { exists_as_root(&ep, &key).await }
    })
    .await;
    assert!(matches!(
        registrar.state(),
        RegistrarState::Registered { lease } if lease == renewed
    ));
}

/// (c) Setting a user's password (even to the same one) drops its tokens:
/// the client re-authenticates transparently, for calls and new watches.
/// A real change leaves the old credentials failing with a typed error,
/// and new credentials work.
async fn password_reset_drops_the_token_and_the_client_reauthenticates(
    registry: Box<dyn Registry>,
) {
    let ep = registry.endpoint();
    enable_auth(&ep).await;
    let etcd = app_client(&ep);
    let registrar = registered(&etcd, 5, [web("a")]).await;
    let discovery = Discovery::new(etcd.clone());
    let web_svc = discovery.service("web").await.unwrap();
    assert_eq!(web_svc.snapshot().len(), 1);
    let auths = etcd.authentications();

    etcdctl_with_input(
        &ep,
        &[ROOT, "user", "passwd", APP, "--interactive=false"],
        &format!("{APP_PASSWORD}\n"),
    )
    .await;
    // Calls, registrations and new watches carry on.
    assert!(
        get(&etcd, &web("a").key(instance::DEFAULT_PREFIX))
            .await
            .is_some()
    );
    assert!(etcd.authentications() > auths);
    registrar.register(web("b")).await.unwrap();
    web_svc.wait_for(DEADLINE, |s| s.len() == 2).await.unwrap();
    let api = discovery.service("api").await.unwrap();
    put_as_root(&ep, &Instance::new("api", "x", "http://127.0.0.1:9000")).await;
    api.wait_for(DEADLINE, |s| s.len() == 1).await.unwrap();
    assert!(matches!(
        registrar.state(),
        RegistrarState::Registered { .. }
    ));

    // A real change: the old password fails, in words, and does not hang.
    etcdctl_with_input(
        &ep,
        &[ROOT, "user", "passwd", APP, "--interactive=false"],
        "newpw\n",
    )
    .await;
    let err = etcd
        .range(muster_proto::RangeRequest {
            key: b"/muster/x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AuthFailed(_)), "{err}");
    let renewed = Etcd::connect(config(vec![ep.clone()]).with_credentials(APP, "newpw")).unwrap();
    assert!(
        get(&renewed, &web("a").key(instance::DEFAULT_PREFIX))
            .await
            .is_some()
    );
    registrar.shutdown().await.ok();
}

/// (d) With auth disabled, the client's stale token is refused; it tries
/// to re-authenticate, hears that auth is off, and goes on without a token:
/// calls, registrations and new watches keep working. Re-enabled, etcd asks
/// for a user again and the client authenticates.
async fn auth_disabled_and_reenabled_while_the_client_holds_a_token(registry: Box<dyn Registry>) {
    let ep = registry.endpoint();
    enable_auth(&ep).await;
    let etcd = app_client(&ep);
    let registrar = registered(&etcd, 5, [web("a")]).await;
    let discovery = Discovery::new(etcd.clone());
    let web_svc = discovery.service("web").await.unwrap();
    let key_a = web("a").key(instance::DEFAULT_PREFIX);

    etcdctl(&ep, &[ROOT, "auth", "disable"]).await;
    assert!(get(&etcd, &key_a).await.is_some());
    put(&etcd, "/muster/plain", b"1").await;
    registrar.register(web("b")).await.unwrap();
    web_svc.wait_for(DEADLINE, |s| s.len() == 2).await.unwrap();
    // A new watch: refused on the stream with the stale token, then
    // created on a new stream without one.
    let api = discovery.service("api").await.unwrap();
    put_as_root(&ep, &Instance::new("api", "x", "http://127.0.0.1:9000")).await;
    api.wait_for(DEADLINE, |s| s.len() == 1).await.unwrap();
    assert!(matches!(
        registrar.state(),
        RegistrarState::Registered { .. }
    ));

    let auths = etcd.authentications();
    etcdctl(&ep, &[ROOT, "auth", "enable"]).await;
    // Without a token, etcd answers "user name is empty": the client
    // authenticates again, for calls and for a new stream's watches.
    assert!(get(&etcd, &key_a).await.is_some());
    assert!(etcd.authentications() > auths);
    let db = discovery.service("db").await.unwrap();
    put_as_root(&ep, &Instance::new("db", "x", "http://127.0.0.1:9001")).await;
    db.wait_for(DEADLINE, |s| s.len() == 1).await.unwrap();
    registrar.register(web("c")).await.unwrap();
    web_svc.wait_for(DEADLINE, |s| s.len() == 3).await.unwrap();
    registrar.shutdown().await.ok();
}

/// What etcd 3.4 answers to a request carrying a token issued before
/// `auth disable`: `Unauthenticated`, "invalid auth token" (the token
/// provider forgets every token when auth goes off), not a plain success;
/// and `Authenticate` then answers "authentication is not enabled". The
/// client's handling of (d) rests on this.
async fn a_stale_token_is_refused_after_auth_disable(registry: Box<dyn Registry>) {
    use muster_proto::auth_client::AuthClient;
    use muster_proto::kv_client::KvClient;
    let ep = registry.endpoint();
    enable_auth(&ep).await;
    let channel = tonic::transport::Endpoint::from_shared(ep.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = AuthClient::new(channel.clone())
        .authenticate(muster_proto::AuthenticateRequest {
            name: APP.into(),
            password: APP_PASSWORD.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    etcdctl(&ep, &[ROOT, "auth", "disable"]).await;
    let mut req = tonic::Request::new(muster_proto::RangeRequest {
        key: b"/muster/x".to_vec(),
        ..Default::default()
    });
    req.metadata_mut().insert("token", token.parse().unwrap());
    let status = KvClient::new(channel.clone()).range(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("invalid auth token"),
        "{status:?}"
    );
    let status = AuthClient::new(channel.clone())
        .authenticate(muster_proto::AuthenticateRequest {
            name: APP.into(),
            password: APP_PASSWORD.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("authentication is not enabled"),
        "{status:?}"
    );
    // Without a token, the same read is served.
    KvClient::new(channel)
        .range(muster_proto::RangeRequest {
            key: b"/muster/x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// A watch or read outside the user's permissions fails with
/// [`Error::PermissionDenied`] naming the user and the range: the hub tries
/// one fresh token, then ends the watcher, without looping.
async fn permission_denied_is_a_typed_error_naming_the_range(registry: Box<dyn Registry>) {
    let ep = registry.endpoint();
    enable_auth(&ep).await;
    let etcd = app_client(&ep);

    let mut denied = etcd.watch(WatchOptions::prefix("/secret/")).await.unwrap();
    let event = tokio::time::timeout(DEADLINE, denied.next())
        .await
        .expect("an answer")
        .expect("an event");
    let WatchEvent::PermissionDenied { user, request } = &event else {
        panic!("expected a refusal, got {event:?}");
    };
    assert_eq!(user.as_deref(), Some(APP));
    assert_eq!(request, "watch prefix /secret/");
    let message = event.error().unwrap().to_string();
    assert!(
        message.contains("\"app\"") && message.contains("/secret/"),
        "{message}"
    );
    assert_eq!(denied.next().await, None, "terminal");
    // One stream, plus one with a fresh token to rule out a stale one.
    assert_eq!(etcd.watch_streams_opened(), 2);

    // The hub goes on serving permitted watches, without more streams.
    let web_svc = follow(&etcd, "web").await;
    put_as_root(&ep, &web("a")).await;
    web_svc.wait_for(DEADLINE, |s| s.len() == 1).await.unwrap();
    assert_eq!(etcd.watch_streams_opened(), 2);

    // Reads say the same.
    let err = etcd
        .range(muster_proto::RangeRequest {
            key: b"/secret/".to_vec(),
            range_end: instance::prefix_range_end(b"/secret/"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let Error::PermissionDenied { user, request } = &err else {
        panic!("expected a refusal, got {err:?}");
    };
    assert_eq!(
        (user.as_deref(), request.as_str()),
        (Some(APP), "read prefix /secret/")
    );
    let secret = Discovery::with_config(
        etcd.clone(),
        DiscoveryConfig::default().with_prefix("/secret"),
    )
    .unwrap()
    .service("x")
    .await
    .unwrap_err();
    assert!(
        matches!(&secret, Error::PermissionDenied { request, .. } if request == "read prefix /secret/x/"),
        "{secret}"
    );

    // Without credentials: the same, for "no user".
    let anonymous = client(&ep);
    let err = anonymous
        .range(muster_proto::RangeRequest {
            key: b"/muster/x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::PermissionDenied { user: None, request } if request == "read key /muster/x"),
        "{err:?}"
    );
    let mut denied = anonymous
        .watch(WatchOptions::key("/muster/x"))
        .await
        .unwrap();
    let event = tokio::time::timeout(DEADLINE, denied.next()).await.unwrap();
    assert!(
        matches!(&event, Some(WatchEvent::PermissionDenied { user: None, request }) if request == "watch key /muster/x"),
        "{event:?}"
    );
    assert_eq!(anonymous.watch_streams_opened(), 1);
}

muster_testkit::on_both!(acting_for_a_user_over_the_same_connections);

/// `authenticate_as`, `with_token` and `anonymous`: a front end checking a
/// user's password and acting as that user (or as nobody) without touching
/// its own handle's authentication.
async fn acting_for_a_user_over_the_same_connections(registry: Box<dyn Registry>) {
    let ep = registry.endpoint();
    let base = client(&ep);
    // Auth off: nobody needs to log in, anonymous reads work.
    assert_eq!(base.authenticate_as("app", "apppw").await.unwrap(), None);
    let count = |key: &str| muster_proto::RangeRequest {
        key: key.as_bytes().to_vec(),
        count_only: true,
        ..Default::default()
    };
    base.anonymous().range(count("/muster/x")).await.unwrap();

    enable_auth(&ep).await;
    let err = base.authenticate_as("app", "wrong").await.unwrap_err();
    assert!(
        matches!(&err, Error::AuthFailed(m) if m.contains("authentication failed")),
        "{err:?}"
    );
    let token = base
        .authenticate_as(APP, APP_PASSWORD)
        .await
        .unwrap()
        .expect("a token");
    assert_eq!(base.authentications(), 0, "the handle's own auth untouched");
    let app = base.with_token(&token).unwrap();
    app.range(count("/muster/services/web/")).await.unwrap();
    let denied = app.range(count("/elsewhere")).await.unwrap_err();
    assert!(
        matches!(denied, Error::PermissionDenied { .. }),
        "{denied:?}"
    );
    // Without a token etcd says "user name is empty": auth is on.
    let anonymous = base
        .anonymous()
        .range(count("/muster/x"))
        .await
        .unwrap_err();
    assert!(
        matches!(anonymous, Error::PermissionDenied { .. }),
        "{anonymous:?}"
    );
    // A token etcd does not know fails as AuthFailed, never retried. (Its
    // index is one etcd has applied: etcd 3.4 waits for the raft index a
    // simple token names before it looks the token up.)
    let forged = base.with_token("abcdefghijklmnop.1").unwrap();
    let refused = forged.range(count("/muster/x")).await.unwrap_err();
    assert!(matches!(refused, Error::AuthFailed(_)), "{refused:?}");
    assert!(base.with_token("not\nascii").is_err());
    // The password changes: the token dies.
    etcdctl_with_input(
        &ep,
        &[ROOT, "user", "passwd", APP, "--interactive=false"],
        "newpw\n",
    )
    .await;
    let dead = app.range(count("/muster/services/web/")).await.unwrap_err();
    assert!(matches!(dead, Error::AuthFailed(_)), "{dead:?}");
}
