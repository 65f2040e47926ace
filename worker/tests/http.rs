//! The `http` (webhook) destination against an HTTP server inside the test that records
//! every request and fails on demand: read-back equals PostgreSQL (inserts, updates,
//! deletes, unchanged TOAST), the idempotency header survives a kill -9 re-delivery, an
//! outage (hang past the timeout, 429, 5xx) loses nothing and holds the slot, a 400 gives
//! up at once with the endpoint's message, and bad configuration is refused up front.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::{TestDb, Worker, parse_lsn, wait_for};
use wallaby_codec::{Change, TableSchema, WireFormat};

const DEADLINE: Duration = Duration::from_secs(60);

/// 400 md5 digests: 12,800 bytes of incompressible text, stored out of line.
const BIG: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i)";

/// What the server does with the next request.
#[derive(Clone, Debug)]
enum Fault {
    /// Answer with this status, body and optional `Retry-After`.
    Status(u16, &'static str, Option<&'static str>),
    /// Never answer (the client's timeout must fire).
    Hang,
}

#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct HookState {
    /// Requests answered 2xx, in arrival order.
    accepted: Vec<Received>,
    /// Every request that arrived.
    attempts: usize,
    /// Faults for the next requests, one each.
    queued: VecDeque<Fault>,
    /// Fault for every request while set (an outage).
    failing: Option<Fault>,
}

#[derive(Clone, Default)]
struct Hook(Arc<Mutex<HookState>>);

