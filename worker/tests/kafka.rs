//! The Kafka destination against librdkafka's in-process mock cluster (a Kafka-protocol
//! broker) and the real PostgreSQL: read-back equals the source rows (inserts, updates,
//! deletes, unchanged TOAST), topic templates, keys, headers, compression, size limits,
//! a broker outage (nothing lost, the slot never passes what was acknowledged) and bad
//! configuration. The worker runs in-process (library), consuming with a BaseConsumer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{TestDb, parse_lsn, wait_for};
use pg_walstream::CancellationToken;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use wallaby_codec::{Change, Op, TableSchema, Value, WireFormat};
use wallaby_worker::run::{RunOptions, open_resolved, run_with};
use wallaby_worker::standalone;

const PARTITIONS: i32 = 3;

/// One consumed record.
#[derive(Debug, Clone)]
struct Record {
    topic: String,
    key: Option<String>,
    headers: BTreeMap<String, String>,
    payload: Vec<u8>,
}

impl Record {
    fn changes(&self, format: WireFormat) -> Vec<(TableSchema, Change)> {
        let (schema, changes) = common::decode_payload(format, &self.payload);
        changes.into_iter().map(|c| (schema.clone(), c)).collect()
    }
}

/// Reads topics from the beginning of every partition.
struct Reader {
    consumer: BaseConsumer,
    records: Vec<Record>,
}

impl Reader {
    fn new(brokers: &str, topics: &[&str]) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "wallaby-test-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for t in topics {
            for p in 0..PARTITIONS {
                tpl.add_partition_offset(t, p, Offset::Beginning).unwrap();
            }
        }
        consumer.assign(&tpl).unwrap();
        Self {
            consumer,
            records: Vec::new(),
        }
    }

    fn drain(&mut self) -> usize {
        while let Some(m) = self.consumer.poll(Duration::from_millis(20)) {
            let m = m.unwrap();
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8(h.value.unwrap_or_default().to_vec()).unwrap(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.records.push(Record {
                topic: m.topic().to_owned(),
                key: m.key().map(|k| String::from_utf8(k.to_vec()).unwrap()),
                headers,
                payload: m.payload().unwrap_or_default().to_vec(),
            });
        }
        self.records.len()
    }

    async fn wait_records(&mut self, n: usize, timeout: Duration) {
        wait_for(&format!("{n} Kafka records"), timeout, async || {
            (self.drain() >= n).then_some(())
        })
        .await;
    }
}

fn mock() -> MockCluster<'static, DefaultProducerContext> {
    MockCluster::new(1).unwrap()
}

