//! Typed errors of the gateway's API, and the JSON error answers it gives
//! clients.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::GatewayBody;

/// Why the gateway could not be started or configured.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A route is invalid.
    #[error("invalid route {route:?}: {reason}")]
    InvalidRoute {
        /// The route (its prefix or flag text).
        route: String,
        /// What is wrong.
        reason: String,
    },
    /// The routes file cannot be read or parsed.
    #[error("routes file {}: {reason}", path.display())]
    RoutesFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Some other setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listener's certificate or key cannot be used (the message
    /// names the file and what is wrong with it).
    #[error("TLS: {0}")]
    Tls(#[from] muster_tls::Error),
}

/// A JSON error answer: `{"error": kind, "message": ..., ...}`.
pub(crate) fn json_error(
    status: StatusCode,
    kind: &str,
    message: &str,
    service: Option<&str>,
) -> Response<GatewayBody> {
    let mut body = serde_json::json!({
        "error": kind,
        "status": status.as_u16(),
        "message": message,
    });
    if let Some(service) = service {
        body["service"] = serde_json::Value::String(service.to_string());
    }
    let mut text = body.to_string();
    text.push('\n');
    let mut resp = Response::new(GatewayBody::full(Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
