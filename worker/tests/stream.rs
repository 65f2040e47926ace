//! The standalone worker against the real PostgreSQL: round trip of every operation,
//! resume after kill -9, and clean shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

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

fn row_id(r: &Value) -> Option<i64> {
    r["after"]["id"]
        .as_i64()
        .or_else(|| r["before"]["id"].as_i64())
}

fn summary(r: &Value) -> Value {
    json!({"table": r["table"], "op": r["op"], "before": r["before"], "after": r["after"], "before_absent": r["before_absent"]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_round_trips_with_primary_key_and_replica_identity_full() {
    let db = TestDb::create("roundtrip").await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int);
         CREATE TABLE events (a int, b text);
         ALTER TABLE events REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &db.dsn,
        &db.name,
        &["public.items", "events"],
        "",
    );
    let worker = Worker::spawn(&manifest, dir.path());
    wait_slot_active(&db, &db.name).await;

    // One transaction per statement (a multi-statement simple query would be one).
    for statement in [
        "INSERT INTO items VALUES (1, 'apple', 3), (2, 'pear', NULL)",
        "UPDATE items SET qty = 4 WHERE id = 1",
        "DELETE FROM items WHERE id = 2",
        "INSERT INTO events VALUES (10, 'x')",
        "UPDATE events SET b = 'y' WHERE a = 10",
        "DELETE FROM events WHERE a = 10",
        "TRUNCATE items",
    ] {
        sql.batch_execute(statement).await.unwrap();
    }
    let last_commit: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);

    let mut got = wait_for("8 records", DEADLINE, async || {
        let r = records(dir.path());
        (r.len() >= 8).then_some(r)
    })
    .await;
    // A batch holds one payload per table; (commit LSN, change LSN) is the commit order.
    got.sort_by_key(|r| (r["commit_lsn"].as_u64(), r["lsn"].as_u64()));
    let none = json!([]);
    let want = vec![
        json!({"table": "public.items", "op": "insert", "before": null, "after": {"id": 1, "name": "apple", "qty": 3}, "before_absent": none}),
        json!({"table": "public.items", "op": "insert", "before": null, "after": {"id": 2, "name": "pear", "qty": null}, "before_absent": none}),
        json!({"table": "public.items", "op": "update", "before": null, "after": {"id": 1, "name": "apple", "qty": 4}, "before_absent": none}),
        // A key-only old tuple: the non-key columns were not sent, and say so.
        json!({"table": "public.items", "op": "delete", "before": {"id": 2, "name": null, "qty": null}, "after": null, "before_absent": ["name", "qty"]}),
        json!({"table": "public.events", "op": "insert", "before": null, "after": {"a": 10, "b": "x"}, "before_absent": none}),
        json!({"table": "public.events", "op": "update", "before": {"a": 10, "b": "x"}, "after": {"a": 10, "b": "y"}, "before_absent": none}),
        json!({"table": "public.events", "op": "delete", "before": {"a": 10, "b": "y"}, "after": null, "before_absent": none}),
        json!({"table": "public.items", "op": "truncate", "before": null, "after": null, "before_absent": none}),
    ];
    assert_eq!(got.iter().map(summary).collect::<Vec<_>>(), want);
    // Statement by statement in commit order: the two inserts share a transaction, every
    // other record has its own, later commit LSN.
    let lsns: Vec<u64> = got
        .iter()
        .map(|r| r["commit_lsn"].as_u64().unwrap())
        .collect();
    assert_eq!(lsns[0], lsns[1], "{lsns:?}");
    assert!(lsns[1..].windows(2).all(|w| w[0] < w[1]), "{lsns:?}");
    assert!(
        got.iter()
            .all(|r| r["schema_version"] == 1 && r["xid"].is_u64() && r["commit_time"].is_string())
    );

    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "SIGTERM must exit 0 after flushing:\n{log}");
    // The server releases the slot once it has seen the connection close.
    let confirmed = wait_for("the slot to be released", DEADLINE, async || {
        db.slot(&db.name)
            .await
            .and_then(|(confirmed, active)| (!active).then_some(confirmed))
    })
    .await;
    assert!(
        parse_lsn(&confirmed) >= got.last().unwrap()["commit_lsn"].as_u64().unwrap(),
        "slot confirmed {confirmed}, last record {}",
        got.last().unwrap()["commit_lsn"]
    );
    assert!(parse_lsn(&confirmed) <= parse_lsn(&last_commit) + 1024 * 1024);
    let status: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("status.json")).unwrap())
            .unwrap();
    assert_eq!(
        status["checkpoint"]["lsn"],
        json!(confirmed),
        "status file checkpoint = slot position"
    );
    assert_eq!(status["counters"]["rows"], json!(7));
    assert_eq!(status["counters"]["truncates"], json!(1));
    assert!(
        !log.contains("wallaby:wallaby") && !log.contains("password='"),
        "no DSN or password in logs"
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_duplicates_only_the_unconfirmed_tail() {
    let db = TestDb::create("kill9").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &db.dsn,
        &db.name,
        &["t"],
        "      batchSize: 200",
    );
    let worker = Worker::spawn(&manifest, dir.path());
    wait_slot_active(&db, &db.name).await;

    // A writer commits 2,000 transactions of 5 rows while the worker is killed and restarted.
    const TXNS: i64 = 2000;
    let writer_dsn = db.dsn.clone();
    let writer = tokio::spawn(async move {
        let c = connect(&writer_dsn).await;
        for i in 0..TXNS {
            c.execute(
                "INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series($1::bigint, $1::bigint + 4) g",
                &[&(i * 5)],
            )
            .await
            .unwrap();
        }
    });
    // Kill once a third of the rows are on disk and the slot has confirmed some of them,
    // so the kill lands between confirmed and unconfirmed batches.
    let initial = parse_lsn(&db.slot(&db.name).await.unwrap().0);
    wait_for("rows on disk and a confirmed batch", DEADLINE, async || {
        let on_disk = records(dir.path()).len() >= (TXNS as usize * 5) / 3;
        let confirmed = parse_lsn(&db.slot(&db.name).await?.0) > initial;
        (on_disk && confirmed).then_some(())
    })
    .await;
    worker.kill9();
    let (confirmed_at_kill, _) = wait_for("the slot to be released", DEADLINE, async || {
        db.slot(&db.name).await.filter(|(_, active)| !active)
    })
    .await;
    let confirmed_at_kill = parse_lsn(&confirmed_at_kill);

    let worker = Worker::spawn(&manifest, dir.path());
    writer.await.unwrap();
    let all = wait_for("every committed row", DEADLINE * 2, async || {
        let r = records(dir.path());
        let ids: std::collections::HashSet<i64> = r.iter().filter_map(row_id).collect();
        (ids.len() == TXNS as usize * 5).then_some(r)
    })
    .await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");

    let mut seen: HashMap<i64, Vec<u64>> = HashMap::new();
    for r in &all {
        seen.entry(row_id(r).unwrap())
            .or_default()
            .push(r["commit_lsn"].as_u64().unwrap());
    }
    assert_eq!(
        seen.len(),
        TXNS as usize * 5,
        "every committed row is present"
    );
    let duplicated: Vec<(&i64, &Vec<u64>)> = seen.iter().filter(|(_, l)| l.len() > 1).collect();
    for (id, lsns) in &duplicated {
        assert!(
            lsns.iter().all(|l| *l >= confirmed_at_kill),
            "row {id} was duplicated although its transaction ({lsns:?}) was confirmed before the kill (slot at {confirmed_at_kill:X})"
        );
        assert_eq!(
            lsns.len(),
            2,
            "row {id} delivered more than twice: {lsns:?}"
        );
    }
    // Rows of transactions confirmed before the kill appear exactly once.
    let confirmed_rows = seen.values().filter(|l| l[0] < confirmed_at_kill).count();
    assert!(
        confirmed_rows > 0,
        "the kill happened after some batches were confirmed"
    );
    eprintln!(
        "kill -9: {} rows, {} confirmed before the kill, {} re-delivered from the unconfirmed tail",
        seen.len(),
        confirmed_rows,
        duplicated.len()
    );
    db.drop_all().await;
}
