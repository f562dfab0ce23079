//! `propagation` against real etcd and the embedded registry: every change
//! reaches every caller, one report per `--callers` value, with the
//! percentiles of both measures; a few callers and rounds, to stay fast.
//! (Callers in child processes re-run the `muster` binary: see the CLI's
//! tests.)

use clap::Parser;
use muster_bench::{BenchArgs, Format};
use muster_testkit::Registry;
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

fn args(line: &[&str]) -> BenchArgs {
    Cli::try_parse_from(std::iter::once("bench").chain(line.iter().copied()))
        .expect("valid flags")
        .bench
}

async fn run(registry: &dyn Registry, line: &[&str], format: Format) -> String {
    let mut out = Vec::new();
    let result = muster_bench::run(
        &args(line),
        &[registry.endpoint()],
        None,
        None,
        format,
        &mut out,
    )
    .await;
    let out = String::from_utf8(out).expect("UTF-8");
    result.unwrap_or_else(|e| panic!("{}: {e}\n{out}", registry.name()));
    out
}

fn int(report: &Value, name: &str) -> u64 {
    report[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no integer {name} in {report}"))
}

async fn every_change_reaches_every_caller(registry: Box<dyn Registry>) {
    let line = [
        "propagation",
        "--callers",
        "1,5",
        "--rounds",
        "5",
        "--callers-per-connection",
        "2",
        "--load-clients",
        "2",
        "--seed",
        "3",
    ];
    let out = run(&*registry, &line, Format::Json).await;
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(rows.len(), 2, "one report per --callers value: {out}");
    for (row, callers) in rows.iter().zip([1u64, 5]) {
        assert_eq!(row["workload"], "propagation", "{row}");
        assert_eq!(int(row, "callers"), callers, "{row}");
        assert_eq!(int(row, "caller_connections"), callers.div_ceil(2), "{row}");
        assert_eq!(int(row, "changes"), 10, "{row}");
        assert_eq!(row["clock"], "monotonic", "{row}");
        // Every change reached every caller.
        assert_eq!(int(row, "expected"), callers * 10, "{row}");
        assert_eq!(int(row, "sightings"), callers * 10, "{row}");
        assert!(row.get("failure").is_none(), "{row}");
        for (summary, samples) in [
            ("last_caller_latency_ms", 10),
            ("each_caller_latency_ms", callers * 10),
            ("last_caller_since_call_ms", 10),
            ("each_caller_since_call_ms", callers * 10),
            ("registrar_latency_ms", 10),
        ] {
            let s = &row[summary];
            assert_eq!(int(s, "samples"), samples, "{summary}: {row}");
            for p in ["p50", "p99", "max"] {
                assert!(
                    s[p].as_f64().is_some_and(|ms| ms >= 0.0),
                    "{summary}.{p}: {row}"
                );
            }
            assert!(s["p50"].as_f64() <= s["max"].as_f64(), "{summary}: {row}");
        }
        // The last caller is never ahead of the others, and a change is
        // seen no earlier than its call began.
        let p = |s: &str, q: &str| row[s][q].as_f64().unwrap();
        assert!(p("last_caller_latency_ms", "max") >= p("each_caller_latency_ms", "max"));
        assert!(p("last_caller_since_call_ms", "p50") >= p("last_caller_latency_ms", "p50"));
        assert_eq!(int(row, "load_clients"), 2, "{row}");
        assert!(int(row, "load_ops") > 0, "the load ran: {row}");
        assert_eq!(int(row, "load_errors"), 0, "{row}");
        assert_eq!(row["seed"], 3, "{row}");
    }
}

async fn the_text_report_has_the_figures(registry: Box<dyn Registry>) {
    let out = run(
        &*registry,
        &["propagation", "--callers", "3", "--rounds", "3"],
        Format::Text,
    )
    .await;
    assert!(
        out.starts_with("propagation: 3 callers in this process over 3 connections"),
        "{out}"
    );
    assert!(out.contains(": 18 of 18 sightings"), "{out}");
    for line in [
        "propagation: ack -> last caller p50 ",
        "propagation: ack -> each caller p50 ",
        "propagation: call -> last caller p50 ",
        "propagation: registrar call p50 ",
    ] {
        let found = out.lines().find(|l| l.starts_with(line));
        let found = found.unwrap_or_else(|| panic!("no {line:?} in {out}"));
        assert!(
            found.contains(" p99 ") && found.contains(" max "),
            "{found}"
        );
    }
}

muster_testkit::on_both!(
    every_change_reaches_every_caller,
    the_text_report_has_the_figures
);
