//! The tonic integration against real gRPC servers and a real etcd: calls
//! spread over every instance, follow changes, and survive an instance dying.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use muster::grpc::{BalancedChannel, ChannelConfig};
use muster::{Instance, Registrar, RegistrarConfig, Status};
use muster_proto::cluster_client::ClusterClient;
use muster_proto::cluster_server::{Cluster, ClusterServer};
use muster_proto::{Member, MemberListRequest, MemberListResponse};
use muster_testkit::Registry;
use tokio_stream::StreamExt;

/// A gRPC server that answers MemberList with one member named by its id.
struct Echo(String);

#[tonic::async_trait]
impl Cluster for Echo {
    async fn member_list(
        &self,
        _req: tonic::Request<MemberListRequest>,
    ) -> Result<tonic::Response<MemberListResponse>, tonic::Status> {
        Ok(tonic::Response::new(MemberListResponse {
            members: vec![Member {
                name: self.0.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }))
    }
}

/// One instance on its own runtime: killing it drops every connection, as a
/// crashed process would.
struct GrpcInstance {
    addr: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl GrpcInstance {
    fn start(id: &str) -> GrpcInstance {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let id = id.to_string();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(ClusterServer::new(Echo(id)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        GrpcInstance {
            addr,
            runtime: Some(runtime),
        }
    }

    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for GrpcInstance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// MemberList is a read: marked idempotent, so a call that was on the wire
/// when its instance died may be sent again to another.
async fn call(channel: &BalancedChannel) -> Result<String, tonic::Status> {
    let mut req = tonic::Request::new(MemberListRequest::default());
    req.extensions_mut().insert(muster::grpc::Idempotent);
    let resp = ClusterClient::new(channel.clone()).member_list(req).await?;
    Ok(resp
        .into_inner()
        .members
        .into_iter()
        .next()
        .map(|m| m.name)
        .unwrap_or_default())
}

async fn calls_spread_over_instances_and_survive_one_dying(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    // A long TTL: the dead instance stays registered for the whole test, so
    // only retries and ejection can keep calls from failing.
    let registrar = Registrar::start(
        etcd.clone(),
        RegistrarConfig::default().with_ttl(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let mut servers: Vec<GrpcInstance> = Vec::new();
    for id in ["g0", "g1", "g2"] {
        let server = GrpcInstance::start(id);
        registrar
            .register(Instance::new("greeter", id, server.addr.clone()))
            .await
            .unwrap();
        servers.push(server);
    }
    let greeter = follow(&etcd, "greeter").await;
    let channel = BalancedChannel::new(&greeter, ChannelConfig::default());
    assert_eq!(channel.len(), 3);

    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        *counts
            .entry(call(&channel).await.expect("call"))
            .or_default() += 1;
    }
    for id in ["g0", "g1", "g2"] {
        let n = counts.get(id).copied().unwrap_or(0);
        assert!(n >= 30, "calls did not spread: {counts:?}");
    }

    // g1 crashes; calls keep succeeding on the other two.
    servers[1].kill();
    let mut after: HashMap<String, usize> = HashMap::new();
    for i in 0..300 {
        let id = call(&channel)
            .await
            .unwrap_or_else(|e| panic!("call {i} after the crash failed: {e}"));
        *after.entry(id).or_default() += 1;
    }
    assert!(!after.contains_key("g1"), "{after:?}");
    assert!(after.get("g0").copied().unwrap_or(0) >= 30, "{after:?}");
    assert!(after.get("g2").copied().unwrap_or(0) >= 30, "{after:?}");

    // A new instance gets traffic once discovered; a draining one gets none.
    let g3 = GrpcInstance::start("g3");
    let g3_instance = Instance::new("greeter", "g3", g3.addr.clone());
    registrar.register(g3_instance.clone()).await.unwrap();
    registrar
        .set_status(
            Instance::new("greeter", "g0", servers[0].addr.clone()),
            Status::Draining,
        )
        .await
        .unwrap();
    greeter
        .wait_for(DEADLINE, |s| {
            s.get("g3").is_some() && s.get("g0").is_some_and(|i| !i.is_serving())
        })
        .await
        .unwrap();
    eventually("the balancer follows the change", || async {
        channel.len() == 3
    })
    .await;
    let mut last: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        *last.entry(call(&channel).await.expect("call")).or_default() += 1;
    }
    assert!(
        !last.contains_key("g0"),
        "draining instance got traffic: {last:?}"
    );
    assert!(last.get("g3").copied().unwrap_or(0) >= 30, "{last:?}");
}

async fn no_instance_is_a_clear_unavailable_error(node: Box<dyn Registry>) {
    let etcd = client(&node.endpoint());
    let greeter = follow(&etcd, "nobody").await;
    let channel = BalancedChannel::new(&greeter, ChannelConfig::default());
    let err = call(&channel).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("no live instance"), "{err}");
}

async fn discover_stream_follows_the_service(node: Box<dyn Registry>) {
    use tower::discover::Change;
    let etcd = client(&node.endpoint());
    let registrar = Registrar::start(etcd.clone(), RegistrarConfig::default())
        .await
        .unwrap();
    registrar
        .register(Instance::new("svc", "a", "10.0.0.1:1"))
        .await
        .unwrap();
    let svc = follow(&etcd, "svc").await;
    let stream = muster::grpc::discover(&svc, |i| Some(i.addr.clone()));
    tokio::pin!(stream);
    async fn next<S>(s: &mut std::pin::Pin<&mut S>) -> Change<String, String>
    where
        S: tokio_stream::Stream<Item = Result<Change<String, String>, std::convert::Infallible>>,
    {
        let item = tokio::time::timeout(DEADLINE, StreamExt::next(s)).await;
        item.expect("a change in time")
            .expect("stream open")
            .unwrap()
    }
    assert!(
        matches!(next(&mut stream).await, Change::Insert(id, addr) if id == "a" && addr == "10.0.0.1:1")
    );
    registrar
        .register(Instance::new("svc", "b", "10.0.0.2:1"))
        .await
        .unwrap();
    assert!(matches!(next(&mut stream).await, Change::Insert(id, _) if id == "b"));
    registrar
        .set_status(Instance::new("svc", "a", "10.0.0.1:1"), Status::Draining)
        .await
        .unwrap();
    assert!(matches!(next(&mut stream).await, Change::Remove(id) if id == "a"));
    registrar
        .register(Instance::new("svc", "b", "10.0.0.9:1"))
        .await
        .unwrap();
    assert!(
        matches!(next(&mut stream).await, Change::Insert(id, addr) if id == "b" && addr == "10.0.0.9:1")
    );
}

muster_testkit::on_both!(
    calls_spread_over_instances_and_survive_one_dying,
    no_instance_is_a_clear_unavailable_error,
    discover_stream_follows_the_service,
);
