//! Fixtures are byte for byte what the Go libraries write (Go's
//! `json.Marshal`: struct fields in declaration order, nil maps and slices
//! as `null`, map keys sorted).

use super::*;

const KRATOS: &[u8] = br#"{"id":"0b5c2a8e-6f1d-4c1e-9a59-3f6f0c1d2e3f","name":"helloworld","version":"v1.2.0","metadata":{"region":"sh","weight":"30"},"endpoints":["grpc://10.0.0.5:9000","http://10.0.0.5:8000"]}"#;
const GO_MICRO: &[u8] = br#"{"name":"greeter","version":"latest","metadata":null,"endpoints":[],"nodes":[{"id":"greeter-8c1e6f3a-1111-4c1e-9a59-3f6f0c1d2e3f","address":"10.0.0.4:54321","metadata":{"broker":"http","protocol":"grpc","registry":"etcd","server":"grpc","transport":"grpc"}}]}"#;
const NAMING: &[u8] = br#"{"Op":0,"Addr":"10.0.0.1:50051","Metadata":null}"#;

fn decode(source: &Source, key: &str, value: &[u8]) -> Instance {
    source
        .decode(key.as_bytes(), value)
        .expect("key of the layout")
        .expect("value of the layout")
}

#[test]
fn reads_kratos() {
    let s = Source::new(LayoutKind::Kratos);
    let i = decode(
        &s,
        "/microservices/helloworld/0b5c2a8e-6f1d-4c1e-9a59-3f6f0c1d2e3f",
        KRATOS,
    );
    assert_eq!(i.service, "helloworld");
    assert_eq!(i.id, "0b5c2a8e-6f1d-4c1e-9a59-3f6f0c1d2e3f");
    assert_eq!(i.addr, "http://10.0.0.5:8000", "http preferred");
    assert_eq!(i.version, "v1.2.0");
    assert_eq!(i.weight, 30);
    assert_eq!(i.metadata["region"], "sh");
    assert_eq!(i.metadata["endpoint.grpc"], "grpc://10.0.0.5:9000");
    // Older versions: ?isSecure=
    let old = br#"{"id":"a","name":"hw","version":"","metadata":null,"endpoints":["grpc://10.0.0.6:9000?isSecure=true"]}"#;
    let i = decode(&s, "/microservices/hw/a", old);
    assert_eq!(i.addr, "grpcs://10.0.0.6:9000");
}

