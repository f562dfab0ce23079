//! `muster dns` against both backends, and `muster serve --dns-listen`
//! with authentication on (the DNS server reads with the internal token).

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::common::{self, Backend, KillOnDrop, Lines, etcdctl, wait_for};

on_both!(muster_dns_answers_from_the_registry);

/// A value under the default prefix (plain JSON, as any writer's).
fn put(endpoint: &str, service: &str, id: &str, addr: &str, args: &[&str]) {
    let key = format!("/muster/services/{service}/{id}");
    let value = format!(r#"{{"schema":1,"addr":"{addr}","weight":100,"status":"serving"}}"#);
    etcdctl(endpoint, &[args, &["put", &key, &value]].concat());
}

/// The addresses `name` resolves to, asked over UDP; `None` without an
/// answer within a second.
fn resolve(dns: SocketAddr, name: &str) -> Option<(Vec<String>, Vec<u32>)> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut q = Message::query();
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    socket.send_to(&q.to_vec().unwrap(), dns).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    let m = Message::from_vec(&buf[..n]).expect("an answer");
    let mut ips: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    ips.sort();
    Some((ips, m.answers.iter().map(|r| r.ttl).collect()))
}

/// The value of `key=` in a log line.
fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .trim_matches('"')
        .to_string()
}

fn muster_dns_answers_from_the_registry(backend: &Backend) {
    let endpoint = backend.endpoint();
    put(&endpoint, "user", "u-1", "http://192.0.2.1:8080", &[]);
    let mut child = backend
        .muster()
        .args([
            "dns",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--domain",
            "consul.",
            "--ttl",
            "7",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("muster dns starts");
    let lines = Lines::stderr(&mut child);
    let mut child = KillOnDrop(child);
    let ready = lines.find("muster dns ready", |l| l.contains("muster dns ready"));
    let dns: SocketAddr = field(&ready, "dns=").parse().unwrap();
    let metrics = field(&ready, "metrics=");
    let metrics_port: u16 = metrics
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/metrics")
        .parse()
        .unwrap();

    let (ips, ttls) = resolve(dns, "user.service.consul.").expect("an answer");
    assert_eq!(ips, ["192.0.2.1"]);
    assert_eq!(ttls, [7]);
    put(&endpoint, "user", "u-2", "192.0.2.2:80", &[]);
    wait_for("the new instance in the answer", || {
        (resolve(dns, "user.service.consul.")?.0.len() == 2).then_some(())
    });
    let text = muster_testkit::http_get(metrics_port, "/metrics").expect("metrics");
    assert!(
        text.contains("muster_dns_queries_total{type=\"A\",rcode=\"NOERROR\"}"),
        "{text}"
    );

    // SIGTERM: a clean exit.
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_for("muster dns exits", || child.0.try_wait().unwrap());
    assert!(exit.success(), "{exit}");
}

/// `muster serve --dns-listen`: the registry's own services over DNS,
/// still answered (and current) once authentication is on, its metrics on
/// /metrics.
#[test]
fn serve_answers_dns_with_auth_on() {
    let port = common::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args([
            "serve",
            "--in-memory",
            "--bcrypt-cost",
            "4",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--http-listen",
            "127.0.0.1:0",
            "--dns-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("muster serve starts");
    let lines = Lines::stderr(&mut child);
    let _child = KillOnDrop(child);
    let dns_line = lines.find("the DNS server's ready line", |l| {
        l.contains("DNS server ready")
    });
    let dns: SocketAddr = field(&dns_line, "addr=").parse().unwrap();
    let ready = lines.find("muster serve ready", |l| l.contains("muster serve ready"));
    let http = field(&ready, "http=");
    let endpoint = format!("127.0.0.1:{port}");
    put(&endpoint, "user", "u-1", "192.0.2.1:80", &[]);
    wait_for("the instance over DNS", || {
        (resolve(dns, "user.service.muster.")?.0 == ["192.0.2.1"]).then_some(())
    });

    common::enable_auth(&endpoint);
    put(
        &endpoint,
        "user",
        "u-2",
        "192.0.2.2:80",
        &["--user=root:rootpw"],
    );
    wait_for("an instance registered after auth was enabled", || {
        (resolve(dns, "user.service.muster.")?.0 == ["192.0.2.1", "192.0.2.2"]).then_some(())
    });
    let http_port: u16 = http
        .trim_start_matches("http://127.0.0.1:")
        .parse()
        .unwrap();
    let text = muster_testkit::http_get(http_port, "/metrics").expect("metrics");
    assert!(text.contains("muster_registry_revision"), "{text}");
    assert!(
        text.contains("muster_dns_queries_total{type=\"A\",rcode=\"NOERROR\"}"),
        "{text}"
    );

    // `muster bench dns` against it: answers counted by response code.
    let out = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args([
            "bench",
            "dns",
            "--dns-server",
            &dns.to_string(),
            "--dns-name",
            "user.service.muster,nope.service.muster",
            "--dns-type",
            "srv",
            "--dns-edns",
            "1232",
            "--clients",
            "4",
            "--duration",
            "300ms",
            "-o",
            "json",
        ])
        .output()
        .expect("muster bench dns runs");
    let stdout = common::text(&out.stdout);
    assert!(
        out.status.success(),
        "{}{stdout}",
        common::text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["workload"], "dns");
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
    assert!(
        report["rcodes"]["NOERROR"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(
        report["rcodes"]["NXDOMAIN"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert!(report["latency_ms"]["p99"].is_number(), "{report}");
}
