//! Unchanged TOAST columns against the real PostgreSQL: an UPDATE that does not touch a
//! large out-of-line value leaves it out of the WAL; each `toastFetch` mode fills it (or
//! flags it) as documented in docs/toast.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

/// 400 md5 digests: 12,800 bytes of incompressible text, stored out of line.
const BIG: &str = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i)";

struct Case {
    db: TestDb,
    dir: tempfile::TempDir,
    worker: Worker,
}

/// A `docs` table whose `big` column is stored out of line uncompressed; rows 100 and 101
/// exist before the worker (and its slot) start, so the worker never sees their insert.
async fn start(prefix: &str, mode: &str) -> Case {
    let db = TestDb::create(prefix).await;
    let sql = db.client().await;
    sql.batch_execute(&format!(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, big text);
         ALTER TABLE docs ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO docs SELECT g, 'before', {BIG} FROM generate_series(100, 101) g;"
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &db.dsn,
        &db.name,
        &["docs"],
        &format!("      toastFetch: {mode}"),
    );
    let worker = Worker::spawn(&manifest, dir.path());
    wait_for("the worker to attach to the slot", DEADLINE, async || {
        db.slot(&db.name)
            .await
            .filter(|(_, active)| *active)
            .map(|_| ())
    })
    .await;
    Case { db, dir, worker }
}

impl Case {
    async fn sql(&self, statements: &str) {
        self.db
            .client()
            .await
            .batch_execute(statements)
            .await
            .unwrap();
    }

    async fn big(&self, id: i32) -> String {
        self.db
            .client()
            .await
            .query_one("SELECT big FROM docs WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0)
    }

    /// Waits for `n` records, stops the worker, returns the updates by id.
    async fn updates(self, n: usize) -> (TestDb, Vec<Value>) {
        let got = wait_for(&format!("{n} records"), DEADLINE, async || {
            let r = records(self.dir.path());
            (r.len() >= n).then_some(r)
        })
        .await;
        let (code, log) = self.worker.terminate();
        assert_eq!(code, Some(0), "{log}");
        let updates = got.into_iter().filter(|r| r["op"] == "update").collect();
        (self.db, updates)
    }
}

/// The update of row `id` (an update always carries `after`, and with it the key).
fn update_of(updates: &[Value], id: i64) -> &Value {
    let r = updates
        .iter()
        .find(|r| r["after"]["id"] == id)
        .unwrap_or_else(|| panic!("no update of row {id} in {updates:?}"));
    assert_eq!(r["table"], "public.docs", "{r}");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_flags_the_unchanged_column_and_carries_no_value() {
    let case = start("toast_off", "off").await;
    case.sql(&format!("INSERT INTO docs VALUES (1, 'a', {BIG})"))
        .await;
    case.sql("UPDATE docs SET title = 'b' WHERE id = 1").await;
    let (db, updates) = case.updates(2).await;
    let r = update_of(&updates, 1);
    assert_eq!(r["after_absent"], json!(["big"]));
    // An absent column is null in the record; the list says it was not sent.
    assert_eq!(
        r["after"],
        json!({"id": 1, "title": "b", "big": null}),
        "no value for big"
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_reselects_the_unchanged_column_and_a_deleted_row_stays_flagged() {
    let case = start("toast_source", "source").await;
    // Row 100 was inserted before the worker started: only the database knows `big`.
    case.sql("UPDATE docs SET title = 'b' WHERE id = 100").await;
    // Row 101 is gone by the time the worker sees its update (same transaction).
    case.sql("BEGIN; UPDATE docs SET title = 'c' WHERE id = 101; DELETE FROM docs WHERE id = 101; COMMIT")
        .await;
    let want = case.big(100).await;
    assert!(want.len() > 8192);
    let (db, updates) = case.updates(3).await;
    let r = update_of(&updates, 100);
    assert_eq!(r["after_absent"], json!([]));
    assert_eq!(r["after"]["title"], "b");
    assert_eq!(r["after"]["big"], json!(want));
    let gone = update_of(&updates, 101);
    assert_eq!(gone["after_absent"], json!(["big"]));
    assert_eq!(gone["after"]["big"], Value::Null, "{gone}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_reselects_the_row() {
    let case = start("toast_full", "full").await;
    case.sql("UPDATE docs SET title = 'b' WHERE id = 100").await;
    let want = case.big(100).await;
    let (db, updates) = case.updates(1).await;
    let r = update_of(&updates, 100);
    assert_eq!(r["after_absent"], json!([]));
    assert_eq!(r["after"], json!({"id": 100, "title": "b", "big": want}));
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_fills_what_the_worker_saw_inserted_and_flags_the_rest() {
    let case = start("toast_cache", "cache").await;
    case.sql(&format!("INSERT INTO docs VALUES (1, 'a', {BIG})"))
        .await;
    case.sql("UPDATE docs SET title = 'b' WHERE id = 1").await;
    case.sql("UPDATE docs SET title = 'c' WHERE id = 1").await;
    // Inserted before the worker started: a cache miss.
    case.sql("UPDATE docs SET title = 'b' WHERE id = 100").await;
    let want = case.big(1).await;
    let (db, updates) = case.updates(4).await;
    let filled: Vec<&Value> = updates.iter().filter(|r| r["after"]["id"] == 1).collect();
    assert_eq!(filled.len(), 2);
    for r in filled {
        assert_eq!(r["after_absent"], json!([]), "{r}");
        assert_eq!(r["after"]["big"], json!(want));
    }
    let miss = update_of(&updates, 100);
    assert_eq!(miss["after_absent"], json!(["big"]));
    assert_eq!(miss["after"]["big"], Value::Null, "{miss}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_fills_rows_of_a_streamed_transaction_at_replay() {
    let case = start("toast_streamed", "source").await;
    // Far above logical_decoding_work_mem (64kB in tests): streamed, spilled, replayed.
    case.sql(
        "UPDATE docs SET title = 'streamed' WHERE id = 100;
         INSERT INTO docs SELECT g, 'filler', 'small' FROM generate_series(1000, 4000) g;",
    )
    .await;
    let want = case.big(100).await;
    let (db, updates) = case.updates(3002).await;
    let r = update_of(&updates, 100);
    assert_eq!(r["after_absent"], json!([]));
    assert_eq!(r["after"]["big"], json!(want));
    let admin = connect(superuser_dsn()).await;
    let streamed: i64 = admin
        .query_opt(
            "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .map_or(0, |r| r.get(0));
    assert!(streamed >= 1, "the transaction was streamed");
    db.drop_all().await;
}
