//! `muster serve`'s dashboard login in a real browser: headless Chromium
//! driven through chromedriver (WebDriver). The page itself is tested
//! further in crates/dashboard; this is the whole product: the server with
//! auth enabled, its dashboard reading with the internal token, a user
//! logging in and seeing only what the user may read.
//!
//! Needs Debian's `chromium` and `chromium-driver`; skipped loudly without
//! them unless `MUSTER_REQUIRE_BROWSER=1`. `MUSTER_CHROMIUM` and
//! `MUSTER_CHROMEDRIVER` name other binaries.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{DEADLINE, free_port};
use fantoccini::{Client, ClientBuilder, Locator};
use muster_testkit::browser::{ChromeDriver, browser_binaries};
use serde_json::{Value, json};

/// A headless Chromium session, kept off the network.
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
        "--window-size=1280,1000".to_string(),
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

/// Runs `script` until it returns something other than `null` or `false`.
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

const SERVICES: &str = "return [...document.querySelectorAll('#services article[data-service]')].map(a => a.dataset.service);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_dashboard_login_in_headless_chromium() {
    let Some((chromium, chromedriver)) = browser_binaries() else {
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("muster-cli-browser-")
        .tempdir()
        .expect("temp dir");
    let driver_log = tmp.path().join("chromedriver.log");
    let driver = ChromeDriver::start(&chromedriver, &driver_log);

    let grpc = free_port();
    let serve = common::serve(grpc, &[std::ffi::OsStr::new("--in-memory")]);
    let endpoint = format!("127.0.0.1:{grpc}");
    tokio::task::spawn_blocking(move || {
        common::enable_auth(&endpoint);
        for (service, id, addr) in [
            ("web", "web-1", "http://127.0.0.1:8001"),
            ("billing", "billing-1", "10.0.0.9:9000"),
        ] {
            let instance = muster::Instance::new(service, id, addr);
            let key = instance.key(muster::instance::DEFAULT_PREFIX);
            let value = String::from_utf8(instance.encode().unwrap()).unwrap();
            common::etcdctl(&endpoint, &["--user=root:rootpw", "put", &key, &value]);
        }
    })
    .await
    .unwrap();

    let client = browser(&driver, &chromium, &tmp.path().join("profile")).await;
    // Run the steps as a task, so that a failed assertion still closes
    // the browser before chromedriver is killed.
    let url = format!("http://{}/", serve.1);
    let result = tokio::spawn(drive(client.clone(), url)).await;
    let _ = client.close().await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let log = std::fs::read_to_string(&driver_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!("{e}\n--- chromedriver log (tail) ---\n{}", tail.join("\n"));
        }
        Err(panic) => std::panic::resume_unwind(panic.into_panic()),
    }
}

async fn drive(client: Client, url: String) -> Result<(), String> {
    let err = |what: &'static str| move |e: fantoccini::error::CmdError| format!("{what}: {e}");
    client.goto(&url).await.map_err(err("load the page"))?;

    // The login form, not the dashboard.
    wait_for(
        &client,
        "the login form",
        "return !document.getElementById('login').hidden && document.getElementById('dashboard').hidden;",
    )
    .await;
    let kind = client
        .execute(
            "const p = document.getElementById('login-password'); \
             return [p.type, p.autocomplete, document.getElementById('login-name').autocomplete];",
            vec![],
        )
        .await
        .map_err(err("the form's fields"))?;
    assert_eq!(kind, json!(["password", "current-password", "username"]));
    let services = client
        .execute(SERVICES, vec![])
        .await
        .map_err(err("services"))?;
    assert_eq!(services, json!([]), "nothing shown before a login");

    // A wrong password: the registry's refusal on the form.
    let name = client
        .find(Locator::Id("login-name"))
        .await
        .map_err(err("name field"))?;
    let password = client
        .find(Locator::Id("login-password"))
        .await
        .map_err(err("password field"))?;
    name.send_keys("alice")
        .await
        .map_err(err("type the name"))?;
    password
        .send_keys("not-her-password")
        .await
        .map_err(err("type the password"))?;
    client
        .find(Locator::Id("login-submit"))
        .await
        .map_err(err("submit"))?
        .click()
        .await
        .map_err(err("click submit"))?;
    let error = wait_for(
        &client,
        "the refusal",
        "const e = document.getElementById('login-error'); return !e.hidden && e.textContent;",
    )
    .await;
    assert!(
        error
            .as_str()
            .unwrap_or_default()
            .contains("authentication failed"),
        "{error}"
    );
    let cleared = client
        .execute(
            "return document.getElementById('login-password').value;",
            vec![],
        )
        .await
        .map_err(err("password value"))?;
    assert_eq!(cleared, json!(""), "a refused password is cleared");

    // The right one: the dashboard, with alice's service only.
    password
        .send_keys("alicepw")
        .await
        .map_err(err("type the password"))?;
    client
        .find(Locator::Id("login-submit"))
        .await
        .map_err(err("submit"))?
        .click()
        .await
        .map_err(err("click submit"))?;
    wait_for(
        &client,
        "the dashboard",
        "return document.getElementById('login').hidden && !document.getElementById('dashboard').hidden;",
    )
    .await;
    wait_for(
        &client,
        "the live stream",
        "return document.getElementById('conn-text').textContent === 'live';",
    )
    .await;
    wait_for(
        &client,
        "web-1 on the page",
        "return document.querySelector('tr[data-key=\"web/web-1\"]') !== null;",
    )
    .await;
    let services = client
        .execute(SERVICES, vec![])
        .await
        .map_err(err("services"))?;
    assert_eq!(services, json!(["web"]), "only what alice may read");
    let user = client
        .execute(
            "return [document.getElementById('user').textContent, document.getElementById('logout').hidden];",
            vec![],
        )
        .await
        .map_err(err("user"))?;
    assert_eq!(user, json!(["alice", false]));
    // The session cookie is out of the page's reach (HttpOnly).
    let cookies = client
        .execute("return document.cookie;", vec![])
        .await
        .map_err(err("document.cookie"))?;
    assert!(
        !cookies
            .as_str()
            .unwrap_or_default()
            .contains("muster_session"),
        "{cookies}"
    );
    // The key counts are not alice's to see.
    wait_for(
        &client,
        "the status panel",
        "const v = document.getElementById('st-revision').textContent; return v !== '…' && v;",
    )
    .await;
    let keys = client
        .execute(
            "return document.getElementById('st-keys').textContent;",
            vec![],
        )
        .await
        .map_err(err("keys"))?;
    assert_eq!(keys, json!("—"));

    // Log out: the form again, nothing shown, the API closed.
    client
        .find(Locator::Id("logout"))
        .await
        .map_err(err("logout button"))?
        .click()
        .await
        .map_err(err("click logout"))?;
    wait_for(
        &client,
        "the login form again",
        "return !document.getElementById('login').hidden && document.getElementById('dashboard').hidden \
         && document.querySelectorAll('tr[data-key]').length === 0;",
    )
    .await;
    let status = client
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             fetch('api/services').then(r => done(r.status), e => done(String(e)));",
            vec![],
        )
        .await
        .map_err(err("fetch after logout"))?;
    assert_eq!(status, json!(401));
    Ok(())
}