/// A Flow over `tables` with one `kafka` Destination whose block is `kafka` (YAML lines,
/// indented 4), `dest_extra` at spec level of the Destination, `flow_extra` in the Flow spec.
fn manifest(
    dir: &Path,
    db: &TestDb,
    tables: &str,
    kafka: &str,
    dest_extra: &str,
    flow_extra: &str,
) -> PathBuf {
    let text = format!(
        r#"apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {{name: kflow}}
spec:
{flow_extra}
  source:
    postgres:
      secretRef: {{name: pg}}
      slot: {slot}
      publication: {slot}
      tables: [{tables}]
      batchSize: 500
      batchTimeout: 20ms
      statusInterval: 200ms
  destinations: [{{name: events}}]
---
apiVersion: wallaby.dev/v1alpha1
kind: Destination
metadata: {{name: events}}
spec:
  type: kafka
{dest_extra}
  kafka:
{kafka}
---
apiVersion: v1
kind: Secret
metadata: {{name: pg}}
stringData: {{dsn: "{dsn}"}}
"#,
        slot = db.name,
        dsn = db.dsn,
    );
    let path = dir.join("flow.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

struct Running {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn start(dir: &Path, manifest: &Path) -> Running {
    let resolved = standalone::load(manifest, None).unwrap();
    let slots = open_resolved(&resolved).unwrap();
    let cancel = CancellationToken::new();
    let options = RunOptions {
        status_file: dir.join("status.json"),
        state_dir: dir.join("state"),
        spill_dir: Some(dir.join("spill")),
    };
    let task = tokio::spawn(run_with(
        resolved,
        slots,
        options,
        cancel.clone(),
        wallaby_pipeline::metrics::Metrics::new(),
    ));
    Running { cancel, task }
}

async fn confirmed(db: &TestDb) -> u64 {
    db.slot(&db.name)
        .await
        .map(|(lsn, _)| parse_lsn(&lsn))
        .unwrap_or(0)
}

async fn current_lsn(c: &tokio_postgres::Client) -> u64 {
    let row = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap();
    parse_lsn(row.get(0))
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(s) => s.clone(),
        other => panic!("expected text, got {other:?}"),
    }
}

fn int(v: &Value) -> i32 {
    match v {
        Value::Int4(i) => *i,
        other => panic!("expected int4, got {other:?}"),
    }
}

/// Applies the records of table `t (id, v, big)` in order: the final rows by id. An
/// update that left `big` unchanged (TOAST not sent) keeps the previous value.
fn replay_t(records: &[Record], format: WireFormat) -> BTreeMap<i32, (String, String)> {
    let mut rows: BTreeMap<i32, (String, String)> = BTreeMap::new();
    for r in records {
        for (_, c) in r.changes(format) {
            match c.op {
                Op::Insert | Op::Update | Op::Read => {
                    let after = c.after.unwrap();
                    let id = int(&after.values[0]);
                    let v = text(&after.values[1]);
                    let big = if after.absent.contains(&2) {
                        rows.get(&id).expect("TOAST of a known row").1.clone()
                    } else {
                        text(&after.values[2])
                    };
                    rows.insert(id, (v, big));
                }
                Op::Delete => {
                    let id = int(&c.before.unwrap().values[0]);
                    rows.remove(&id);
                }
                Op::Truncate => rows.clear(),
            }
        }
    }
    rows
}

async fn pg_rows(c: &tokio_postgres::Client) -> BTreeMap<i32, (String, String)> {
    c.query("SELECT id, v, big FROM t", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

async fn setup_t(c: &tokio_postgres::Client) {
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL, big text NOT NULL);
         ALTER TABLE t ALTER big SET STORAGE EXTERNAL;
         CREATE TABLE u (k text PRIMARY KEY, n int);",
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_read_back_equal_the_source_rows_per_table_topic() {
    let db = TestDb::create("kafka_rb").await;
    let c = db.client().await;
    setup_t(&c).await;
    let cluster = mock();
    let brokers = cluster.bootstrap_servers();
    for t in ["cdc.public.t", "cdc.public.u"] {
        cluster.create_topic(t, PARTITIONS, 1).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let kafka = format!(
        "    brokers: [\"{brokers}\"]\n    topic: \"cdc.{{schema}}.{{table}}\"\n    compression: lz4\n    acks: all"
    );
    let m = manifest(
        dir.path(),
        &db,
        "\"public.t\", \"public.u\"",
        &kafka,
        "  format: avro",
        "",
    );
    let run = start(dir.path(), &m);
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;

    // Inserts with out-of-line TOAST values, then updates that leave them unchanged,
    // updates that change them, deletes, and a second table.
    c.batch_execute(
        "INSERT INTO t SELECT g, 'v' || g, repeat(md5(g::text), 200) FROM generate_series(1, 50) g;
         UPDATE t SET v = 'updated' || id WHERE id % 5 = 0;
         UPDATE t SET big = repeat('changed', 1000) WHERE id = 7;
         DELETE FROM t WHERE id % 10 = 3;
         INSERT INTO u VALUES ('a', 1), ('b', 2);
         UPDATE u SET n = 20 WHERE k = 'b';",
    )
    .await
    .unwrap();
    let expected_t = 50 + 10 + 1 + 5;
    let mut reader = Reader::new(&brokers, &["cdc.public.t", "cdc.public.u"]);
    reader
        .wait_records(expected_t + 3, Duration::from_secs(30))
        .await;
    let t_records: Vec<Record> = reader
        .records
        .iter()
        .filter(|r| r.topic == "cdc.public.t")
        .cloned()
        .collect();
    assert_eq!(t_records.len(), expected_t, "one record per change of t");
    assert_eq!(replay_t(&t_records, WireFormat::Avro), pg_rows(&c).await);
    let u_records: Vec<&Record> = reader
        .records
        .iter()
        .filter(|r| r.topic == "cdc.public.u")
        .collect();
    assert_eq!(u_records.len(), 3);

    // Key = the primary key as a JSON object; headers carry the position.
    // (Records of different partitions arrive in any order: compare as a set.)
    let mut delete_keys: Vec<&str> = t_records
        .iter()
        .filter(|r| r.headers.get("op").map(String::as_str) == Some("delete"))
        .filter_map(|r| r.key.as_deref())
        .collect();
    delete_keys.sort_unstable();
    assert_eq!(
        delete_keys,
        [
            r#"{"id":"13"}"#,
            r#"{"id":"23"}"#,
            r#"{"id":"3"}"#,
            r#"{"id":"33"}"#,
            r#"{"id":"43"}"#
        ]
    );
    for r in &reader.records {
        for h in [
            "lsn",
            "commit_lsn",
            "op",
            "table",
            "schema_version",
            "format",
        ] {
            assert!(r.headers.contains_key(h), "header {h} missing: {r:?}");
        }
        assert_eq!(r.headers["format"], "avro");
        assert_eq!(r.headers["schema_version"], "1");
        let lsn = r.headers["lsn"].clone();
        assert!(lsn.contains('/'), "lsn header is an LSN: {lsn}");
    }
    assert_eq!(u_records[0].key.as_deref(), Some(r#"{"k":"a"}"#));
    assert_eq!(u_records[0].headers["table"], "public.u");

    // Throughput of this debug build: a bulk insert, timed from commit to the last
    // record read back.
    let n = 20_000usize;
    let before = reader.records.len();
    let started = Instant::now();
    c.execute(
        "INSERT INTO t SELECT g, 'v' || g, 'small' FROM generate_series(1000, 999 + $1::int) g",
        &[&(n as i32)],
    )
    .await
    .unwrap();
    reader
        .wait_records(before + n, Duration::from_secs(120))
        .await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "kafka throughput (debug build, mock cluster, avro+lz4, acks=all): {n} rows in {secs:.2}s = {:.0} rows/s",
        n as f64 / secs
    );
    let t_records: Vec<Record> = reader
        .records
        .iter()
        .filter(|r| r.topic == "cdc.public.t")
        .cloned()
        .collect();
    assert_eq!(replay_t(&t_records, WireFormat::Avro), pg_rows(&c).await);
    let end = current_lsn(&c).await;
    wait_for(
        "slot confirmed past the writes",
        Duration::from_secs(20),
        async || (confirmed(&db).await >= end).then_some(()),
    )
    .await;
    run.stop().await;
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_records_are_dropped_or_fail_the_flow() {
    let db = TestDb::create("kafka_big").await;
    let c = db.client().await;
    setup_t(&c).await;
    let cluster = mock();
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("big", PARTITIONS, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Small batches force librdkafka to split the stream into many produce requests.
    let kafka = format!(
        "    brokers: [\"{brokers}\"]\n    topic: big\n    maxBatchBytes: 2048\n    maxRecordBytes: 4096\n    oversizePolicy: drop\n    compression: zstd"
    );
    let m = manifest(
        dir.path(),
        &db,
        "\"public.t\"",
        &kafka,
        "  format: json",
        "",
    );
    let run = start(dir.path(), &m);
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    c.batch_execute(
        "INSERT INTO t SELECT g, 'v' || g, 'small' FROM generate_series(1, 100) g;
         INSERT INTO t VALUES (1000, 'huge', repeat('x', 20000));
         INSERT INTO t VALUES (101, 'after', 'small');",
    )
    .await
    .unwrap();
    let end = current_lsn(&c).await;
    wait_for(
        "slot confirmed past the huge row",
        Duration::from_secs(20),
        async || (confirmed(&db).await >= end).then_some(()),
    )
    .await;
    let mut reader = Reader::new(&brokers, &["big"]);
    reader.wait_records(101, Duration::from_secs(20)).await;
    let rows = replay_t(&reader.records, WireFormat::Json);
    assert_eq!(rows.len(), 101, "every small row, not the huge one");
    assert!(!rows.contains_key(&1000), "the oversize row was dropped");
    assert!(rows.contains_key(&101));
    run.stop().await;

    // The same row under oversizePolicy: error stops the flow with a precise message.
    let db2 = TestDb::create("kafka_big_err").await;
    let c2 = db2.client().await;
    setup_t(&c2).await;
    let dir2 = tempfile::tempdir().unwrap();
    let kafka = format!(
        "    brokers: [\"{brokers}\"]\n    topic: big\n    maxRecordBytes: 4096\n    oversizePolicy: error"
    );
    let m = manifest(
        dir2.path(),
        &db2,
        "\"public.t\"",
        &kafka,
        "  format: json",
        "",
    );
    let run = start(dir2.path(), &m);
    wait_for("slot created", Duration::from_secs(20), async || {
        db2.slot(&db2.name).await
    })
    .await;
    let floor = confirmed(&db2).await;
    c2.batch_execute("INSERT INTO t VALUES (1000, 'huge', repeat('x', 20000))")
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), run.task)
        .await
        .expect("the flow stops")
        .unwrap()
        .expect_err("the flow fails");
    let text = format!("{err:#}");
    assert!(
        text.contains("above maxRecordBytes 4096") && text.contains("oversizePolicy: drop"),
        "{text}"
    );
    assert!(
        confirmed(&db2).await <= floor + 1024 && confirmed(&db2).await < current_lsn(&c2).await,
        "the slot did not pass the failed row"
    );
    db.drop_all().await;
    db2.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_loses_nothing_and_holds_the_slot() {
    let db = TestDb::create("kafka_out").await;
    let c = db.client().await;
    setup_t(&c).await;
    let cluster = mock();
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("out", PARTITIONS, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kafka = format!(
        "    brokers: [\"{brokers}\"]\n    topic: out\n    deliveryTimeout: 1s\n    compression: gzip"
    );
    let m = manifest(
        dir.path(),
        &db,
        "\"public.t\"",
        &kafka,
        "  format: json\n  retry: {maxRetries: 1000, backoffBase: 50ms, backoffMax: 300ms}",
        "",
    );
    let run = start(dir.path(), &m);
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    c.batch_execute("INSERT INTO t SELECT g, 'v' || g, 's' FROM generate_series(1, 20) g")
        .await
        .unwrap();
    let before_outage = current_lsn(&c).await;
    wait_for(
        "first rows acknowledged",
        Duration::from_secs(20),
        async || (confirmed(&db).await >= before_outage).then_some(()),
    )
    .await;

    cluster.broker_down(1).unwrap();
    c.batch_execute("INSERT INTO t SELECT g, 'v' || g, 's' FROM generate_series(21, 60) g")
        .await
        .unwrap();
    let after_writes = current_lsn(&c).await;
    // Several delivery timeouts pass: the slot stays where the broker last acknowledged.
    let down_since = Instant::now();
    while down_since.elapsed() < Duration::from_secs(4) {
        let slot = confirmed(&db).await;
        assert!(
            slot < after_writes,
            "slot {slot:X} confirmed past unacknowledged rows (end {after_writes:X})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.broker_up(1).unwrap();
    wait_for(
        "slot confirmed after the outage",
        Duration::from_secs(60),
        async || (confirmed(&db).await >= after_writes).then_some(()),
    )
    .await;
    let mut reader = Reader::new(&brokers, &["out"]);
    reader.wait_records(60, Duration::from_secs(20)).await;
    let rows = replay_t(&reader.records, WireFormat::Json);
    assert_eq!(rows, pg_rows(&c).await, "nothing lost");

    // Produce requests failing with retriable broker errors: librdkafka retries them and
    // the idempotent producer keeps them from duplicating records.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 4],
    );
    let delivered = reader.records.len();
    c.batch_execute("INSERT INTO t SELECT g, 'v' || g, 's' FROM generate_series(61, 80) g")
        .await
        .unwrap();
    let end = current_lsn(&c).await;
    wait_for(
        "slot confirmed after injected errors",
        Duration::from_secs(60),
        async || (confirmed(&db).await >= end).then_some(()),
    )
    .await;
    reader
        .wait_records(delivered + 20, Duration::from_secs(20))
        .await;
    assert_eq!(
        replay_t(&reader.records, WireFormat::Json),
        pg_rows(&c).await,
        "nothing lost after injected errors"
    );
    let ids: Vec<i32> = reader.records[delivered..]
        .iter()
        .flat_map(|r| r.changes(WireFormat::Json))
        .map(|(_, c)| int(&c.after.unwrap().values[0]))
        .collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        ids.len(),
        "no duplicates from retried produce requests: {ids:?}"
    );
    run.stop().await;
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_with_the_field_and_the_fix() {
    let db = TestDb::create("kafka_bad").await;
    let c = db.client().await;
    setup_t(&c).await;
    let dir = tempfile::tempdir().unwrap();

    // Refused before the run: a broker without a port, an unknown placeholder, SASL
    // without a Secret.
    let kafka = "    brokers: [\"localhost\"]\n    topic: \"cdc.{db}.{table}\"\n    sasl: {mechanism: PLAIN}";
    let m = manifest(dir.path(), &db, "\"public.t\"", kafka, "", "");
    let err = standalone::load(&m, None).unwrap_err().to_string();
    for want in [
        "Destination/events spec.kafka.brokers: \"localhost\" has no port",
        "Destination/events spec.kafka.topic: unknown placeholder(s) {db}",
        "Destination/events spec.kafka.secretRef: sasl is set",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }

    // SASL credentials that the environment does not provide either.
    let kafka = "    brokers: [\"localhost:9092\"]\n    topic: t\n    sasl: {mechanism: SCRAM-SHA-512}\n    secretRef: {name: kafka-creds}";
    let m = manifest(dir.path(), &db, "\"public.t\"", kafka, "", "");
    let err = standalone::load(&m, None).unwrap_err().to_string();
    assert!(
        err.contains("Secret \"kafka-creds\" with keys username and password not found")
            && err.contains("WALLABY_SECRET_KAFKA_CREDS_PASSWORD"),
        "{err}"
    );

    // An unreachable broker: deliveries time out, the flow retries, then gives up naming
    // the brokers; the slot stays where it was.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = listener.local_addr().unwrap();
    drop(listener);
    let kafka = format!("    brokers: [\"{dead}\"]\n    topic: t\n    deliveryTimeout: 1s");
    let m = manifest(
        dir.path(),
        &db,
        "\"public.t\"",
        &kafka,
        "  retry: {maxRetries: 2, backoffBase: 10ms, backoffMax: 50ms}",
        "",
    );
    let run = start(dir.path(), &m);
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    let floor = confirmed(&db).await;
    c.batch_execute("INSERT INTO t VALUES (1, 'a', 'b')")
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(60), run.task)
        .await
        .expect("the flow stops")
        .unwrap()
        .expect_err("the flow fails");
    let text = format!("{err:#}");
    assert!(
        text.contains("gave up after 3 attempt(s)")
            && text.contains(&format!("check that {dead} is reachable")),
        "{text}"
    );
    assert!(confirmed(&db).await <= floor + 1024);

    // A topic the brokers do not have (auto-creation refused): permanent, no retries.
    let db2 = TestDb::create("kafka_bad_topic").await;
    let c2 = db2.client().await;
    setup_t(&c2).await;
    let cluster = mock();
    cluster
        .topic_error(
            "missing",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        )
        .unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let kafka = format!(
        "    brokers: [\"{}\"]\n    topic: missing\n    deliveryTimeout: 2s",
        cluster.bootstrap_servers()
    );
    let m = manifest(
        dir2.path(),
        &db2,
        "\"public.t\"",
        &kafka,
        "  retry: {maxRetries: 5, backoffBase: 10ms, backoffMax: 50ms}",
        "",
    );
    let run = start(dir2.path(), &m);
    wait_for("slot created", Duration::from_secs(20), async || {
        db2.slot(&db2.name).await
    })
    .await;
    c2.batch_execute("INSERT INTO t VALUES (1, 'a', 'b')")
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(60), run.task)
        .await
        .expect("the flow stops")
        .unwrap()
        .expect_err("the flow fails");
    let text = format!("{err:#}");
    assert!(
        text.contains("gave up after 1 attempt(s)")
            && text.contains("producing to Kafka topic \"missing\"")
            && text.contains("create topic \"missing\""),
        "{text}"
    );
    db.drop_all().await;
    db2.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bufstream_is_the_same_code_path() {
    let db = TestDb::create("kafka_buf").await;
    let c = db.client().await;
    setup_t(&c).await;
    let cluster = mock();
    let brokers = cluster.bootstrap_servers();
    cluster.create_topic("buf", PARTITIONS, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kafka = format!("    brokers: [\"{brokers}\"]\n    topic: buf\n    acks: leader");
    let m = manifest(
        dir.path(),
        &db,
        "\"public.t\"",
        &kafka,
        "  format: arrow",
        "",
    );
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replace("type: kafka", "type: bufstream")
        .replace("  kafka:\n", "  bufstream:\n");
    std::fs::write(&m, text).unwrap();
    let run = start(dir.path(), &m);
    wait_for("slot created", Duration::from_secs(20), async || {
        db.slot(&db.name).await
    })
    .await;
    c.batch_execute("INSERT INTO t SELECT g, 'v' || g, 's' FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let mut reader = Reader::new(&brokers, &["buf"]);
    reader.wait_records(10, Duration::from_secs(20)).await;
    assert_eq!(
        replay_t(&reader.records, WireFormat::Arrow),
        pg_rows(&c).await
    );
    run.stop().await;
    db.drop_all().await;
}
