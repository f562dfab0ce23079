//! `ready`: waits for the first successful Range on the first endpoint,
//! connecting (and, with credentials, logging in) again and again (restart
//! measurements: `ready_unix_ns` is when it answered).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use muster_proto as pb;
use pb::kv_client::KvClient;
use serde::Serialize;

use crate::args::Plan;
use crate::auth::log_in;
use crate::connect::{connect_one, error_chain, status_text};
use crate::error::Error;
use crate::report::Report;
use crate::units::{duration_as_ms, ms, nanos};

/// The pause between two attempts.
const RETRY_EVERY: Duration = Duration::from_millis(2);

/// The JSON fields of `ready`.
#[derive(Debug, Serialize)]
pub(crate) struct Fields {
    #[serde(serialize_with = "duration_as_ms")]
    waited_ms: Duration,
    attempts: u64,
    /// Whether the first key of the keyspace exists.
    found: bool,
    ready_unix_ns: u64,
}

/// Runs `ready` for up to `--ready-timeout`.
pub(crate) async fn run(plan: &Plan<'_>) -> Result<Report<Fields>, Error> {
    let (args, keys) = (plan.args, &plan.keys);
    let url = plan.endpoints.first().ok_or(Error::NoEndpoints)?;
    let start = Instant::now();
    let deadline = start.checked_add(args.ready_timeout);
    let mut attempts = 0u64;
    let mut last_error = String::new();
    let found = loop {
        attempts += 1;
        let attempt = async {
            let channel = connect_one(url, plan.tls.as_ref())
                .await
                .map_err(|e| error_chain(&e))?;
            let auth = match log_in(url, &channel, plan.credentials.as_ref(), &plan.relogins).await
            {
                Ok(auth) => auth,
                // A wrong password stays wrong: no point waiting.
                Err(failed) if failed.refused => return Ok(Err(failed.error)),
                Err(failed) => return Err(failed.error.to_string()),
            };
            let resp = KvClient::new(auth.wrap(channel))
                .range(pb::RangeRequest {
                    key: keys.key(0),
                    ..Default::default()
                })
                .await
                .map_err(|s| status_text(&s))?;
            Ok::<_, String>(Ok(!resp.get_ref().kvs.is_empty()))
        };
        let left = deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        });
        match tokio::time::timeout(left, attempt).await {
            Ok(Ok(Ok(found))) => break found,
            Ok(Ok(Err(refused))) => return Err(refused),
            Ok(Err(e)) => last_error = e,
            Err(_) => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Error::NotReady {
                url: url.clone(),
                timeout: args.ready_timeout,
                attempts,
                last_error,
            });
        }
        tokio::time::sleep(RETRY_EVERY).await;
    };
    let waited = start.elapsed();
    let ready_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, nanos);
    let key = String::from_utf8_lossy(&keys.key(0)).into_owned();
    Ok(Report {
        workload: "ready",
        text: vec![format!(
            "ready: first successful Range after {} ({attempts} attempts); key {key} {}",
            ms(nanos(waited)),
            if found { "found" } else { "not found" }
        )],
        fields: Fields {
            waited_ms: waited,
            attempts,
            found,
            ready_unix_ns,
        },
        failure: None,
        seed: None,
        relogins: 0,
    })
}
