//! Idle databases: while the published table is quiet and another table takes heavy
//! writes, keepalive replies confirm the server's latest position, so the slot does not
//! retain the other table's WAL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    TestDb, Worker, connect, parse_lsn, records, superuser_dsn, wait_for, write_manifest,
};

const DEADLINE: Duration = Duration::from_secs(60);

/// WAL the slot forces the server to keep: current position minus `restart_lsn`.
async fn retained(admin: &tokio_postgres::Client, slot: &str) -> Option<(u64, u64)> {
    let row = admin
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                    confirmed_flush_lsn::text
             FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn IS NOT NULL",
            &[&slot],
        )
        .await
        .unwrap()?;
    Some((row.get::<_, i64>(0).max(0) as u64, parse_lsn(row.get(1))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_slot_does_not_retain_wal_of_unpublished_tables() {
    let db = TestDb::create("idle").await;
    let sql = db.client().await;
    sql.batch_execute(
        "CREATE TABLE published (id int PRIMARY KEY, v text);
         CREATE TABLE noise (id bigserial PRIMARY KEY, pad text);",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &db.dsn, &db.name, &["public.published"], "");
    let worker = Worker::spawn(&manifest, dir.path());
    db.attached().await;
    sql.batch_execute("INSERT INTO published VALUES (1, 'one')")
        .await
        .unwrap();
    wait_for("the published row", DEADLINE, async || {
        (records(dir.path()).len() == 1).then_some(())
    })
    .await;

    let admin = connect(superuser_dsn()).await;
    let before: String = admin
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    // About 64 MiB of WAL in a table outside the publication, in many transactions.
    for _ in 0..32 {
        sql.batch_execute(
            "INSERT INTO noise (pad) SELECT repeat(md5(g::text), 16) FROM generate_series(1, 2500) g",
        )
        .await
        .unwrap();
    }
    let written: i64 = admin
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
            &[&before],
        )
        .await
        .unwrap()
        .get(0);
    assert!(written > 32 << 20, "the noise wrote {written} bytes of WAL");

    // The slot follows the server: restart_lsn moves once a checkpoint logs the running
    // transactions, and the retained WAL falls well below what was written.
    let (kept, confirmed) = wait_for("retained WAL to stay bounded", DEADLINE, async || {
        admin.batch_execute("CHECKPOINT").await.unwrap();
        let (kept, confirmed) = retained(&admin, &db.name).await?;
        (kept < 8 << 20 && confirmed > parse_lsn(&before)).then_some((kept, confirmed))
    })
    .await;
    eprintln!(
        "idle slot: {written} bytes of unpublished WAL written, {kept} retained, confirmed {confirmed:X}"
    );
    // Nothing was delivered for the noise, and the published table still streams.
    sql.batch_execute("INSERT INTO published VALUES (2, 'two')")
        .await
        .unwrap();
    wait_for("the second published row", DEADLINE, async || {
        (records(dir.path()).len() == 2).then_some(())
    })
    .await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}
