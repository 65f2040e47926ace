//! `--drain` (stop by itself once the server's WAL position at start is delivered and
//! confirmed) and `--start-lsn` (skip ahead; never behind the slot) against the real
//! PostgreSQL, with the worker binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(60);

fn spawn(manifest: &Path, dir: &Path, extra: &[&str], log: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_wallaby-worker"))
        .args(["run", "-f"])
        .arg(manifest)
        .arg("--status-file")
        .arg(dir.join("status.json"))
        .arg("--spill-dir")
        .arg(dir.join("spill"))
        .args(extra)
        .env("WALLABY_LOG", "info,wallaby_worker=debug,wallaby_source=debug,wallaby_ddl=debug,wallaby_pipeline=debug,wallaby_destinations=debug,wallaby_pg=debug")
        .env("WALLABY_METRICS_ADDR", "off")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).unwrap())
        .spawn()
        .unwrap()
}

/// Waits for the worker to exit by itself.
async fn exited(child: &mut Child, what: &str) -> ExitStatus {
    wait_for(what, DEADLINE, async || child.try_wait().unwrap()).await
}

async fn current_wal(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

fn ids(dir: &Path) -> Vec<i64> {
    let mut ids: Vec<i64> = records(dir)
        .iter()
        .filter_map(|r| r.pointer("/after/id").and_then(|v| v.as_i64()))
        .collect();
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_delivers_what_was_written_before_the_start_and_exits_zero() {
    let db = TestDb::create("drain").await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &db.dsn, &db.name, &["t"], "");

    // First run: creates the slot, has nothing to deliver, stops by itself.
    let mut first = spawn(&manifest, dir.path(), &["--drain"], "first.log");
    let status = exited(&mut first, "the first --drain run to exit").await;
    let log = std::fs::read_to_string(dir.path().join("first.log")).unwrap();
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("--drain: caught up"), "{log}");

    c.batch_execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 500) g")
        .await
        .unwrap();
    let written = parse_lsn(&current_wal(&c).await);

    let mut second = spawn(&manifest, dir.path(), &["--drain"], "second.log");
    let status = exited(&mut second, "the second --drain run to exit").await;
    let log = std::fs::read_to_string(dir.path().join("second.log")).unwrap();
    assert!(status.success(), "exit {status:?}\n{log}");
    assert_eq!(ids(dir.path()), (1..=500).collect::<Vec<_>>(), "{log}");
    let (confirmed, active) = db.slot(&db.name).await.unwrap();
    assert!(!active, "the walsender is gone after the run");
    assert!(
        parse_lsn(&confirmed) >= written,
        "slot confirmed {confirmed}, rows were written up to {written:X}"
    );
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_lsn_skips_ahead_and_refuses_to_go_behind_the_slot() {
    let db = TestDb::create("startlsn").await;
    let c = db.client().await;
    c.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &db.dsn, &db.name, &["t"], "");
    let mut create = spawn(&manifest, dir.path(), &["--drain"], "create.log");
    assert!(exited(&mut create, "the slot-creating run").await.success());
    let (slot_lsn, _) = db.slot(&db.name).await.unwrap();

    // Behind the slot: refused before streaming, with the reason and the way out.
    let behind = {
        let lsn = parse_lsn(&slot_lsn) - 1;
        format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
    };
    let mut refused = spawn(
        &manifest,
        dir.path(),
        &["--drain", "--start-lsn", &behind],
        "refused.log",
    );
    let status = exited(&mut refused, "the refused run to exit").await;
    let log = std::fs::read_to_string(dir.path().join("refused.log")).unwrap();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "--start-lsn {behind} is before slot {}'s confirmed_flush_lsn {slot_lsn}",
            db.name
        )) && log.contains("cannot rewind a logical slot"),
        "{log}"
    );
    assert_eq!(
        db.slot(&db.name).await.unwrap().0,
        slot_lsn,
        "slot untouched"
    );

    // Ahead of the slot: transactions committed before the LSN are skipped.
    c.batch_execute("INSERT INTO t SELECT g, 'skipped' FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let from = current_wal(&c).await;
    c.batch_execute("INSERT INTO t SELECT g, 'kept' FROM generate_series(11, 20) g")
        .await
        .unwrap();
    let mut ahead = spawn(
        &manifest,
        dir.path(),
        &["--drain", "--start-lsn", &from],
        "ahead.log",
    );
    let status = exited(&mut ahead, "the --start-lsn run to exit").await;
    let log = std::fs::read_to_string(dir.path().join("ahead.log")).unwrap();
    assert!(status.success(), "{log}");
    assert_eq!(ids(dir.path()), (11..=20).collect::<Vec<_>>(), "{log}");
    db.drop_all().await;
}
