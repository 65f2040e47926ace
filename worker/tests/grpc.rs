//! The `grpc` destination against an `IngestService` server inside the test (tonic, the
//! messages of worker/destinations/proto/ingest.proto) that records calls and fails on demand:
//! read-back equals PostgreSQL (inserts, updates, deletes, unchanged TOAST) with metadata
//! and request fields, retryable status codes lose nothing and hold the slot,
//! INVALID_ARGUMENT gives up at once, and an unreachable endpoint fails with its address.
//! TLS with certificates generated at test time (rcgen): a private CA from `tls.ca`, a
//! server that requires client certificates (mutual TLS), and a CA that did not sign the
//! server's certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestDb, Worker, parse_lsn, wait_for};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::metadata::MetadataMap;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Code, Status};
use wallaby_codec::{Change, TableSchema, WireFormat};
use wallaby_destinations::grpc::{IngestBatchRequest, IngestBatchResponse};

const DEADLINE: Duration = Duration::from_secs(60);

/// 400 md5 digests: 12,800 bytes of incompressible text, stored out of line.
const BIG: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i)";

#[derive(Default)]
struct IngestState {
    /// Calls answered OK, in arrival order.
    accepted: Vec<(MetadataMap, IngestBatchRequest)>,
    /// Every call that arrived.
    attempts: usize,
    /// Status codes for the next calls, one each.
    queued: VecDeque<Code>,
    /// Status for every call while set (an outage).
    failing: Option<Code>,
    /// Largest request the server decodes (tonic's default, 4 MiB, when `None`).
    max_request: Option<usize>,
}

/// The in-test `IngestService`.
#[derive(Clone, Default)]
struct Ingest(Arc<Mutex<IngestState>>);

impl Ingest {
    async fn start() -> (Self, String) {
        Self::start_with(None).await
    }

