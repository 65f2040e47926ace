//! Test fixtures: the private PostgreSQL (started through e2e/pg.sh), a database per test,
//! the worker binary as a child process, and polling with deadlines (no fixed sleeps).

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Superuser DSN of the private PostgreSQL, started on first use.
pub fn superuser_dsn() -> &'static str {
    static DSN: OnceLock<String> = OnceLock::new();
    DSN.get_or_init(|| {
        let pg = repo().join("e2e/pg.sh");
        let start = Command::new(&pg)
            .arg("start")
            .output()
            .expect("running e2e/pg.sh start");
        assert!(
            start.status.success(),
            "e2e/pg.sh start failed: {}",
            String::from_utf8_lossy(&start.stderr)
        );
        let env = Command::new(&pg)
            .arg("env")
            .output()
            .expect("running e2e/pg.sh env");
        let text = String::from_utf8_lossy(&env.stdout);
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("WALLABY_PG_SUPERUSER_DSN="))
            .map(|s| s.trim_matches(|c| c == '"' || c == '\'').to_owned())
            .expect("pg.sh env prints WALLABY_PG_SUPERUSER_DSN")
    })
}

pub async fn connect(dsn: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database owned by the `wallaby` role, dropped (with its slots) at the end.
pub struct TestDb {
    admin: tokio_postgres::Client,
    pub name: String,
    /// DSN of the `wallaby` role (SCRAM over TCP) for this database.
    pub dsn: String,
}

impl TestDb {
    pub async fn create(prefix: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "wt_{prefix}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(superuser_dsn()).await;
        // Leftovers of an earlier, interrupted test run (slot names are cluster-wide).
        let me = format!("wt\\_%\\_{}\\_%", std::process::id());
        let stale = admin
            .query(
                "SELECT datname::text FROM pg_database WHERE datname LIKE 'wt\\_%' AND datname NOT LIKE $1",
                &[&me],
            )
            .await
            .expect("list stale databases");
        for row in stale {
            let db: String = row.get(0);
            let _ = admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active",
                    &[&db],
                )
                .await;
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await;
        }
        // A low logical_decoding_work_mem makes the server stream every transaction above
        // 64kB before it commits (pgoutput protocol v2), so the tests exercise the worker's
        // spill path with small transactions too. It is a per-session setting that
        // walsenders of a database read at connection start; pg_walstream's connection
        // ignores libpq `options`, hence the database-level default.
        admin
            .batch_execute(&format!("CREATE DATABASE {name} OWNER wallaby"))
            .await
            .expect("create database");
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {name} SET logical_decoding_work_mem = '64kB'"
            ))
            .await
            .expect("set logical_decoding_work_mem");
        let base = superuser_dsn().replace("postgres:postgres@", "wallaby:wallaby@");
        let dsn = format!(
            "{}/{name}",
            base.rsplit_once('/').expect("dsn has a database").0
        );
        Self { admin, name, dsn }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.dsn).await
    }

    /// A superuser session in this database (CREATE EXTENSION of untrusted extensions).
    pub async fn superuser_client(&self) -> tokio_postgres::Client {
        let base = superuser_dsn();
        let dsn = format!(
            "{}/{}",
            base.rsplit_once('/').expect("dsn has a database").0,
            self.name
        );
        connect(&dsn).await
    }

    /// `confirmed_flush_lsn` and `active` of a slot (`None` until it exists and is
    /// consistent: a slot being created has no confirmed position yet).
    pub async fn slot(&self, slot: &str) -> Option<(String, bool)> {
        self.admin
            .query_opt(
                "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn IS NOT NULL",
                &[&slot],
            )
            .await
            .unwrap_or_else(|e| panic!("slot query: {e:?}"))
            .map(|r| (r.get(0), r.get(1)))
    }

    /// Waits (60 s at most) until a worker is attached to the database's slot (named
    /// after the database).
    pub async fn attached(&self) {
        wait_for(
            "the worker to attach to the slot",
            Duration::from_secs(60),
            async || self.slot(&self.name).await.filter(|(_, active)| *active),
        )
        .await;
    }

    pub async fn drop_all(self) {
        let admin = connect(superuser_dsn()).await;
        let _ = admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active",
                &[&self.name],
            )
            .await;
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// Writes a standalone manifest: Flow (+ Secret with the DSN) and one file Destination.
pub fn write_manifest(
    dir: &Path,
    dsn: &str,
    slot: &str,
    tables: &[&str],
    source_extra: &str,
) -> PathBuf {
    let tables = tables
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        r#"apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {{name: test}}
spec:
  source:
    postgres:
      secretRef: {{name: pg}}
      slot: {slot}
      publication: {slot}
      tables: [{tables}]
      batchTimeout: 50ms
      statusInterval: 1s
{source_extra}
  destinations: [{{name: files}}]
---
apiVersion: wallaby.dev/v1alpha1
kind: Destination
metadata: {{name: files}}
spec:
  type: file
  file: {{path: "{out}", maxFileBytes: 65536}}
---
apiVersion: v1
kind: Secret
metadata: {{name: pg}}
stringData: {{dsn: "{dsn}"}}
"#,
        out = dir.join("out").display()
    );
    let path = dir.join("flow.yaml");
    std::fs::write(&path, text).expect("write manifest");
    path
}

pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
}

impl Worker {
    pub fn spawn(manifest: &Path, dir: &Path) -> Self {
        Self::spawn_with_env(manifest, dir, &[])
    }

    /// Spawns with extra environment variables (e.g. `WALLABY_SPILL_DIR`).
    pub fn spawn_with_env(manifest: &Path, dir: &Path, env: &[(&str, &Path)]) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let log = dir.join(format!("worker-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let child = Command::new(env!("CARGO_BIN_EXE_wallaby-worker"))
            .args(["run", "-f"])
            .arg(manifest)
            .arg("--status-file")
            .arg(dir.join("status.json"))
            .env("WALLABY_LOG", "info,wallaby_worker=debug")
            // Tests run workers side by side: any free port, not the shared default.
            .env("WALLABY_METRICS_ADDR", "127.0.0.1:0")
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn worker");
        Self { child, log }
    }

    /// Peak resident set size (VmHWM) of the running worker, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(mut self) -> (Option<i32>, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("wait worker");
        (status.code(), self.log_text())
    }

    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    /// A failing test must not leave a worker holding its slot.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every record in the output directory, in file then line order.
pub fn records(dir: &Path) -> Vec<Value> {
    let out = dir.join("out");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&out)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "jsonl"));
    files.sort();
    let mut all = Vec::new();
    for f in files {
        for line in std::fs::read_to_string(&f).unwrap_or_default().lines() {
            // A line being written right now may be incomplete; the caller polls again.
            // Schema header lines (`wallaby_schema`) describe the changes that follow.
            if let Ok(v) = serde_json::from_str::<Value>(line)
                && v.get("op").is_some()
            {
                all.push(v);
            }
        }
    }
    all
}

/// Every logical-message line (`{"kind": "message", …}`) in the output directory, in file
/// then line order. The file destination writes them as their own lines, after the change
/// payloads of their batch, so their place among changes is told by `lsn`, not file order.
pub fn messages(dir: &Path) -> Vec<Value> {
    output_lines(dir)
        .into_iter()
        .filter(|v| v["kind"] == "message")
        .collect()
}

/// Every complete JSON line of the output directory (headers, changes, messages), in file
/// then line order.
pub fn output_lines(dir: &Path) -> Vec<Value> {
    let out = dir.join("out");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&out)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "jsonl"));
    files.sort();
    let mut all = Vec::new();
    for f in files {
        for line in std::fs::read_to_string(&f).unwrap_or_default().lines() {
            // A line being written right now may be incomplete; the caller polls again.
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                all.push(v);
            }
        }
    }
    all
}

/// Spill files (`xid-*.spill`) in a spill directory and their total size.
pub fn spill_files(spill: &Path) -> (usize, u64) {
    std::fs::read_dir(spill)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".spill"))
                .fold((0, 0), |(n, bytes), e| {
                    (n + 1, bytes + e.metadata().map(|m| m.len()).unwrap_or(0))
                })
        })
        .unwrap_or((0, 0))
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').expect("lsn");
    (u64::from_str_radix(hi, 16).expect("hi") << 32) | u64::from_str_radix(lo, 16).expect("lo")
}

