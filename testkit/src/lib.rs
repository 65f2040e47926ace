//! Fixtures for tests that run against the private PostgreSQL of e2e/pg.sh: the server,
//! started on first use, a database per test owned by the `wallaby` role, binaries of this
//! workspace, and polling with deadlines (no fixed sleeps). A dev-dependency only.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A binary of this workspace in the target directory (`CARGO_TARGET_DIR`, else
/// `<repo>/target`), overridden by `WALLABY_E2E_<NAME>_BIN` (`wallaby-worker` → `WORKER`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let var = format!(
        "WALLABY_E2E_{}_BIN",
        name.trim_start_matches("wallaby-").to_uppercase()
    );
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p {name}) or set {var}",
        path.display()
    );
    path
}

/// Superuser DSN of the private PostgreSQL (`e2e/pg.sh start`, then `e2e/pg.sh env`),
/// started on first use in this process.
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

/// A client (no TLS) with its connection driven by a spawned task.
pub async fn connect(dsn: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// `dsn` (a URL) with its database replaced by `db`.
pub fn with_db(dsn: &str, db: &str) -> String {
    let mut url = url::Url::parse(dsn).unwrap();
    url.set_path(db);
    url.to_string()
}

/// An LSN in PostgreSQL's text form (`16/B374D848`) as a number.
pub fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').expect("lsn");
    (u64::from_str_radix(hi, 16).expect("hi") << 32) | u64::from_str_radix(lo, 16).expect("lo")
}

/// Polls `check` every 50 ms until it returns `Some`; panics naming `what` once `timeout`
/// has passed.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    check: impl AsyncFnMut() -> Option<T>,
) -> T {
    wait_for_every(what, timeout, Duration::from_millis(50), check).await
}

/// [`wait_for`] polling every `every`.
pub async fn wait_for_every<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
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
        tokio::time::sleep(every).await;
    }
}

/// How [`TestDb::create_with`] prepares a database.
#[derive(Debug, Clone, Copy, Default)]
pub struct DbOptions<'a> {
    /// First drop the `wt_*` databases (and their inactive slots, whose names are
    /// cluster-wide) that other, earlier test processes left behind.
    pub drop_stale: bool,
    /// Database-level defaults, `ALTER DATABASE … SET name = 'value'`: what sessions
    /// (walsenders too) of the database read at connection start.
    pub settings: &'a [(&'a str, &'a str)],
}

/// A database per test, `wt_<prefix>_<pid>_<n>`, owned by the `wallaby` role; dropped with
/// its slots by [`TestDb::drop_all`].
#[derive(Debug)]
pub struct TestDb {
    admin: tokio_postgres::Client,
    /// The database name.
    pub name: String,
    /// DSN of the `wallaby` role (SCRAM over TCP) for this database.
    pub dsn: String,
}

impl TestDb {
    /// A new, empty database.
    pub async fn create(prefix: &str) -> Self {
        Self::create_with(prefix, &DbOptions::default()).await
    }

    /// A new, empty database prepared as `options` say.
    pub async fn create_with(prefix: &str, options: &DbOptions<'_>) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "wt_{prefix}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(superuser_dsn()).await;
        if options.drop_stale {
            drop_stale(&admin).await;
        }
        admin
            .batch_execute(&format!("CREATE DATABASE {name} OWNER wallaby"))
            .await
            .expect("create database");
        for (setting, value) in options.settings {
            admin
                .batch_execute(&format!("ALTER DATABASE {name} SET {setting} = '{value}'"))
                .await
                .unwrap_or_else(|e| panic!("set {setting}: {e:?}"));
        }
        let base = superuser_dsn().replace("postgres:postgres@", "wallaby:wallaby@");
        let dsn = format!(
            "{}/{name}",
            base.rsplit_once('/').expect("dsn has a database").0
        );
        Self { admin, name, dsn }
    }

    /// A session of the `wallaby` role in this database.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.dsn).await
    }

    /// The superuser DSN for this database.
    pub fn superuser_dsn(&self) -> String {
        let base = superuser_dsn();
        format!(
            "{}/{}",
            base.rsplit_once('/').expect("dsn has a database").0,
            self.name
        )
    }

    /// A superuser session in this database (CREATE EXTENSION of untrusted extensions).
    pub async fn superuser_client(&self) -> tokio_postgres::Client {
        connect(&self.superuser_dsn()).await
    }

    /// `(confirmed_flush_lsn, active)` of a slot, `None` when it does not exist (the LSN is
    /// `None` while the slot is being created).
    pub async fn slot(&self, slot: &str) -> Option<(Option<String>, bool)> {
        self.admin
            .query_opt(
                "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("slot query")
            .map(|r| (r.get(0), r.get(1)))
    }

    /// `confirmed_flush_lsn` and `active` of a slot (`None` until it exists and is
    /// consistent: a slot being created has no confirmed position yet).
    pub async fn confirmed_slot(&self, slot: &str) -> Option<(String, bool)> {
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
            async || {
                self.confirmed_slot(&self.name)
                    .await
                    .filter(|(_, active)| *active)
            },
        )
        .await;
    }

    /// Drops the database's inactive slots, then the database (forcing its sessions out),
    /// over a new superuser session.
    pub async fn drop_all(self) {
        let admin = connect(superuser_dsn()).await;
        drop_database(&admin, &self.name).await;
    }
}

/// Drops the `wt_*` databases of other processes (leftovers of an interrupted test run).
async fn drop_stale(admin: &tokio_postgres::Client) {
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
        drop_database(admin, &db).await;
    }
}

/// Drops the inactive slots of `db`, then `db`; errors are ignored (cleanup).
async fn drop_database(admin: &tokio_postgres::Client, db: &str) {
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
