//! Observability of the real worker against the real PostgreSQL: the Prometheus endpoint
//! counts what was delivered, spans reach an OTLP collector with their attributes and the
//! service's resource, and an unreachable collector never holds up delivery.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use fake_opentelemetry_collector::ExportedSpan;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(60);

/// Variables a developer's shell may carry that would redirect the worker's telemetry.
const OTEL_VARS: &[&str] = &[
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
];

/// The worker with extra arguments and environment (the common helper takes neither).
fn spawn_worker(manifest: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Worker {
    let log = dir.join("worker.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wallaby-worker"));
    cmd.args(["run", "-f"])
        .arg(manifest)
        .arg("--status-file")
        .arg(dir.join("status.json"))
        .args(args)
        .env("WALLABY_LOG", "info,wallaby_worker=debug,wallaby_source=debug,wallaby_ddl=debug,wallaby_pipeline=debug,wallaby_destinations=debug,wallaby_pg=debug")
        .env_remove("WALLABY_METRICS_ADDR");
    for var in OTEL_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Worker { child, log }
}

async fn wait_slot_active(db: &TestDb, worker: &Worker) {
    wait_for("the worker to attach to the slot", DEADLINE, async || {
        db.slot(&db.name)
            .await
            .filter(|(_, active)| *active)
            .map(|_| ())
            .or_else(|| {
                // Fail fast with the log instead of waiting out the deadline.
                let log = worker.log_text();
                assert!(!log.contains("error:"), "worker failed:\n{log}");
                None
            })
    })
    .await;
}

async fn current_wal(sql: &tokio_postgres::Client) -> u64 {
    let lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    parse_lsn(&lsn)
}

