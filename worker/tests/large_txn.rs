//! Large transactions against the real PostgreSQL: with `logical_decoding_work_mem` at 64kB
//! (see `TestDb::create`) the server streams them before they commit; the worker spills
//! them to disk and delivers them whole, in commit order, with bounded memory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

async fn wait_slot_active(db: &TestDb, slot: &str) {
    wait_for("the worker to attach to the slot", DEADLINE, async || {
        db.slot(slot)
            .await
            .filter(|(_, active)| *active)
            .map(|_| ())
    })
    .await;
}

/// Commits the open transaction of `sql`; returns a WAL position just before its commit
/// record. (The current position after the commit would not do: other tests' databases
/// write WAL this slot never confirms.)
async fn commit(sql: &tokio_postgres::Client) -> u64 {
    let before: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    sql.batch_execute("COMMIT").await.unwrap();
    parse_lsn(&before)
}

/// Waits until the slot confirmed a commit after `before` (every destination made it
/// durable).
async fn wait_confirmed(db: &TestDb, before: u64, timeout: Duration) {
    wait_for("the slot to confirm the last commit", timeout, async || {
        let (confirmed, _) = db.slot(&db.name).await?;
        (parse_lsn(&confirmed) > before).then_some(())
    })
    .await;
}

/// Transactions the server streamed to this slot before they committed.
async fn streamed_txns(db: &TestDb) -> i64 {
    let admin = connect(superuser_dsn()).await;
    admin
        .query_opt(
            "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
        .unwrap_or(0)
}

async fn setup(prefix: &str, batch_size: u32) -> (TestDb, tempfile::TempDir, Worker) {
    let db = TestDb::create(prefix).await;
    db.client()
        .await
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v int)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &db.dsn,
        &db.name,
        &["t"],
        &format!("      batchSize: {batch_size}"),
    );
    let spill = dir.path().join("spill");
    // A leftover of a crashed run: useless (the server re-sends), so it must go at start.
    std::fs::create_dir_all(&spill).unwrap();
    std::fs::write(spill.join("xid-1.spill"), b"stale").unwrap();
    let worker = Worker::spawn_with_env(&manifest, dir.path(), &[("WALLABY_SPILL_DIR", &spill)]);
    wait_slot_active(&db, &db.name).await;
    wait_for(
        "stale spill files to be removed at start",
        DEADLINE,
        async || (spill_files(&spill) == (0, 0)).then_some(()),
    )
    .await;
    (db, dir, worker)
}

fn ids(records: &[Value]) -> Vec<i64> {
    records
        .iter()
        .filter(|r| r["table"] == "t")
        .map(|r| r["key"]["id"].as_i64().unwrap())
        .collect()
}

