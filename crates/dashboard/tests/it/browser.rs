//! The page in a real browser: headless Chromium driven through
//! chromedriver (WebDriver) against the embedded registry.
//!
//! Needs Debian's `chromium` and `chromium-driver`; skipped loudly without
//! them unless `MUSTER_REQUIRE_BROWSER=1`. `MUSTER_CHROMIUM` and
//! `MUSTER_CHROMEDRIVER` name other binaries.

use crate::common;

use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{DEADLINE, Served};
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use muster::{Instance, Registrar, RegistrarConfig, Status};
use muster_testkit::EmbeddedNode;
use muster_testkit::browser::{ChromeDriver, browser_binaries};
use serde_json::{Value, json};

/// How soon a change must show on the page, from the registry call
/// returning to the DOM changing.
const LIVE_BOUND: Duration = Duration::from_secs(1);

/// A headless Chromium session. The flags keep it off the network (this
/// machine has none; without them Chromium waits on refused connections).
async fn browser(driver: &ChromeDriver, chromium: &Path, profile: &Path) -> Client {
    let args = [
        "--headless".to_string(),
        "--no-sandbox".to_string(),
        "--disable-gpu".to_string(),
        "--disable-dev-shm-usage".to_string(),
        "--disable-quic".to_string(),
        "--no-first-run".to_string(),
        "--disable-background-networking".to_string(),
        "--disable-component-update".to_string(),
        "--disable-sync".to_string(),
        "--disable-extensions".to_string(),
        "--window-size=1440,1200".to_string(),
        "--force-device-scale-factor=1".to_string(),
        format!("--user-data-dir={}", profile.display()),
    ];
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": chromium, "args": args },
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    tokio::time::timeout(
        DEADLINE,
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver.url()),
    )
    .await
    .expect("browser session timed out")
    .expect("browser session")
}

/// Milliseconds since the epoch, the clock the page's `Date.now()` reads.
fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
        * 1000.0
}