    /// A server speaking TLS with `tls` (plain text when `None`).
    async fn start_with(tls: Option<ServerTlsConfig>) -> (Self, String) {
        let ingest = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = ingest.clone();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).unwrap();
        }
        tokio::spawn(async move {
            builder
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        (ingest, addr.to_string())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, IngestState> {
        self.0.lock().unwrap()
    }

    fn accepted(&self) -> Vec<(MetadataMap, IngestBatchRequest)> {
        self.state().accepted.clone()
    }
}

impl tonic::server::NamedService for Ingest {
    const NAME: &'static str = "wallaby.ingest.v1.IngestService";
}

/// The unary handler: records the call or answers the queued fault.
struct IngestBatch(Ingest);

impl tonic::server::UnaryService<IngestBatchRequest> for IngestBatch {
    type Response = IngestBatchResponse;
    type Future = BoxFuture<tonic::Response<IngestBatchResponse>, Status>;

    fn call(&mut self, request: tonic::Request<IngestBatchRequest>) -> Self::Future {
        let ingest = self.0.clone();
        Box::pin(async move {
            let mut s = ingest.state();
            s.attempts += 1;
            if let Some(code) = s.queued.pop_front().or(s.failing) {
                return Err(Status::new(code, format!("injected {code:?}")));
            }
            let metadata = request.metadata().clone();
            let message = request.into_inner();
            let accepted = u64::from(message.record_count);
            s.accepted.push((metadata, message));
            Ok(tonic::Response::new(IngestBatchResponse { accepted }))
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for Ingest {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        assert_eq!(
            request.uri().path(),
            wallaby_destinations::grpc::INGEST_BATCH_PATH
        );
        let handler = IngestBatch(self.clone());
        let max_request = self.state().max_request;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                IngestBatchResponse,
                IngestBatchRequest,
            >::default());
            if let Some(limit) = max_request {
                grpc = grpc.max_decoding_message_size(limit);
            }
            Ok(grpc.unary(handler, request).await)
        })
    }
}

/// A CA and what it signs, all PEM.
struct TestCa {
    cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate and its PKCS#8 key.
struct Leaf {
    cert_pem: String,
    key_pem: String,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert_pem = params.self_signed(&key).unwrap().pem();
        Self {
            cert_pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn leaf(&self, names: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        params.extended_key_usages = vec![usage];
        Leaf {
            cert_pem: params.signed_by(&key, &self.issuer).unwrap().pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    fn server(&self) -> Leaf {
        self.leaf(
            &["127.0.0.1", "localhost"],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self) -> Leaf {
        self.leaf(
            &["wallaby-worker"],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

/// Server TLS with `server`'s certificate; with `client_ca`, client certificates issued by
/// it are required.
fn server_tls(server: &Leaf, client_ca: Option<&TestCa>) -> ServerTlsConfig {
    let mut tls =
        ServerTlsConfig::new().identity(Identity::from_pem(&server.cert_pem, &server.key_pem));
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(&ca.cert_pem));
    }
    tls
}

/// A `kind: Secret` document with PEM values (JSON strings are valid YAML).
fn pem_secret(name: &str, data: &[(&str, &str)]) -> String {
    let data: BTreeMap<&str, &str> = data.iter().copied().collect();
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\nstringData: {}\n",
        serde_json::to_string(&data).unwrap()
    )
}

/// Appends documents to a manifest.
fn append(path: &Path, text: &str) {
    let mut all = std::fs::read_to_string(path).unwrap();
    all += text;
    std::fs::write(path, all).unwrap();
}

fn manifest(dir: &Path, db: &TestDb, dests: &[(&str, String)]) -> PathBuf {
    let names: Vec<String> = dests
        .iter()
        .map(|(n, _)| format!("{{name: {n}}}"))
        .collect();
    let mut text = format!(
        r#"apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {{name: ingest, namespace: team}}
spec:
  source:
    postgres:
      secretRef: {{name: pg}}
      slot: {slot}
      publication: {slot}
      tables: ["public.t"]
      batchTimeout: 50ms
      statusInterval: 1s
  destinations: [{names}]
---
apiVersion: v1
kind: Secret
metadata: {{name: pg}}
stringData: {{dsn: "{dsn}"}}
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
    let path = dir.join("flow.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn setup(prefix: &str) -> TestDb {
    common::toast_table_db(prefix).await
}

async fn attach(db: &TestDb) {
    db.attached().await;
}

fn decode(format: WireFormat, body: &[u8]) -> (TableSchema, Vec<Change>) {
    common::decode_payload(format, body)
}

type Rows = common::TextRows;

/// Applies every accepted call's changes in order; an absent (unchanged TOAST) value keeps
/// the previous one.
fn replay(ingest: &Ingest) -> Rows {
    let mut rows = Rows::new();
    for (_, m) in ingest.accepted() {
        if m.format == "pgoutput" {
            common::apply_pgoutput(&m.payload, &mut rows);
            continue;
        }
        let format = match m.format.as_str() {
            "proto" => WireFormat::Proto,
            "json" => WireFormat::Json,
            other => panic!("unexpected format {other}"),
        };
        let (schema, changes) = decode(format, &m.payload);
        common::apply_changes(&schema, changes, &mut rows);
    }
    rows
}

async fn postgres_rows(db: &TestDb) -> Rows {
    common::toast_table_rows(db).await
}

async fn exit(worker: Worker) -> (Option<i32>, String) {
    worker.exit_by_itself().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_decode_back_to_the_postgres_rows_with_metadata_and_fields() {
    let db = setup("grpc_readback").await;
    let (ingest, addr) = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        &[(
            "sink",
            format!(
                "{{type: grpc, format: proto, grpc: {{endpoint: \"{addr}\", headers: {{authorization: Bearer tkn}}}}}}"
            ),
        )],
    );
    let worker = Worker::spawn(&m, dir.path());
    attach(&db).await;
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO t SELECT g, 'title ' || g, {BIG} FROM generate_series(1, 20) g;
             UPDATE t SET title = 'renamed' WHERE id <= 5;
             UPDATE t SET big = 'small now', title = NULL WHERE id = 6;
             DELETE FROM t WHERE id BETWEEN 15 AND 17;
             INSERT INTO t VALUES (100, 'ünï', NULL);"
        ))
        .await
        .unwrap();
    let want = postgres_rows(&db).await;
    wait_for(
        "the server's rows to match PostgreSQL",
        DEADLINE,
        async || (replay(&ingest) == want).then_some(()),
    )
    .await;
    for (metadata, m) in ingest.accepted() {
        assert_eq!(metadata.get("x-wallaby-payload-mode").unwrap(), "wire");
        assert_eq!(metadata.get("authorization").unwrap(), "Bearer tkn");
        assert_eq!(m.flow_id, "team/ingest");
        assert_eq!(m.destination, "sink");
        assert_eq!(m.table, "public.t");
        assert_eq!(m.kind, "changes");
        assert_eq!(m.content_type, "application/x-protobuf");
        let (schema, changes) = decode(WireFormat::Proto, &m.payload);
        assert_eq!(m.record_count as usize, changes.len());
        assert_eq!(m.schema_version, schema.version);
        assert_eq!(m.first_lsn, changes.first().unwrap().lsn);
        assert_eq!(m.last_lsn, changes.last().unwrap().lsn);
        assert_eq!(
            m.idempotency_key,
            wallaby_destinations::idempotency::changes_key(&schema, &changes)
        );
    }
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("Bearer tkn"), "a header value was logged");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_mode_wal_sends_pgoutput_that_replays_to_the_postgres_rows() {
    let db = setup("grpc_wal").await;
    let (ingest, addr) = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        &[(
            "sink",
            format!("{{type: grpc, grpc: {{endpoint: \"{addr}\", payloadMode: wal}}}}"),
        )],
    );
    let worker = Worker::spawn(&m, dir.path());
    attach(&db).await;
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO t SELECT g, 'title ' || g, {BIG} FROM generate_series(1, 20) g;
             UPDATE t SET title = 'renamed' WHERE id <= 5;
             UPDATE t SET big = 'small now', title = NULL WHERE id = 6;
             DELETE FROM t WHERE id BETWEEN 15 AND 17;"
        ))
        .await
        .unwrap();
    let want = postgres_rows(&db).await;
    wait_for(
        "the pgoutput replay to match PostgreSQL",
        DEADLINE,
        async || (replay(&ingest) == want).then_some(()),
    )
    .await;
    for (metadata, m) in ingest.accepted() {
        assert_eq!(metadata.get("x-wallaby-payload-mode").unwrap(), "wal");
        assert_eq!(m.format, "pgoutput");
        assert_eq!(m.content_type, "application/vnd.wallaby.pgoutput");
    }
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_above_max_message_bytes_are_split_under_the_servers_limit() {
    let db = setup("grpc_split").await;
    let (ingest, addr) = Ingest::start().await;
    ingest.state().max_request = Some(64 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        &[(
            "sink",
            format!(
                "{{type: grpc, format: json, grpc: {{endpoint: \"{addr}\", maxMessageBytes: 65536}}}}"
            ),
        )],
    );
    let worker = Worker::spawn(&m, dir.path());
    attach(&db).await;
    // One transaction, one batch: 40 rows of ~12.8 KB TOASTed text, about 550 KB of JSON.
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO t SELECT g, 'title ' || g, {BIG} FROM generate_series(1, 40) g"
        ))
        .await
        .unwrap();
    let want = postgres_rows(&db).await;
    wait_for(
        "the split calls to add up to PostgreSQL's rows",
        DEADLINE,
        async || (replay(&ingest) == want).then_some(()),
    )
    .await;
    let calls = ingest.accepted();
    assert!(calls.len() >= 9, "{} calls for ~550 KB", calls.len());
    let mut next_lsn = 0;
    for (_, m) in &calls {
        let (schema, changes) = decode(WireFormat::Json, &m.payload);
        assert!(m.payload.len() < 64 * 1024, "{} bytes", m.payload.len());
        assert!(m.first_lsn > next_lsn, "calls in commit order");
        next_lsn = m.last_lsn;
        assert_eq!(
            m.idempotency_key,
            wallaby_destinations::idempotency::changes_key(&schema, &changes),
            "each call's key covers exactly its changes"
        );
    }
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");

    // The server's limit below maxMessageBytes: refused, with the fix in the hint.
    let db2 = setup("grpc_toolarge").await;
    let (ingest2, addr2) = Ingest::start().await;
    ingest2.state().max_request = Some(64 * 1024);
    let m = manifest(
        dir.path(),
        &db2,
        &[(
            "sink",
            format!("{{type: grpc, format: json, grpc: {{endpoint: \"{addr2}\"}}}}"),
        )],
    );
    let worker = Worker::spawn(&m, dir.path());
    attach(&db2).await;
    db2.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO t SELECT g, 'title ' || g, {BIG} FROM generate_series(1, 40) g"
        ))
        .await
        .unwrap();
    let (code, log) = exit(worker).await;
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("message length too large"), "{log}");
    assert!(
        log.contains(
            "the server's maximum receive message size is below spec.grpc.maxMessageBytes"
        ),
        "{log}"
    );
    db.drop_all().await;
    db2.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_codes_lose_nothing_hold_the_slot_and_resume() {
    let db = setup("grpc_outage").await;
    let (ingest, addr) = Ingest::start().await;
    {
        let mut s = ingest.state();
        s.queued.extend([
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
        ]);
        s.failing = Some(Code::Unavailable);
    }
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        &[(
            "sink",
            format!(
                "{{type: grpc, grpc: {{endpoint: \"{addr}\", payloadMode: recordJson, retry: {{maxRetries: 1000, backoffBase: 50ms, backoffMax: 200ms}}}}}}"
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
    wait_for("several failed calls", DEADLINE, async || {
        (ingest.state().attempts >= 6).then_some(())
    })
    .await;
    assert!(ingest.accepted().is_empty());
    let (confirmed, _) = db.slot(&db.name).await.unwrap();
    assert!(
        parse_lsn(&confirmed) <= parse_lsn(&before),
        "slot confirmed {confirmed} past what the server holds (nothing after {before})"
    );
    ingest.state().failing = None;
    let want = postgres_rows(&db).await;
    wait_for(
        "delivery to resume and match PostgreSQL",
        DEADLINE,
        async || (replay(&ingest) == want).then_some(()),
    )
    .await;
    for (metadata, m) in ingest.accepted() {
        assert_eq!(
            metadata.get("x-wallaby-payload-mode").unwrap(),
            "recordJson"
        );
        assert_eq!(m.format, "json");
    }
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
    assert!(
        log.contains("status Unavailable: injected Unavailable"),
        "{log}"
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_is_permanent_and_the_flow_gives_up() {
    let db = setup("grpc_reject").await;
    let (ingest, addr) = Ingest::start().await;
    ingest.state().failing = Some(Code::InvalidArgument);
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        &[(
            "strict",
            format!("{{type: grpc, grpc: {{endpoint: \"{addr}\"}}}}"),
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
            "gRPC IngestBatch to http://{addr} (1 changes of public.t): status InvalidArgument: injected InvalidArgument (permanent)"
        )),
        "{log}"
    );
    assert_eq!(
        ingest.state().attempts,
        1,
        "a permanent error is not retried"
    );
    assert_eq!(db.slot(&db.name).await.unwrap().0, start_lsn, "slot held");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_retried_then_reported_and_a_bad_one_refused() {
    let db = setup("grpc_endpoint").await;
    // A port nothing listens on: bind, read the port, close.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        &[(
            "gone",
            format!(
                "{{type: grpc, grpc: {{endpoint: \"{closed}\", timeout: 2s, retry: {{maxRetries: 2, backoffBase: 50ms, backoffMax: 100ms}}}}}}"
            ),
        )],
    );
    let worker = Worker::spawn(&m, dir.path());
    attach(&db).await;
    db.client()
        .await
        .batch_execute("INSERT INTO t VALUES (1, 'a', 'b')")
        .await
        .unwrap();
    let (code, log) = exit(worker).await;
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains(&format!(
            "gRPC IngestBatch to http://{closed} (1 changes of public.t): status Unavailable: tcp connect error (transient); hint: the server is unreachable"
        )),
        "{log}"
    );
    assert!(
        log.contains("destination \"gone\" gave up after 3 attempt(s)"),
        "retried maxRetries times, then gave up: {log}"
    );

    let bad = manifest(
        dir.path(),
        &db,
        &[(
            "noport",
            "{type: grpc, grpc: {endpoint: \"ingest.example\"}}".into(),
        )],
    );
    let (code, log) = exit(Worker::spawn(&bad, dir.path())).await;
    assert_ne!(code, Some(0), "{log}");
    let want =
        "Destination/noport spec.grpc.endpoint \"ingest.example\": it has no port; write host:port";
    assert!(log.contains(want), "missing {want:?} in:\n{log}");
    db.drop_all().await;
}

/// A `grpc` Destination spec over TLS to `addr`, with `tls` (flow-style YAML).
fn tls_destination(addr: &str, tls: &str) -> String {
    format!(
        "{{type: grpc, format: proto, grpc: {{endpoint: \"{addr}\", insecure: false, tls: {tls}, retry: {{maxRetries: 2, backoffBase: 50ms, backoffMax: 100ms}}}}}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_from_tls_ca_verifies_the_server_and_rows_arrive() {
    let db = setup("grpc_tls_ca").await;
    let ca = TestCa::new("wallaby test CA");
    let (ingest, addr) = Ingest::start_with(Some(server_tls(&ca.server(), None))).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        &[(
            "secure",
            tls_destination(&addr, "{ca: {name: ingest-tls, key: ca.pem}}"),
        )],
    );
    append(&m, &pem_secret("ingest-tls", &[("ca.pem", &ca.cert_pem)]));
    let worker = Worker::spawn(&m, dir.path());
    attach(&db).await;
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO t SELECT g, 'tls ' || g, {BIG} FROM generate_series(1, 10) g;
             UPDATE t SET title = 'changed' WHERE id <= 3;
             DELETE FROM t WHERE id = 10;"
        ))
        .await
        .unwrap();
    let want = postgres_rows(&db).await;
    wait_for(
        "the TLS server's rows to match PostgreSQL",
        DEADLINE,
        async || (replay(&ingest) == want).then_some(()),
    )
    .await;
    assert_eq!(replay(&ingest), want);
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        !log.contains("PRIVATE KEY") && !log.contains("BEGIN CERTIFICATE"),
        "PEM material was logged: {log}"
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_requiring_client_certificates_refuses_without_one_and_accepts_with_it() {
    let db = setup("grpc_mtls").await;
    let server_ca = TestCa::new("wallaby server CA");
    let client_ca = TestCa::new("wallaby client CA");
    let (ingest, addr) =
        Ingest::start_with(Some(server_tls(&server_ca.server(), Some(&client_ca)))).await;
    let client = client_ca.client();
    let secret = pem_secret(
        "ingest-mtls",
        &[
            ("ca.pem", &server_ca.cert_pem),
            ("tls.crt", &client.cert_pem),
            ("tls.key", &client.key_pem),
        ],
    );
    let dir = tempfile::tempdir().unwrap();

    // Without a client certificate: the handshake is refused, a permanent error.
    let m = manifest(
        dir.path(),
        &db,
        &[(
            "mtls",
            tls_destination(&addr, "{ca: {name: ingest-mtls, key: ca.pem}}"),
        )],
    );
    append(&m, &secret);
    let worker = Worker::spawn(&m, dir.path());
    attach(&db).await;
    let start_lsn = db.slot(&db.name).await.unwrap().0;
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO t SELECT g, 'm ' || g, {BIG} FROM generate_series(1, 5) g"
        ))
        .await
        .unwrap();
    let (code, log) = exit(worker).await;
    assert_ne!(code, Some(0), "{log}");
    for want in [
        &format!(
            "gRPC IngestBatch to https://{addr} (5 changes of public.t): TLS handshake refused by the server: alert CertificateRequired (no client certificate was offered) (permanent)"
        ),
        "hint: the server requires mutual TLS: set spec.grpc.tls.clientCert and spec.grpc.tls.clientKey",
        "destination \"mtls\" gave up after 1 attempt(s)",
    ] {
        assert!(log.contains(want), "missing {want:?} in:\n{log}");
    }
    assert!(ingest.accepted().is_empty());
    assert_eq!(db.slot(&db.name).await.unwrap().0, start_lsn, "slot held");

    // With the client certificate the held changes are delivered.
    let m = manifest(
        dir.path(),
        &db,
        &[(
            "mtls",
            tls_destination(
                &addr,
                "{ca: {name: ingest-mtls, key: ca.pem}, clientCert: {name: ingest-mtls, key: tls.crt}, clientKey: {name: ingest-mtls, key: tls.key}}",
            ),
        )],
    );
    append(&m, &secret);
    let worker = Worker::spawn(&m, dir.path());
    let want = postgres_rows(&db).await;
    assert_eq!(want.len(), 5);
    wait_for(
        "the mTLS server's rows to match PostgreSQL",
        DEADLINE,
        async || (replay(&ingest) == want).then_some(()),
    )
    .await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("PRIVATE KEY"), "the client key was logged");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_did_not_sign_the_server_certificate_fails_verification() {
    let db = setup("grpc_wrong_ca").await;
    let real = TestCa::new("wallaby real CA");
    let other = TestCa::new("wallaby other CA");
    let (ingest, addr) = Ingest::start_with(Some(server_tls(&real.server(), None))).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        &[(
            "wrongca",
            tls_destination(&addr, "{ca: {name: other-ca, key: ca.pem}}"),
        )],
    );
    append(&m, &pem_secret("other-ca", &[("ca.pem", &other.cert_pem)]));
    let worker = Worker::spawn(&m, dir.path());
    attach(&db).await;
    db.client()
        .await
        .batch_execute("INSERT INTO t VALUES (1, 'a', 'b')")
        .await
        .unwrap();
    let (code, log) = exit(worker).await;
    assert_ne!(code, Some(0), "{log}");
    for want in [
        &format!(
            "gRPC IngestBatch to https://{addr} (1 changes of public.t): TLS certificate verification of the server failed: UnknownIssuer (permanent)"
        ),
        "hint: the server's certificate is not issued by the CA of spec.grpc.tls.ca",
        "destination \"wrongca\" gave up after 1 attempt(s)",
    ] {
        assert!(log.contains(want), "missing {want:?} in:\n{log}");
    }
    assert!(ingest.accepted().is_empty());
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_options_are_checked_when_the_manifest_is_loaded() {
    let db = setup("grpc_tls_validate").await;
    let ca = TestCa::new("wallaby test CA");
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        &[
            (
                "certonly",
                tls_destination("h:1", "{clientCert: {name: pems, key: tls.crt}}"),
            ),
            (
                "keyonly",
                tls_destination("h:1", "{clientKey: {name: pems, key: tls.key}}"),
            ),
            (
                "plain",
                "{type: grpc, grpc: {endpoint: \"h:1\", tls: {ca: {name: pems, key: ca.pem}}}}"
                    .into(),
            ),
            (
                "nokey",
                tls_destination("h:1", "{ca: {name: pems, key: missing.pem}}"),
            ),
            (
                "notpem",
                tls_destination("h:1", "{ca: {name: pems, key: junk}}"),
            ),
        ],
    );
    append(
        &m,
        &pem_secret(
            "pems",
            &[("ca.pem", &ca.cert_pem), ("junk", "not a certificate")],
        ),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallaby-worker"))
        .args(["validate", "-f"])
        .arg(&m)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    for want in [
        "Destination/certonly spec.grpc.tls: clientCert is set without clientKey",
        "Destination/keyonly spec.grpc.tls: clientKey is set without clientCert",
        "Destination/plain spec.grpc.tls: ca, clientCert and clientKey need TLS, but \"h:1\" is reached in plain text (insecure: true is the default): set insecure: false",
        "Destination/nokey spec.grpc.tls.ca: key \"missing.pem\" of Secret \"pems\" not found",
        "Destination/notpem spec.grpc.tls: tls.ca: the Secret key holds no PEM certificate",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    db.drop_all().await;
}