/// Applies one `payloadMode: wal` body (frames of pgoutput messages, see
/// `destination::pgoutput`) to `rows`, keyed by the integer first column, each row as the
/// text of its columns; parsed by pg_walstream's own pgoutput parser, i.e. what a consumer
/// of the replication protocol would hold. Unchanged TOAST keeps the previous value.
pub fn apply_pgoutput(
    body: &[u8],
    rows: &mut std::collections::BTreeMap<i32, Vec<Option<String>>>,
) {
    use pg_walstream::{LogicalReplicationMessage as M, LogicalReplicationParser, TupleData};
    let cell = |t: &TupleData, i: usize| {
        let c = t.get_column(i).unwrap();
        (!c.is_null() && !c.is_unchanged()).then(|| c.as_string().unwrap())
    };
    let mut parser = LogicalReplicationParser::with_protocol_version(1);
    let mut rest = body;
    let mut in_tx = false;
    let mut width = 0;
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest[8..12].try_into().unwrap()) as usize;
        let message = parser
            .parse_wal_message(&rest[12..12 + len])
            .unwrap()
            .message;
        rest = &rest[12 + len..];
        match message {
            M::Begin { .. } => in_tx = true,
            M::Commit { .. } => in_tx = false,
            M::Relation { columns, .. } => width = columns.len(),
            M::Insert { tuple, .. }
            | M::Update {
                new_tuple: tuple, ..
            } => {
                assert!(in_tx, "a change outside Begin/Commit");
                assert_eq!(tuple.column_count(), width, "tuple width = Relation's");
                let id: i32 = cell(&tuple, 0).unwrap().parse().unwrap();
                let old = rows.get(&id).cloned();
                let values = (0..width)
                    .map(
                        |i| match (&old, tuple.get_column(i).unwrap().is_unchanged()) {
                            (Some(old), true) => old[i].clone(),
                            _ => cell(&tuple, i),
                        },
                    )
                    .collect();
                rows.insert(id, values);
            }
            M::Delete { old_tuple, .. } => {
                assert!(in_tx, "a change outside Begin/Commit");
                rows.remove(&cell(&old_tuple, 0).unwrap().parse::<i32>().unwrap());
            }
            other => panic!("unexpected pgoutput message {other:?}"),
        }
    }
    assert!(!in_tx, "every Begin has its Commit");
}

/// Decodes one self-describing payload (any wire format) into the schema it carries and
/// its changes. Only built-in column types: what the destination tests' tables use.
pub fn decode_payload(
    format: wallaby_codec::WireFormat,
    bytes: &[u8],
) -> (wallaby_codec::TableSchema, Vec<wallaby_codec::Change>) {
    let ps = wallaby_codec::payload_schema(format, bytes).unwrap();
    let (schema, table) = ps.table.split_once('.').unwrap();
    let schema = wallaby_codec::TableSchema {
        schema: schema.into(),
        table: table.into(),
        columns: ps
            .columns
            .iter()
            .map(|c| wallaby_codec::ColumnSchema {
                name: c.name.clone(),
                ty: std::sync::Arc::new(
                    wallaby_worker::source::types::builtin_type(c.oid, c.typmod)
                        .unwrap_or_else(|| panic!("{} is not a built-in type", c.oid)),
                ),
                key: c.key,
                mapped_type: c.mapped_type.clone(),
            })
            .collect(),
        version: ps.schema_version,
    };
    let changes = wallaby_codec::decode(format, &schema, bytes).unwrap();
    (schema, changes)
}

/// Rows keyed by the integer first column, each as the text of its columns (what the
/// request/response destination tests compare with PostgreSQL).
pub type TextRows = std::collections::BTreeMap<i32, Vec<Option<String>>>;

/// A database with table `t (id int primary key, title text, big text)`, `big` stored out
/// of line (TOAST) so that updates can leave it unchanged.
pub async fn toast_table_db(prefix: &str) -> TestDb {
    let db = TestDb::create(prefix).await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, title text, big text);
             ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL;",
        )
        .await
        .unwrap();
    db
}

/// The rows of `t` as PostgreSQL prints them.
pub async fn toast_table_rows(db: &TestDb) -> TextRows {
    db.client()
        .await
        .query("SELECT id, id::text, title, big FROM t ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), vec![r.get(1), r.get(2), r.get(3)]))
        .collect()
}

/// Applies decoded changes of `t` to `rows` in order: the table a consumer would hold. An
/// unchanged TOAST value (absent) keeps the previous one.
pub fn apply_changes(
    schema: &wallaby_codec::TableSchema,
    changes: Vec<wallaby_codec::Change>,
    rows: &mut TextRows,
) {
    use wallaby_codec::{Op, Value};
    let id_of = |row: &wallaby_codec::Row| match row.values[0] {
        Value::Int4(i) => i,
        ref other => panic!("id decoded as {other:?}"),
    };
    for c in changes {
        if c.op == Op::Delete {
            rows.remove(&id_of(c.before.as_ref().unwrap()));
            continue;
        }
        let after = c.after.unwrap();
        let id = id_of(&after);
        let old = rows.get(&id).cloned();
        let values = after
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| match (&old, after.absent.contains(&i)) {
                (Some(old), true) => old[i].clone(),
                _ => (*v != Value::Null)
                    .then(|| wallaby_codec::text::render(&schema.columns[i].ty, v)),
            })
            .collect();
        rows.insert(id, values);
    }
}

impl Worker {
    /// Waits (60 s at most) for the worker to exit by itself; returns its code and log.
    pub async fn exit_by_itself(mut self) -> (Option<i32>, String) {
        let code = wait_for("the worker to exit", Duration::from_secs(60), async || {
            self.child.try_wait().unwrap().map(|s| s.code())
        })
        .await;
        (code, self.log_text())
    }
}
