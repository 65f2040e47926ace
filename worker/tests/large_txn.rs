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

/// A table `t` and a worker with `batchSize: batch_size` (and `memoryBudgetBytes` when
/// given), attached to its slot, with a spill directory it has cleaned at start.
async fn setup(
    prefix: &str,
    batch_size: u32,
    memory_budget_bytes: Option<u64>,
) -> (TestDb, tempfile::TempDir, Worker) {
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
        &match memory_budget_bytes {
            Some(budget) => {
                format!(
                    "      batchSize: {batch_size}\n      memoryBudgetBytes: {budget}\n      batchMaxBytes: {}",
                    budget / 4
                )
            }
            None => format!("      batchSize: {batch_size}"),
        },
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

/// Primary keys of the rows of `t`, in delivery (file) order: with one table each batch is
/// one payload, so file order is the order the worker delivered them in.
fn ids(records: &[Value]) -> Vec<i64> {
    records
        .iter()
        .filter(|r| r["table"] == "public.t")
        .map(|r| {
            let row = if r["op"] == "delete" {
                &r["before"]
            } else {
                &r["after"]
            };
            row["id"].as_i64().unwrap_or_else(|| panic!("no id in {r}"))
        })
        .collect()
}

/// A change's own WAL position, or its transaction's commit position (`field`).
fn lsn_of(r: &Value, field: &str) -> u64 {
    r[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a number in {r}"))
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
    // The pipeline holds at most `memoryBudgetBytes` of decoded changes (the batch being
    // assembled and batches not yet written); with 16 MiB and `batchMaxBytes` a quarter of
    // it, the peak is set by configuration.
    const BUDGET: u64 = 16 << 20;
    // What the worker holds outside the budget while a transaction streams through: the
    // bounded event channel from the reader, the spill file's read buffer, one batch encoded
    // as JSON lines (≈ 2 MiB for 10,000 rows), the file writer's 1 MiB buffer, allocator
    // slack (glibc arenas of the runtime's threads keep their high-water mark), measured at
    // 30–46 MiB depending on how fast the destination drains. The test's discriminating
    // check is the second one: from a warm-up transaction a fifth the size to the full one,
    // the peak may not grow by the budget.
    const OUTSIDE_BUDGET: u64 = 64 << 20;
    const WARM_UP_ROWS: usize = 200_000;
    let (db, dir, worker) = setup("million", 10_000, Some(BUDGET)).await;
    let spill = dir.path().join("spill");
    // The attached, idle worker: code, runtime, connection buffers.
    let idle_rss_kib = worker.peak_rss_kib();

    // The warm-up transaction takes the worker to its working size (budget spent, channels
    // full, allocator pools grown); rows with negative ids, told apart below.
    let warm = db.client().await;
    warm.batch_execute(&format!(
        "BEGIN; INSERT INTO t SELECT -g, g % 1000 FROM generate_series(1, {WARM_UP_ROWS}) g"
    ))
    .await
    .unwrap();
    let before_warm_commit = commit(&warm).await;
    wait_confirmed(&db, before_warm_commit, Duration::from_secs(600)).await;
    let warm_rss_kib = worker.peak_rss_kib();

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

    let all: Vec<Value> = records(dir.path())
        .into_iter()
        .filter(|r| r["after"]["id"].as_i64().is_some_and(|id| id > 0))
        .collect();
    let got = ids(&all);
    if got.len() != ROWS {
        // Name what is missing and what is on disk, so a failure can be diagnosed.
        let present: std::collections::HashSet<i64> = got.iter().copied().collect();
        let mut missing: Vec<(i64, i64)> = Vec::new();
        for id in 1..=ROWS as i64 {
            if present.contains(&id) {
                continue;
            }
            match missing.last_mut() {
                Some((_, end)) if *end == id - 1 => *end = id,
                _ => missing.push((id, id)),
            }
        }
        let files: Vec<String> = std::fs::read_dir(dir.path().join("out"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                format!(
                    "{} ({} bytes)",
                    e.file_name().to_string_lossy(),
                    e.metadata().unwrap().len()
                )
            })
            .collect();
        panic!(
            "{} rows instead of {ROWS}; missing id ranges (first 20): {:?}; files: {files:?}\nworker log:\n{log}",
            got.len(),
            &missing[..missing.len().min(20)]
        );
    }
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
            .all(|r| r["commit_lsn"] == all[0]["commit_lsn"] && r["xid"] == all[0]["xid"]),
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

    // What holding the transaction would cost: its records as JSON (a compact form of
    // them; decoded rows in memory take more). The files also hold the warm-up's records.
    let all_bytes: u64 = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let record_bytes = all_bytes * ROWS as u64 / (ROWS + WARM_UP_ROWS) as u64;
    // The worker may grow above its idle size by the budget plus what lives outside it;
    // that bound must itself be far below holding the transaction (half its records as
    // JSON, which are smaller than decoded rows), or this test could not tell a streaming
    // worker from one that keeps it.
    let growth_bound_kib = (BUDGET + OUTSIDE_BUDGET) / 1024;
    let bound_kib = idle_rss_kib + growth_bound_kib;
    eprintln!(
        "1M-row transaction: committed after {committed:?}, durable downstream after {delivered:?}; \
         worker peak RSS {} MiB (idle {} MiB; after the {WARM_UP_ROWS}-row warm-up {} MiB; \
         bound {} MiB = idle + memoryBudgetBytes {} MiB + {} MiB outside the budget; the \
         records are {} MiB as JSON); spill file {} MiB; streamed transactions {streamed}",
        peak_rss_kib / 1024,
        idle_rss_kib / 1024,
        warm_rss_kib / 1024,
        bound_kib / 1024,
        BUDGET >> 20,
        OUTSIDE_BUDGET >> 20,
        record_bytes >> 20,
        spilled >> 20,
    );
    assert!(
        growth_bound_kib < record_bytes / 2 / 1024,
        "the memory bound ({growth_bound_kib} KiB above idle) is not far below the \
         transaction's {record_bytes} bytes of records"
    );
    assert!(
        peak_rss_kib < bound_kib,
        "peak RSS {peak_rss_kib} KiB is not below {bound_kib} KiB \
         (idle {idle_rss_kib} KiB + budget + outside-budget allowance)"
    );
    // Five times the rows of the warm-up, and the peak grows by less than twice the
    // budget (measured: 5–25 MiB, depending on how far the destination lags when the
    // spill file is replayed): the worker's memory does not follow the transaction's size
    // (holding the extra 800,000 rows would take more than ten times the budget).
    assert!(
        peak_rss_kib < warm_rss_kib + 2 * BUDGET / 1024,
        "peak RSS grew from {warm_rss_kib} KiB after the {WARM_UP_ROWS}-row transaction to \
         {peak_rss_kib} KiB after the {ROWS}-row one: memory follows the transaction's size"
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_streamed_transaction_is_never_delivered() {
    let (db, dir, worker) = setup("abort", 1000, None).await;
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
    let (db, dir, worker) = setup("savepoint", 1000, None).await;
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
    let (db, dir, worker) = setup("interleave", 1000, None).await;
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
    assert_eq!(
        messages(dir.path()),
        Vec::<Value>::new(),
        "not even its message"
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
    let big_commit = lsn_of(all.last().unwrap(), "commit_lsn");
    assert!(lsn_of(&all[0], "commit_lsn") < big_commit);
    assert!(
        all[1..]
            .iter()
            .all(|r| lsn_of(r, "commit_lsn") == big_commit && r["xid"] == all[1]["xid"]),
        "the 20,000 rows are one transaction"
    );
    assert!(
        all[1..]
            .windows(2)
            .all(|w| lsn_of(&w[0], "lsn") < lsn_of(&w[1], "lsn")),
        "each row keeps its own, increasing WAL position"
    );
    // The transactional message travels inside its (streamed) transaction, in place: the
    // file destination writes messages on their own lines, so its place is its LSN.
    let messages = messages(dir.path());
    assert_eq!(messages.len(), 1, "{messages:?}");
    let message = &messages[0];
    assert_eq!(message["prefix"], "big");
    assert_eq!(message["content"], "inside");
    assert_eq!(message["transactional"], true);
    assert_eq!(
        parse_lsn(message["commit_lsn"].as_str().unwrap()),
        big_commit,
        "the message belongs to the big transaction"
    );
    let message_lsn = parse_lsn(message["lsn"].as_str().unwrap());
    let rows_before = all[1..]
        .iter()
        .take_while(|r| lsn_of(r, "lsn") < message_lsn)
        .count();
    assert_eq!(
        rows_before, 10_000,
        "after the first 10,000 rows of the big transaction"
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_stream_loses_nothing_and_the_next_run_starts_a_fresh_spill() {
    let (db, dir, worker) = setup("crash", 1000, None).await;
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
