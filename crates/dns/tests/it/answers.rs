//! What the server answers: Consul's names, filters, SRV with addresses
//! alongside, negative answers, truncation, and answers that follow the
//! registry.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use muster::{Instance, Registrar, RegistrarConfig, Status};
use muster_testkit::{Registry, on_both};

use crate::common::*;

on_both!(
    consul_names_and_filters,
    large_answers_are_cut_over_udp_and_whole_over_tcp,
    answers_follow_registrations,
    a_mixed_fleet_answers_under_one_name,
);

/// Documentation addresses (RFC 5737, RFC 3849): answered, never dialed.
fn users() -> Vec<Instance> {
    let mut draining = Instance::new("user", "u-5", "192.0.2.5:80");
    draining.status = Status::Draining;
    vec![
        Instance::new("user", "u-1", "http://192.0.2.1:8080")
            .with_tag("canary")
            .with_zone("eu-1"),
        Instance::new("user", "u-2", "192.0.2.2:8081").with_zone("us-1"),
        Instance::new("user", "u-3", "[2001:db8::3]:8082").with_tag("canary"),
        Instance::new("user", "u-4", "https://api.example.internal"),
        draining,
        Instance::new("user", "Pod_7.a", "192.0.2.7:8087"),
    ]
}

async fn consul_names_and_filters(registry: Box<dyn Registry>) {
    let etcd = client(&*registry);
    let server = dns(&etcd).await;
    let addr = server.local_addr();
    for instance in users() {
        put_instance(&etcd, &instance).await;
    }
    caught_up(&server, revision(&etcd).await).await;

    // A and AAAA: serving instances with IP addresses (not the draining
    // u-5, not u-4 whose host is a name), case-insensitively.
    let (a, _) = udp(addr, &query("user.service.muster.", RecordType::A, None)).await;
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative && !a.metadata.truncation);
    assert_eq!(addresses(&a), ["192.0.2.1", "192.0.2.2", "192.0.2.7"]);
    assert!(a.answers.iter().all(|r| r.ttl == 0), "TTL 0 by default");
    let (aaaa, _) = udp(addr, &query("USER.Service.Muster.", RecordType::AAAA, None)).await;
    assert_eq!(addresses(&aaaa), ["2001:db8::3"]);
    assert_eq!(aaaa.answers[0].name.to_ascii(), "USER.Service.Muster.");

    // SRV, both forms: the port, targets under instance., their
    // addresses alongside; a host name is its own target.
    for name in ["user.service.muster.", "_user._tcp.service.muster."] {
        let srv = tcp(addr, &query(name, RecordType::SRV, None)).await;
        let mut targets: Vec<(u16, u16, String)> = srv
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => (s.port, s.weight, s.target.to_ascii()),
                other => panic!("{other:?}"),
            })
            .collect();
        targets.sort();
        assert_eq!(targets.len(), 5, "{targets:?}");
        assert_eq!(targets[0], (443, 100, "api.example.internal.".into()));
        assert_eq!(targets[1], (8080, 100, "u-1.user.instance.muster.".into()));
        assert_eq!(targets[2], (8081, 100, "u-2.user.instance.muster.".into()));
        assert_eq!(targets[3], (8082, 100, "u-3.user.instance.muster.".into()));
        assert_eq!(targets[4].0, 8087);
        let pod = &targets[4].2;
        assert!(
            pod.starts_with("pod-7-a-") && pod.ends_with(".user.instance.muster."),
            "ids are made labels: {pod}"
        );
        let mut additional: Vec<(String, String)> = srv
            .additionals
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some((r.name.to_ascii(), a.0.to_string())),
                RData::AAAA(a) => Some((r.name.to_ascii(), a.0.to_string())),
                _ => None,
            })
            .collect();
        additional.sort();
        assert_eq!(additional.len(), 4, "{additional:?}");
        for (target, ip) in [
            ("u-1.user.instance.muster.", "192.0.2.1"),
            ("u-2.user.instance.muster.", "192.0.2.2"),
            ("u-3.user.instance.muster.", "2001:db8::3"),
            (pod.as_str(), "192.0.2.7"),
        ] {
            assert!(
                additional.contains(&(target.to_string(), ip.to_string())),
                "{target} {ip} not in {additional:?}"
            );
        }
        // The target of the odd id resolves.
        let (pod_a, _) = udp(addr, &query(pod, RecordType::A, None)).await;
        assert_eq!(addresses(&pod_a), ["192.0.2.7"]);
    }

    // Tag, zone, both, in Consul's and RFC 2782's forms.
    assert_eq!(
        a_now(addr, "canary.user.service.muster.").await,
        ["192.0.2.1"]
    );
    let (aaaa, _) = udp(
        addr,
        &query("_user._canary.service.muster.", RecordType::AAAA, None),
    )
    .await;
    assert_eq!(addresses(&aaaa), ["2001:db8::3"]);
    assert_eq!(
        a_now(addr, "user.service.us-1.muster.").await,
        ["192.0.2.2"]
    );
    assert_eq!(
        a_now(addr, "canary.user.service.eu-1.muster.").await,
        ["192.0.2.1"]
    );
    let (none, _) = udp(
        addr,
        &query("canary.user.service.us-1.muster.", RecordType::A, None),
    )
    .await;
    assert_eq!(none.metadata.response_code, ResponseCode::NXDomain);

    // Instance names: any instance by id, draining ones too; a host name
    // is a CNAME.
    assert_eq!(
        a_now(addr, "u-2.user.instance.muster.").await,
        ["192.0.2.2"]
    );
    assert_eq!(
        a_now(addr, "U-5.User.Instance.Muster.").await,
        ["192.0.2.5"]
    );
    let (cname, _) = udp(
        addr,
        &query("u-4.user.instance.muster.", RecordType::A, None),
    )
    .await;
    match &cname.answers[..] {
        [r] => assert!(
            matches!(&r.data, RData::CNAME(c) if c.0.to_ascii() == "api.example.internal."),
            "{r:?}"
        ),
        other => panic!("{other:?}"),
    }

    // Negative answers carry the SOA; names elsewhere are refused.
    for (name, qtype, rcode) in [
        (
            "nope.service.muster.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        ("x.y.z.w.muster.", RecordType::A, ResponseCode::NXDomain),
        (
            "u-9.user.instance.muster.",
            RecordType::A,
            ResponseCode::NXDomain,
        ),
        (
            "user.service.muster.",
            RecordType::TXT,
            ResponseCode::NoError,
        ),
        (
            "u-1.user.instance.muster.",
            RecordType::AAAA,
            ResponseCode::NoError,
        ),
    ] {
        let (m, _) = udp(addr, &query(name, qtype, None)).await;
        assert_eq!(m.metadata.response_code, rcode, "{name} {qtype}");
        assert!(m.answers.is_empty(), "{name} {qtype}");
        match &m.authorities[..] {
            [soa] => assert!(
                matches!(&soa.data, RData::SOA(s) if s.mname.to_ascii() == "ns.muster."),
                "{soa:?}"
            ),
            other => panic!("{name}: no SOA in {other:?}"),
        }
    }
    let (refused, _) = udp(addr, &query("example.com.", RecordType::A, None)).await;
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);

    // A real resolver sees the same.
    let resolver = resolver(addr);
    let lookup = resolver
        .lookup("user.service.muster.", RecordType::A)
        .await
        .expect("A lookup");
    let mut ips: Vec<String> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    ips.sort();
    assert_eq!(ips, ["192.0.2.1", "192.0.2.2", "192.0.2.7"]);
    let srv = resolver
        .lookup("_user._tcp.service.muster.", RecordType::SRV)
        .await
        .expect("SRV lookup");
    assert_eq!(srv.answers().len(), 5);
    let nx = resolver
        .lookup("nope.service.muster.", RecordType::A)
        .await
        .expect_err("NXDOMAIN");
    assert!(nx.is_nx_domain(), "{nx}");
    assert!(nx.into_soa().is_some(), "the SOA reaches the resolver");

    let metrics = server.render_metrics();
    assert!(
        metric_value(
            &metrics,
            "muster_dns_queries_total",
            &["type=\"A\"", "rcode=\"NOERROR\""]
        )
        .is_some_and(|n| n >= 5.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "muster_dns_instances", &["addr=\"name\""]),
        Some(1.0)
    );
}

