//! Schemas derive from the relation and are versioned: a column added mid-stream gives the
//! table's records a new schema version carrying the new column, in every wire format.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{TestDb, Worker, records, wait_for, write_manifest};

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_column_starts_a_new_schema_version() {
    let db = TestDb::create("schemaver").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &db.dsn, &db.name, &["public.t"], "");
    let worker = Worker::spawn(&manifest, dir.path());
    db.attached().await;
    sql.batch_execute("INSERT INTO t VALUES (1, 'x')")
        .await
        .unwrap();
    sql.batch_execute("ALTER TABLE t ADD COLUMN b numeric(10,2)")
        .await
        .unwrap();
    sql.batch_execute("INSERT INTO t VALUES (2, 'y', 12.50)")
        .await
        .unwrap();
    let got = wait_for("2 records", DEADLINE, async || {
        let r = records(dir.path());
        (r.len() >= 2).then_some(r)
    })
    .await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    let by_id = |id: i64| {
        got.iter()
            .find(|r| r["after"]["id"] == id)
            .unwrap_or_else(|| panic!("no record for {id}: {got:?}"))
    };
    assert_eq!(by_id(1)["schema_version"], 1);
    assert_eq!(by_id(1)["after"], serde_json::json!({"id": 1, "a": "x"}));
    assert_eq!(by_id(2)["schema_version"], 2);
    assert_eq!(
        by_id(2)["after"],
        serde_json::json!({"id": 2, "a": "y", "b": "12.50"}),
        "numeric keeps its exact text"
    );
    // The header of the second payload describes version 2 with the new column.
    let text: String = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let headers: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("wallaby_schema").cloned())
        .collect();
    assert!(
        headers
            .iter()
            .any(|h| h.to_string().contains("\"numeric\"") && h.to_string().contains("\"b\"")),
        "a header names column b of type numeric: {headers:?}"
    );
    db.drop_all().await;
}
