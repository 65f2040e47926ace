//! `metaColumns`, `softDelete` and `appendMode` through the real replication path: one
//! flow fanned out to three destinations that each rewrite the same insert, update and
//! delete differently, read back from their output (JSON lines and Parquet).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TestDb, Worker, records, wait_for};
use serde_json::{Value as Json, json};
use wallaby_codec::{Op, Value, WireFormat};

const DEADLINE: Duration = Duration::from_secs(60);

fn manifest(dir: &Path, db: &TestDb) -> std::path::PathBuf {
    let dest = |name: &str, extra: &str| {
        format!(
            "---\napiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {{name: {name}}}\nspec: {{type: file, format: json, file: {{path: \"{}\"}}{extra}}}\n",
            dir.join(name).join("out").display()
        )
    };
    let mut text = format!(
        r#"apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {{name: meta}}
spec:
  source:
    postgres:
      secretRef: {{name: pg}}
      slot: {slot}
      publication: {slot}
      tables: ["public.t"]
      batchTimeout: 50ms
  destinations: [{{name: soft}}, {{name: append}}, {{name: pq}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: pg}}
stringData: {{dsn: "{dsn}"}}
"#,
        slot = db.name,
        dsn = db.dsn
    );
    text += &dest(
        "soft",
        ", metaColumns: {enabled: true, watermarkSource: lsn}, softDelete: true",
    );
    text += &dest("append", ", appendMode: true");
    text += &dest(
        "pq",
        ", metaColumns: {enabled: true, watermark: '-', op: change_kind}, appendMode: true",
    )
    .replace("format: json", "format: parquet");
    let path = dir.join("flow.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Decodes the Parquet payloads of a directory into their changes, with the schema each
/// payload carries.
fn parquet_changes(dir: &Path) -> Vec<(Vec<String>, wallaby_codec::Change)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(WireFormat::Parquet.extension()) {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let (schema, changes) = common::decode_payload(WireFormat::Parquet, &bytes);
        let names: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
        for change in changes {
            out.push((names.clone(), change));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_delete_append_mode_and_metadata_columns_rewrite_the_changes() {
    let db = TestDb::create("meta").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), &db);
    let worker = Worker::spawn(&m, dir.path());
    db.attached().await;
    let before_insert = chrono::Utc::now();
    sql.batch_execute("INSERT INTO t VALUES (1, 'ada'), (2, 'bob')")
        .await
        .unwrap();
    sql.batch_execute("UPDATE t SET name = 'ada lovelace' WHERE id = 1")
        .await
        .unwrap();
    sql.batch_execute("DELETE FROM t WHERE id = 2")
        .await
        .unwrap();
    let delete_lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);

    // soft: every column, deletes become updates flagged deleted.
    let soft = wait_for("4 soft-delete records", DEADLINE, async || {
        let r = records(&dir.path().join("soft"));
        (r.len() >= 4).then_some(r)
    })
    .await;
    let ops: Vec<&str> = soft.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["insert", "insert", "update", "update"], "{soft:#?}");
    let deleted = &soft[3];
    assert_eq!(deleted["after"]["id"], 2);
    assert_eq!(deleted["after"]["__ds_is_deleted"], true);
    assert_eq!(deleted["after"]["__ds_op"], "delete");
    // Only the key came with the delete: the name is absent (kept), not overwritten.
    assert_eq!(deleted["after_absent"], json!(["name"]));
    assert_eq!(soft[2]["after"]["__ds_is_deleted"], false);
    assert_eq!(soft[2]["after"]["__ds_op"], "update");
    for r in &soft {
        // watermarkSource: lsn → the commit LSN as a number, the same as the record's.
        assert_eq!(r["after"]["__ds_watermark"], r["commit_lsn"], "{r}");
        let synced = r["after"]["__ds_synced_at"].as_str().unwrap();
        let synced = chrono::DateTime::parse_from_rfc3339(synced)
            .unwrap_or_else(|e| panic!("synced_at {synced:?}: {e}"));
        assert!(synced >= before_insert, "{synced} < {before_insert}");
    }
    assert!(
        soft[3]["commit_lsn"].as_u64().unwrap() <= common::parse_lsn(&delete_lsn),
        "watermark within the WAL written"
    );

    // append: only `deleted` and `op` are added; every change is an insert.
    let append = wait_for("4 append records", DEADLINE, async || {
        let r = records(&dir.path().join("append"));
        (r.len() >= 4).then_some(r)
    })
    .await;
    let got: Vec<(Json, Json, Json, Json)> = append
        .iter()
        .map(|r| {
            let after = &r["after"];
            assert!(r["before"].is_null(), "{r}");
            assert!(after.get("__ds_synced_at").is_none(), "{r}");
            (
                r["op"].clone(),
                after["id"].clone(),
                after["__ds_op"].clone(),
                after["__ds_is_deleted"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (json!("insert"), json!(1), json!("insert"), json!(false)),
            (json!("insert"), json!(2), json!("insert"), json!(false)),
            (json!("insert"), json!(1), json!("update"), json!(false)),
            (json!("insert"), json!(2), json!("delete"), json!(true)),
        ]
    );
    assert_eq!(append[2]["after"]["name"], "ada lovelace");

    // Parquet: renamed op column, no watermark, typed columns.
    let pq = wait_for("4 parquet changes", DEADLINE, async || {
        let c = parquet_changes(&dir.path().join("pq").join("out"));
        (c.len() >= 4).then_some(c)
    })
    .await;
    let (names, _) = &pq[0];
    assert_eq!(
        names,
        &[
            "id",
            "name",
            "__ds_synced_at",
            "__ds_is_deleted",
            "change_kind"
        ]
    );
    let kinds: Vec<(Op, Value, Value)> = pq
        .iter()
        .map(|(_, c)| {
            let after = c.after.as_ref().unwrap();
            assert!(
                matches!(after.values[2], Value::TimestampTz(_)),
                "{after:?}"
            );
            (c.op, after.values[3].clone(), after.values[4].clone())
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (Op::Insert, Value::Bool(false), Value::Text("insert".into())),
            (Op::Insert, Value::Bool(false), Value::Text("insert".into())),
            (Op::Insert, Value::Bool(false), Value::Text("update".into())),
            (Op::Insert, Value::Bool(true), Value::Text("delete".into())),
        ]
    );

    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_column_that_collides_with_a_source_column_stops_the_flow_precisely() {
    let db = TestDb::create("metacollide").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY, __ds_op text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {{name: meta}}
spec:
  source:
    postgres:
      secretRef: {{name: pg}}
      slot: {slot}
      publication: {slot}
      tables: ["public.t"]
      batchTimeout: 50ms
  destinations: [{{name: append}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: pg}}
stringData: {{dsn: "{dsn}"}}
---
apiVersion: wallaby.dev/v1alpha1
kind: Destination
metadata: {{name: append}}
spec: {{type: file, file: {{path: "{out}"}}, appendMode: true}}
"#,
        slot = db.name,
        dsn = db.dsn,
        out = dir.path().join("out").display()
    );
    let m = dir.path().join("flow.yaml");
    std::fs::write(&m, text).unwrap();
    let mut worker = Worker::spawn(&m, dir.path());
    db.attached().await;
    let slot_before: Option<String> = sql
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    sql.batch_execute("INSERT INTO t VALUES (1, 'x')")
        .await
        .unwrap();
    let status = wait_for("the worker to stop", DEADLINE, async || {
        worker.child.try_wait().unwrap()
    })
    .await;
    let code = status.code().unwrap_or(-1);
    let log = worker.log_text();
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("metadata column \"__ds_op\" collides with column \"__ds_op\" of public.t"),
        "{log}"
    );
    assert!(
        log.contains("rename the metadata column in spec.metaColumns"),
        "{log}"
    );
    assert!(records(dir.path()).is_empty(), "nothing was written");
    let slot_after: Option<String> = sql
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        slot_before, slot_after,
        "the slot did not move past the insert"
    );
    db.drop_all().await;
}