async fn large_answers_are_cut_over_udp_and_whole_over_tcp(registry: Box<dyn Registry>) {
    let etcd = client(&*registry);
    let server = dns(&etcd).await;
    let addr = server.local_addr();
    for i in 0..60 {
        let ip = format!("198.51.100.{}:{}", i + 1, 9000 + i);
        put_instance(&etcd, &Instance::new("big", format!("b-{i}"), ip)).await;
    }
    caught_up(&server, revision(&etcd).await).await;

    // Without EDNS: 512 bytes at most, as many answers as fit, TC set.
    let (cut, size) = udp(addr, &query("big.service.muster.", RecordType::A, None)).await;
    assert!(cut.metadata.truncation, "TC bit");
    assert!(size <= 512, "{size} bytes");
    assert!(
        !cut.answers.is_empty() && cut.answers.len() < 60,
        "{} answers",
        cut.answers.len()
    );
    // With EDNS the client's size (60 A records fit in 1232 bytes, 60 SRV
    // records with their addresses do not).
    let (whole, _) = udp(
        addr,
        &query("big.service.muster.", RecordType::A, Some(1232)),
    )
    .await;
    assert!(!whole.metadata.truncation);
    assert_eq!(whole.answers.len(), 60);
    assert!(whole.edns.is_some(), "EDNS answered with EDNS");
    let (cut, size) = udp(
        addr,
        &query("big.service.muster.", RecordType::SRV, Some(1232)),
    )
    .await;
    assert!(cut.metadata.truncation && size <= 1232, "{size} bytes");

    // TCP: everything.
    let srv = tcp(addr, &query("big.service.muster.", RecordType::SRV, None)).await;
    assert!(!srv.metadata.truncation);
    assert_eq!((srv.answers.len(), srv.additionals.len()), (60, 60));
    let a = tcp(addr, &query("big.service.muster.", RecordType::A, None)).await;
    assert_eq!(a.answers.len(), 60);

    // Answers are shuffled: the first record is not always the same.
    let mut first_ips = std::collections::HashSet::new();
    for _ in 0..20 {
        let (m, _) = udp(
            addr,
            &query("big.service.muster.", RecordType::A, Some(1232)),
        )
        .await;
        if let Some(RData::A(a)) = m.answers.first().map(|r| &r.data) {
            first_ips.insert(a.0);
        }
    }
    assert!(
        first_ips.len() > 1,
        "20 answers all began with {first_ips:?}"
    );

    // The resolver asks again over TCP after the truncated UDP answer.
    let lookup = resolver(addr)
        .lookup("big.service.muster.", RecordType::SRV)
        .await
        .expect("SRV lookup");
    assert_eq!(lookup.answers().len(), 60);

    let metrics = server.render_metrics();
    assert!(
        metric_value(&metrics, "muster_dns_truncated_total", &[]).is_some_and(|n| n >= 2.0),
        "{metrics}"
    );
}

