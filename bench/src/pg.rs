//! The private PostgreSQL as the harness uses it: a superuser connection, a fresh database
//! per workload (dropped with its slots afterwards), slots and LSNs, and the walsender
//! that serves a slot.

use anyhow::{Context, Result};
use tokio_postgres::{Client, NoTls};
use url::Url;

/// Connects and drives the connection on the runtime.
pub async fn connect(dsn: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact(dsn)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The DSN without its password, for messages.
pub fn redact(dsn: &str) -> String {
    match Url::parse(dsn) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparseable DSN>".into(),
    }
}

/// `dsn` pointing at database `db`, with `application_name` set.
pub fn dsn_for(dsn: &str, db: &str, application_name: &str) -> Result<String> {
    let mut u = Url::parse(dsn).with_context(|| {
        format!(
            "the superuser DSN {} is not a postgres:// URL (e2e/pg.sh env prints one)",
            redact(dsn)
        )
    })?;
    u.set_path(&format!("/{db}"));
    let rest: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| k != "application_name")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    u.query_pairs_mut()
        .clear()
        .extend_pairs(rest)
        .append_pair("application_name", application_name);
    Ok(u.to_string())
}

/// Drops `db` after dropping every slot in it (DROP DATABASE refuses while logical slots
/// exist). Missing is fine.
pub async fn drop_database(admin: &Client, db: &str) -> Result<()> {
    admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
            &[&db],
        )
        .await
        .with_context(|| format!("dropping the replication slots of database {db}"))?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .with_context(|| format!("dropping database {db}"))?;
    Ok(())
}

/// Drops leftovers of an interrupted earlier run, then creates `db` with the given
/// `logical_decoding_work_mem` (the walsenders of the run read it at connection start).
pub async fn create_database(admin: &Client, db: &str, decoding_work_mem: &str) -> Result<()> {
    drop_database(admin, db).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .with_context(|| format!("creating database {db}"))?;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET logical_decoding_work_mem = '{decoding_work_mem}'"
        ))
        .await
        .with_context(|| {
            format!("setting logical_decoding_work_mem = {decoding_work_mem:?} on database {db}")
        })?;
    Ok(())
}

pub async fn create_slot(client: &Client, slot: &str) -> Result<()> {
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .with_context(|| format!("creating logical replication slot {slot}"))?;
    Ok(())
}

/// A WAL position, as PostgreSQL prints it (`16/B374D848`) and as a byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lsn {
    pub text: String,
    pub bytes: u64,
}

/// `pg_current_wal_insert_lsn()`: the end of the WAL inserted so far, including commits
/// of `synchronous_commit = off` sessions not yet written out.
pub async fn insert_lsn(client: &Client) -> Result<Lsn> {
    lsn(client, "pg_current_wal_insert_lsn()").await
}

/// Waits until the WAL up to `target` is flushed: walsenders only send flushed WAL, and a
/// `--drain` run targets the flushed `pg_current_wal_lsn()` at its start.
pub async fn wait_flushed(client: &Client, target: &Lsn) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let flushed = lsn(client, "pg_current_wal_flush_lsn()").await?;
        if flushed.bytes >= target.bytes {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "WAL flush stayed at {} for 60 s, short of {}: is the server's WAL writer stuck?",
                flushed.text,
                target.text
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

async fn lsn(client: &Client, function: &str) -> Result<Lsn> {
    let row = client
        .query_one(&format!("SELECT {function}::text"), &[])
        .await
        .with_context(|| format!("reading {function}"))?;
    let text: String = row.get(0);
    let bytes = parse_lsn(&text)
        .with_context(|| format!("{function} returned {text:?}, not X/Y in hex"))?;
    Ok(Lsn { text, bytes })
}

fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Pid of the walsender holding `slot`, if one does.
pub async fn slot_walsender(client: &Client, slot: &str) -> Result<Option<u32>> {
    let row = client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .with_context(|| format!("reading pg_replication_slots for slot {slot}"))?;
    Ok(row
        .and_then(|r| r.get::<_, Option<i32>>(0))
        .and_then(|p| u32::try_from(p).ok()))
}

/// `confirmed_flush_lsn` of `slot` as a byte offset (0 when unset).
pub async fn confirmed_flush(client: &Client, slot: &str) -> Result<Lsn> {
    let row = client
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn, '0/0')::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .with_context(|| format!("reading confirmed_flush_lsn of slot {slot}"))?;
    let text: String = row.get(0);
    let bytes = parse_lsn(&text)
        .with_context(|| format!("confirmed_flush_lsn {text:?} of slot {slot} is not X/Y"))?;
    Ok(Lsn { text, bytes })
}

/// `SELECT version()`.
pub async fn server_version(client: &Client) -> Result<String> {
    let row = client
        .query_one("SELECT version()", &[])
        .await
        .context("reading the server version")?;
    Ok(row.get(0))
}
