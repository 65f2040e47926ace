//! DDL capture, schema history and the gate, against the real PostgreSQL: statements
//! arrive at their exact LSN inside their transaction and version the schema; a gated
//! flow stops before a statement until `wallaby-worker ddl approve`, fails on `reject`
//! with the slot held, waits for `ddl apply` with `autoApply: false`; without capture,
//! drift is found in the stream and versions stay stable across restarts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{TestDb, Worker, messages, parse_lsn, records, wait_for, write_manifest};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

/// Installs the capture as a superuser, from the SQL the worker prints for a DBA.
async fn install_capture(db: &TestDb, manifest: &Path) {
    let out = ddl_cli(manifest, &["install", "--print"]);
    assert!(out.0, "ddl install --print failed: {}", out.2);
    db.superuser_client()
        .await
        .batch_execute(&out.1)
        .await
        .unwrap();
}

/// Runs statements one by one (each its own transaction).
async fn run_sql(sql: &tokio_postgres::Client, statements: &[&str]) {
    for stmt in statements {
        sql.batch_execute(stmt)
            .await
            .unwrap_or_else(|e| panic!("{stmt}: {e}"));
    }
}

/// Runs `wallaby-worker ddl <args> -f manifest`: (success, stdout, stderr).
fn ddl_cli(manifest: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wallaby-worker"))
        .arg("ddl")
        .args(args)
        .arg("-f")
        .arg(manifest)
        .output()
        .expect("run wallaby-worker ddl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn condition(status: &Value, kind: &str) -> Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind).cloned())
        .unwrap_or(Value::Null)
}

fn record_with(dir: &Path, table: &str, id: i64) -> Option<Value> {
    records(dir).into_iter().find(|r| {
        r["table"] == table && r["after"]["id"].as_i64() == Some(id) && r["op"] != "delete"
    })
}

fn ddl_messages(dir: &Path) -> Vec<Value> {
    messages(dir)
        .into_iter()
        .filter(|m| m["prefix"] == "wallaby_ddl")
        .collect()
}

/// An LSN as records (a number) or message lines (`X/Y`) carry it.
fn lsn_of(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| parse_lsn(v.as_str().expect("an LSN")))
}

