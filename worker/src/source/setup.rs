//! Preflight on a normal SQL connection before replication starts: server settings
//! (`validateReplication`), the tables, the publication (`ensurePublication`,
//! `syncPublication`) and the slot (`createSlot`). Every failure names the fix.

use tokio_postgres::Client;
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

    fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Runs every preflight step in order.
pub async fn prepare(client: &Client, spec: &PostgresSource) -> Result<SlotState, SourceError> {
    if spec.validate_replication {
        check_server_settings(client).await?;
    }
    let tables: Vec<TableName> = spec.tables.iter().map(|t| TableName::parse(t)).collect();
    check_tables_exist(client, &tables, &spec.schemas).await?;
    ensure_publication(client, spec, &tables).await?;
    ensure_slot(client, spec).await
}

async fn check_server_settings(client: &Client) -> Result<(), SourceError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int,
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*) FROM pg_replication_slots)::int,
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
                    current_user::text",
            &[],
        )
        .await
        .map_err(SourceError::query("reading replication settings"))?;
    let wal_level: String = row.get(0);
    let max_slots: i32 = row.get(1);
    let max_senders: i32 = row.get(2);
    let used_slots: i32 = row.get(3);
    let can_replicate: Option<bool> = row.get(4);
    let user: String = row.get(5);
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
    if used_slots >= max_slots {
        tracing::warn!(
            used_slots,
            max_slots,
            "every replication slot is in use; creating a new slot will fail (raise max_replication_slots)"
        );
    }
    if can_replicate != Some(true) {
        return Err(SourceError::Replication(format!(
            "role {user:?} may not start replication: run `ALTER ROLE {} WITH REPLICATION;` (or grant rds_replication on RDS)",
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
                "schema {s:?} (source.postgres.schemas[{i}]) does not exist: create it, or remove it from source.postgres.schemas"
            )));
        }
    }
    Ok(())
}

async fn ensure_publication(
    client: &Client,
    spec: &PostgresSource,
    tables: &[TableName],
) -> Result<(), SourceError> {
    let publication = &spec.publication;
    let exists = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
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
        let mut targets: Vec<String> = Vec::new();
        if !tables.is_empty() {
            targets.push(format!(
                "TABLE {}",
                tables
                    .iter()
                    .map(TableName::quoted)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !spec.schemas.is_empty() {
            targets.push(format!(
                "TABLES IN SCHEMA {}",
                spec.schemas
                    .iter()
                    .map(|s| quote_ident(s))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let what = if targets.is_empty() {
            "ALL TABLES".to_owned()
        } else {
            targets.join(", ")
        };
        let sql = format!("CREATE PUBLICATION {} FOR {what}", quote_ident(publication));
        client.batch_execute(&sql).await.map_err(|e| {
            let hint = if targets.is_empty() {
                " (FOR ALL TABLES needs a superuser: list source.postgres.tables or schemas instead)"
            } else {
                ""
            };
            SourceError::Catalog(format!(
                "creating publication {publication:?} failed: {}{hint}",
                e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string())
            ))
        })?;
        tracing::info!(publication = %publication, "created publication FOR {what}");
        return Ok(());
    };
    let all_tables: bool = row.get(0);
    if all_tables || spec.sync_publication == SyncPublication::Off || tables.is_empty() {
        return Ok(());
    }
    let current: Vec<TableName> = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(SourceError::query(format!("listing tables of publication {publication}")))?
        .iter()
        .map(|r| TableName { schema: r.get(0), table: r.get(1) })
        .collect();
    for t in tables.iter().filter(|t| !current.contains(t)) {
        alter_publication(client, publication, "ADD", t).await?;
    }
    if spec.sync_publication == SyncPublication::Sync {
        for t in current.iter().filter(|t| !tables.contains(t)) {
            alter_publication(client, publication, "DROP", t).await?;
        }
    }
    Ok(())
}

/// `ALTER PUBLICATION … ADD|DROP TABLE …`.
async fn alter_publication(
    client: &Client,
    publication: &str,
    action: &str,
    table: &TableName,
) -> Result<(), SourceError> {
    let sql = format!(
        "ALTER PUBLICATION {} {action} TABLE {}",
        quote_ident(publication),
        table.quoted()
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(SourceError::query(format!(
            "{action} TABLE {table} on publication {publication}"
        )))?;
    tracing::info!(publication = %publication, table = %table, action, "altered publication");
    Ok(())
}

async fn ensure_slot(client: &Client, spec: &PostgresSource) -> Result<SlotState, SourceError> {
    let slot = &spec.slot;
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active, active_pid, confirmed_flush_lsn::text,
                    current_database()::text
             FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(SourceError::query(format!(
            "looking up replication slot {slot}"
        )))?;
    let Some(row) = row else {
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
                SourceError::Catalog(format!(
                    "creating replication slot {slot:?} failed: {}",
                    e.as_db_error()
                        .map(|d| d.message().to_owned())
                        .unwrap_or_else(|| e.to_string())
                ))
            })?;
        let lsn: String = created.get(0);
        tracing::info!(slot = %slot, lsn = %lsn, "created replication slot");
        return Ok(SlotState {
            confirmed_flush_lsn: lsn,
            created: true,
        });
    };
    let plugin: Option<String> = row.get(0);
    let database: Option<String> = row.get(1);
    let active: bool = row.get(2);
    let active_pid: Option<i32> = row.get(3);
    let confirmed: Option<String> = row.get(4);
    let current_db: String = row.get(5);
    if plugin.as_deref() != Some("pgoutput") {
        return Err(SourceError::Catalog(format!(
            "replication slot {slot:?} uses plugin {:?}, not pgoutput: choose another slot name or drop it (SELECT pg_drop_replication_slot('{slot}'))",
            plugin.unwrap_or_default()
        )));
    }
    if database.as_deref() != Some(current_db.as_str()) {
        return Err(SourceError::Catalog(format!(
            "replication slot {slot:?} belongs to database {:?}, not {current_db:?}: fix the dsn or choose another slot name",
            database.unwrap_or_default()
        )));
    }
    if active {
        return Err(SourceError::Catalog(format!(
            "replication slot {slot:?} is in use by backend PID {}: another worker is consuming it; stop that worker (a slot has exactly one consumer)",
            active_pid.unwrap_or_default()
        )));
    }
    Ok(SlotState {
        confirmed_flush_lsn: confirmed.unwrap_or_default(),
        created: false,
    })
}

/// Drops the slot (`failureMode: dropSlot`), waiting for the walsender that held it to
/// exit first: a slot that is still active cannot be dropped.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
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
            Some(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(SourceError::query(format!("dropping slot {slot}")))?;
    Ok(())
}