impl Hook {
    async fn start() -> (Self, String) {
        let hook = Self::default();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(hook.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (hook, format!("http://{addr}"))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HookState> {
        self.0.lock().unwrap()
    }

    fn accepted(&self, path: &str) -> Vec<Received> {
        self.state()
            .accepted
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }
}

async fn handle(State(hook): State<Hook>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let fault = {
        let mut s = hook.state();
        s.attempts += 1;
        s.queued.pop_front().or_else(|| s.failing.clone())
    };
    match fault {
        Some(Fault::Hang) => {
            // The client gives up first; this task ends with the runtime.
            std::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
        Some(Fault::Status(code, text, retry_after)) => {
            let mut response = (StatusCode::from_u16(code).unwrap(), text).into_response();
            if let Some(after) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", after.parse().unwrap());
            }
            response
        }
        None => {
            hook.state().accepted.push(Received {
                path: uri.path().to_owned(),
                headers,
                body,
            });
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

/// A Flow over `public.t` with the given Destinations (`(name, spec yaml)`), the source
/// Secret and a `hook-auth` Secret for `headersSecretRef`.
fn manifest(
    dir: &Path,
    db: &TestDb,
    file: &str,
    status_interval: &str,
    dests: &[(&str, String)],
) -> PathBuf {
    let names: Vec<String> = dests
        .iter()
        .map(|(n, _)| format!("{{name: {n}}}"))
        .collect();
    let mut text = format!(
        r#"apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {{name: hooks}}
spec:
  parallelism: 4
  source:
    postgres:
      secretRef: {{name: pg}}
      slot: {slot}
      publication: {slot}
      tables: ["public.t"]
      batchTimeout: 50ms
      batchSize: 5000
      statusInterval: {status_interval}
  destinations: [{names}]
---
apiVersion: v1
kind: Secret
metadata: {{name: pg}}
stringData: {{dsn: "{dsn}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: hook-auth}}
stringData: {{Authorization: "Bearer s3cret"}}
"#,
        slot = db.name,
        dsn = db.dsn,
        names = names.join(", "),
    );
    for (name, spec) in dests {
        text += &format!(
            "---\napiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {{name: {name}}}\nspec: {spec}\n"
        );
    }
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

async fn setup(prefix: &str) -> TestDb {
    common::toast_table_db(prefix).await
}

async fn attach(db: &TestDb) {
    db.attached().await;
}

/// Decodes one request body back to its schema and changes.
fn decode(format: WireFormat, body: &[u8]) -> (TableSchema, Vec<Change>) {
    common::decode_payload(format, body)
}

type Rows = common::TextRows;

/// Applies the changes of every accepted request on `path` in order: the table the
/// endpoint would hold. An unchanged TOAST value (absent) keeps the previous one.
fn replay(hook: &Hook, path: &str, format: WireFormat) -> Rows {
    let mut rows = Rows::new();
    for r in hook.accepted(path) {
        let (schema, changes) = decode(format, &r.body);
        common::apply_changes(&schema, changes, &mut rows);
    }
    rows
}

/// Applies the pgoutput bodies of every accepted `wal` request on `path`.
fn replay_wal(hook: &Hook, path: &str) -> Rows {
    let mut rows = Rows::new();
    for r in hook.accepted(path) {
        common::apply_pgoutput(&r.body, &mut rows);
    }
    rows
}

async fn postgres_rows(db: &TestDb) -> Rows {
    common::toast_table_rows(db).await
}

fn header<'a>(r: &'a Received, name: &str) -> &'a str {
    r.headers
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_else(|| panic!("no {name} header in {:?}", r.headers))
}

async fn exit(worker: Worker) -> (Option<i32>, String) {
    worker.exit_by_itself().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_decode_back_to_the_postgres_rows() {
    let db = setup("http_readback").await;
    let (hook, base) = Hook::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        "flow.yaml",
        "1s",
        &[
            (
                "wire",
                format!(
                    "{{type: http, format: arrow, http: {{url: \"{base}/wire\", headers: {{X-Team: data}}, headersSecretRef: {{name: hook-auth}}}}}}"
                ),
            ),
            (
                "records",
                format!(
                    "{{type: http, format: parquet, http: {{url: \"{base}/records\", method: PUT, payloadMode: recordJson, idempotencyHeader: X-Dedup}}}}"
                ),
            ),
            (
                "wal",
                format!("{{type: http, http: {{url: \"{base}/wal\", payloadMode: wal}}}}"),
            ),
        ],
    );
    let worker = Worker::spawn(&m, dir.path());
    attach(&db).await;
    let sql = db.client().await;
    sql.batch_execute(&format!(
        "INSERT INTO t SELECT g, 'title ' || g, {BIG} FROM generate_series(1, 20) g;
         UPDATE t SET title = 'renamed' WHERE id <= 5;
         UPDATE t SET big = 'small now', title = NULL WHERE id = 6;
         DELETE FROM t WHERE id BETWEEN 15 AND 17;
         INSERT INTO t VALUES (100, 'ünï \"quoted\"', NULL);"
    ))
    .await
    .unwrap();
    let want = postgres_rows(&db).await;
    for (path, format) in [("/wire", WireFormat::Arrow), ("/records", WireFormat::Json)] {
        let got = wait_for(
            &format!("{path} to match PostgreSQL"),
            DEADLINE,
            async || {
                let rows = replay(&hook, path, format);
                (rows == want).then_some(rows)
            },
        )
        .await;
        assert_eq!(got.len(), 18);
    }
    let got = wait_for("/wal to match PostgreSQL", DEADLINE, async || {
        let rows = replay_wal(&hook, "/wal");
        (rows == want).then_some(rows)
    })
    .await;
    assert_eq!(got.len(), 18);
    for r in hook.accepted("/wal") {
        assert_eq!(
            header(&r, "content-type"),
            "application/vnd.wallaby.pgoutput"
        );
        assert_eq!(header(&r, "x-wallaby-payload-mode"), "wal");
        assert_eq!(header(&r, "x-wallaby-format"), "pgoutput");
    }

    // Headers: static, from the Secret, metadata, and an idempotency key that is the hash
    // of (table, key, lsn) of exactly the changes in the body.
    let wire = hook.accepted("/wire");
    for r in &wire {
        assert_eq!(
            header(r, "content-type"),
            "application/vnd.apache.arrow.stream"
        );
        assert_eq!(header(r, "x-team"), "data");
        assert_eq!(header(r, "authorization"), "Bearer s3cret");
        assert_eq!(header(r, "x-wallaby-table"), "public.t");
        assert_eq!(header(r, "x-wallaby-payload-mode"), "wire");
        let (schema, changes) = decode(WireFormat::Arrow, &r.body);
        assert_eq!(header(r, "x-wallaby-rows"), changes.len().to_string());
        assert_eq!(
            header(r, "idempotency-key"),
            wallaby_destinations::idempotency::changes_key(&schema, &changes)
        );
    }
    let records = hook.accepted("/records");
    for r in &records {
        assert_eq!(header(r, "content-type"), "application/x-ndjson");
        assert_eq!(header(r, "x-wallaby-payload-mode"), "recordJson");
        assert_eq!(header(r, "x-wallaby-format"), "json");
        assert_eq!(header(r, "x-dedup").len(), 64);
        assert!(r.headers.get("authorization").is_none());
    }
    let keys: std::collections::HashSet<&str> =
        wire.iter().map(|r| header(r, "idempotency-key")).collect();
    assert_eq!(
        keys.len(),
        wire.len(),
        "distinct batches have distinct keys"
    );

    // Throughput (a debug-build test figure, not a benchmark): 20,000 narrow rows.
    let before = hook.accepted("/wire").len();
    let start = Instant::now();
    sql.batch_execute(
        "INSERT INTO t SELECT g, 'row ' || g, NULL FROM generate_series(1000, 20999) g",
    )
    .await
    .unwrap();
    wait_for("20,000 rows delivered", DEADLINE, async || {
        let rows: usize = hook.accepted("/wire")[before..]
            .iter()
            .map(|r| header(r, "x-wallaby-rows").parse::<usize>().unwrap())
            .sum();
        (rows >= 20_000).then_some(())
    })
    .await;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "http destination (debug build, arrow wire + recordJson side by side): 20000 rows in {secs:.2}s = {:.0} rows/s",
        20_000.0 / secs
    );

    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("s3cret"), "a Secret header value was logged");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_after_kill9_carries_the_same_idempotency_key() {
    let db = setup("http_redeliver").await;
    let (hook, base) = Hook::start().await;
    let dir = tempfile::tempdir().unwrap();
    let dest = [(
        "hook",
        format!("{{type: http, format: json, http: {{url: \"{base}/in\"}}}}"),
    )];
    // A long status interval: the slot is not told about the delivery before the kill.
    let slow = manifest(dir.path(), &db, "slow.yaml", "10m", &dest);
    let worker = Worker::spawn(&slow, dir.path());
    attach(&db).await;
    let start_lsn = db.slot(&db.name).await.unwrap().0;
    db.client()
        .await
        .batch_execute("INSERT INTO t SELECT g, 'x' || g, NULL FROM generate_series(1, 50) g")
        .await
        .unwrap();
    let first = wait_for("the first delivery", DEADLINE, async || {
        hook.accepted("/in").first().cloned()
    })
    .await;
    worker.kill9();
    let (confirmed, _) = db.slot(&db.name).await.unwrap();
    assert_eq!(
        confirmed, start_lsn,
        "the slot must not have moved past the undelivered-to-PostgreSQL confirmation"
    );

    let fast = manifest(dir.path(), &db, "fast.yaml", "1s", &dest);
    let worker = Worker::spawn(&fast, dir.path());
    let again = wait_for("the re-delivery", DEADLINE, async || {
        hook.accepted("/in").get(1).cloned()
    })
    .await;
    assert_eq!(
        header(&again, "idempotency-key"),
        header(&first, "idempotency-key"),
        "the re-delivered batch carries the same idempotency key"
    );
    assert_eq!(
        header(&again, "x-wallaby-lsn-range"),
        header(&first, "x-wallaby-lsn-range")
    );
    assert_eq!(again.body, first.body);
    // Once durable again, the slot moves past the changes.
    let last = parse_lsn(
        header(&first, "x-wallaby-lsn-range")
            .split('-')
            .nth(1)
            .unwrap(),
    );
    wait_for(
        "the slot to confirm the re-delivered batch",
        DEADLINE,
        async || {
            db.slot(&db.name)
                .await
                .filter(|(lsn, _)| parse_lsn(lsn) > last)
        },
    )
    .await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing_holds_the_slot_and_resumes() {
    let db = setup("http_outage").await;
    let (hook, base) = Hook::start().await;
    {
        let mut s = hook.state();
        s.queued.push_back(Fault::Hang);
        s.queued
            .push_back(Fault::Status(429, "slow down", Some("1")));
        s.queued.push_back(Fault::Status(408, "", None));
        s.failing = Some(Fault::Status(503, "maintenance", None));
    }
    let dir = tempfile::tempdir().unwrap();
    // spec.http.retry (not the defaults) is the policy the pipeline uses.
    let m = manifest(
        dir.path(),
        &db,
        "flow.yaml",
        "1s",
        &[(
            "hook",
            format!(
                "{{type: http, format: avro, http: {{url: \"{base}/in\", timeout: 1s, retry: {{maxRetries: 1000, backoffBase: 50ms, backoffMax: 200ms}}}}}}"
            ),
        )],
    );
    let worker = Worker::spawn(&m, dir.path());
    attach(&db).await;
    let sql = db.client().await;
    let before: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    sql.batch_execute(&format!(
        "INSERT INTO t SELECT g, 'x' || g, {BIG} FROM generate_series(1, 30) g;
         UPDATE t SET title = 'y' WHERE id % 2 = 0;
         DELETE FROM t WHERE id > 25;"
    ))
    .await
    .unwrap();
    wait_for("hang, 429, 408 and several 503s", DEADLINE, async || {
        (hook.state().attempts >= 8).then_some(())
    })
    .await;
    assert!(hook.accepted("/in").is_empty());
    let (confirmed, _) = db.slot(&db.name).await.unwrap();
    assert!(
        parse_lsn(&confirmed) <= parse_lsn(&before),
        "slot confirmed {confirmed} past what the endpoint holds (nothing after {before})"
    );
    hook.state().failing = None;
    let want = postgres_rows(&db).await;
    wait_for(
        "delivery to resume and match PostgreSQL",
        DEADLINE,
        async || (replay(&hook, "/in", WireFormat::Avro) == want).then_some(()),
    )
    .await;
    let after: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_for(
        "the slot to confirm the delivered changes",
        DEADLINE,
        async || {
            db.slot(&db.name)
                .await
                .filter(|(lsn, _)| parse_lsn(lsn) >= parse_lsn(&after))
        },
    )
    .await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("503 Service Unavailable"), "{log}");
    assert!(log.contains("no answer within the timeout"), "{log}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_permanent_and_the_flow_gives_up_with_the_endpoints_message() {
    let db = setup("http_reject").await;
    let (hook, base) = Hook::start().await;
    hook.state().failing = Some(Fault::Status(400, "unknown field \"big\"", None));
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        "flow.yaml",
        "1s",
        &[(
            "strict",
            format!("{{type: http, format: json, http: {{url: \"{base}/in\"}}}}"),
        )],
    );
    let worker = Worker::spawn(&m, dir.path());
    attach(&db).await;
    let start_lsn = db.slot(&db.name).await.unwrap().0;
    db.client()
        .await
        .batch_execute("INSERT INTO t VALUES (1, 'a', 'b')")
        .await
        .unwrap();
    let (code, log) = exit(worker).await;
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("strict"), "names the Destination: {log}");
    assert!(
        log.contains(&format!(
            "HTTP POST {base}/in (1 changes of public.t): the endpoint answered 400 Bad Request: unknown field \"big\" (permanent)"
        )),
        "{log}"
    );
    assert!(
        log.contains("hint: the endpoint rejected the payload"),
        "{log}"
    );
    assert_eq!(hook.state().attempts, 1, "a permanent error is not retried");
    assert_eq!(db.slot(&db.name).await.unwrap().0, start_lsn, "slot held");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_with_the_field_and_the_fix() {
    let db = setup("http_config").await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        "flow.yaml",
        "1s",
        &[
            (
                "badurl",
                "{type: http, http: {url: \"ftp://127.0.0.1:9/x\", payloadMode: wal}}".into(),
            ),
            (
                "nosecret",
                "{type: http, http: {url: \"http://127.0.0.1:9/x\", headersSecretRef: {name: missing}, headers: {\"bad header\": x}}}".into(),
            ),
        ],
    );
    let (code, log) = exit(Worker::spawn(&m, dir.path())).await;
    assert_ne!(code, Some(0), "{log}");
    for want in [
        "Destination/badurl spec.http.url \"ftp://127.0.0.1:9/x\" is not an absolute http:// or https:// URL",
        "Destination/nosecret spec.http.headersSecretRef: Secret \"missing\" not found",
        "WALLABY_SECRET_MISSING_AUTHORIZATION",
        "Destination/nosecret spec.http.headers.bad header: \"bad header\" is not a valid header name",
    ] {
        assert!(log.contains(want), "missing {want:?} in:\n{log}");
    }
    db.drop_all().await;
}
