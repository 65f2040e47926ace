//! Preflight on a normal SQL connection before replication starts: server settings
//! (`validateReplication`), the tables, the publication (`ensurePublication`,
//! `syncPublication`) and the slot (`createSlot`, taking it over from a stale holder).
//! Every failure names the object and the fix.

use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use wallaby_crds::flow::{PostgresSource, SyncPublication};

use super::SourceError;

/// What preflight found about the slot.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// `confirmed_flush_lsn` the stream resumes from.
    pub confirmed_flush_lsn: String,
    /// True when this run created the slot.
    pub created: bool,
}

/// A `schema.table` name from the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    /// Schema (default `public`).
    pub schema: String,
    /// Table.
    pub table: String,
}

impl TableName {
    /// Parses `schema.table` or `table` (meaning `public.table`).
    pub fn parse(s: &str) -> Self {
        match s.split_once('.') {
            Some((schema, table)) => Self {
                schema: schema.into(),
                table: table.into(),
            },
            None => Self {
                schema: "public".into(),
                table: s.into(),
            },
        }
    }

    /// `"schema"."table"`, quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

pub use wallaby_pg::quote_ident;

/// How long a terminated slot holder may take to release the slot.
const HOLDER_RELEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the slot is polled while waiting for its holder to go.
const HOLDER_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Holders terminated in one start before giving up: a holder that keeps coming back is a
/// live client (another Flow on the same slot?), not a stale one.
const MAX_HOLDER_TERMINATIONS: u32 = 3;

/// Runs every preflight step in order.
pub async fn prepare(client: &Client, spec: &PostgresSource) -> Result<SlotState, SourceError> {
    prepare_publication(client, spec).await?;
    ensure_slot(client, spec).await
}

/// The preflight steps before the slot: server settings, tables, publication. The
/// publication must exist before the slot is created (pgoutput looks it up as of each
/// change), which is why an initial snapshot creates its slot between the two.
pub async fn prepare_publication(
    client: &Client,
    spec: &PostgresSource,
) -> Result<(), SourceError> {
    if spec.validate_replication {
        check_server_settings(client, spec).await?;
    } else {
        tracing::debug!(
            "validateReplication is false: skipping the wal_level, max_replication_slots, max_wal_senders and REPLICATION checks"
        );
    }
    let tables: Vec<TableName> = spec.tables.iter().map(|t| TableName::parse(t)).collect();
    check_tables_exist(client, &tables, &spec.schemas).await?;
    ensure_publication(client, spec, &tables).await
}

/// The message of a server error, or the error itself.
fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

async fn check_server_settings(client: &Client, spec: &PostgresSource) -> Result<(), SourceError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int,
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*) FROM pg_replication_slots)::int,
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')::int,
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
                    EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = 'rds_replication'
                            AND pg_has_role(current_user, r.oid, 'MEMBER')),
                    current_user::text,
                    (SELECT active FROM pg_replication_slots WHERE slot_name = $1)",
            &[&spec.slot],
        )
        .await
        .map_err(SourceError::query("reading replication settings"))?;
    let wal_level: String = row.get(0);
    let max_slots: i32 = row.get(1);
    let max_senders: i32 = row.get(2);
    let used_slots: i32 = row.get(3);
    let busy_senders: i32 = row.get(4);
    let can_replicate: Option<bool> = row.get(5);
    let rds_replication: bool = row.get(6);
    let user: String = row.get(7);
    let slot_active: Option<bool> = row.get(8);
    if wal_level != "logical" {
        return Err(SourceError::Replication(format!(
            "wal_level is '{wal_level}' but logical replication needs 'logical': run `ALTER SYSTEM SET wal_level = logical;` and restart PostgreSQL (on managed services set the parameter group / flag, e.g. rds.logical_replication = 1)"
        )));
    }
    if max_slots < 1 {
        return Err(SourceError::Replication(
            "max_replication_slots is 0: set it to at least 1 (ALTER SYSTEM SET max_replication_slots = 10) and restart PostgreSQL".into(),
        ));
    }
    if max_senders < 1 {
        return Err(SourceError::Replication(
            "max_wal_senders is 0: set it to at least 1 (ALTER SYSTEM SET max_wal_senders = 10) and restart PostgreSQL".into(),
        ));
    }
    if slot_active.is_none() && spec.create_slot && used_slots >= max_slots {
        return Err(SourceError::Replication(format!(
            "replication slot {:?} does not exist and all {max_slots} replication slots (max_replication_slots) are taken: drop an unused slot (SELECT slot_name, active FROM pg_replication_slots; SELECT pg_drop_replication_slot('…')) or raise max_replication_slots and restart PostgreSQL",
            spec.slot
        )));
    }
    // A stale holder of our slot occupies a WAL sender that its termination frees.
    if slot_active != Some(true) && busy_senders >= max_senders {
        return Err(SourceError::Replication(format!(
            "all {max_senders} WAL senders (max_wal_senders) are busy, so the replication connection for slot {:?} would be refused: stop an unused replication client (SELECT pid, application_name, client_addr FROM pg_stat_replication) or raise max_wal_senders and restart PostgreSQL",
            spec.slot
        )));
    }
    if can_replicate != Some(true) && !rds_replication {
        return Err(SourceError::Replication(format!(
            "role {user:?} may not start replication: run `ALTER ROLE {} WITH REPLICATION;` (on RDS: GRANT rds_replication TO {0};), or set source.postgres.validateReplication: false if the privilege comes from elsewhere",
            quote_ident(&user)
        )));
    }
    Ok(())
}