/// Runs `script` until it returns something other than `null`.
async fn wait_for(client: &Client, what: &str, script: &str) -> Value {
    let start = Instant::now();
    loop {
        let value = client.execute(script, vec![]).await.expect("execute");
        if !value.is_null() && value != Value::Bool(false) {
            return value;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Records in `window.__seen[key]` / `window.__gone[key]` the moment
/// (`Date.now()`) a row `data-key` appears / disappears, from a
/// MutationObserver, so the latency does not depend on how fast the test
/// polls.
const OBSERVER: &str = r#"
window.__seen = {}; window.__gone = {}; window.__noReload = true;
const present = new Set();
const scan = () => {
  const now = Date.now();
  const keys = new Set([...document.querySelectorAll('tr[data-key]')].map(tr => tr.dataset.key));
  for (const k of keys) if (!present.has(k)) { present.add(k); window.__seen[k] ??= now; }
  for (const k of [...present]) if (!keys.has(k)) { present.delete(k); window.__gone[k] ??= now; }
};
scan();
new MutationObserver(scan).observe(document.getElementById('services'), { childList: true, subtree: true });
return true;
"#;

fn visible_services_script() -> &'static str {
    "return [...document.querySelectorAll('#services article[data-service]')].map(a => a.dataset.service);"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_page_in_headless_chromium() {
    muster_testkit::init_tracing();
    let Some((chromium, chromedriver)) = browser_binaries() else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("muster-browser-")
        .tempdir()
        .expect("temp dir");
    let profile = tmp.path().join("profile");
    let driver_log = tmp.path().join("chromedriver.log");
    let driver = ChromeDriver::start(&chromedriver, &driver_log);

    let registry = EmbeddedNode::start().expect("embedded registry");
    let served = Served::start(&registry.endpoint()).await;
    let registrar = Registrar::start(
        common::client(&registry.endpoint()),
        RegistrarConfig::default().with_ttl(Duration::from_secs(10)),
    )
    .await
    .expect("registrar");
    // Something there before the page loads.
    registrar
        .register(
            Instance::new("billing", "billing-1", "http://10.0.3.21:9000")
                .with_zone("us-east-1")
                .with_version("2.0.1"),
        )
        .await
        .unwrap();

    let client = browser(&driver, &chromium, &profile).await;
    // Close the browser whatever happens: a failed assertion must not leave
    // Chromium running behind a killed chromedriver.
    let result = AssertUnwindSafe(drive(&client, &served, &registrar, tmp.path()))
        .catch_unwind()
        .await;
    let _ = client.close().await;
    registrar.shutdown().await.unwrap();
    let result = result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    if let Err(e) = result {
        let log = std::fs::read_to_string(&driver_log).unwrap_or_default();
        let tail: String = log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        panic!("{e}\n--- chromedriver log (tail) ---\n{tail}");
    }
}

async fn drive(
    client: &Client,
    served: &Served,
    registrar: &Registrar,
    tmp: &Path,
) -> Result<(), String> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: fantoccini::error::CmdError| format!("{what}: {e}")
    };
    client
        .goto(&served.url("/"))
        .await
        .map_err(err("load the page"))?;
    let title = client.title().await.map_err(err("title"))?;
    assert!(title.contains("muster"), "title {title:?}");

    // The stream is live and the first snapshot is on the page.
    wait_for(
        client,
        "the live indicator",
        "return document.getElementById('conn-text').textContent === 'live';",
    )
    .await;
    wait_for(
        client,
        "the first snapshot",
        "return document.querySelector('tr[data-key=\"billing/billing-1\"]') !== null;",
    )
    .await;
    wait_for(
        client,
        "the registry status panel",
        "const v = document.getElementById('st-revision').textContent; return v !== '…' && v;",
    )
    .await;
    client
        .execute(OBSERVER, vec![])
        .await
        .map_err(err("install the observer"))?;

    // A registration appears without a reload, within a second.
    registrar
        .register(
            Instance::new("user", "user-1", "http://10.0.1.17:8080")
                .with_zone("eu-west-1")
                .with_version("1.4.2")
                .with_tag("canary"),
        )
        .await
        .unwrap();
    let registered_at = now_ms();
    let seen = wait_for(
        client,
        "user-1 on the page",
        "return window.__seen['user/user-1'] ?? null;",
    )
    .await
    .as_f64()
    .expect("a time");
    let latency = seen - registered_at;
    eprintln!("registration visible on the page {latency:.0} ms after register() returned");
    assert!(
        latency <= LIVE_BOUND.as_millis() as f64,
        "registration took {latency:.0} ms to show (bound {LIVE_BOUND:?})"
    );
    let row = client
        .find(Locator::Css("tr[data-key=\"user/user-1\"]"))
        .await
        .map_err(err("user-1 row"))?;
    let text = row.text().await.map_err(err("row text"))?;
    for expected in ["user-1", "10.0.1.17:8080", "eu-west-1", "1.4.2", "serving"] {
        assert!(text.contains(expected), "row {text:?} lacks {expected:?}");
    }
    // The lease countdown and the age fill in.
    wait_for(
        client,
        "the lease time left",
        "const t = document.querySelector('tr[data-key=\"user/user-1\"] td.lease').textContent; \
         return /^[0-9.]+s$/.test(t) ? t : null;",
    )
    .await;

    // More of a fleet, for the filters and the screenshot.
    for (service, id, addr, zone, version) in [
        (
            "user",
            "user-2",
            "http://10.0.1.18:8080",
            "eu-west-1",
            "1.4.2",
        ),
        (
            "user",
            "user-3",
            "http://10.0.2.9:8080",
            "us-east-1",
            "1.4.1",
        ),
        ("orders", "orders-a1", "10.0.4.2:7000", "eu-west-1", "0.9.0"),
        ("orders", "orders-b7", "10.0.4.3:7000", "us-east-1", "0.9.0"),
        (
            "billing",
            "billing-2",
            "http://10.0.3.22:9000",
            "us-east-1",
            "2.0.1",
        ),
    ] {
        registrar
            .register(
                Instance::new(service, id, addr)
                    .with_zone(zone)
                    .with_version(version),
            )
            .await
            .unwrap();
    }
    registrar
        .set_status(
            Instance::new("user", "user-3", "http://10.0.2.9:8080")
                .with_zone("us-east-1")
                .with_version("1.4.1"),
            Status::Draining,
        )
        .await
        .unwrap();
    wait_for(
        client,
        "user-3 draining",
        "const r = document.querySelector('tr[data-key=\"user/user-3\"]'); \
         return r && r.dataset.status === 'draining';",
    )
    .await;
    wait_for(
        client,
        "every instance",
        "return document.querySelectorAll('tr[data-key]').length === 7;",
    )
    .await;
    let badges = client
        .execute(
            "return document.querySelector('article[data-service=\"user\"] .counts').textContent;",
            vec![],
        )
        .await
        .map_err(err("counts"))?;
    let badges = badges.as_str().unwrap_or_default().to_string();
    assert!(
        badges.contains("2 serving") && badges.contains("1 draining"),
        "{badges:?}"
    );

    // Filters: by service name...
    let search = client
        .find(Locator::Id("filter-service"))
        .await
        .map_err(err("service filter"))?;
    search.send_keys("ord").await.map_err(err("type"))?;
    let shown = wait_for(
        client,
        "only orders",
        "const s = [...document.querySelectorAll('#services article[data-service]')].map(a => a.dataset.service); \
         return s.length === 1 && s[0] === 'orders' ? s : null;",
    )
    .await;
    assert_eq!(shown, json!(["orders"]));
    search.clear().await.map_err(err("clear"))?;
    wait_for(
        client,
        "every service again",
        "return document.querySelectorAll('#services article[data-service]').length === 3;",
    )
    .await;
    // ...by status...
    client
        .find(Locator::Id("filter-status"))
        .await
        .map_err(err("status filter"))?
        .select_by_value("draining")
        .await
        .map_err(err("select draining"))?;
    let rows = wait_for(
        client,
        "only draining rows",
        "const r = [...document.querySelectorAll('tr[data-key]')].map(r => r.dataset.key); \
         return r.length === 1 ? r : null;",
    )
    .await;
    assert_eq!(rows, json!(["user/user-3"]));
    let services = client
        .execute(visible_services_script(), vec![])
        .await
        .map_err(err("services"))?;
    assert_eq!(services, json!(["user"]));
    client
        .find(Locator::Id("filter-status"))
        .await
        .map_err(err("status filter"))?
        .select_by_value("")
        .await
        .map_err(err("select any"))?;
    // ...and by zone.
    client
        .find(Locator::Id("filter-zone"))
        .await
        .map_err(err("zone filter"))?
        .select_by_value("us-east-1")
        .await
        .map_err(err("select zone"))?;
    let rows = wait_for(
        client,
        "only us-east-1 rows",
        "const r = [...document.querySelectorAll('tr[data-key]')].map(r => r.dataset.key); \
         return r.length === 4 ? r.sort() : null;",
    )
    .await;
    assert_eq!(
        rows,
        json!([
            "billing/billing-1",
            "billing/billing-2",
            "orders/orders-b7",
            "user/user-3"
        ])
    );
    assert!(
        client
            .current_url()
            .await
            .map_err(err("url"))?
            .as_str()
            .contains("zone=us-east-1"),
        "the filters are in the URL"
    );
    client
        .find(Locator::Id("filter-zone"))
        .await
        .map_err(err("zone filter"))?
        .select_by_value("")
        .await
        .map_err(err("select all zones"))?;
    wait_for(
        client,
        "every row again",
        "return document.querySelectorAll('tr[data-key]').length === 7;",
    )
    .await;

    // Open one service's event list for the picture, then take it.
    client
        .execute(
            "document.querySelector('article[data-service=\"user\"] details summary').click(); return true;",
            vec![],
        )
        .await
        .map_err(err("open events"))?;
    // Let the lease countdowns fill in before the picture.
    wait_for(
        client,
        "lease times on every row",
        "return [...document.querySelectorAll('td.lease')].every(td => /s$/.test(td.textContent));",
    )
    .await;
    // The status panel follows the changes (revision, key count).
    wait_for(
        client,
        "the status panel counts every key",
        "return document.getElementById('st-keys').textContent === '7';",
    )
    .await;
    client
        .execute(
            "document.activeElement.blur(); window.scrollTo(0, 0); return true;",
            vec![],
        )
        .await
        .map_err(err("blur"))?;
    let png = client.screenshot().await.map_err(err("screenshot"))?;
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| tmp.to_path_buf());
    let path = target.join("dashboard-screenshot.png");
    std::fs::write(&path, &png).map_err(|e| format!("write {}: {e}", path.display()))?;
    let _ = writeln!(
        std::io::stderr().lock(),
        "dashboard screenshot: {}",
        path.display()
    );
    assert!(
        png.len() > 10_000,
        "a blank screenshot? {} bytes",
        png.len()
    );

    // Values from the registry are text, never markup.
    registrar
        .register(
            Instance::new(
                "evil",
                "evil-1",
                "http://<img src=x onerror=window.__xss=1>/",
            )
            .with_version("<b>1</b>")
            .with_zone("<script>window.__xss=2</script>"),
        )
        .await
        .unwrap();
    let cells = wait_for(
        client,
        "the evil row",
        "const r = document.querySelector('tr[data-key=\"evil/evil-1\"]'); \
         return r && [r.querySelector('.addr').textContent, r.querySelector('.version').textContent, \
                      r.querySelector('.zone').textContent, r.querySelectorAll('img, b, script').length];",
    )
    .await;
    assert_eq!(
        cells,
        json!([
            "http://<img src=x onerror=window.__xss=1>/",
            "<b>1</b>",
            "<script>window.__xss=2</script>",
            0
        ])
    );
    let xss = client
        .execute("return window.__xss ?? null;", vec![])
        .await
        .map_err(err("xss"))?;
    assert_eq!(xss, Value::Null, "markup from the registry ran");

    // A deregistration disappears without a reload, within a second.
    client
        .execute("delete window.__gone['user/user-1']; return true;", vec![])
        .await
        .map_err(err("reset the observer"))?;
    registrar.deregister("user", "user-1").await.unwrap();
    let deregistered_at = now_ms();
    let gone = wait_for(
        client,
        "user-1 gone from the page",
        "return window.__gone['user/user-1'] ?? null;",
    )
    .await
    .as_f64()
    .expect("a time");
    let latency = gone - deregistered_at;
    eprintln!("deregistration visible on the page {latency:.0} ms after deregister() returned");
    assert!(
        latency <= LIVE_BOUND.as_millis() as f64,
        "deregistration took {latency:.0} ms to show (bound {LIVE_BOUND:?})"
    );
    let activity = client
        .execute(
            "return [...document.querySelectorAll('#activity .event')].map(e => e.dataset.kind + ' ' + e.querySelector('.who').textContent);",
            vec![],
        )
        .await
        .map_err(err("activity"))?;
    assert_eq!(
        activity[0],
        json!("deregistered user/user-1"),
        "newest event first: {activity}"
    );
    let still = client
        .execute("return window.__noReload === true;", vec![])
        .await
        .map_err(err("no reload"))?;
    assert_eq!(still, json!(true), "the page was reloaded");
    Ok(())
}