/// Waits until a spill file of at least `bytes` exists: the open transaction was streamed.
async fn wait_spilled(spill: &Path, bytes: u64) {
    wait_for(
        &format!("a spill file of at least {bytes} bytes"),
        DEADLINE,
        async || {
            let (n, size) = spill_files(spill);
            (n > 0 && size >= bytes).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_is_delivered_whole_with_bounded_memory() {
    const ROWS: usize = 1_000_000;
    let (db, dir, worker) = setup("million", 10_000).await;
    let spill = dir.path().join("spill");

    let started = Instant::now();
    let insert = db.client().await;
    insert
        .batch_execute("BEGIN; INSERT INTO t SELECT g, g % 1000 FROM generate_series(1, 1000000) g")
        .await
        .unwrap();
    let before_commit = commit(&insert).await;
    let committed = started.elapsed();
    wait_confirmed(&db, before_commit, Duration::from_secs(600)).await;
    // Includes the wait for the worker's next standby status update.
    let delivered = started.elapsed();
    let peak_rss_kib = worker.peak_rss_kib();
    let streamed = streamed_txns(&db).await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    let spilled: u64 = log
        .lines()
        .filter(|l| l.contains("replaying its spill file"))
        .filter_map(|l| l.split("bytes=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0);

    let all = records(dir.path());
    let got = ids(&all);
    assert_eq!(got.len(), ROWS, "every row exactly once");
    let mut seen = vec![false; ROWS + 1];
    for id in &got {
        assert!(
            !std::mem::replace(&mut seen[*id as usize], true),
            "row {id} twice"
        );
    }
    assert_eq!(got.iter().min(), Some(&1));
    assert_eq!(got.iter().max(), Some(&(ROWS as i64)));
    assert!(
        all.iter()
            .all(|r| r["lsn"] == all[0]["lsn"] && r["xid"] == all[0]["xid"]),
        "one transaction"
    );
    assert!(streamed >= 1, "the server streamed the transaction");
    assert!(
        spilled > 20 * ROWS as u64,
        "the transaction went through the spill file ({spilled} bytes)"
    );
    assert_eq!(
        spill_files(&spill),
        (0, 0),
        "spill file removed after commit"
    );

    // What holding the transaction would cost: its records as JSON (the smallest form the
    // worker ever has of them; decoded rows in memory take more). A quarter of that is
    // far above a streaming worker's need (buffers, the bounded event channel) and far
    // below any implementation that keeps the transaction.
    let record_bytes: u64 = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let bound_kib = record_bytes / 4 / 1024;
    eprintln!(
        "1M-row transaction: committed after {committed:?}, durable downstream after {delivered:?}; \
         worker peak RSS {} MiB (bound {} MiB = 25% of {} MiB of records); spill file {} MiB; \
         streamed transactions {streamed}",
        peak_rss_kib / 1024,
        bound_kib / 1024,
        record_bytes / 1024 / 1024,
        spilled / 1024 / 1024,
    );
    assert!(
        peak_rss_kib < bound_kib,
        "peak RSS {peak_rss_kib} KiB is not below {bound_kib} KiB"
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_streamed_transaction_is_never_delivered() {
    let (db, dir, worker) = setup("abort", 1000).await;
    let spill = dir.path().join("spill");
    let big = db.client().await;
    big.batch_execute("BEGIN; INSERT INTO t SELECT g, 0 FROM generate_series(1, 20000) g")
        .await
        .unwrap();
    // Streamed and spilled while still open (18,000 rows of ≥ 30 bytes each).
    wait_spilled(&spill, 18_000 * 30).await;
    big.batch_execute("ROLLBACK").await.unwrap();
    wait_for(
        "the spill file to go after the abort",
        DEADLINE,
        async || (spill_files(&spill) == (0, 0)).then_some(()),
    )
    .await;

    let sql = db.client().await;
    sql.batch_execute("BEGIN; INSERT INTO t VALUES (100001, 1)")
        .await
        .unwrap();
    let before = commit(&sql).await;
    wait_confirmed(&db, before, DEADLINE).await;
    assert!(streamed_txns(&db).await >= 1);
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(ids(&records(dir.path())), vec![100001]);
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_savepoints_of_a_streamed_transaction_are_left_out() {
    let (db, dir, worker) = setup("savepoint", 1000).await;
    let spill = dir.path().join("spill");
    let big = db.client().await;
    big.batch_execute(
        "BEGIN;
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 10000) g;
         SAVEPOINT a;
         INSERT INTO t SELECT g, 1 FROM generate_series(10001, 20000) g;",
    )
    .await
    .unwrap();
    // The subtransaction's rows are already in the spill file when it rolls back.
    wait_spilled(&spill, 19_000 * 30).await;
    big.batch_execute(
        "ROLLBACK TO a;
         INSERT INTO t SELECT g, 2 FROM generate_series(20001, 30000) g;
         SAVEPOINT b;
         INSERT INTO t SELECT g, 3 FROM generate_series(30001, 30010) g;
         RELEASE b;
         SAVEPOINT c;
         INSERT INTO t SELECT g, 4 FROM generate_series(40001, 45000) g;
         SAVEPOINT d;
         INSERT INTO t SELECT g, 5 FROM generate_series(45001, 50000) g;
         RELEASE d;
         ROLLBACK TO c;
         INSERT INTO t VALUES (50001, 6);",
    )
    .await
    .unwrap();
    let before = commit(&big).await;
    wait_confirmed(&db, before, DEADLINE).await;
    assert!(streamed_txns(&db).await >= 1);
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(
        spill_files(&spill),
        (0, 0),
        "spill file removed after commit"
    );

    let mut got = ids(&records(dir.path()));
    got.sort_unstable();
    let want: Vec<i64> = (1..=10_000)
        .chain(20_001..=30_010)
        .chain([50_001])
        .collect();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "only the surviving rows");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_transaction_committed_during_a_streamed_one_is_delivered_first() {
    let (db, dir, worker) = setup("interleave", 1000).await;
    let spill = dir.path().join("spill");
    let big = db.client().await;
    big.batch_execute(
        "BEGIN;
         INSERT INTO t SELECT g, 0 FROM generate_series(1, 10000) g;
         SELECT pg_logical_emit_message(true, 'big', 'inside');",
    )
    .await
    .unwrap();
    wait_spilled(&spill, 9_000 * 30).await;

    // Committed (and delivered) while the big one is still open.
    let small = db.client().await;
    small
        .batch_execute("INSERT INTO t VALUES (900001, 1)")
        .await
        .unwrap();
    wait_for("the small transaction's record", DEADLINE, async || {
        ids(&records(dir.path())).contains(&900001).then_some(())
    })
    .await;
    assert_eq!(
        ids(&records(dir.path())),
        vec![900001],
        "nothing of the open one yet"
    );

    big.batch_execute("INSERT INTO t SELECT g, 1 FROM generate_series(10001, 20000) g;")
        .await
        .unwrap();
    let before = commit(&big).await;
    wait_confirmed(&db, before, DEADLINE).await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(spill_files(&spill), (0, 0));

    let all = records(dir.path());
    let got = ids(&all);
    assert_eq!(got.len(), 20_001);
    assert_eq!(got[0], 900001, "commit order: the small one first");
    assert_eq!(
        got[1..].to_vec(),
        (1..=20_000).collect::<Vec<i64>>(),
        "rows in order"
    );
    let lsn = |r: &Value| parse_lsn(r["lsn"].as_str().unwrap());
    assert!(lsn(&all[0]) < lsn(all.last().unwrap()));
    // The transactional message travels inside its (streamed) transaction, in place.
    let message = all.iter().position(|r| r["op"] == "message").unwrap();
    assert_eq!(
        message, 10_001,
        "after the first 10,000 rows of the big transaction"
    );
    assert_eq!(all[message]["prefix"], "big");
    assert_eq!(all[message]["content"], "inside");
    assert_eq!(all[message]["xid"], all.last().unwrap()["xid"]);
    assert_eq!(all[message]["lsn"], all.last().unwrap()["lsn"]);
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_stream_loses_nothing_and_the_next_run_starts_a_fresh_spill() {
    let (db, dir, worker) = setup("crash", 1000).await;
    let spill = dir.path().join("spill");
    let big = db.client().await;
    big.batch_execute("BEGIN; INSERT INTO t SELECT g, 0 FROM generate_series(1, 10000) g")
        .await
        .unwrap();
    wait_spilled(&spill, 9_000 * 30).await;
    worker.kill9();
    assert_eq!(
        spill_files(&spill).0,
        1,
        "the crash leaves the spill file behind"
    );
    wait_for("the slot to be released", DEADLINE, async || {
        db.slot(&db.name).await.filter(|(_, active)| !active)
    })
    .await;

    // The server streams the open transaction again from its first change; the new run
    // dropped the leftover file at start and spills it afresh.
    let manifest = dir.path().join("flow.yaml");
    let worker = Worker::spawn_with_env(&manifest, dir.path(), &[("WALLABY_SPILL_DIR", &spill)]);
    wait_slot_active(&db, &db.name).await;
    big.batch_execute("INSERT INTO t SELECT g, 1 FROM generate_series(10001, 20000) g")
        .await
        .unwrap();
    let before = commit(&big).await;
    wait_confirmed(&db, before, DEADLINE).await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(spill_files(&spill), (0, 0));
    let got = ids(&records(dir.path()));
    assert_eq!(
        got,
        (1..=20_000).collect::<Vec<i64>>(),
        "every row once, in order"
    );
    db.drop_all().await;
}