/// `GET path` over a fresh connection: status, lower-cased head, body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Value of one series (`name{labels}` exactly as exposed) in an OpenMetrics text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_counts_rows_batches_latency_and_the_confirmed_position() {
    let db = TestDb::create("metrics").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE items (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &db.dsn, &db.name, &["items"], "");
    let worker = spawn_worker(
        &manifest,
        dir.path(),
        &["--metrics-addr", "127.0.0.1:0"],
        &[],
    );
    // Port 0: the worker logs the address it bound.
    let addr: SocketAddr = wait_for("the metrics address in the log", DEADLINE, async || {
        let log = worker.log_text();
        let rest = log.split("serving metrics on http://").nth(1)?;
        rest.split_once("/metrics")?.0.parse().ok()
    })
    .await;
    wait_slot_active(&db, &worker).await;

    let (status, head, body) = http_get(addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"), "{head}");

    let before = current_wal(&sql).await;
    sql.batch_execute("INSERT INTO items SELECT g, 'x' FROM generate_series(1, 20) g")
        .await
        .unwrap();
    sql.batch_execute("INSERT INTO items SELECT g, 'y' FROM generate_series(21, 25) g")
        .await
        .unwrap();
    sql.batch_execute("UPDATE items SET v = 'z' WHERE id <= 2")
        .await
        .unwrap();
    sql.batch_execute("DELETE FROM items WHERE id = 25")
        .await
        .unwrap();

    let wanted = [
        (
            r#"wallaby_rows_total{table="public.items",op="insert"}"#,
            25.0,
        ),
        (
            r#"wallaby_rows_total{table="public.items",op="update"}"#,
            2.0,
        ),
        (
            r#"wallaby_rows_total{table="public.items",op="delete"}"#,
            1.0,
        ),
        ("wallaby_transactions_total", 4.0),
        (
            r#"wallaby_batches_total{destination="files",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"wallaby_destination_write_seconds_count{destination="files"}"#,
            1.0,
        ),
        (
            r#"wallaby_destination_flush_seconds_count{destination="files"}"#,
            1.0,
        ),
        ("wallaby_batch_rows_sum", 28.0),
        // 28 JSON records are far more than 28 × 100 bytes.
        (r#"wallaby_bytes_total{destination="files"}"#, 2800.0),
        ("wallaby_confirmed_lsn", before as f64 + 1.0),
        (
            r#"wallaby_destination_durable_lsn{destination="files"}"#,
            before as f64 + 1.0,
        ),
    ];
    let text = wait_for("metrics for every delivered change", DEADLINE, async || {
        let (status, head, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "{head}");
        assert!(
            head.contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"
            ),
            "{head}"
        );
        wanted
            .iter()
            .all(|(series, min)| sample(&body, series).is_some_and(|v| v >= *min))
            .then_some(body)
    })
    .await;
    // Rows are counted once each, not per retry or per flush.
    assert_eq!(
        sample(
            &text,
            r#"wallaby_rows_total{table="public.items",op="insert"}"#
        ),
        Some(25.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"wallaby_batches_total{destination="files",outcome="error"}"#
        ),
        None,
        "no failed batch"
    );
    assert!(text.ends_with("# EOF\n"));

    // Lag and retained WAL come from the status report every statusInterval (1s).
    wait_for("slot gauges from the status report", DEADLINE, async || {
        let body = http_get(addr, "/metrics").await.2;
        (sample(&body, "wallaby_slot_retained_wal_bytes")? > 0.0).then_some(())
    })
    .await;

    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    // The gauge is the position the worker confirmed: its status checkpoint.
    let gauge = sample(&text, "wallaby_confirmed_lsn").unwrap() as u64;
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("status.json")).unwrap())
            .unwrap();
    assert_eq!(
        gauge,
        parse_lsn(status["checkpoint"]["lsn"].as_str().unwrap()),
        "{status}"
    );
    let (confirmed, _) = wait_for("the slot to be released", DEADLINE, async || {
        db.slot(&db.name).await.filter(|(_, active)| !active)
    })
    .await;
    let confirmed = parse_lsn(&confirmed);
    assert!(
        gauge <= confirmed,
        "gauge {gauge} > slot {confirmed}\n{status}\n{log}"
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_metrics_port_stops_the_worker_with_a_precise_error() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Nothing connects to PostgreSQL before the endpoint is bound.
    let manifest = write_manifest(
        dir.path(),
        "postgresql://nobody@127.0.0.1:1/none",
        "unused",
        &["t"],
        "",
    );
    let mut worker = spawn_worker(
        &manifest,
        dir.path(),
        &["--metrics-addr", &addr.to_string()],
        &[],
    );
    let status = worker.child.wait().unwrap();
    let log = worker.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("error: address {addr} already in use: "))
            && log.contains("--metrics-addr off"),
        "{log}"
    );
    drop(holder);
}

/// Attributes as plain strings.
type Attributes = BTreeMap<String, String>;

/// What the in-process collector received: each span with its resource's attributes.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(Attributes, SpanView)>>>);

/// A span with its identifiers (from the fake collector's conversion) and typed attributes.
#[derive(Debug, Clone)]
struct SpanView {
    span: ExportedSpan,
    attributes: BTreeMap<String, String>,
}

fn plain(attributes: &[KeyValue]) -> BTreeMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| {
            let v = match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => s.clone(),
                AnyValue::IntValue(i) => i.to_string(),
                AnyValue::BoolValue(b) => b.to_string(),
                AnyValue::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), v))
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .map(|r| plain(&r.attributes))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let attributes = plain(&span.attributes);
                received.push((
                    resource.clone(),
                    SpanView {
                        span: ExportedSpan::from(span),
                        attributes,
                    },
                ));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC trace collector on a free port. The fake collector crate's server drops