async fn confirmed_flush(db: &TestDb, slot: &str) -> u64 {
    parse_lsn(&db.slot(slot).await.expect("slot exists").0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captured_statements_arrive_at_their_exact_lsn_and_version_the_schema() {
    let db = TestDb::create("ddlcap").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY, a text, q int)")
        .await
        .unwrap();
    // A schema publication (superuser on PostgreSQL 15), so created tables join it.
    db.superuser_client()
        .await
        .batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLES IN SCHEMA public",
            db.name
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &db.dsn,
        &db.name,
        &[],
        "      schemas: [public]\n      captureDDL: true",
    );
    install_capture(&db, &manifest).await;
    let worker = Worker::spawn(&manifest, dir.path());
    db.attached().await;

    sql.batch_execute("INSERT INTO t VALUES (1, 'x', 1)")
        .await
        .unwrap();
    // One transaction: a row before the statement, the statement, a row after it.
    sql.batch_execute(
        "BEGIN;
         INSERT INTO t VALUES (2, 'y', 2);
         ALTER TABLE t ADD COLUMN b text;
         INSERT INTO t VALUES (3, 'z', 3, 'bee');
         COMMIT;",
    )
    .await
    .unwrap();
    run_sql(
        &sql,
        &[
            "ALTER TABLE t RENAME COLUMN a TO a2",
            "INSERT INTO t VALUES (4, 'r', 4, 'b4')",
            "ALTER TABLE t ALTER COLUMN q TYPE bigint",
            "INSERT INTO t VALUES (5, 's', 5000000000, 'b5')",
            "ALTER TABLE t DROP COLUMN b",
            "INSERT INTO t VALUES (6, 'u', 6)",
            "CREATE TABLE public.n (id int PRIMARY KEY, v text)",
            "INSERT INTO public.n VALUES (1, 'new')",
            "DROP TABLE public.n",
            "CREATE INDEX t_q ON t (q)",
            "INSERT INTO t VALUES (7, 'end', 7)",
        ],
    )
    .await;
    wait_for("the last row", DEADLINE, async || {
        record_with(dir.path(), "public.t", 7).map(|_| ())
    })
    .await;
    // Only statements on the flow's tables reach the stream: not the worker's own state
    // tables, not the index.
    let mut msgs = ddl_messages(dir.path());
    assert_eq!(msgs.len(), 6, "{msgs:#?}\n{}", worker.log_text());
    msgs.sort_by_key(|m| lsn_of(&m["lsn"]));
    let tags: Vec<String> = msgs
        .iter()
        .map(|m| {
            let c: Value = serde_json::from_str(m["content"].as_str().unwrap()).unwrap();
            c["tag"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        tags,
        [
            "ALTER TABLE",
            "ALTER TABLE",
            "ALTER TABLE",
            "ALTER TABLE",
            "CREATE TABLE",
            "DROP TABLE",
        ],
        "{msgs:#?}"
    );

    // Exact placement: between the rows around it, inside their transaction.
    let r2 = record_with(dir.path(), "public.t", 2).unwrap();
    let r3 = record_with(dir.path(), "public.t", 3).unwrap();
    let add = &msgs[0];
    let at = lsn_of(&add["lsn"]);
    // pgoutput gives a message the end of its WAL record, which is where the next record
    // (row 3's insert) starts.
    assert!(
        lsn_of(&r2["lsn"]) < at && at <= lsn_of(&r3["lsn"]),
        "ADD COLUMN at {at:X} is not between rows 2 and 3: {r2} {r3}"
    );
    assert_eq!(lsn_of(&add["commit_lsn"]), lsn_of(&r2["commit_lsn"]));
    assert_eq!(lsn_of(&add["commit_lsn"]), lsn_of(&r3["commit_lsn"]));
    assert_eq!(add["transactional"], true);

    // Each statement starts a schema version; rows carry the version of their shape.
    let versions: Vec<(i64, u64)> = (1..=7)
        .map(|id| {
            let r = record_with(dir.path(), "public.t", id).unwrap();
            (id, r["schema_version"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        versions,
        [(1, 1), (2, 1), (3, 2), (4, 3), (5, 4), (6, 5), (7, 5)]
    );
    let r3 = record_with(dir.path(), "public.t", 3).unwrap();
    assert_eq!(r3["after"]["b"], "bee");
    let r5 = record_with(dir.path(), "public.t", 5).unwrap();
    assert_eq!(r5["after"]["a2"], "s");
    assert_eq!(r5["after"]["q"], 5_000_000_000_i64);
    let n = record_with(dir.path(), "public.n", 1).unwrap();
    assert_eq!(n["schema_version"], 1);

    // The history and the log, durable in the state schema.
    let history = sql
        .query(
            "SELECT version, source, lsn::text, columns::text FROM wallaby.schema_history
             WHERE table_name = 'public.t' ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let sources: Vec<(i32, String)> = history.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        sources,
        [
            (1, "catalog".to_owned()),
            (2, "ddl".to_owned()),
            (3, "ddl".to_owned()),
            (4, "ddl".to_owned()),
            (5, "ddl".to_owned())
        ]
    );
    let v2_lsn: String = history[1].get(2);
    assert_eq!(parse_lsn(&v2_lsn), at, "version 2 starts at the statement");
    let v3_columns: String = history[2].get(3);
    assert!(
        v3_columns.contains("\"a2\"") && v3_columns.contains("\"attnum\""),
        "{v3_columns}"
    );
    let events = sql
        .query(
            "SELECT tag, tables, state, gated FROM wallaby.ddl_events ORDER BY lsn",
            &[],
        )
        .await
        .unwrap();
    let events: Vec<(String, Vec<String>, String, bool)> = events
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    // The index is not a table change of the flow: not in the log.
    assert_eq!(events.len(), 6, "{events:?}");
    assert!(
        events.iter().all(|e| e.2 == "Applied" && !e.3),
        "{events:?}"
    );
    assert_eq!(events[4].0, "CREATE TABLE");
    assert_eq!(events[4].1, ["public.n"]);
    assert_eq!(events[5].0, "DROP TABLE");

    let (list_ok, list, err) = ddl_cli(&manifest, &["list"]);
    assert!(list_ok, "{err}");
    assert_eq!(list.lines().count(), 7, "{list}");
    let (hist_ok, hist, err) = ddl_cli(&manifest, &["history", "--table", "public.t"]);
    assert!(hist_ok, "{err}");
    let hist: Vec<Value> = serde_json::from_str(&hist).unwrap();
    assert_eq!(hist.len(), 5);

    let st = wait_for("the status to show the last change", DEADLINE, async || {
        let s = status(dir.path());
        (s["lastSchemaChange"]["source"] == "ddl").then_some(s)
    })
    .await;
    assert_eq!(condition(&st, "DDLGated")["status"], "False");
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("schema drift"), "{log}");
    db.drop_all().await;
}

/// A flow over `public.t (id, a)` with capture and the `ddl` policy given, its worker
/// running and attached.
struct GatedFlow {
    db: TestDb,
    sql: tokio_postgres::Client,
    dir: tempfile::TempDir,
    manifest: std::path::PathBuf,
    worker: Worker,
}

async fn gated_flow(prefix: &str, policy: &str) -> GatedFlow {
    let db = TestDb::create(prefix).await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &db.dsn,
        &db.name,
        &["public.t"],
        "      captureDDL: true",
    );
    let text = std::fs::read_to_string(&manifest).unwrap().replace(
        "  destinations: [{name: files}]",
        &format!("  ddl: {policy}\n  destinations: [{{name: files}}]"),
    );
    std::fs::write(&manifest, text).unwrap();
    install_capture(&db, &manifest).await;
    let worker = Worker::spawn(&manifest, dir.path());
    db.attached().await;
    GatedFlow {
        db,
        sql,
        dir,
        manifest,
        worker,
    }
}

/// Waits for `DDLGated=True` with `reason`; its message must name the command `hint`.
async fn wait_gated(dir: &Path, reason: &str, hint: &str) {
    let gate = wait_for(&format!("DDLGated=True ({reason})"), DEADLINE, async || {
        let s = status(dir);
        let c = condition(&s, "DDLGated");
        (c["status"] == "True" && c["reason"] == reason).then_some(c)
    })
    .await;
    assert!(gate["message"].as_str().unwrap().contains(hint), "{gate}");
}

async fn ddl_lsn(db: &TestDb, tag_state: &str) -> u64 {
    let sql = db.client().await;
    let row = sql
        .query_one(
            "SELECT lsn::text FROM wallaby.ddl_events WHERE state = $1 ORDER BY lsn DESC LIMIT 1",
            &[&tag_state],
        )
        .await
        .unwrap();
    parse_lsn(&row.get::<_, String>(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_statement_waits_for_approve_and_a_rejected_one_stops_the_flow() {
    let GatedFlow {
        db,
        sql,
        dir,
        manifest,
        worker,
    } = gated_flow("ddlgate", "{gate: true, autoApprove: false}").await;
    run_sql(
        &sql,
        &[
            "INSERT INTO t VALUES (1, 'before')",
            "ALTER TABLE t ADD COLUMN b int",
            "INSERT INTO t VALUES (2, 'after', 42)",
        ],
    )
    .await;

    wait_gated(dir.path(), "AwaitingApproval", "ddl approve").await;
    // Everything before the statement is delivered and confirmed; nothing after it.
    let r1 = record_with(dir.path(), "public.t", 1).expect("the row before the statement");
    let r1_commit = lsn_of(&r1["commit_lsn"]);
    let at = ddl_lsn(&db, "Pending").await;
    wait_for(
        "the slot to confirm the row before the statement",
        DEADLINE,
        async || {
            let c = confirmed_flush(&db, &db.name).await;
            (c > r1_commit).then_some(())
        },
    )
    .await;
    assert!(record_with(dir.path(), "public.t", 2).is_none());
    let (ok, pending, err) = ddl_cli(&manifest, &["list", "--state", "pending"]);
    assert!(ok, "{err}");
    assert_eq!(pending.lines().count(), 2, "{pending}");
    assert!(
        pending.contains("ALTER TABLE t ADD COLUMN b int"),
        "{pending}"
    );
    // The slot must not pass the statement while it waits.
    assert!(confirmed_flush(&db, &db.name).await <= at);

    let (ok, out, err) = ddl_cli(&manifest, &["approve", "1"]);
    assert!(ok, "{out}{err}");
    let r2 = wait_for("the row after the statement", DEADLINE, async || {
        record_with(dir.path(), "public.t", 2)
    })
    .await;
    assert_eq!(r2["after"]["b"], 42);
    assert_eq!(r2["schema_version"], 2);
    wait_for("DDLGated=False", DEADLINE, async || {
        (condition(&status(dir.path()), "DDLGated")["status"] == "False").then_some(())
    })
    .await;
    // A decision is final.
    let (ok, _, err) = ddl_cli(&manifest, &["reject", "1"]);
    assert!(!ok && err.contains("already Approved"), "{err}");

    // The second statement is rejected: the flow stops before it, the slot is held.
    run_sql(
        &sql,
        &["ALTER TABLE t DROP COLUMN a", "INSERT INTO t VALUES (3, 7)"],
    )
    .await;
    wait_gated(dir.path(), "AwaitingApproval", "ddl reject").await;
    let second = ddl_lsn(&db, "Pending").await;
    let (ok, out, err) = ddl_cli(
        &manifest,
        &[
            "reject",
            &format!("{:X}/{:X}", second >> 32, second & 0xFFFF_FFFF),
        ],
    );
    assert!(ok, "{out}{err}");
    let (code, log) = worker.exit_by_itself().await;
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("was rejected"), "{log}");
    assert!(log.contains("ddl gate:"), "{log}");
    assert!(record_with(dir.path(), "public.t", 3).is_none());
    assert!(confirmed_flush(&db, &db.name).await <= second);
    let st = status(dir.path());
    assert_eq!(st["phase"], "Failed", "{st}");

    // Restarted, it stops there again: the rejection is durable.
    let again = Worker::spawn(&manifest, dir.path());
    let (code, log) = again.exit_by_itself().await;
    assert_ne!(code, Some(0), "{log}");
    assert!(log.contains("was rejected"), "{log}");
    assert!(record_with(dir.path(), "public.t", 3).is_none());
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_auto_apply_the_flow_waits_for_the_apply_confirmation() {
    let GatedFlow {
        db,
        sql,
        dir,
        manifest,
        worker,
    } = gated_flow("ddlapply", "{autoApply: false}").await;
    run_sql(
        &sql,
        &[
            "ALTER TABLE t ADD COLUMN b int",
            "INSERT INTO t VALUES (1, 'after', 1)",
        ],
    )
    .await;
    wait_gated(dir.path(), "AwaitingApply", "ddl apply").await;
    assert!(record_with(dir.path(), "public.t", 1).is_none());
    // Decided automatically (no gate), so it can be confirmed right away.
    let (ok, out, err) = ddl_cli(&manifest, &["apply", "1"]);
    assert!(ok, "{out}{err}");
    wait_for("the row after the statement", DEADLINE, async || {
        record_with(dir.path(), "public.t", 1)
    })
    .await;
    let row = sql
        .query_one("SELECT state, apply_confirmed FROM wallaby.ddl_events", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Applied");
    assert!(row.get::<_, bool>(1));
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_capture_drift_is_reported_and_versions_survive_a_restart() {
    let db = TestDb::create("ddldrift").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &db.dsn, &db.name, &["public.t"], "");
    let worker = Worker::spawn(&manifest, dir.path());
    db.attached().await;
    run_sql(
        &sql,
        &[
            "INSERT INTO t VALUES (1, 'x')",
            "ALTER TABLE t ADD COLUMN b int",
            "INSERT INTO t VALUES (2, 'y', 2)",
        ],
    )
    .await;
    let st = wait_for("drift in the status", DEADLINE, async || {
        let s = status(dir.path());
        (s["lastSchemaChange"]["source"] == "stream").then_some(s)
    })
    .await;
    assert_eq!(st["lastSchemaChange"]["table"], "public.t");
    assert_eq!(st["lastSchemaChange"]["version"], 2);
    assert!(
        st["lastSchemaChange"]["summary"]
            .as_str()
            .unwrap()
            .contains("+b"),
        "{st}"
    );
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("schema drift"), "{log}");

    // A restarted worker numbers the same shape the same way.
    let worker = Worker::spawn(&manifest, dir.path());
    db.attached().await;
    sql.batch_execute("INSERT INTO t VALUES (3, 'z', 3)")
        .await
        .unwrap();
    let r3 = wait_for("the row after the restart", DEADLINE, async || {
        record_with(dir.path(), "public.t", 3)
    })
    .await;
    assert_eq!(r3["schema_version"], 2);
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}

/// The body of `GET /metrics` from a worker listening on `addr`.
async fn scrape(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_gate_survives_kill_9_and_is_counted() {
    let GatedFlow {
        db,
        sql,
        dir,
        manifest,
        worker,
    } = gated_flow("ddlkill", "{gate: true, autoApprove: false}").await;
    run_sql(
        &sql,
        &[
            "ALTER TABLE t ADD COLUMN b int",
            "INSERT INTO t VALUES (1, 'after', 1)",
        ],
    )
    .await;
    wait_gated(dir.path(), "AwaitingApproval", "ddl approve").await;
    worker.kill9();
    std::fs::remove_file(dir.path().join("status.json")).unwrap();

    // Restarted, it meets the same statement and waits again: one record, not two.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let worker = Worker::spawn_with_env(
        &manifest,
        dir.path(),
        &[("WALLABY_METRICS_ADDR", Path::new(&addr))],
    );
    wait_gated(dir.path(), "AwaitingApproval", "ddl approve").await;
    // This process stopped once; the version was recorded by the first one.
    let metrics = wait_for("the gate in /metrics", DEADLINE, async || {
        scrape(&addr)
            .await
            .filter(|m| m.contains("wallaby_ddl_gated_total 1"))
    })
    .await;
    assert!(
        !metrics.contains("wallaby_schema_changes_total{source=\"ddl\"} 1"),
        "{metrics}"
    );
    let (ok, list, err) = ddl_cli(&manifest, &["list"]);
    assert!(ok, "{err}");
    assert_eq!(
        list.lines().count(),
        2,
        "one statement, recorded once: {list}"
    );
    assert!(record_with(dir.path(), "public.t", 1).is_none());

    let (ok, out, err) = ddl_cli(&manifest, &["approve", "1"]);
    assert!(ok, "{out}{err}");
    let row = wait_for("the row after the statement", DEADLINE, async || {
        record_with(dir.path(), "public.t", 1)
    })
    .await;
    assert_eq!(row["after"]["b"], 1);
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}
