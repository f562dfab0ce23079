//! What the permission check costs a put, in process: the server's own
//! `Core::put` on an in-memory store, with auth off and with auth on (the
//! caller's token resolved, then the put checked against a role holding
//! `readwrite` on `bench/` among ten other permissions), the same keys and
//! values. No network and no fsync, so the check's share here is an upper
//! bound on its share of a put over gRPC to a persistent server. The two
//! differ by less than run-to-run noise on a busy machine, so the group
//! `check` times the check alone: the token's lookup, then the user's
//! merged permissions searched for the key (what auth adds to a put).
//!
//! `cargo bench -p muster-server --bench auth` (under a minute).
#![allow(
    missing_docs,
    reason = "criterion_group! generates an undocumented pub fn"
)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use muster_proto as pb;
use muster_server::auth::{Access, AuthStore, Caller, Tokens};
use muster_server::storage::RecoveredAuth;
use muster_server::{AuthConfig, Server, ServerConfig};

const KEYS: usize = 10_000;

fn put(i: usize) -> pb::PutRequest {
    pb::PutRequest {
        key: format!("bench/{:08}", i % KEYS).into_bytes(),
        value: vec![b'v'; 256],
        ..Default::default()
    }
}

/// The `bench` role's permissions: `readwrite` on `bench/` and on ten
/// other prefixes.
fn permissions() -> Vec<pb::authpb::Permission> {
    (0..10)
        .map(|i| format!("other{i}/"))
        .chain(["bench/".to_string()])
        .map(|p| pb::authpb::Permission {
            perm_type: pb::authpb::permission::Type::Readwrite as i32,
            range_end: pb::prefix_range_end(p.as_bytes()),
            key: p.into_bytes(),
        })
        .collect()
}

/// A server with auth on, a `bench` user whose role may write `bench/`
/// (and ten other prefixes), and that user's token.
async fn with_auth() -> (Server, String) {
    let server = Server::start(ServerConfig::in_memory().with_auth(AuthConfig {
        bcrypt_cost: 4,
        ..Default::default()
    }))
    .await
    .expect("start");
    let core = server.core();
    let sys = Caller::System;
    for (name, password) in [("root", "rootpw"), ("bench", "benchpw")] {
        core.user_add(
            &sys,
            pb::AuthUserAddRequest {
                name: name.into(),
                password: password.into(),
                options: None,
            },
        )
        .await
        .expect("user add");
    }
    let grant = |user: &str, role: &str| pb::AuthUserGrantRoleRequest {
        user: user.into(),
        role: role.into(),
    };
    core.user_grant_role(&sys, grant("root", "root"))
        .await
        .expect("grant root");
    core.role_add(
        &sys,
        pb::AuthRoleAddRequest {
            name: "bench".into(),
        },
    )
    .await
    .expect("role add");
    for perm in permissions() {
        core.role_grant_permission(
            &sys,
            pb::AuthRoleGrantPermissionRequest {
                name: "bench".into(),
                perm: Some(perm),
            },
        )
        .await
        .expect("grant permission");
    }
    core.user_grant_role(&sys, grant("bench", "bench"))
        .await
        .expect("grant bench");
    core.auth_enable(&sys).await.expect("enable");
    let token = core
        .authenticate("bench", "benchpw", None)
        .await
        .expect("login")
        .token;
    (server, token)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("put");

    let open = rt
        .block_on(Server::start(ServerConfig::in_memory()))
        .expect("start");
    let mut i = 0;
    group.bench_function("auth-off", |b| {
        b.iter(|| {
            i += 1;
            let core = open.core();
            black_box(rt.block_on(core.put(put(i), &Caller::Anonymous))).expect("put");
        })
    });

    let (guarded, token) = rt.block_on(with_auth());
    let mut i = 0;
    group.bench_function("auth-on", |b| {
        b.iter(|| {
            i += 1;
            let core = guarded.core();
            // As the gRPC service does for every request: the token first.
            let user = core.tokens().resolve(&token).expect("live token");
            black_box(rt.block_on(core.put(put(i), &Caller::User(user)))).expect("put");
        })
    });
    group.finish();

    // The check alone, on the same permissions.
    let roles = vec![pb::authpb::Role {
        name: b"bench".to_vec(),
        key_permission: permissions(),
    }];
    let users = vec![pb::authpb::User {
        name: b"bench".to_vec(),
        roles: vec!["bench".into()],
        ..Default::default()
    }];
    let store = AuthStore::restore(RecoveredAuth {
        enabled: true,
        revision: 1,
        users,
        roles,
    });
    let tokens = Tokens::new(std::time::Duration::from_secs(300));
    let token = tokens.assign("bench").expect("token");
    let keys: Vec<Vec<u8>> = (0..KEYS).map(|i| put(i).key).collect();
    let mut i = 0;
    c.bench_function("check/token-and-put-permission", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let user = tokens.resolve(black_box(&token)).expect("live token");
            store
                .check(&Caller::User(user), Access::Write, &keys[i], b"")
                .expect("allowed");
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
