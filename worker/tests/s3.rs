//! The `s3` destination against a real S3-compatible server that checks SigV4 signatures
//! (`s3s-fs`, installed by e2e/setup.sh; one server per test with its own port, data
//! directory and access key): read-back equals PostgreSQL (updates, deletes, TOAST) in
//! parquet and gzipped JSON, `partitionBy ts:day`, deterministic keys across a kill -9,
//! multipart uploads, an outage of the server, and bad configuration.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use common::{TestDb, Worker, parse_lsn, wait_for};
use wallaby_codec::{Change, Value, WireFormat};

const DEADLINE: Duration = Duration::from_secs(90);

/// One `s3s-fs` process with its own port, directory and access key.
struct S3Server {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    access_key: String,
    secret_key: String,
}

fn s3s_fs_binary() -> PathBuf {
    if let Ok(p) = std::env::var("S3S_FS") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let local = Path::new(&home).join(".cargo/bin/s3s-fs");
    if local.exists() {
        return local;
    }
    "s3s-fs".into()
}

impl S3Server {
    fn start(tag: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
            access_key: format!("AK{tag}{}", std::process::id()),
            secret_key: format!("secret-{tag}-{}", std::process::id()),
        };
        server.resume();
        server
    }

    /// (Re)starts the process on the same port and directory, and waits until it listens.
    fn resume(&mut self) {
        let child = Command::new(s3s_fs_binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--access-key",
                &self.access_key,
                "--secret-key",
                &self.secret_key,
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn s3s-fs (install it with e2e/setup.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn client(&self) -> Client {
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(self.endpoint())
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .credentials_provider(Credentials::new(
                &self.access_key,
                &self.secret_key,
                None,
                None,
                "test",
            ))
            .build();
        Client::from_conf(conf)
    }

    async fn create_bucket(&self, bucket: &str) {
        self.client()
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every object of a bucket: key → body.
async fn objects(client: &Client, bucket: &str) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(list) = client.list_objects_v2().bucket(bucket).send().await else {
        return out;
    };
    assert!(
        !list.is_truncated().unwrap_or(false),
        "test buckets stay small"
    );
    for o in list.contents() {
        let key = o.key().unwrap().to_owned();
        let body = client
            .get_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .unwrap()
            .body
            .collect()
            .await
            .unwrap()
            .into_bytes()
            .to_vec();
        out.insert(key, body);
    }
    out
}

/// Decodes one object (gunzipping `.gz`) into its changes.
fn decode(key: &str, body: &[u8]) -> Vec<Change> {
    let (format, bytes) = if let Some(k) = key.strip_suffix(".gz") {
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(body)
            .read_to_end(&mut text)
            .unwrap();
        (format_of(k), text)
    } else {
        (format_of(key), body.to_vec())
    };
    let (schema, changes) = common::decode_payload(format, &bytes);
    // Rendered back to PostgreSQL's text to compare with `::text` of the source.
    changes
        .into_iter()
        .map(|mut c| {
            for row in [c.before.as_mut(), c.after.as_mut()].into_iter().flatten() {
                for (i, v) in row.values.iter_mut().enumerate() {
                    if *v != Value::Null {
                        *v = Value::Text(wallaby_codec::text::render(&schema.columns[i].ty, v));
                    }
                }
            }
            c
        })
        .collect()
}

fn format_of(key: &str) -> WireFormat {
    match key.rsplit('.').next().unwrap() {
        "parquet" => WireFormat::Parquet,
        "jsonl" | "json" => WireFormat::Json,
        "arrow" => WireFormat::Arrow,
        "avro" => WireFormat::Avro,
        other => panic!("unexpected object {key} ({other})"),
    }
}

/// Table state after applying every change of the bucket in LSN order (deduplicated by
/// LSN: a re-delivered change counts once). Unchanged TOAST columns keep their value.
fn replay(
    objects: &BTreeMap<String, Vec<u8>>,
    prefix: &str,
) -> BTreeMap<String, Vec<Option<String>>> {
    let mut all: BTreeMap<u64, Change> = BTreeMap::new();
    for (key, body) in objects {
        if key.starts_with(prefix) && !key.contains("_messages/") {
            for c in decode(key, body) {
                all.insert(c.lsn, c);
            }
        }
    }
    let text = |v: &Value| match v {
        Value::Null => None,
        Value::Text(t) => Some(t.clone()),
        other => panic!("{other:?}"),
    };
    let mut rows: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for c in all.into_values() {
        match (c.before, c.after) {
            (_, Some(after)) => {
                let id = text(&after.values[0]).unwrap();
                let old = rows.get(&id).cloned();
                let new = after
                    .values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        if after.absent.contains(&i) {
                            old.as_ref().and_then(|o| o[i].clone())
                        } else {
                            text(v)
                        }
                    })
                    .collect();
                rows.insert(id, new);
            }
            (Some(before), None) => {
                rows.remove(&text(&before.values[0]).unwrap());
            }
            (None, None) => rows.clear(),
        }
    }
    rows
}

async fn pg_rows(
    sql: &tokio_postgres::Client,
    table: &str,
) -> BTreeMap<String, Vec<Option<String>>> {
    let q = format!("SELECT id::text, name, ts::text, big FROM {table} ORDER BY id");
    sql.query(&q, &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let id: String = r.get(0);
            (id.clone(), vec![Some(id), r.get(1), r.get(2), r.get(3)])
        })
        .collect()
}

