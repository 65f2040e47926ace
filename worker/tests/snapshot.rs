//! Initial snapshot against the real PostgreSQL: a copy under concurrent inserts, updates
//! and deletes ends equal to the source with no change doubled across the hand-off; a
//! worker killed mid-snapshot resumes only the unfinished partitions; a table added to a
//! running flow is copied alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);

type State = BTreeMap<(String, i64), (Option<String>, Option<i64>)>;

fn lsn_of(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().map(parse_lsn))
        .expect("an LSN")
}

/// What a consumer applying the records in order holds (read/insert/update upsert).
fn applied(records: &[Value]) -> State {
    let mut state = State::new();
    for r in records {
        let table = r["table"].as_str().unwrap().to_owned();
        match r["op"].as_str().unwrap() {
            "delete" => {
                state.remove(&(table, r["before"]["id"].as_i64().unwrap()));
            }
            "truncate" => state.retain(|(t, _), _| *t != table),
            _ => {
                let a = &r["after"];
                state.insert(
                    (table, a["id"].as_i64().unwrap()),
                    (a["v"].as_str().map(str::to_owned), a["n"].as_i64()),
                );
            }
        }
    }
    state
}

async fn source_state(sql: &tokio_postgres::Client, tables: &[&str]) -> State {
    let mut state = State::new();
    for t in tables {
        for row in sql
            .query(&format!("SELECT id::int8, v, n::int8 FROM {t}"), &[])
            .await
            .unwrap()
        {
            state.insert(
                (format!("public.{t}"), row.get(0)),
                (row.get(1), row.get(2)),
            );
        }
    }
    state
}

/// Waits until the records applied in order equal the source.
async fn converges(dir: &Path, sql: &tokio_postgres::Client, tables: &[&str]) -> Vec<Value> {
    let want = source_state(sql, tables).await;
    wait_for(
        "the destination to equal the source",
        DEADLINE,
        async || {
            let records = records(dir);
            (applied(&records) == want).then_some(records)
        },
    )
    .await
}

fn snapshot_manifest(
    dir: &Path,
    db: &TestDb,
    tables: &[&str],
    snapshot: &str,
) -> std::path::PathBuf {
    write_manifest(
        dir,
        &db.dsn,
        &db.name,
        tables,
        &format!("      syncPublication: add\n  snapshot: {snapshot}"),
    )
}

/// Runs DML on `table` until `stop` is set: inserts, updates and deletes, one
/// transaction per statement.
fn churn(
    dsn: String,
    table: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let sql = connect(&dsn).await;
        let mut i: i64 = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let id = 1 + (i * 7919) % 20_000;
            let statement = match i % 3 {
                0 => format!("UPDATE {table} SET v = 'u{i}', n = n + 1 WHERE id = {id}"),
                1 => format!("DELETE FROM {table} WHERE id = {id}"),
                _ => format!(
                    "INSERT INTO {table} VALUES ({}, 'i{i}', {i})",
                    1_000_000 + i
                ),
            };
            sql.batch_execute(&statement).await.unwrap();
            i += 1;
        }
        i as u64
    })
}

/// A flow over `items (id, v, n)` with `rows` rows, started with `snapshot` while DML runs
/// on the table until the worker holds its slot.
struct Churned {
    db: TestDb,
    sql: tokio_postgres::Client,
    dir: tempfile::TempDir,
    manifest: std::path::PathBuf,
    worker: Worker,
    /// DML statements run during the start.
    statements: u64,
}