async fn check_tables_exist(
    client: &Client,
    tables: &[TableName],
    schemas: &[String],
) -> Result<(), SourceError> {
    for (i, t) in tables.iter().enumerate() {
        let found = client
            .query_opt(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&t.schema, &t.table],
            )
            .await
            .map_err(SourceError::query(format!("looking up table {t}")))?;
        if found.is_none() {
            return Err(SourceError::Catalog(format!(
                "table {t} (source.postgres.tables[{i}]) does not exist in this database: create it, or remove it from source.postgres.tables"
            )));
        }
    }
    for (i, s) in schemas.iter().enumerate() {
        let found = client
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[s])
            .await
            .map_err(SourceError::query(format!("looking up schema {s}")))?;
        if found.is_none() {
            return Err(SourceError::Catalog(format!(
                "schema {s:?} (source.postgres.schemas[{i}]) does not exist in this database: create it, or remove it from source.postgres.schemas"
            )));
        }
    }
    Ok(())
}

/// Something a publication can hold explicitly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicationMember {
    /// `TABLE schema.table`.
    Table(TableName),
    /// `TABLES IN SCHEMA schema` (PostgreSQL 15+).
    Schema(String),
}

impl PublicationMember {
    fn sql(&self) -> String {
        match self {
            Self::Table(t) => format!("TABLE {}", t.quoted()),
            Self::Schema(s) => format!("TABLES IN SCHEMA {}", quote_ident(s)),
        }
    }
}

impl std::fmt::Display for PublicationMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Table(t) => write!(f, "table {t}"),
            Self::Schema(s) => write!(f, "schema {s}"),
        }
    }
}

/// `ADD` or `DROP` in `ALTER PUBLICATION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicationChange {
    /// Add a member.
    Add,
    /// Drop a member.
    Drop,
}

impl PublicationChange {
    fn keyword(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Drop => "DROP",
        }
    }
}

/// Hint for a failed publication DDL: schemas need a superuser on PostgreSQL 15.
fn publication_privilege_hint(
    e: &tokio_postgres::Error,
    members: &[PublicationMember],
) -> &'static str {
    let denied = e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE);
    if denied
        && members
            .iter()
            .any(|m| matches!(m, PublicationMember::Schema(_)))
    {
        "; FOR TABLES IN SCHEMA needs a superuser: run the statement as one, or list the tables in source.postgres.tables instead of schemas"
    } else if denied && members.is_empty() {
        "; FOR ALL TABLES needs a superuser: list source.postgres.tables or schemas instead"
    } else if denied {
        "; the worker's role must own the publication and the tables: fix the ownership, or change the publication by hand and set syncPublication: off"
    } else {
        ""
    }
}