async fn answers_follow_registrations(registry: Box<dyn Registry>) {
    let etcd = client(&*registry);
    let server = dns(&etcd).await;
    let addr = server.local_addr();
    let name = "orders.service.muster.";
    let (m, _) = udp(addr, &query(name, RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    let registrar = Registrar::start(
        etcd.clone(),
        RegistrarConfig::default().with_ttl(std::time::Duration::from_secs(5)),
    )
    .await
    .expect("registrar");
    let first = Instance::new("orders", "o-1", "192.0.2.10:80");
    registrar.register(first.clone()).await.expect("register");
    eventually("the registration is answered", || async {
        a_now(addr, name).await == ["192.0.2.10"]
    })
    .await;

    put_instance(&etcd, &Instance::new("orders", "o-2", "192.0.2.11:80")).await;
    eventually("a second instance is answered", || async {
        a_now(addr, name).await == ["192.0.2.10", "192.0.2.11"]
    })
    .await;

    registrar
        .set_status(first.clone(), Status::Draining)
        .await
        .expect("drain");
    eventually("a draining instance leaves the answer", || async {
        a_now(addr, name).await == ["192.0.2.11"]
    })
    .await;

    delete_instance(&etcd, "orders", "o-2").await;
    registrar
        .deregister("orders", "o-1")
        .await
        .expect("deregister");
    eventually("without instances, the name is gone", || async {
        let (m, _) = udp(addr, &query(name, RecordType::A, None)).await;
        m.metadata.response_code == ResponseCode::NXDomain
    })
    .await;
    registrar.shutdown().await.expect("shutdown");
}

/// The server answers from whatever catalog it is given: here one over
/// muster's layout and kratos's, a service registered by both libraries
/// answering as one name.
async fn a_mixed_fleet_answers_under_one_name(registry: Box<dyn Registry>) {
    use muster::{LayoutKind, Source};
    let etcd = client(&*registry);
    let kratos = Source::new(LayoutKind::Kratos);
    let catalog = muster::Catalog::follow_sources(
        etcd.clone(),
        vec![Source::new(LayoutKind::Muster), kratos.clone()],
    )
    .await
    .expect("catalog");
    let server = muster_dns::DnsServer::start(
        catalog,
        muster_dns::DnsConfig::new(([127, 0, 0, 1], 0).into()),
    )
    .await
    .expect("dns server");
    put_instance(&etcd, &Instance::new("user", "u-1", "192.0.2.1:8080")).await;
    let go = Instance::new("user", "k-1", "http://192.0.2.2:8000");
    etcd.put(muster_proto::PutRequest {
        key: kratos.key("user", "k-1").into_bytes(),
        value: LayoutKind::Kratos
            .layout()
            .encode(&go, None)
            .expect("kratos value"),
        ..Default::default()
    })
    .await
    .expect("put");
    // (A catalog over several sources applies each part on its own: the
    // answer is awaited, not the revision.)
    let addr = server.local_addr();
    eventually("both libraries' instances are answered", || async {
        a_now(addr, "user.service.muster.").await == ["192.0.2.1", "192.0.2.2"]
    })
    .await;
    let srv = tcp(addr, &query("user.service.muster.", RecordType::SRV, None)).await;
    let mut ports: Vec<u16> = srv
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.port),
            _ => None,
        })
        .collect();
    ports.sort();
    assert_eq!(ports, [8000, 8080]);
}
