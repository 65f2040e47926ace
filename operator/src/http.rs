//! The operator's HTTP endpoints: `/healthz` (the process serves), `/readyz` (connected to
//! the API server: leading with controllers running, or standing by for the Lease), and
//! `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// Readiness of the process, shared with the code that changes it.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

// 0 (the default) is "starting".

const STANDBY: u8 = 1;
const LEADING: u8 = 2;
const STOPPING: u8 = 3;

impl Readiness {
    /// Waiting for the Lease.
    pub fn standby(&self) {
        self.0.store(STANDBY, Ordering::Release);
    }
    /// Controllers running.
    pub fn leading(&self) {
        self.0.store(LEADING, Ordering::Release);
    }
    /// Shutting down.
    pub fn stopping(&self) {
        self.0.store(STOPPING, Ordering::Release);
    }
    fn describe(&self) -> (bool, &'static str) {
        match self.0.load(Ordering::Acquire) {
            STANDBY => (true, "standby: waiting for the leader Lease"),
            LEADING => (true, "leading: controllers running"),
            STOPPING => (false, "stopping"),
            _ => (false, "starting"),
        }
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// The router (exposed for tests).
pub fn router(metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { metrics, readiness })
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    let (ready, what) = s.readiness.describe();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, what)
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    match s.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}"),
        )
            .into_response(),
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // The bound address, so `--http-addr 127.0.0.1:0` (tests) shows the port it got.
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, router(metrics, readiness))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code = response[9..12].parse().unwrap();
        (code, response)
    }

    #[tokio::test]
    async fn endpoints_follow_readiness_and_expose_metrics() {
        let metrics = Arc::new(Metrics::default());
        let readiness = Arc::new(Readiness::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(metrics.clone(), readiness.clone());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503, "starting");
        readiness.standby();
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 200);
        assert!(body.contains("standby"));
        readiness.leading();
        metrics.set_leader(true);
        metrics.failed("flow", "apply");
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("wallaby_operator_leader 1"), "{body}");
        assert!(body.contains(
            r#"wallaby_operator_reconcile_errors_total{controller="flow",error="apply"} 1"#
        ));
        readiness.stopping();
        assert_eq!(get(addr, "/readyz").await.0, 503);
        server.abort();
    }
}