async fn ensure_publication(
    client: &Client,
    spec: &PostgresSource,
    tables: &[TableName],
) -> Result<(), SourceError> {
    let publication = &spec.publication;
    let wanted: Vec<PublicationMember> = tables
        .iter()
        .cloned()
        .map(PublicationMember::Table)
        .chain(spec.schemas.iter().cloned().map(PublicationMember::Schema))
        .collect();
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(SourceError::query("reading server_version_num"))?
        .get(0);
    if !spec.schemas.is_empty() && version < 150_000 {
        return Err(SourceError::Catalog(format!(
            "source.postgres.schemas needs PostgreSQL 15 or later (FOR TABLES IN SCHEMA), this server is version {}: list the tables in source.postgres.tables instead",
            version / 10_000
        )));
    }
    let exists = client
        .query_opt(
            "SELECT oid, puballtables FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(SourceError::query(format!(
            "looking up publication {publication}"
        )))?;
    let Some(row) = exists else {
        if !spec.ensure_publication {
            return Err(SourceError::Catalog(format!(
                "publication {publication:?} does not exist and ensurePublication is false: create it (CREATE PUBLICATION {} FOR TABLE …) or set source.postgres.ensurePublication: true",
                quote_ident(publication)
            )));
        }
        // Nothing listed means every table, as the seed's default; the listed tables and
        // schemas combine into one publication otherwise.
        let what = if wanted.is_empty() {
            "ALL TABLES".to_owned()
        } else {
            wanted
                .iter()
                .map(PublicationMember::sql)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let sql = format!("CREATE PUBLICATION {} FOR {what}", quote_ident(publication));
        client.batch_execute(&sql).await.map_err(|e| {
            SourceError::Catalog(format!(
                "creating publication {publication:?} FOR {what} failed: {}{}",
                db_message(&e),
                publication_privilege_hint(&e, &wanted)
            ))
        })?;
        tracing::info!(publication = %publication, "created publication FOR {what}");
        return Ok(());
    };
    let oid: u32 = row.get(0);
    let all_tables: bool = row.get(1);
    if spec.sync_publication == SyncPublication::Off {
        return Ok(());
    }
    if all_tables {
        if !wanted.is_empty() {
            tracing::warn!(publication = %publication, "publication is FOR ALL TABLES: syncPublication leaves it as it is (it already covers the listed tables and schemas)");
        }
        return Ok(());
    }
    if wanted.is_empty() {
        // An empty list means "all tables" at creation; `sync` must not empty the publication.
        tracing::warn!(publication = %publication, "syncPublication is set but source.postgres.tables and schemas are empty: leaving the publication as it is");
        return Ok(());
    }
    let mut current: Vec<PublicationMember> = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_publication_rel r
             JOIN pg_class c ON c.oid = r.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE r.prpubid = $1",
            &[&oid],
        )
        .await
        .map_err(SourceError::query(format!(
            "listing tables of publication {publication}"
        )))?
        .iter()
        .map(|r| {
            PublicationMember::Table(TableName {
                schema: r.get(0),
                table: r.get(1),
            })
        })
        .collect();
    if version >= 150_000 {
        let schemas = client
            .query(
                "SELECT n.nspname::text FROM pg_publication_namespace pn
                 JOIN pg_namespace n ON n.oid = pn.pnnspid WHERE pn.pnpubid = $1",
                &[&oid],
            )
            .await
            .map_err(SourceError::query(format!(
                "listing schemas of publication {publication}"
            )))?;
        current.extend(schemas.iter().map(|r| PublicationMember::Schema(r.get(0))));
    }
    if spec.sync_publication == SyncPublication::Sync {
        for member in current.iter().filter(|m| !wanted.contains(m)) {
            alter_publication(client, publication, PublicationChange::Drop, member).await?;
        }
    }
    for member in wanted.iter().filter(|m| !current.contains(m)) {
        alter_publication(client, publication, PublicationChange::Add, member).await?;
    }
    Ok(())
}

