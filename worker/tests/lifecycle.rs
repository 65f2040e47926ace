//! Slot and publication lifecycle against the real PostgreSQL: publication creation and
//! `syncPublication` for tables and schemas, `ensurePublication` / `createSlot` /
//! `validateReplication` switched off, take-over of a stale slot holder, and the
//! source-state table.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use wallaby_crds::flow::PostgresSource;
use wallaby_source::SourceState;
use wallaby_source::setup::prepare;

const DEADLINE: Duration = Duration::from_secs(60);
const PG_RECVLOGICAL: &str = "/usr/lib/postgresql/15/bin/pg_recvlogical";

/// A source spec from JSON fields on top of `slot` and `publication`.
fn spec(slot: &str, extra: serde_json::Value) -> PostgresSource {
    let mut v = serde_json::json!({"dsn": "postgres://unused@localhost/unused", "slot": slot, "publication": slot});
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    serde_json::from_value(v).unwrap()
}

/// The superuser's DSN for the test database (FOR TABLES IN SCHEMA needs a superuser).
fn superuser_dsn_for(db: &TestDb) -> String {
    format!(
        "{}/{}",
        superuser_dsn().rsplit_once('/').unwrap().0,
        db.name
    )
}

/// Explicit members of a publication: `table:schema.name` and `schema:name`.
async fn members(client: &tokio_postgres::Client, publication: &str) -> BTreeSet<String> {
    let rows = client
        .query(
            "SELECT 'table:' || n.nspname || '.' || c.relname FROM pg_publication_rel r
               JOIN pg_publication p ON p.oid = r.prpubid JOIN pg_class c ON c.oid = r.prrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = $1
             UNION ALL
             SELECT 'schema:' || n.nspname FROM pg_publication_namespace pn
               JOIN pg_publication p ON p.oid = pn.pnpubid JOIN pg_namespace n ON n.oid = pn.pnnspid
             WHERE p.pubname = $1",
            &[&publication],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_is_created_for_tables_and_schemas_together() {
    let db = TestDb::create("pubcreate").await;
    let admin = connect(&superuser_dsn_for(&db)).await;
    admin
        .batch_execute(
            "CREATE SCHEMA sales; CREATE TABLE sales.orders (id int PRIMARY KEY);
             CREATE TABLE public.items (id int PRIMARY KEY); CREATE TABLE public.other (id int)",
        )
        .await
        .unwrap();
    let s = spec(
        &db.name,
        serde_json::json!({"tables": ["items"], "schemas": ["sales"]}),
    );
    let slot = prepare(&admin, &s).await.unwrap();
    assert!(slot.created, "the slot is created");
    assert_eq!(
        members(&admin, &db.name).await,
        set(&["table:public.items", "schema:sales"])
    );
    let published: BTreeSet<String> = admin
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
            &[&db.name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(published, set(&["public.items", "sales.orders"]));

    // A second start finds both and changes nothing.
    let again = prepare(&admin, &s).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.confirmed_flush_lsn, slot.confirmed_flush_lsn);
    drop(admin);
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_publication_adds_and_drops_tables_and_schemas() {
    let db = TestDb::create("pubsync").await;
    let owner = db.client().await;
    owner
        .batch_execute(
            "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);
             CREATE TABLE c (id int PRIMARY KEY); CREATE SCHEMA extra;
             CREATE TABLE extra.x (id int PRIMARY KEY);",
        )
        .await
        .unwrap();
    let p = db.name.clone();
    let run = async |client: &tokio_postgres::Client, extra: serde_json::Value| {
        prepare(client, &spec(&p, extra)).await
    };

    run(&owner, serde_json::json!({"tables": ["a", "b"]}))
        .await
        .unwrap();
    assert_eq!(
        members(&owner, &p).await,
        set(&["table:public.a", "table:public.b"])
    );

    // off: the list changed, the publication does not.
    run(&owner, serde_json::json!({"tables": ["a", "c"]}))
        .await
        .unwrap();
    assert_eq!(
        members(&owner, &p).await,
        set(&["table:public.a", "table:public.b"])
    );

    // add: c joins, b stays.
    run(
        &owner,
        serde_json::json!({"tables": ["a", "c"], "syncPublication": "add"}),
    )
    .await
    .unwrap();
    assert_eq!(
        members(&owner, &p).await,
        set(&["table:public.a", "table:public.b", "table:public.c"])
    );

    // sync: b, no longer listed, is dropped.
    run(
        &owner,
        serde_json::json!({"tables": ["a", "c"], "syncPublication": "sync"}),
    )
    .await
    .unwrap();
    assert_eq!(
        members(&owner, &p).await,
        set(&["table:public.a", "table:public.c"])
    );

    // A schema added (FOR TABLES IN SCHEMA needs a superuser on PostgreSQL 15) ...
    let denied = run(
        &owner,
        serde_json::json!({"tables": ["a", "c"], "schemas": ["extra"], "syncPublication": "add"}),
    )
    .await
    .unwrap_err()
    .to_string();
    for want in [
        "ALTER PUBLICATION",
        "ADD TABLES IN SCHEMA \"extra\" failed",
        "needs a superuser",
    ] {
        assert!(denied.contains(want), "lacks {want:?}: {denied}");
    }
    let admin = connect(&superuser_dsn_for(&db)).await;
    run(
        &admin,
        serde_json::json!({"tables": ["a", "c"], "schemas": ["extra"], "syncPublication": "add"}),
    )
    .await
    .unwrap();
    assert_eq!(
        members(&admin, &p).await,
        set(&["table:public.a", "table:public.c", "schema:extra"])
    );
    // ... and dropped again by sync, with c, while a stays.
    run(
        &admin,
        serde_json::json!({"tables": ["a"], "syncPublication": "sync"}),
    )
    .await
    .unwrap();
    assert_eq!(members(&admin, &p).await, set(&["table:public.a"]));

    // A schema that does not exist is named, before anything changes.
    let missing = run(
        &admin,
        serde_json::json!({"tables": ["a"], "schemas": ["nope"], "syncPublication": "sync"}),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        missing.contains("schema \"nope\" (source.postgres.schemas[0]) does not exist"),
        "{missing}"
    );
    assert_eq!(members(&admin, &p).await, set(&["table:public.a"]));
    drop((owner, admin));
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_publication_or_slot_is_an_error_when_creation_is_off() {
    let db = TestDb::create("nocreate").await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();

    let err = prepare(
        &client,
        &spec(
            &db.name,
            serde_json::json!({"tables": ["t"], "ensurePublication": false}),
        ),
    )
    .await
    .unwrap_err()
    .to_string();
    for want in [
        &format!(
            "publication \"{}\" does not exist and ensurePublication is false",
            db.name
        ),
        "CREATE PUBLICATION",
        "ensurePublication: true",
    ] {
        assert!(err.contains(want), "lacks {want:?}: {err}");
    }
    assert!(db.slot(&db.name).await.is_none(), "no slot was created");

    let err = prepare(
        &client,
        &spec(
            &db.name,
            serde_json::json!({"tables": ["t"], "createSlot": false}),
        ),
    )
    .await
    .unwrap_err()
    .to_string();
    for want in [
        &format!(
            "replication slot \"{}\" does not exist and createSlot is false",
            db.name
        ),
        "pg_create_logical_replication_slot",
        "createSlot: true",
    ] {
        assert!(err.contains(want), "lacks {want:?}: {err}");
    }
    assert!(db.slot(&db.name).await.is_none(), "no slot was created");
    // The publication was still ensured before the slot check.
    assert_eq!(members(&client, &db.name).await, set(&["table:public.t"]));
    drop(client);
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_replication_false_skips_the_checks() {
    let db = TestDb::create("novalidate").await;
    let role = format!("{}_norepl", db.name);
    let admin = connect(&superuser_dsn_for(&db)).await;
    admin
        .batch_execute(&format!(
            "CREATE TABLE t (id int PRIMARY KEY);
             CREATE PUBLICATION {0} FOR TABLE t;
             CREATE ROLE {role} NOLOGIN NOREPLICATION;",
            db.name
        ))
        .await
        .unwrap();
    // A slot cannot be created in a transaction that wrote.
    admin
        .batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
            db.name
        ))
        .await
        .unwrap();
    // The session now runs as a role without REPLICATION.
    admin
        .batch_execute(&format!("SET ROLE {role}"))
        .await
        .unwrap();
    let checked = spec(
        &db.name,
        serde_json::json!({"tables": ["t"], "createSlot": false}),
    );
    let err = prepare(&admin, &checked).await.unwrap_err().to_string();
    for want in [
        &format!("role \"{role}\" may not start replication"),
        "WITH REPLICATION",
        "rds_replication",
    ] {
        assert!(err.contains(want), "lacks {want:?}: {err}");
    }
    let unchecked = spec(
        &db.name,
        serde_json::json!({"tables": ["t"], "createSlot": false, "validateReplication": false}),
    );
    let slot = prepare(&admin, &unchecked).await.unwrap();
    assert!(!slot.created);
    admin
        .batch_execute(&format!("RESET ROLE; DROP ROLE {role}"))
        .await
        .unwrap();
    drop(admin);
    db.drop_all().await;
}

/// `pg_recvlogical` holding `slot` as the user of `dsn`, with `application_name`.
struct Holder(Child);

impl Holder {
    fn start(dsn: &str, slot: &str, application_name: &str) -> Self {
        let child = Command::new(PG_RECVLOGICAL)
            .arg("-d")
            .arg(format!("{dsn}?application_name={application_name}"))
            .args(["--slot", slot, "--start", "--no-loop", "-f", "/dev/null"])
            .args(["-o", "proto_version=1", "-o"])
            .arg(format!("publication_names={slot}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pg_recvlogical");
        Self(child)
    }

    fn exited(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// PID, application_name and role of the slot's active backend.
async fn slot_holder(client: &tokio_postgres::Client, slot: &str) -> Option<(i32, String, String)> {
    client
        .query_opt(
            "SELECT s.active_pid, a.application_name, a.usename::text FROM pg_replication_slots s
             JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_name = $1 AND s.active",
            &[&slot],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Waits until a walsender streams from `slot` (while the slot is being created, the
/// creating SQL backend shows as its active holder).
async fn wait_streaming(client: &tokio_postgres::Client, slot: &str) {
    wait_for("a walsender to stream from the slot", DEADLINE, async || {
        client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid
                 WHERE s.slot_name = $1 AND a.backend_type = 'walsender'",
                &[&slot],
            )
            .await
            .unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_slot_holder_is_terminated_and_the_worker_streams() {
    let db = TestDb::create("stale").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    // The slot and publication exist, held by a client that no longer reports: the old pod.
    prepare(&sql, &spec(&db.name, serde_json::json!({"tables": ["t"]})))
        .await
        .unwrap();
    let mut holder = Holder::start(&db.dsn, &db.name, "old-pod");
    let (old_pid, _, _) = wait_for("pg_recvlogical to hold the slot", DEADLINE, async || {
        slot_holder(&sql, &db.name)
            .await
            .filter(|h| h.1 == "old-pod")
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &db.dsn, &db.name, &["t"], "");
    let worker = Worker::spawn(&manifest, dir.path());
    let (_, _, role) = wait_for("the worker to take over the slot", DEADLINE, async || {
        slot_holder(&sql, &db.name).await.filter(|h| h.0 != old_pid)
    })
    .await;
    assert_eq!(role, "wallaby");
    // The worker's SQL connection names the flow (pg_walstream's native replication
    // connection does not send application_name).
    let named: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'wallaby-worker/default/test'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        named >= 1,
        "no connection named wallaby-worker/default/test"
    );
    let deadline = Instant::now() + DEADLINE;
    while !holder.exited() {
        assert!(
            Instant::now() < deadline,
            "pg_recvlogical was not terminated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    sql.batch_execute("INSERT INTO t VALUES (1, 'after take-over')")
        .await
        .unwrap();
    let got = wait_for("the change after the take-over", DEADLINE, async || {
        records(dir.path()).into_iter().next()
    })
    .await;
    assert_eq!(got["after"]["v"], "after take-over");
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    let warning = log
        .lines()
        .find(|l| l.contains("terminated the stale holder"))
        .unwrap_or_else(|| panic!("no take-over warning:\n{log}"));
    for want in [
        format!("pid={old_pid}"),
        "old-pod".to_owned(),
        "127.0.0.1".to_owned(),
    ] {
        assert!(warning.contains(&want), "warning lacks {want:?}: {warning}");
    }
    drop(sql);
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_the_worker_may_not_terminate_is_a_precise_error() {
    let db = TestDb::create("foreign").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    prepare(&sql, &spec(&db.name, serde_json::json!({"tables": ["t"]})))
        .await
        .unwrap();
    // A superuser's backend: the worker's role (no pg_signal_backend) may not signal it.
    let _holder = Holder::start(&superuser_dsn_for(&db), &db.name, "admin-session");
    let (pid, _, role) = wait_for("pg_recvlogical to hold the slot", DEADLINE, async || {
        slot_holder(&sql, &db.name).await
    })
    .await;
    assert_eq!(role, "postgres");

    let err = prepare(&sql, &spec(&db.name, serde_json::json!({"tables": ["t"]})))
        .await
        .unwrap_err()
        .to_string();
    for want in [
        format!(
            "replication slot \"{}\" is held by backend PID {pid}",
            db.name
        ),
        "application_name \"admin-session\"".to_owned(),
        "may not terminate it".to_owned(),
        "pg_signal_backend".to_owned(),
    ] {
        assert!(err.contains(&want), "lacks {want:?}: {err}");
    }
    assert_eq!(
        slot_holder(&sql, &db.name).await.map(|h| h.0),
        Some(pid),
        "the holder is untouched"
    );
    drop(_holder);
    drop(sql);
    db.drop_all().await;
}

/// `(status, last_confirmed_lsn, updated_at > started_at, worker)` of a flow's row.
async fn state_row(
    client: &tokio_postgres::Client,
    table: &str,
    flow_id: &str,
) -> Option<(String, Option<String>, std::time::SystemTime, String)> {
    client
        .query_opt(
            &format!(
                "SELECT status, last_confirmed_lsn::text, updated_at, worker FROM {table} WHERE flow_id = $1"
            ),
            &[&flow_id],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_state_row_follows_the_flow() {
    let db = TestDb::create("state").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &db.dsn, &db.name, &["t"], "");
    let worker = Worker::spawn(&manifest, dir.path());
    let table = "wallaby.source_state";
    let (status, lsn, started, who) = wait_for("the state row", DEADLINE, async || {
        let exists: Option<String> = sql
            .query_one("SELECT to_regclass('wallaby.source_state')::text", &[])
            .await
            .unwrap()
            .get(0);
        match exists {
            Some(_) => state_row(&sql, table, "default/test").await,
            None => None,
        }
    })
    .await;
    assert_eq!(status, "running");
    assert_eq!(lsn, None, "nothing confirmed yet");
    assert!(
        who.ends_with(&format!("/{}", worker.child.id())),
        "worker column names the process: {who}"
    );
    let row = sql
        .query_one(
            "SELECT slot, publication, plugin, tables FROM wallaby.source_state WHERE flow_id = 'default/test'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), db.name);
    assert_eq!(row.get::<_, String>(1), db.name);
    assert_eq!(row.get::<_, String>(2), "pgoutput");
    assert_eq!(row.get::<_, Vec<String>>(3), vec!["t".to_owned()]);

    // A WAL position inside the transaction, just before its commit record: the confirmed
    // position must pass it. (The position after the commit would not do: other tests'
    // databases write WAL in between that this slot may never be told about.)
    sql.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let change_lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    sql.batch_execute("COMMIT").await.unwrap();
    // The row may first record an earlier confirmation (an idle keepalive before the
    // insert): wait for the one that covers the change.
    let (_, confirmed, updated, _) = wait_for(
        "the change's checkpoint in the state row",
        DEADLINE,
        async || {
            state_row(&sql, table, "default/test").await.filter(|r| {
                r.1.as_deref()
                    .is_some_and(|c| parse_lsn(c) > parse_lsn(&change_lsn))
            })
        },
    )
    .await;
    assert!(updated > started, "updated_at advanced");
    let confirmed = confirmed.unwrap();
    // The row records what the worker confirmed; the slot hears of it at the next status
    // update.
    wait_for("the slot to reach the recorded LSN", DEADLINE, async || {
        let (slot_lsn, _) = db.slot(&db.name).await?;
        (parse_lsn(&slot_lsn) >= parse_lsn(&confirmed)).then_some(())
    })
    .await;
    assert!(
        parse_lsn(&confirmed) > parse_lsn(&change_lsn),
        "recorded {confirmed} covers the change before {change_lsn}"
    );

    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    let (status, _, _, _) = state_row(&sql, table, "default/test").await.unwrap();
    assert_eq!(status, "stopped");
    drop(sql);
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_state_false_creates_nothing() {
    let db = TestDb::create("nostate").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        dir.path(),
        &db.dsn,
        &db.name,
        &["t"],
        "      ensureState: false",
    );
    let worker = Worker::spawn(&manifest, dir.path());
    wait_streaming(&sql, &db.name).await;
    sql.batch_execute("INSERT INTO t VALUES (1)").await.unwrap();
    wait_for("the change", DEADLINE, async || {
        records(dir.path()).into_iter().next()
    })
    .await;
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    let schema: Option<String> = sql
        .query_one("SELECT to_regnamespace('wallaby')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, None, "no state schema was created");
    drop(sql);
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_create_the_state_table_once_with_custom_names() {
    let db = TestDb::create("statecc").await;
    let s = spec(
        &db.name,
        serde_json::json!({"stateSchema": "audit", "stateTable": "flows"}),
    );
    let clients = [db.client().await, db.client().await, db.client().await];
    // Three workers starting at once on a database without the table.
    let (a, b, c) = tokio::join!(
        SourceState::start(&clients[0], &s, "flow-0"),
        SourceState::start(&clients[1], &s, "flow-1"),
        SourceState::start(&clients[2], &s, "flow-2"),
    );
    for state in [a, b, c] {
        state.unwrap();
    }
    let ids: BTreeSet<String> = clients[0]
        .query("SELECT flow_id FROM audit.flows", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, set(&["flow-0", "flow-1", "flow-2"]));

    // A checkpoint never moves backward; record_stopped sets the status.
    let state = SourceState::start(&clients[0], &s, "flow-0").await.unwrap();
    let lsn = |s: &str| s.parse::<wallaby_pipeline::lsn::Lsn>().unwrap();
    state
        .record_checkpoint(&clients[0], lsn("0/2000"))
        .await
        .unwrap();
    let other = SourceState::start(&clients[1], &s, "flow-0").await.unwrap();
    other
        .record_checkpoint(&clients[1], lsn("0/1000"))
        .await
        .unwrap();
    other.record_stopped(&clients[1], "failed").await.unwrap();
    let (status, confirmed, _, _) = state_row(&clients[0], "audit.flows", "flow-0")
        .await
        .unwrap();
    assert_eq!(status, "failed");
    assert_eq!(confirmed.as_deref(), Some("0/2000"));
    drop(clients);
    db.drop_all().await;
}
