//! The metrics endpoint of the worker (`GET /metrics`, `GET /healthz`): where it listens
//! (`--metrics-addr`) and the server that encodes [`Metrics`] on each scrape.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wallaby_pipeline::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE};

/// Default listen address of the metrics endpoint (the exporter port Prometheus assigns to
/// nothing else, on loopback so a laptop run exposes nothing).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9187";

/// Where the metrics endpoint listens: `HOST:PORT` (an IP address and a port; port 0 picks a
/// free one) or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddr {
    /// No endpoint; metrics are still counted.
    Off,
    /// Serve on this address.
    Listen(SocketAddr),
}

/// An unparsable `--metrics-addr`.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid metrics address {input:?}: expected IP:PORT (e.g. 127.0.0.1:9187, [::]:9187) or off"
)]
pub struct MetricsAddrError {
    input: String,
}

impl FromStr for MetricsAddr {
    type Err = MetricsAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        s.parse().map(Self::Listen).map_err(|_| MetricsAddrError {
            input: s.to_owned(),
        })
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Listen(a) => a.fmt(f),
        }
    }
}

/// Failure to start or run the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Another process (often a second worker) holds the port.
    #[error(
        "address {addr} already in use: {cause}; choose another with --metrics-addr (or WALLABY_METRICS_ADDR), or turn the endpoint off with --metrics-addr off"
    )]
    AddressInUse {
        addr: SocketAddr,
        // In the message, not a `#[source]`: error chains would print it twice.
        cause: std::io::Error,
    },
    /// Any other bind failure (address not local, permission denied for a low port, …).
    #[error("cannot listen on {addr} for the metrics endpoint: {cause}")]
    Bind {
        addr: SocketAddr,
        // In the message, not a `#[source]`: error chains would print it twice.
        cause: std::io::Error,
    },
    /// The server stopped with an I/O error after it started.
    #[error("metrics endpoint on {addr} failed: {cause}")]
    Serve {
        addr: SocketAddr,
        // In the message, not a `#[source]`: error chains would print it twice.
        cause: std::io::Error,
    },
}

/// Starts the metrics endpoint on `addr` and returns the bound address (useful with port
/// 0) and the server task, which ends when `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<Result<(), MetricsError>>), MetricsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|cause| bind_error(addr, cause))?;
    let bound = listener
        .local_addr()
        .map_err(|cause| bind_error(addr, cause))?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .with_state(metrics);
    tracing::info!(address = %bound, "serving metrics on http://{bound}/metrics");
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|cause| MetricsError::Serve { addr: bound, cause })
    });
    Ok((bound, task))
}

fn bind_error(addr: SocketAddr, cause: std::io::Error) -> MetricsError {
    if cause.kind() == std::io::ErrorKind::AddrInUse {
        MetricsError::AddressInUse { addr, cause }
    } else {
        MetricsError::Bind { addr, cause }
    }
}

async fn metrics_handler(State(metrics): State<Metrics>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        metrics.encode_text(),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn metrics_addr_parses_addresses_and_off() {
        for (input, want) in [
            ("off", Some(MetricsAddr::Off)),
            ("OFF", Some(MetricsAddr::Off)),
            (
                "127.0.0.1:9187",
                Some(MetricsAddr::Listen("127.0.0.1:9187".parse().unwrap())),
            ),
            (
                "[::]:0",
                Some(MetricsAddr::Listen("[::]:0".parse().unwrap())),
            ),
            ("localhost:9187", None),
            ("9187", None),
            ("", None),
        ] {
            assert_eq!(input.parse::<MetricsAddr>().ok(), want, "{input:?}");
        }
        let err = "nope".parse::<MetricsAddr>().unwrap_err().to_string();
        assert!(err.contains("\"nope\"") && err.contains("or off"), "{err}");
    }

    #[tokio::test]
    async fn serves_metrics_and_health_and_reports_a_busy_port() {
        let m = Metrics::new();
        m.rows("public.t", "update", 7);
        let stop = CancellationToken::new();
        let (addr, task) = serve("127.0.0.1:0".parse().unwrap(), m.clone(), stop.clone())
            .await
            .unwrap();
        assert_ne!(addr.port(), 0);

        let (status, head, body) = get_raw(addr, "/metrics").await;
        assert_eq!(status, 200, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}")),
            "{head}"
        );
        assert!(
            body.contains(r#"wallaby_rows_total{table="public.t",op="update"} 7"#),
            "{body}"
        );
        assert_eq!(get_raw(addr, "/healthz").await.0, 200);
        assert_eq!(get_raw(addr, "/nope").await.0, 404);

        let busy = serve(addr, m, CancellationToken::new()).await.unwrap_err();
        assert!(matches!(busy, MetricsError::AddressInUse { .. }), "{busy}");
        assert!(
            busy.to_string()
                .starts_with(&format!("address {addr} already in use: ")),
            "{busy}"
        );

        stop.cancel();
        task.await.unwrap().unwrap();
    }

    async fn get_raw(addr: SocketAddr, path: &str) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }
}