/// `ALTER PUBLICATION … ADD|DROP TABLE … | TABLES IN SCHEMA …`, shared by preflight and
/// any later publication maintenance.
pub async fn alter_publication(
    client: &Client,
    publication: &str,
    change: PublicationChange,
    member: &PublicationMember,
) -> Result<(), SourceError> {
    let action = change.keyword();
    let sql = format!(
        "ALTER PUBLICATION {} {action} {}",
        quote_ident(publication),
        member.sql()
    );
    client.batch_execute(&sql).await.map_err(|e| {
        SourceError::Catalog(format!(
            "ALTER PUBLICATION {publication} {action} {} failed: {}{}",
            member.sql(),
            db_message(&e),
            publication_privilege_hint(&e, std::slice::from_ref(member))
        ))
    })?;
    tracing::info!(publication = %publication, member = %member, action, "altered publication");
    Ok(())
}

/// One read of the slot's row in `pg_replication_slots`.
struct SlotRow {
    plugin: Option<String>,
    database: Option<String>,
    active_pid: Option<i32>,
    confirmed_flush_lsn: Option<String>,
    current_database: String,
}

/// Whether a replication slot of this name exists.
pub async fn slot_exists(client: &Client, slot: &str) -> Result<bool, SourceError> {
    Ok(read_slot(client, slot).await?.is_some())
}

async fn read_slot(client: &Client, slot: &str) -> Result<Option<SlotRow>, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, CASE WHEN active THEN active_pid END,
                    confirmed_flush_lsn::text, current_database()::text
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(SourceError::query(format!(
            "looking up replication slot {slot}"
        )))?;
    Ok(row.map(|row| SlotRow {
        plugin: row.get(0),
        database: row.get(1),
        active_pid: row.get(2),
        confirmed_flush_lsn: row.get(3),
        current_database: row.get(4),
    }))
}

/// Takes over the slot, or creates it (`createSlot`) when it is missing.
pub async fn ensure_slot(client: &Client, spec: &PostgresSource) -> Result<SlotState, SourceError> {
    let slot = &spec.slot;
    let mut terminated = 0;
    loop {
        let Some(row) = read_slot(client, slot).await? else {
            return create_slot(client, spec).await;
        };
        if row.plugin.as_deref() != Some("pgoutput") {
            return Err(SourceError::Catalog(format!(
                "replication slot {slot:?} uses plugin {:?}, not pgoutput: choose another slot name or drop it (SELECT pg_drop_replication_slot('{slot}'))",
                row.plugin.unwrap_or_default()
            )));
        }
        if row.database.as_deref() != Some(row.current_database.as_str()) {
            return Err(SourceError::Catalog(format!(
                "replication slot {slot:?} belongs to database {:?}, not {:?}: fix the dsn or choose another slot name",
                row.database.unwrap_or_default(),
                row.current_database
            )));
        }
        let Some(pid) = row.active_pid else {
            return Ok(SlotState {
                confirmed_flush_lsn: row.confirmed_flush_lsn.unwrap_or_default(),
                created: false,
            });
        };
        if terminated >= MAX_HOLDER_TERMINATIONS {
            return Err(SourceError::Catalog(format!(
                "replication slot {slot:?} was taken again by backend PID {pid} after {terminated} stale holders were terminated: a live client keeps reconnecting to it (another worker or Flow using the same slot?); stop it, or give this Flow its own slot"
            )));
        }
        // Kubernetes cannot promise a single instance: when a node is partitioned, the old
        // pod may still hold the slot after its replacement started (the Recreate strategy
        // only helps while the kubelet is reachable). The old holder can no longer report
        // status, so the newest worker wins: terminate it and take over the slot.
        terminate_holder(client, slot, pid).await?;
        terminated += 1;
        wait_until_released(client, slot, pid).await?;
    }
}

