//! Protocol upgrades (WebSocket and others) passing through: once the
//! upstream answers `101 Switching Protocols`, the client's connection is
//! taken over from hyper, joined with the upstream's, and bytes are copied
//! both ways until either side closes.

use http::{HeaderMap, Version, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use muster::balance::InFlight;
use tokio::io::AsyncWriteExt;

use crate::client::Upgraded;
use crate::headers::connection_has;

/// Whether a request asks to switch protocols (HTTP/1.1 `Connection:
/// upgrade` with an `Upgrade` header).
pub(crate) fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && crate::headers::find(headers, &header::UPGRADE).is_some()
        && connection_has(headers, "upgrade")
}

/// Joins the client's and the upstream's upgraded connections and copies
/// bytes between them; the request counts as in flight meanwhile.
pub(crate) fn tunnel(client: OnUpgrade, upstream: Upgraded, in_flight: Option<InFlight>) {
    let upstream_read = upstream.read;
    tokio::spawn(async move {
        let _in_flight = in_flight;
        let client = match client.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = upstream.io;
        // What the upstream sent right after its head.
        if !upstream_read.is_empty()
            && let Err(e) = client.write_all(&upstream_read).await
        {
            tracing::debug!(error = %e, "upgraded connection ended");
            return;
        }
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(up, down, "upgraded connection closed"),
            Err(e) => tracing::debug!(error = %e, "upgraded connection ended"),
        }
    });
}