#[test]
fn writes_kratos_exactly() {
    let i = Instance::new("helloworld", "id-1", "grpc://10.0.0.5:9000")
        .with_version("v1")
        .with_zone("eu-1")
        .with_metadata("region", "sh");
    let v = Kratos.encode(&i, None).unwrap();
    assert_eq!(
        std::str::from_utf8(&v).unwrap(),
        r#"{"id":"id-1","name":"helloworld","version":"v1","metadata":{"region":"sh","zone":"eu-1"},"endpoints":["grpc://10.0.0.5:9000"]}"#
    );
    let back = Kratos.decode("helloworld", "id-1", &v).unwrap();
    assert_eq!(
        (back.addr.as_str(), back.zone.as_str()),
        ("grpc://10.0.0.5:9000", "eu-1")
    );
    // Endpoints read from kratos go back as endpoints, not metadata.
    let read = Kratos.decode("helloworld", "x", KRATOS).unwrap();
    let again: serde_json::Value =
        serde_json::from_slice(&Kratos.encode(&read, None).unwrap()).unwrap();
    assert_eq!(
        again["endpoints"],
        serde_json::json!(["http://10.0.0.5:8000", "grpc://10.0.0.5:9000"])
    );
    assert!(again["metadata"].get("endpoint.grpc").is_none());
    // Bare addresses get a scheme.
    let bare = Kratos
        .encode(&Instance::new("hw", "1", "10.0.0.1:80"), None)
        .unwrap();
    assert!(
        std::str::from_utf8(&bare)
            .unwrap()
            .contains(r#""endpoints":["http://10.0.0.1:80"]"#)
    );
}

#[test]
fn reads_and_writes_go_zero() {
    let s = Source::new(LayoutKind::GoZero);
    assert_eq!(s.prefix, "");
    let i = decode(&s, "user.rpc/7587869785858585", b"10.0.0.3:8080");
    assert_eq!(
        (i.service.as_str(), i.id.as_str(), i.addr.as_str()),
        ("user.rpc", "7587869785858585", "10.0.0.3:8080")
    );
    assert_eq!(s.key("user.rpc", "42"), "user.rpc/42");
    assert_eq!(s.service_dir("user.rpc"), "user.rpc/");
    let v = GoZero
        .encode(
            &Instance::new("user.rpc", "42", "http://10.0.0.3:8080/"),
            None,
        )
        .unwrap();
    assert_eq!(v, b"10.0.0.3:8080");
    for bad in [
        &b"{\"a\":1}"[..],
        b"10.0.0.3",
        b"host:port",
        b"a b:80",
        b"\xff:1",
    ] {
        assert!(GoZero.decode("s", "1", bad).is_err(), "{bad:?}");
    }
    assert!(GoZero.new_id("s", "a").parse::<i64>().unwrap() > 0);
}

#[test]
fn reads_and_writes_go_micro() {
    let s = Source::new(LayoutKind::GoMicro);
    let id = "greeter-8c1e6f3a-1111-4c1e-9a59-3f6f0c1d2e3f";
    let i = decode(&s, &format!("/micro/registry/greeter/{id}"), GO_MICRO);
    assert_eq!(
        (i.id.as_str(), i.addr.as_str(), i.version.as_str()),
        (id, "10.0.0.4:54321", "latest")
    );
    assert_eq!(i.metadata["protocol"], "grpc");
    let w = Instance::new("greeter", "greeter-1", "10.0.0.9:1").with_weight(5);
    let v = GoMicro.encode(&w, None).unwrap();
    assert_eq!(
        std::str::from_utf8(&v).unwrap(),
        r#"{"name":"greeter","version":"","metadata":null,"endpoints":[],"nodes":[{"id":"greeter-1","address":"10.0.0.9:1","metadata":{"weight":"5"}}]}"#
    );
    assert_eq!(
        GoMicro.decode("greeter", "greeter-1", &v).unwrap().weight,
        5
    );
    assert!(GoMicro.new_id("greeter", "").starts_with("greeter-"));
}

#[test]
fn reads_and_writes_etcd_naming() {
    let s = Source::new(LayoutKind::EtcdNaming);
    let i = decode(&s, "greeter/10.0.0.1:50051", NAMING);
    assert_eq!(
        (i.id.as_str(), i.addr.as_str()),
        ("10.0.0.1:50051", "10.0.0.1:50051")
    );
    let v = EtcdNaming
        .encode(
            &Instance::new("greeter", "10.0.0.1:50051", "10.0.0.1:50051"),
            None,
        )
        .unwrap();
    assert_eq!(v, NAMING);
    let tagged = Instance::new("greeter", "a", "grpc://10.0.0.1:1")
        .with_tag("canary")
        .with_version("2");
    let v = EtcdNaming.encode(&tagged, None).unwrap();
    assert_eq!(
        std::str::from_utf8(&v).unwrap(),
        r#"{"Op":0,"Addr":"10.0.0.1:1","Metadata":{"tags":"canary","version":"2"}}"#
    );
    let back = EtcdNaming.decode("greeter", "a", &v).unwrap();
    assert_eq!(
        (back.tags, back.version),
        (vec!["canary".to_string()], "2".to_string())
    );
    assert!(
        EtcdNaming
            .decode("g", "a", br#"{"Op":1,"Addr":"x:1"}"#)
            .is_err()
    );
    // An id that is an address with brackets or a path is accepted from a key.
    let i = decode(
        &s,
        "greeter/[::1]:50051",
        br#"{"Op":0,"Addr":"[::1]:50051","Metadata":null}"#,
    );
    assert_eq!(i.id, "[::1]:50051");
}

#[test]
fn auto_detects_every_layout() {
    let muster = Instance::new("s", "1", "10.0.0.1:1").encode().unwrap();
    for (value, kind) in [
        (&muster[..], LayoutKind::Muster),
        (NAMING, LayoutKind::EtcdNaming),
        (KRATOS, LayoutKind::Kratos),
        (GO_MICRO, LayoutKind::GoMicro),
        (b"10.0.0.3:8080", LayoutKind::GoZero),
    ] {
        assert_eq!(Auto::detect(value), Some(kind));
        assert!(Auto.decode("helloworld", "x", value).is_ok() || kind == LayoutKind::Kratos);
    }
    assert!(Auto.decode("helloworld", "x", KRATOS).is_ok());
    for bad in [&b"{}"[..], b"[1]", b"nonsense", b"", b"{\"x\":1}"] {
        assert_eq!(Auto::detect(bad), None, "{bad:?}");
    }
}

#[test]
fn malformed_values_are_counted_not_fatal() {
    let s = Source::with_prefix(LayoutKind::Kratos, "/m");
    let before = malformed_total(LayoutKind::Kratos);
    for bad in [
        &b"not json"[..],
        b"{}",
        br#"{"name":"other","endpoints":["http://a:1"]}"#,
        b"\xff",
    ] {
        let e = s.decode(b"/m/hw/1", bad).unwrap().unwrap_err();
        assert!(matches!(e, Error::Malformed { .. }), "{e}");
    }
    assert!(malformed_total(LayoutKind::Kratos) >= before + 4);
    let mut out = String::new();
    render_metrics(&mut out);
    assert!(out.contains("muster_discovery_malformed_total{layout=\"kratos\"}"));
    // Keys outside the layout are not entries at all.
    assert!(s.decode(b"/m/hw", b"{}").is_none());
    assert!(s.decode(b"/other/hw/1", b"{}").is_none());
}

#[test]
fn draining_is_not_written_by_layouts_without_status() {
    let mut i = Instance::new("s", "1", "10.0.0.1:1");
    i.status = Status::Draining;
    for kind in [
        LayoutKind::Kratos,
        LayoutKind::GoZero,
        LayoutKind::GoMicro,
        LayoutKind::EtcdNaming,
    ] {
        assert!(!kind.layout().has_status());
        assert!(kind.layout().encode(&i, None).is_err(), "{kind}");
    }
    assert!(LayoutKind::Muster.layout().encode(&i, None).is_ok());
}

#[test]
fn names_and_prefixes() {
    for kind in LayoutKind::ALL {
        assert_eq!(kind.as_str().parse::<LayoutKind>().unwrap(), kind);
    }
    assert!("consul".parse::<LayoutKind>().is_err());
    let s: Source = "kratos".parse().unwrap();
    assert_eq!(s.prefix, "/microservices");
    let s: Source = "go-zero:services".parse().unwrap();
    assert_eq!(
        (s.layout, s.key("a", "1")),
        (LayoutKind::GoZero, "services/a/1".to_string())
    );
    assert!("muster:/a/".parse::<Source>().is_err());
    assert!(validate_prefix("").is_ok());
    assert!(validate_prefix("/").is_err());
    assert_eq!(dir(""), "");
    assert_eq!(uuid_v4().len(), 36);
}