/// A manifest with one Flow over `public.t` and the given S3 Destinations.
fn manifest(dir: &Path, db: &TestDb, flow_extra: &str, destinations: &[(&str, String)]) -> PathBuf {
    let names = destinations
        .iter()
        .map(|(n, _)| format!("{{name: {n}}}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!(
        r#"apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {{name: s3flow}}
spec:
  wireFormat: parquet
{flow_extra}
  source:
    postgres:
      secretRef: {{name: pg}}
      slot: {slot}
      publication: {slot}
      tables: ["public.t"]
      batchTimeout: 200ms
      statusInterval: 1s
  destinations: [{names}]
---
apiVersion: v1
kind: Secret
metadata: {{name: pg}}
stringData: {{dsn: "{dsn}"}}
"#,
        slot = db.name,
        dsn = db.dsn
    );
    for (name, spec) in destinations {
        text += &format!(
            "---\napiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {{name: {name}}}\n{spec}\n"
        );
    }
    let path = dir.join("flow.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A Destination spec (and its credentials Secret) writing to `server`.
fn s3_destination(
    server: &S3Server,
    name: &str,
    bucket: &str,
    s3_extra: &str,
    spec_extra: &str,
) -> String {
    format!(
        r#"spec:
  type: s3
{spec_extra}
  retry: {{maxRetries: 1000, backoffBase: 100ms, backoffMax: 500ms}}
  s3:
    bucket: {bucket}
    endpoint: "{endpoint}"
    forcePathStyle: true
    secretRef: {{name: {name}-creds}}
{s3_extra}
---
apiVersion: v1
kind: Secret
metadata: {{name: {name}-creds}}
stringData: {{accessKeyId: "{ak}", secretAccessKey: "{sk}"}}"#,
        endpoint = server.endpoint(),
        ak = server.access_key,
        sk = server.secret_key,
    )
}

async fn create_table(sql: &tokio_postgres::Client) {
    sql.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, name text, ts timestamptz, big text);
         ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL;",
    )
    .await
    .unwrap();
}

async fn attached(db: &TestDb) {
    db.attached().await;
}

async fn current_lsn(sql: &tokio_postgres::Client) -> u64 {
    let s: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    parse_lsn(&s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_and_gzipped_json_read_back_as_the_source_rows_partitioned_by_day() {
    let server = S3Server::start("rb");
    server.create_bucket("lake").await;
    let db = TestDb::create("s3rb").await;
    let sql = db.client().await;
    create_table(&sql).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        "",
        &[
            (
                "pq",
                s3_destination(
                    &server,
                    "pq",
                    "lake",
                    "    prefix: /cdc/pq/\n    partitionBy: [\"ts:day\"]",
                    "",
                ),
            ),
            (
                "js",
                s3_destination(
                    &server,
                    "js",
                    "lake",
                    "    prefix: cdc/js\n    compression: gzip",
                    "  format: json",
                ),
            ),
        ],
    );
    let worker = Worker::spawn(&m, dir.path());
    attached(&db).await;
    // A TOASTed value (stored out of line, uncompressed) that a later update leaves alone.
    let big: String = (0..400).map(|i| format!("{i:08x}")).collect();
    sql.batch_execute(&format!(
        "INSERT INTO t VALUES (1, 'ada', '2024-01-01 10:00+00', NULL), (2, 'bob', '2024-01-02 23:59:59+00', '{big}'), (3, 'cy', '2024-01-03 00:00+00', 'x');
         UPDATE t SET name = 'bob2' WHERE id = 2;
         UPDATE t SET name = 'ada2', ts = '2024-01-05 01:00+00' WHERE id = 1;
         DELETE FROM t WHERE id = 3;
         INSERT INTO t VALUES (4, NULL, NULL, 'nulls');"
    ))
    .await
    .unwrap();
    let want = pg_rows(&sql, "t").await;
    let client = server.client();
    for prefix in ["cdc/pq/", "cdc/js/"] {
        let got = wait_for(
            &format!("{prefix} objects equal the source"),
            DEADLINE,
            async || {
                let objs = objects(&client, "lake").await;
                let rows = replay(&objs, prefix);
                (rows == want).then_some(rows)
            },
        )
        .await;
        assert_eq!(got, want);
    }
    let objs = objects(&client, "lake").await;
    // Parquet objects sit in day partitions of the row's ts (UTC); the delete carries only
    // the key, so it lands in the NULL partition, as does the row with a NULL ts.
    let mut partitions = std::collections::BTreeSet::new();
    for (key, body) in objs.iter().filter(|(k, _)| k.starts_with("cdc/pq/")) {
        assert!(key.starts_with("cdc/pq/public/t/ts="), "{key}");
        assert!(key.ends_with(".parquet"), "{key}");
        let part = key["cdc/pq/public/t/ts=".len()..]
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        for c in decode(key, body) {
            let row = c.after.as_ref().or(c.before.as_ref()).unwrap();
            match &row.values[2] {
                Value::Text(ts) => assert!(ts.starts_with(&part), "{ts} in partition {part}"),
                Value::Null => assert_eq!(part, "__HIVE_DEFAULT_PARTITION__", "{key}"),
                other => panic!("{other:?}"),
            }
        }
        partitions.insert(part);
    }
    for day in [
        "2024-01-01",
        "2024-01-02",
        "2024-01-03",
        "2024-01-05",
        "__HIVE_DEFAULT_PARTITION__",
    ] {
        assert!(
            partitions.contains(day),
            "{day} missing from {partitions:?}"
        );
    }
    let json_keys: Vec<_> = objs.keys().filter(|k| k.starts_with("cdc/js/")).collect();
    assert!(
        json_keys
            .iter()
            .all(|k| k.starts_with("cdc/js/public/t/") && k.ends_with(".jsonl.gz")),
        "{json_keys:?}"
    );
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}

/// Keys of the objects under `prefix` with their LSN range (`FIRST-LAST` of the name).
fn lsn_ranges(objs: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    objs.keys()
        .map(|k| {
            k.rsplit('/')
                .next()
                .unwrap()
                .split("-v")
                .next()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_delivered_again_after_kill_9_overwrites_the_same_objects() {
    let server = S3Server::start("kill");
    server.create_bucket("redo").await;
    let db = TestDb::create("s3kill").await;
    let sql = db.client().await;
    create_table(&sql).await;
    let dir = tempfile::tempdir().unwrap();
    let dest = s3_destination(&server, "lake", "redo", "", "");
    // A long status interval: the slot is not confirmed before the kill.
    let m = manifest(dir.path(), &db, "", &[("lake", dest.clone())]);
    std::fs::write(
        &m,
        std::fs::read_to_string(&m)
            .unwrap()
            .replace("statusInterval: 1s", "statusInterval: 10m")
            .replace("batchTimeout: 200ms", "batchTimeout: 2s"),
    )
    .unwrap();
    let worker = Worker::spawn(&m, dir.path());
    attached(&db).await;
    let (confirmed_before, _) = db.slot(&db.name).await.unwrap();
    sql.batch_execute(
        "INSERT INTO t SELECT i, 'n' || i, '2024-01-01'::timestamptz + i * interval '1 hour', NULL FROM generate_series(1, 300) i",
    )
    .await
    .unwrap();
    let end = current_lsn(&sql).await;
    let client = server.client();
    let first = wait_for("the batch to be uploaded", DEADLINE, async || {
        let objs = objects(&client, "redo").await;
        (replay(&objs, "").len() == 300).then_some(objs)
    })
    .await;
    worker.kill9();
    let (confirmed, _) = db.slot(&db.name).await.unwrap();
    assert_eq!(
        confirmed, confirmed_before,
        "the slot did not move before the kill"
    );
    assert!(parse_lsn(&confirmed) < end);

    // The restarted worker delivers the same transaction again, as the same batch.
    let worker = Worker::spawn(&m, dir.path());
    let log = wait_for("the re-delivery", DEADLINE, async || {
        let log = worker.log_text();
        first
            .keys()
            .all(|k| log.contains(k.as_str()))
            .then_some(log)
    })
    .await;
    let (code, stop_log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}{stop_log}");
    let again = objects(&client, "redo").await;
    // The transaction's commit LSN, from the delivered changes (`end` above may include
    // WAL that tests running alongside wrote after the insert).
    let commit_lsn = again
        .iter()
        .flat_map(|(k, body)| decode(k, body))
        .map(|c| c.commit_lsn)
        .max()
        .unwrap();
    let (confirmed, _) = db.slot(&db.name).await.unwrap();
    assert!(
        parse_lsn(&confirmed) > commit_lsn,
        "the clean stop confirmed the batch: {confirmed} after commit {commit_lsn:X}"
    );
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>(),
        "same keys, no new objects"
    );
    let ranges = lsn_ranges(&again);
    let mut unique = ranges.clone();
    unique.dedup();
    assert_eq!(ranges, unique, "one object per LSN range");
    assert_eq!(replay(&again, "").len(), 300);
    db.drop_all().await;
}

/// Part size of the multipart test: the smallest S3 accepts for every part but the last
/// (s3s-fs, like AWS, answers `EntityTooSmall` below it at CompleteMultipartUpload).
const TEST_PART_BYTES: usize = 5 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_goes_up_in_parts_and_throughput_is_reported() {
    let server = S3Server::start("mp");
    server.create_bucket("big").await;
    let db = TestDb::create("s3mp").await;
    let sql = db.client().await;
    create_table(&sql).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        "",
        &[(
            "lake",
            s3_destination(&server, "lake", "big", "", "  format: json"),
        )],
    );
    std::fs::write(
        &m,
        std::fs::read_to_string(&m).unwrap().replace(
            "batchTimeout: 200ms",
            "batchTimeout: 1s\n      batchSize: 20000\n      batchMaxBytes: 67108864",
        ),
    )
    .unwrap();
    let part_bytes = TEST_PART_BYTES.to_string();
    let mut worker = Worker::spawn_with_env(
        &m,
        dir.path(),
        &[("WALLABY_S3_PART_BYTES", Path::new(&part_bytes))],
    );
    attached(&db).await;
    // ~600 bytes of JSON per row: one object of ~12 MiB, three 5 MiB parts.
    let rows = 20_000;
    let started = Instant::now();
    sql.batch_execute(&format!(
        "INSERT INTO t SELECT i, md5(i::text) || md5((i+1)::text), now(), repeat(md5(i::text), 8) FROM generate_series(1, {rows}) i"
    ))
    .await
    .unwrap();
    let want = pg_rows(&sql, "t").await;
    assert_eq!(want.len(), rows);
    let client = server.client();
    let objs = wait_for("every row in the bucket", DEADLINE, async || {
        // A worker that gave up fails the test now, with its log, not at the deadline.
        if let Some(status) = worker.child.try_wait().unwrap() {
            panic!("the worker exited ({status}): {}", worker.log_text());
        }
        let objs = objects(&client, "big").await;
        (replay(&objs, "").len() == rows).then_some(objs)
    })
    .await;
    let elapsed = started.elapsed();
    let bytes: usize = objs.values().map(Vec::len).sum();
    println!(
        "s3 (debug build, test workload, json, s3s-fs on localhost): {rows} rows, {:.1} MiB in {:.2}s = {:.0} rows/s, {:.2} MiB/s",
        bytes as f64 / 1048576.0,
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64(),
        bytes as f64 / 1048576.0 / elapsed.as_secs_f64()
    );
    assert_eq!(
        replay(&objs, ""),
        want,
        "the bucket holds PostgreSQL's rows"
    );
    // The transaction is one batch, hence one object, uploaded in parts: its ETag has the
    // multipart form `"<md5 of the part md5s>-<parts>"`.
    assert_eq!(objs.len(), 1, "{:?}", objs.keys().collect::<Vec<_>>());
    let (key, body) = objs.iter().next().unwrap();
    let head = client
        .head_object()
        .bucket("big")
        .key(key)
        .send()
        .await
        .unwrap();
    let e_tag = head.e_tag().unwrap().trim_matches('"').to_owned();
    let (md5, parts) = e_tag
        .split_once('-')
        .unwrap_or_else(|| panic!("{key}: ETag {e_tag:?} is not a multipart ETag"));
    assert_eq!(md5.len(), 32, "{e_tag}");
    let parts: usize = parts.parse().unwrap();
    assert!(parts >= 2, "{key} went up in {parts} part(s)");
    assert_eq!(parts, body.len().div_ceil(TEST_PART_BYTES), "{e_tag}");
    assert_eq!(head.content_length(), Some(body.len() as i64));
    let log = worker.log_text();
    assert!(log.contains("multipart upload complete"), "{log}");
    assert!(log.contains(&e_tag), "the worker logs the ETag: {log}");
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing_holds_the_slot_and_resumes() {
    let mut server = S3Server::start("out");
    server.create_bucket("flaky").await;
    let db = TestDb::create("s3out").await;
    let sql = db.client().await;
    create_table(&sql).await;
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        "  giveUpPolicy: never",
        &[("lake", s3_destination(&server, "lake", "flaky", "", ""))],
    );
    let worker = Worker::spawn(&m, dir.path());
    attached(&db).await;
    sql.batch_execute("INSERT INTO t SELECT i, 'a', now(), NULL FROM generate_series(1, 50) i")
        .await
        .unwrap();
    let client = server.client();
    wait_for("the first rows", DEADLINE, async || {
        (replay(&objects(&client, "flaky").await, "").len() == 50).then_some(())
    })
    .await;
    server.stop();
    let before_outage = current_lsn(&sql).await;
    for i in 0..5 {
        sql.batch_execute(&format!(
            "INSERT INTO t SELECT i, 'b', now(), NULL FROM generate_series({}, {}) i",
            100 + i * 10,
            109 + i * 10
        ))
        .await
        .unwrap();
    }
    sql.batch_execute("UPDATE t SET name = 'c' WHERE id <= 10; DELETE FROM t WHERE id > 140")
        .await
        .unwrap();
    let end = current_lsn(&sql).await;
    wait_for(
        "failed attempts while the server is down",
        DEADLINE,
        async || {
            worker
                .log_text()
                .contains("cannot reach the store")
                .then_some(())
        },
    )
    .await;
    // Several status intervals pass with the server down: the slot stays put.
    let down_since = Instant::now();
    while down_since.elapsed() < Duration::from_secs(3) {
        let (confirmed, active) = db.slot(&db.name).await.unwrap();
        assert!(active);
        assert!(
            parse_lsn(&confirmed) <= before_outage,
            "slot confirmed {confirmed} past what S3 holds"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.resume();
    let want = pg_rows(&sql, "t").await;
    wait_for("delivery to resume and catch up", DEADLINE, async || {
        (replay(&objects(&client, "flaky").await, "") == want).then_some(())
    })
    .await;
    wait_for("the slot to confirm the backlog", DEADLINE, async || {
        let (confirmed, _) = db.slot(&db.name).await?;
        (parse_lsn(&confirmed) >= end).then_some(())
    })
    .await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}

/// Runs the worker until it exits by itself and returns its log.
async fn run_to_failure(m: &Path, dir: &Path, db: &TestDb) -> String {
    let mut worker = Worker::spawn(m, dir);
    attached(db).await;
    db.client()
        .await
        .batch_execute("INSERT INTO t SELECT coalesce(max(id), 0) + 1, 'a', now(), NULL FROM t")
        .await
        .unwrap();
    let deadline = Instant::now() + DEADLINE;
    let code = loop {
        if let Some(code) = worker.child.try_wait().unwrap() {
            break code;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not give up: {}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(code.code(), Some(0));
    worker.log_text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_fails_with_a_precise_error() {
    let server = S3Server::start("bad");
    server.create_bucket("exists").await;
    let db = TestDb::create("s3bad").await;
    create_table(&db.client().await).await;
    let dir = tempfile::tempdir().unwrap();

    // An unknown bucket.
    let m = manifest(
        dir.path(),
        &db,
        "",
        &[(
            "lake",
            s3_destination(&server, "lake", "no-such-bucket", "", ""),
        )],
    );
    let log = run_to_failure(&m, dir.path(), &db).await;
    assert!(log.contains("Destination/lake"), "{log}");
    assert!(log.contains("HeadBucket s3://no-such-bucket/"), "{log}");
    assert!(
        log.contains("does not exist: create it, or fix spec.s3.bucket"),
        "{log}"
    );
    assert!(log.contains("(permanent)"), "{log}");

    // A wrong secret key: the server checks the signature.
    let wrong = s3_destination(&server, "lake", "exists", "", "").replace(
        &format!("secretAccessKey: \"{}\"", server.secret_key),
        "secretAccessKey: \"wrong\"",
    );
    let m = manifest(dir.path(), &db, "", &[("lake", wrong)]);
    let log = run_to_failure(&m, dir.path(), &db).await;
    assert!(log.contains("Destination/lake"), "{log}");
    assert!(log.contains("signature was rejected"), "{log}");
    assert!(log.contains("secretAccessKey"), "{log}");
    assert!(log.contains("(permanent)"), "{log}");

    // Refused before connecting: a malformed partitionBy, gzip on parquet, a missing key.
    let bad = s3_destination(
        &server,
        "lake",
        "exists",
        "    partitionBy: [\"ts:week\"]\n    compression: gzip",
        "",
    )
    .replace(&format!("secretAccessKey: \"{}\", ", server.secret_key), "")
    .replace(&format!(", secretAccessKey: \"{}\"", server.secret_key), "");
    let m = manifest(dir.path(), &db, "", &[("lake", bad)]);
    let out = Command::new(env!("CARGO_BIN_EXE_wallaby-worker"))
        .args(["validate", "-f"])
        .arg(&m)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("Destination/lake spec.s3.partitionBy"),
        "{text}"
    );
    assert!(
        text.contains("Destination/lake spec.s3.compression"),
        "{text}"
    );
    assert!(text.contains("secretAccessKey"), "{text}");
    db.drop_all().await;
}

/// A snapshot's rows all carry the slot's consistent point as their LSN: every batch of
/// them must still become objects of their own, not overwrite one another. Without
/// `partitionBy` the copy workers encode the objects' payloads themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_many_batches_keeps_every_row() {
    let log = snapshot_keeps_every_row("s3snap", "").await;
    assert!(log.contains("encoded_by_copy_workers=true"), "{log}");
}

/// The same with `partitionBy`: the destination splits and encodes the rows itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_snapshot_of_many_batches_keeps_every_row() {
    let log = snapshot_keeps_every_row("s3snappart", "    partitionBy: [\"ts:day\"]").await;
    assert!(log.contains("encoded_by_copy_workers=false"), "{log}");
}

/// Snapshots 3,000 rows in batches of 100 into an s3 destination (`s3_extra` added to
/// its `s3` block), checks that every row is in the bucket, and returns the worker's log.
async fn snapshot_keeps_every_row(name: &str, s3_extra: &str) -> String {
    let server = S3Server::start(name);
    server.create_bucket("lake").await;
    let db = TestDb::create(name).await;
    let sql = db.client().await;
    create_table(&sql).await;
    sql.batch_execute(
        "INSERT INTO t SELECT g, 'n' || g, now(), NULL FROM generate_series(1, 3000) g",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(
        dir.path(),
        &db,
        "  snapshot: {initial: true, workers: 2, partitionCount: 4, batchSize: 100}",
        &[("pq", s3_destination(&server, "pq", "lake", s3_extra, ""))],
    );
    let worker = Worker::spawn(&m, dir.path());
    let client = server.client();
    let ids = wait_for("every snapshot row in the bucket", DEADLINE, async || {
        let mut ids: Vec<String> = objects(&client, "lake")
            .await
            .iter()
            .flat_map(|(k, body)| decode(k, body))
            .filter(|c| c.op == wallaby_codec::Op::Read)
            .filter_map(|c| match &c.after.as_ref()?.values[0] {
                Value::Text(id) => Some(id.clone()),
                _ => None,
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        (ids.len() == 3000).then_some(ids)
    })
    .await;
    assert_eq!(ids.len(), 3000);
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
    log
}