async fn create_slot(client: &Client, spec: &PostgresSource) -> Result<SlotState, SourceError> {
    let slot = &spec.slot;
    if !spec.create_slot {
        return Err(SourceError::Catalog(format!(
            "replication slot {slot:?} does not exist and createSlot is false: create it with SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput') or set source.postgres.createSlot: true"
        )));
    }
    let created = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[slot],
        )
        .await
        .map_err(|e| {
            let hint = match e.code() {
                Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => {
                    ": the worker's role needs the REPLICATION attribute (ALTER ROLE … WITH REPLICATION)"
                }
                Some(c) if *c == SqlState::CONFIGURATION_LIMIT_EXCEEDED => {
                    ": drop an unused slot or raise max_replication_slots"
                }
                _ => "",
            };
            SourceError::Catalog(format!(
                "creating replication slot {slot:?} failed: {}{hint}",
                db_message(&e)
            ))
        })?;
    let lsn: String = created.get(0);
    tracing::info!(slot = %slot, lsn = %lsn, "created replication slot");
    Ok(SlotState {
        confirmed_flush_lsn: lsn,
        created: true,
    })
}

/// Drops the slot (`failureMode: dropSlot`), waiting for the walsender that held it to
/// exit first: a slot that is still active cannot be dropped.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let row = client
            .query_opt(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(SourceError::query("looking up the slot to drop"))?;
        match row {
            None => return Ok(()),
            Some(r) if !r.get::<_, bool>(0) => break,
            Some(_) if tokio::time::Instant::now() >= deadline => break,
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(SourceError::query(format!("dropping slot {slot}")))?;
    Ok(())
}

/// Terminates the backend holding `slot`, logging who it was.
async fn terminate_holder(client: &Client, slot: &str, pid: i32) -> Result<(), SourceError> {
    let holder = client
        .query_opt(
            "SELECT application_name, host(client_addr), usename::text
             FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .await
        .map_err(SourceError::query(format!(
            "looking up backend {pid} holding replication slot {slot}"
        )))?;
    let (application_name, client_addr, role) = holder
        .map(|r| {
            (
                r.get::<_, Option<String>>(0).unwrap_or_default(),
                r.get::<_, Option<String>>(1)
                    .unwrap_or_else(|| "local socket".into()),
                r.get::<_, Option<String>>(2).unwrap_or_default(),
            )
        })
        .unwrap_or_default();
    let signalled = client
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .map_err(|e| {
            if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                SourceError::Catalog(format!(
                    "replication slot {slot:?} is held by backend PID {pid} (application_name {application_name:?}, client {client_addr}, role {role:?}) and this worker may not terminate it ({}): grant the worker's role pg_signal_backend (GRANT pg_signal_backend TO …; a superuser's backend needs a superuser), run the worker as the role holding the slot, or stop that client yourself",
                    db_message(&e)
                ))
            } else {
                SourceError::Query {
                    context: format!(
                        "terminating backend {pid} holding replication slot {slot}"
                    ),
                    source: e,
                }
            }
        })?;
    let signalled: bool = signalled.get(0);
    tracing::warn!(
        slot,
        pid,
        application_name = %application_name,
        client_addr = %client_addr,
        role = %role,
        signalled,
        "terminated the stale holder of the replication slot: Kubernetes cannot promise a single worker, and the newest one takes over"
    );
    Ok(())
}

/// Polls until `pid` no longer holds `slot` (another holder is handled by the caller).
async fn wait_until_released(client: &Client, slot: &str, pid: i32) -> Result<(), SourceError> {
    let deadline = Instant::now() + HOLDER_RELEASE_TIMEOUT;
    loop {
        let holder = read_slot(client, slot).await?.and_then(|r| r.active_pid);
        if holder != Some(pid) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(SourceError::Catalog(format!(
                "replication slot {slot:?} is still held by backend PID {pid} {}s after it was terminated: check the server (SELECT * FROM pg_stat_activity WHERE pid = {pid}) and restart the worker",
                HOLDER_RELEASE_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(HOLDER_POLL_INTERVAL).await;
    }
}