async fn copy_under_churn(prefix: &str, rows: u64, snapshot: &str) -> Churned {
    let db = TestDb::create(prefix).await;
    let sql = db.client().await;
    sql.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, v text, n int);
         INSERT INTO items SELECT g, 'row ' || g, g FROM generate_series(1, {rows}) g;"
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = snapshot_manifest(dir.path(), &db, &["public.items"], snapshot);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dml = churn(db.dsn.clone(), "items", stop.clone());
    let worker = Worker::spawn(&manifest, dir.path());
    db.attached().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statements = dml.await.unwrap();
    Churned {
        db,
        sql,
        dir,
        manifest,
        worker,
        statements,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_under_concurrent_changes_ends_equal_to_the_source() {
    let Churned {
        db,
        sql,
        dir,
        worker,
        statements,
        ..
    } = copy_under_churn(
        "snap",
        20_000,
        "{initial: true, workers: 2, partitionCount: 4}",
    )
    .await;
    assert!(statements > 0, "no DML ran during the snapshot");

    let records = converges(dir.path(), &sql, &["items"]).await;
    let reads: Vec<&Value> = records.iter().filter(|r| r["op"] == "read").collect();
    assert!(
        reads.len() > 19_000,
        "only {} rows were copied",
        reads.len()
    );
    // Consistent hand-off: every row copied once, and no streamed change is from before
    // the snapshot's point.
    let mut ids: Vec<i64> = reads
        .iter()
        .map(|r| r["after"]["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), reads.len(), "a row was copied twice");
    let point = lsn_of(&reads[0]["lsn"]);
    for r in records.iter().filter(|r| r["op"] != "read") {
        assert!(
            lsn_of(&r["commit_lsn"]) > point,
            "change {r} committed before the snapshot point {point:X} was streamed too"
        );
    }
    let status: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("status.json")).unwrap()).unwrap();
    let table = &status["snapshot"][0];
    assert_eq!(table["table"], "public.items", "{status}");
    assert_eq!(table["state"], "Done", "{status}");
    assert_eq!(table["partitionsDone"], 4, "{status}");
    assert_eq!(table["rowsCopied"].as_u64().unwrap(), reads.len() as u64);
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("created replication slot with an exported snapshot"),
        "{log}"
    );
    assert!(log.contains("snapshot public.items: "), "{log}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_snapshot_resumes_only_unfinished_partitions() {
    stopped_mid_snapshot_resumes("snapkill", false).await;
}

/// SIGTERM during the copy: the worker stops promptly (copy workers waiting to hand on a
/// piece are released), exits 0, and the next start copies only what is unfinished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_snapshot_exits_cleanly_and_resumes() {
    stopped_mid_snapshot_resumes("snapterm", true).await;
}

