//! `muster demo`, the README's "see it work" command: it must run the whole
//! scenario (registry, three instances, gateway, traffic, a crash, a drain)
//! and exit 0 with no failed request.

use std::process::Command;

#[test]
fn demo_runs_the_whole_scenario_without_a_failed_request() {
    let out = Command::new(env!("CARGO_BIN_EXE_muster"))
        .args(["demo", "--requests", "200"])
        .env("RUST_LOG", "warn")
        .env_remove("MUSTER_ENDPOINTS")
        .output()
        .expect("muster demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "muster demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let line = |what: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(what))
            .unwrap_or_else(|| panic!("no {what:?} line in:\n{stdout}"))
            .to_string()
    };
    // Three instances started, traffic reached all three.
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("instance"))
            .count(),
        3,
        "{stdout}"
    );
    let spread = line("spread");
    for id in ["user-1", "user-2", "user-3"] {
        assert!(spread.contains(id), "{id} got no traffic: {spread}");
    }
    assert!(spread.contains("200 requests"), "{spread}");
    // Every traffic phase: no failed request.
    let phases: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" requests: "))
        .collect();
    assert_eq!(phases.len(), 3, "{stdout}");
    for phase in phases {
        assert!(phase.ends_with("failed 0"), "{phase}");
    }
    // The crash and the drain both happened and were seen.
    line("kill");
    assert!(line("ejected").contains("user-2"), "{stdout}");
    line("expired");
    line("draining");
    assert!(line("gone").contains("exit status: 0"), "{stdout}");
    assert!(line("done").contains("no request failed"));
}