/// the Resource, which this test checks, so only its span conversion is reused here.
async fn start_collector() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Received::default();
    let service = TraceServiceServer::new(received.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (addr, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_spans_with_destination_children_reach_the_collector_by_the_flush_at_exit() {
    let (collector, received) = start_collector().await;
    let db = TestDb::create("traces").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &db.dsn, &db.name, &["t"], "");
    let service = format!("wallaby-test-{}", std::process::id());
    let endpoint = format!("http://{collector}");
    let worker = spawn_worker(
        &manifest,
        dir.path(),
        &["--metrics-addr", "off"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", &service),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            // No periodic export: the spans can only arrive through the flush at exit.
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ],
    );
    wait_slot_active(&db, &worker).await;
    let before = current_wal(&sql).await;
    sql.batch_execute("INSERT INTO t SELECT generate_series(1, 7)")
        .await
        .unwrap();
    wait_for("7 records on disk", DEADLINE, async || {
        (records(dir.path()).len() >= 7).then_some(())
    })
    .await;
    assert!(received.0.lock().unwrap().is_empty());
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("exporting traces over OTLP/gRPC"), "{log}");

    let (resource, batch, child) = wait_for(
        "a batch span with a destination.write child",
        DEADLINE,
        async || {
            let received = received.0.lock().unwrap().clone();
            let (resource, batch) = received
                .iter()
                .find(|(_, s)| {
                    s.span.name == "batch" && s.attributes.get("rows").is_some_and(|r| r == "7")
                })?
                .clone();
            let child = received
                .iter()
                .map(|(_, s)| s)
                .find(|s| {
                    s.span.name == "destination.write"
                        && s.span.parent_span_id == batch.span.span_id
                })?
                .clone();
            Some((resource, batch, child))
        },
    )
    .await;
    assert_eq!(resource.get("service.name"), Some(&service), "{resource:?}");
    assert_eq!(
        resource.get("deployment.environment").map(String::as_str),
        Some("test"),
        "{resource:?}"
    );
    assert_eq!(batch.attributes["transactions"], "1", "{batch:?}");
    assert!(
        batch.attributes["bytes"].parse::<u64>().unwrap() > 7 * 50,
        "{batch:?}"
    );
    assert!(parse_lsn(&batch.attributes["lsn"]) > before, "{batch:?}");
    assert_eq!(child.attributes["destination"], "files", "{child:?}");
    assert_eq!(child.attributes["bytes"], batch.attributes["bytes"]);
    assert_eq!(child.span.trace_id, batch.span.trace_id);
    assert!(
        child.span.start_time_unix_nano >= batch.span.start_time_unix_nano
            && child.span.end_time_unix_nano <= batch.span.end_time_unix_nano,
        "the destination write happens within its batch"
    );
    db.drop_all().await;
}

/// Delivery with spans going to `endpoint`, which never accepts them.
async fn delivers_despite_a_dead_collector(prefix: &str, endpoint: &str) {
    let db = TestDb::create(prefix).await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &db.dsn, &db.name, &["t"], "");
    let worker = spawn_worker(
        &manifest,
        dir.path(),
        &["--metrics-addr", "off"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "500"),
        ],
    );
    wait_slot_active(&db, &worker).await;
    for i in 0..20 {
        sql.execute(
            "INSERT INTO t SELECT generate_series($1::int * 5, $1::int * 5 + 4)",
            &[&i],
        )
        .await
        .unwrap();
    }
    wait_for("all 100 rows on disk", DEADLINE, async || {
        (records(dir.path()).len() >= 100).then_some(())
    })
    .await;
    wait_for("a warning about the collector", DEADLINE, async || {
        worker
            .log_text()
            .contains("cannot export spans to the OpenTelemetry collector")
            .then_some(())
    })
    .await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(records(dir.path()).len(), 100, "{log}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_collector_connection_does_not_stop_delivery() {
    // A port that was just free: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    delivers_despite_a_dead_collector("otelrefused", &format!("http://127.0.0.1:{port}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_collector_does_not_stop_delivery() {
    // Accepts TCP connections and never answers: every export waits for its timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    delivers_despite_a_dead_collector("otelsilent", &format!("http://{addr}")).await;
    holder.abort();
}
