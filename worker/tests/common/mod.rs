//! Test fixtures: the private PostgreSQL (started through e2e/pg.sh), a database per test
//! and polling with deadlines (no fixed sleeps) from wallaby-testkit; the worker binary as a
//! child process and readers of its output.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use wallaby_testkit::DbOptions;
// Not every test file uses every fixture.
#[allow(unused_imports)]
pub use wallaby_testkit::{connect, parse_lsn, repo, superuser_dsn, wait_for};

/// A database owned by the `wallaby` role ([`wallaby_testkit::TestDb`]), dropped (with its
/// slots) at the end, as this suite makes them: the leftovers of an earlier, interrupted
/// run dropped first, and a low `logical_decoding_work_mem`.
pub struct TestDb(wallaby_testkit::TestDb);

impl Deref for TestDb {
    type Target = wallaby_testkit::TestDb;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl TestDb {
    /// A new, empty database `wt_<prefix>_<pid>_<n>`.
    pub async fn create(prefix: &str) -> Self {
        // Leftovers of an earlier, interrupted test run (slot names are cluster-wide).
        // A low logical_decoding_work_mem makes the server stream every transaction above
        // 64kB before it commits (pgoutput protocol v2), so the tests exercise the worker's
        // spill path with small transactions too. It is a per-session setting that
        // walsenders of a database read at connection start; pg_walstream's connection
        // ignores libpq `options`, hence the database-level default.
        let options = DbOptions {
            drop_stale: true,
            settings: &[("logical_decoding_work_mem", "64kB")],
        };
        Self(wallaby_testkit::TestDb::create_with(prefix, &options).await)
    }

    /// `confirmed_flush_lsn` and `active` of a slot (`None` until it exists and is
    /// consistent: a slot being created has no confirmed position yet).
    pub async fn slot(&self, slot: &str) -> Option<(String, bool)> {
        self.0.confirmed_slot(slot).await
    }

    /// Drops the database's inactive slots, then the database.
    pub async fn drop_all(self) {
        self.0.drop_all().await;
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
            .env("WALLABY_LOG", "info,wallaby_worker=debug,wallaby_source=debug,wallaby_ddl=debug,wallaby_pipeline=debug,wallaby_destinations=debug,wallaby_pg=debug")
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
                    wallaby_codec::builtin_type(c.oid, c.typmod)
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