/// Stops the worker (SIGTERM when `graceful`, else SIGKILL) once some partitions of a
/// 48-partition copy are done, changes the table, restarts, and checks the result.
async fn stopped_mid_snapshot_resumes(prefix: &str, graceful: bool) {
    let db = TestDb::create(prefix).await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v text, n int);
         INSERT INTO items SELECT g, repeat('x', 200) || g, g FROM generate_series(1, 400000) g;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = snapshot_manifest(
        dir.path(),
        &db,
        &["public.items"],
        // Many small partitions: the copy is fast, and the kill must land between two.
        "{initial: true, workers: 1, partitionCount: 48}",
    );
    let worker = Worker::spawn(&manifest, dir.path());
    let done_at_kill = wait_for("some partitions to finish", DEADLINE, async || {
        let done: i64 = sql
            .query_one(
                "SELECT count(*) FILTER (WHERE done) FROM wallaby.snapshot_state",
                &[],
            )
            .await
            .ok()?
            .get(0);
        (done >= 2).then_some(done)
    })
    .await;
    if graceful {
        let mut worker = worker;
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &worker.child.id().to_string()])
            .status();
        let code = wait_for("the worker to exit after SIGTERM", DEADLINE, async || {
            worker.child.try_wait().ok().flatten().map(|s| s.code())
        })
        .await;
        let log = worker.log_text();
        assert_eq!(code, Some(0), "{log}");
        assert!(
            log.contains("snapshot: stopped; unfinished partitions are copied on the next start"),
            "{log}"
        );
    } else {
        worker.kill9();
    }
    assert!(done_at_kill < 48, "the snapshot finished before the stop");
    let done_rows: i64 = sql
        .query_one(
            "SELECT coalesce(sum(rows_copied), 0)::int8 FROM wallaby.snapshot_state WHERE done",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let before_restart = records(dir.path()).len();
    sql.batch_execute(
        "UPDATE items SET n = -1 WHERE id % 1000 = 0; DELETE FROM items WHERE id % 999 = 0",
    )
    .await
    .unwrap();

    let worker = Worker::spawn(&manifest, dir.path());
    db.attached().await;
    let records = converges(dir.path(), &sql, &["items"]).await;
    let second_run = records.len() - before_restart;
    assert!(
        (second_run as i64) < 400_000 - done_rows + 5_000,
        "the restart copied {second_run} rows; {done_rows} were already done"
    );
    let remaining: i64 = sql
        .query_one(
            "SELECT count(*) FILTER (WHERE NOT done) FROM wallaby.snapshot_state",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(remaining, 0);
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_a_running_flow_is_copied_alone_while_the_others_stream() {
    let db = TestDb::create("snapadd").await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text, n int);
         CREATE TABLE b (id int PRIMARY KEY, v text, n int);
         INSERT INTO a SELECT g, 'a' || g, g FROM generate_series(1, 1000) g;
         INSERT INTO b SELECT g, 'b' || g, g FROM generate_series(1, 200000) g;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state_path = dir.path().join("snapshot-state.json");
    let snapshot = "{initial: true, workers: 2, stateBackend: file, statePath: \"STATE\"}"
        .replace("STATE", &state_path.display().to_string());
    let manifest = snapshot_manifest(dir.path(), &db, &["public.a"], &snapshot);
    let worker = Worker::spawn(&manifest, dir.path());
    db.attached().await;
    sql.batch_execute("UPDATE a SET n = 0 WHERE id <= 10")
        .await
        .unwrap();
    converges(dir.path(), &sql, &["a"]).await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    let reads_of_a = records(dir.path())
        .iter()
        .filter(|r| r["op"] == "read" && r["table"] == "public.a")
        .count();
    assert_eq!(reads_of_a, 1000);

    // Changes while the flow is down, then the flow lists b too.
    sql.batch_execute("UPDATE a SET v = 'down' WHERE id = 1; DELETE FROM b WHERE id = 5")
        .await
        .unwrap();
    let manifest = snapshot_manifest(dir.path(), &db, &["public.a", "public.b"], &snapshot);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dml = churn(db.dsn.clone(), "b", stop.clone());
    let worker = Worker::spawn(&manifest, dir.path());
    db.attached().await;
    // Table a streams while b is being copied.
    sql.batch_execute("UPDATE a SET v = 'during' WHERE id = 2")
        .await
        .unwrap();
    wait_for("a's change to stream", DEADLINE, async || {
        records(dir.path())
            .iter()
            .any(|r| r["table"] == "public.a" && r["after"]["v"] == "during")
            .then_some(())
    })
    .await;
    let state: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    let b_done = state.to_string().contains("\"table\":\"public.b\"")
        && state["runs"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|v| v.as_array().unwrap())
            .filter(|p| p["table"] == "public.b")
            .all(|p| p["done"] == true);
    assert!(!b_done, "b was copied before a streamed: {state}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(dml.await.unwrap() > 0);
    sql.batch_execute(
        "UPDATE a SET v = 'after' WHERE id = 3; UPDATE b SET v = 'after' WHERE id = 3",
    )
    .await
    .unwrap();
    let records = converges(dir.path(), &sql, &["a", "b"]).await;
    assert_eq!(
        records
            .iter()
            .filter(|r| r["op"] == "read" && r["table"] == "public.a")
            .count(),
        reads_of_a,
        "table a was copied again"
    );
    assert!(
        records
            .iter()
            .filter(|r| r["op"] == "read" && r["table"] == "public.b")
            .count()
            >= 190_000
    );
    assert!(
        messages(dir.path())
            .iter()
            .all(|m| m["prefix"] != "wallaby.snapshot"),
        "watermarks reached the destination"
    );
    let done_everywhere = wait_for("b's partition to be recorded", DEADLINE, async || {
        let state: Value = serde_json::from_slice(&std::fs::read(&state_path).ok()?).ok()?;
        let all = state["runs"]
            .as_object()?
            .values()
            .flat_map(|v| v.as_array().cloned().unwrap_or_default())
            .all(|p| p["done"] == true);
        all.then_some(state)
    })
    .await;
    assert!(done_everywhere.to_string().contains("public.b"));
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("copying while streaming"), "{log}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_copies_the_named_tables_prints_progress_and_exits() {
    let db = TestDb::create("backfill").await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text, n int);
         CREATE TABLE b (id int PRIMARY KEY, v text, n int);
         INSERT INTO a SELECT g, 'a' || g, g FROM generate_series(1, 5000) g;
         INSERT INTO b SELECT g, 'b' || g, g FROM generate_series(1, 10) g;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = snapshot_manifest(
        dir.path(),
        &db,
        &["public.a", "public.b"],
        "{workers: 2, partitionColumn: id, partitionCount: 3}",
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_wallaby-worker"))
        .args(["backfill", "-f"])
        .arg(&manifest)
        .args([
            "--tables",
            "public.a",
            "--metrics-addr",
            "off",
            "--status-file",
        ])
        .arg(dir.path().join("status.json"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("snapshot public.a: Done, 5000 rows, 3/3 partitions"),
        "{stderr}"
    );
    let records = records(dir.path());
    assert_eq!(applied(&records), source_state(&sql, &["a"]).await);
    assert!(records.iter().all(|r| r["op"] == "read"));
    // Batches of `snapshot.batchSize` (10,000 by default), not of the source's batchSize
    // (100 here): one JSON-lines payload, with its schema header line, per partition.
    let headers = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
        .map(|text| {
            text.lines()
                .filter(|l| l.starts_with("{\"wallaby_schema\""))
                .count()
        })
        .sum::<usize>();
    assert_eq!(headers, 3, "one payload per partition of 1,667 rows");
    assert!(
        db.slot(&db.name).await.is_none(),
        "a backfill created a slot"
    );
    let status: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("status.json")).unwrap()).unwrap();
    assert_eq!(status["snapshot"][0]["partitionsDone"], 3, "{status}");

    // A finished backfill copies everything again when run again. This time the
    // destination rewrites rows (softDelete), so the copy workers hand on rows instead of
    // payloads they encoded themselves.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let rewriting = text.replace("  type: file\n", "  type: file\n  softDelete: true\n");
    assert_ne!(text, rewriting);
    std::fs::write(&manifest, rewriting).unwrap();
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_wallaby-worker"))
        .args(["backfill", "-f"])
        .arg(&manifest)
        .args([
            "--tables",
            "public.a",
            "--metrics-addr",
            "off",
            "--status-file",
        ])
        .arg(dir.path().join("status.json"))
        .output()
        .unwrap();
    assert!(again.status.success());
    let records = common::records(dir.path());
    assert_eq!(records.len(), 10_000);
    assert_eq!(applied(&records[5_000..]), source_state(&sql, &["a"]).await);
    assert!(
        records[5_000..]
            .iter()
            .all(|r| r["after"]["__ds_is_deleted"] == false)
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_snapshot_table_stops_the_worker_with_its_name() {
    let db = TestDb::create("snapmiss").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE items (id int PRIMARY KEY, v text, n int)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = snapshot_manifest(
        dir.path(),
        &db,
        &["public.items"],
        "{initial: true, tables: [public.missing]}",
    );
    let worker = Worker::spawn(&manifest, dir.path());
    let (code, log) = worker.exit_by_itself().await;
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains("snapshot: table public.missing does not exist"),
        "{log}"
    );
    let status = std::fs::read_to_string(dir.path().join("status.json")).unwrap();
    assert!(status.contains("public.missing"), "{status}");
    let status: Value = serde_json::from_str(&status).unwrap();
    assert!(
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["message"]
                .as_str()
                .unwrap_or_default()
                .contains("public.missing")),
        "{status}"
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_consistent_snapshot_or_state_the_copy_still_converges_and_is_not_repeated() {
    let Churned {
        db,
        sql,
        dir,
        manifest,
        worker,
        ..
    } = copy_under_churn(
        "snapnone",
        5_000,
        "{initial: true, consistent: false, stateBackend: none, workers: 2, partitionCount: 3}",
    )
    .await;
    let records = converges(dir.path(), &sql, &["items"]).await;
    let reads = records.iter().filter(|r| r["op"] == "read").count();
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("exported snapshot"), "{log}");

    // stateBackend none: the existing slot means no new copy.
    sql.batch_execute("INSERT INTO items VALUES (-1, 'late', 0)")
        .await
        .unwrap();
    let worker = Worker::spawn(&manifest, dir.path());
    db.attached().await;
    let records = converges(dir.path(), &sql, &["items"]).await;
    assert_eq!(
        records.iter().filter(|r| r["op"] == "read").count(),
        reads,
        "the restart copied again"
    );
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}

/// Every type the binary COPY decoder claims, with edge values, decodes from
/// `COPY … (FORMAT binary)` to exactly the values its text form decodes to, and the
/// field encoders (Parquet, Arrow, JSON) fed the binary fields give the payloads the row
/// encoder gives for those values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_copy_decodes_every_supported_type_as_text_copy_does() {
    use std::sync::Arc;
    use tokio_stream::StreamExt;
    use wallaby_codec::{
        Change, ColumnSchema, ReadEncoder, TableSchema, TypeInfo, TypeKind, WireFormat,
    };
    use wallaby_source::snapshot::copy::{BinaryRows, binary_copy, decode_fields, decode_line};

    let db = TestDb::create("snapbin").await;
    let sql = db.client().await;
    sql.batch_execute(
        r#"CREATE DOMAIN price AS numeric(10,3);
        CREATE TABLE m (b bool, i2 int2, i4 int4, i8 int8, o oid, f4 float4, f8 float8,
          n numeric, n2 numeric(12,2), p price, t text, vc varchar(12), bp char(5), nm name,
          by bytea, u uuid, j json, jb jsonb, d date, tm time, ts timestamp, tz timestamptz);
        INSERT INTO m VALUES
          (true, 1, 2, 3, 4, 1.5, 2.25, 0, 0, 0, '', '', '', '', '', '00000000-0000-0000-0000-000000000000',
           '{}', '{}', '2000-01-01', '00:00', '2000-01-01', '2000-01-01 00:00+00'),
          (false, -32768, -2147483648, -9223372036854775808, 4294967295, '-0', '-0', -1.5, -0.01,
           -1234567.125, E'tab\there\nnew line \\ back', 'ünïcødé ✓', 'ab', 'n a m e',
           E'\\x00ff5c0a09', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
           '{ "a" : [1, 2.50, "x"] }', '{"b": {"c": null}, "a": 1}', '0044-03-15 BC', '24:00',
           '1999-12-31 23:59:59.999999', '1969-07-20 20:17:40.5-04'),
          (NULL, 32767, 2147483647, 9223372036854775807, 0, 'NaN', 'Infinity', 'NaN', 9999999999.99,
           0.001, 'x', NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'infinity', '23:59:59.999999',
           '-infinity', 'infinity'),
          (NULL, NULL, NULL, NULL, NULL, '-Infinity', 1e308, 'Infinity', NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, '-infinity', NULL, '200000-12-31 23:59:59.5',
           '4713-01-01 00:00+00 BC'),
          (NULL, NULL, NULL, NULL, NULL, 1.17549435e-38, 4.9e-324, '-Infinity', NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, '5874897-12-31', NULL, NULL, NULL),
          (NULL, NULL, NULL, NULL, NULL, 3.4028235e38, -2.2250738585072014e-308,
           123456789012345678901234567890.000000000000000000012345, NULL, NULL, NULL, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
          (NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0.000000000000000000000000000001, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
          (NULL, NULL, NULL, NULL, NULL, NULL, NULL, 100000000, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)"#,
    )
    .await
    .unwrap();

    let ty = |oid: u32, name: &str, kind: TypeKind| {
        Arc::new(TypeInfo {
            oid,
            name: name.into(),
            typmod: -1,
            kind,
        })
    };
    let numeric = ty(1700, "numeric", TypeKind::Numeric);
    let types = vec![
        ("b", ty(16, "bool", TypeKind::Bool)),
        ("i2", ty(21, "int2", TypeKind::Int2)),
        ("i4", ty(23, "int4", TypeKind::Int4)),
        ("i8", ty(20, "int8", TypeKind::Int8)),
        ("o", ty(26, "oid", TypeKind::Oid)),
        ("f4", ty(700, "float4", TypeKind::Float4)),
        ("f8", ty(701, "float8", TypeKind::Float8)),
        ("n", numeric.clone()),
        ("n2", numeric.clone()),
        ("p", ty(90001, "price", TypeKind::Domain(numeric))),
        ("t", ty(25, "text", TypeKind::Text)),
        ("vc", ty(1043, "varchar", TypeKind::Text)),
        ("bp", ty(1042, "bpchar", TypeKind::Text)),
        ("nm", ty(19, "name", TypeKind::Text)),
        ("by", ty(17, "bytea", TypeKind::Bytea)),
        ("u", ty(2950, "uuid", TypeKind::Uuid)),
        ("j", ty(114, "json", TypeKind::Json)),
        ("jb", ty(3802, "jsonb", TypeKind::Jsonb)),
        ("d", ty(1082, "date", TypeKind::Date)),
        ("tm", ty(1083, "time", TypeKind::Time)),
        ("ts", ty(1114, "timestamp", TypeKind::Timestamp)),
        ("tz", ty(1184, "timestamptz", TypeKind::TimestampTz)),
    ];
    let schema = TableSchema {
        schema: "public".into(),
        table: "m".into(),
        columns: types
            .into_iter()
            .map(|(name, ty)| ColumnSchema {
                name: name.into(),
                ty,
                key: false,
                mapped_type: None,
            })
            .collect(),
        version: 1,
    };
    assert!(binary_copy(&schema), "every column has a binary decoder");

    let read = |binary: bool| {
        let sql = &sql;
        let schema = &schema;
        async move {
            let format = if binary { " (FORMAT binary)" } else { "" };
            let stream = sql
                .copy_out(&format!("COPY m TO STDOUT{format}"))
                .await
                .unwrap();
            let mut stream = std::pin::pin!(stream);
            let mut rows = Vec::new();
            let mut tuples = BinaryRows::default();
            let mut scratch = Vec::new();
            let shared = Arc::new(schema.clone());
            let (lsn, time) = (0x16B3_74D48, 1_700_000_000_000_000);
            let mut encoders =
                [WireFormat::Parquet, WireFormat::Arrow, WireFormat::Json].map(|f| {
                    let mut encoder = ReadEncoder::new(f, shared.clone()).unwrap();
                    encoder.begin(lsn, time).unwrap();
                    (f, encoder)
                });
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.unwrap();
                if binary {
                    // Fed a byte at a time: tuples cut anywhere are put together.
                    for byte in chunk.chunks(1) {
                        tuples
                            .feed(byte, schema.columns.len(), &mut |fields, _| {
                                for (_, encoder) in &mut encoders {
                                    encoder.push_row(fields).map_err(|e| e.to_string())?;
                                }
                                rows.push(decode_fields(fields, schema)?);
                                Ok(())
                            })
                            .unwrap();
                    }
                } else {
                    for line in chunk.strip_suffix(b"\n").unwrap().split(|b| *b == b'\n') {
                        rows.push(decode_line(line, schema, &mut scratch).unwrap());
                    }
                }
            }
            if binary {
                tuples.finish().unwrap();
                // The field encoders' payloads are the row encoder's for the same rows.
                let changes: Vec<Change> = rows
                    .iter()
                    .map(|row| Change::read(lsn, time, row.clone()))
                    .collect();
                for (format, encoder) in &mut encoders {
                    assert_eq!(encoder.rows(), rows.len());
                    let payload = encoder.finish().unwrap();
                    let want = wallaby_codec::encode(*format, schema, &changes).unwrap();
                    assert!(payload == want, "{format:?} payloads differ");
                }
            }
            rows
        }
    };
    let text = read(false).await;
    let binary = read(true).await;
    assert_eq!(text.len(), 8);
    assert_eq!(binary.len(), text.len());
    for (t, b) in text.iter().zip(&binary) {
        for (i, col) in schema.columns.iter().enumerate() {
            // Debug text, so NaN equals NaN and -0 differs from 0.
            assert_eq!(
                format!("{:?}", b.values[i]),
                format!("{:?}", t.values[i]),
                "column {}",
                col.name
            );
        }
    }
    drop(sql);
    db.drop_all().await;
}
