//! The durable source-state table (`stateSchema`.`stateTable`, `ensureState`): one row per
//! flow naming its slot, publication and tables, who runs it and the last LSN it
//! confirmed. It is for cleanup and auditing; the slot, not this row, is where a flow resumes.

use std::sync::Mutex;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use wallaby_crds::flow::{Flow, PostgresSource};

use super::SourceError;
use wallaby_pg::{EnsureError, TableDdl, ensure_table, quote_ident};
use wallaby_pipeline::lsn::Lsn;

/// Advisory lock serialising the DDL of concurrent starts: `CREATE … IF NOT EXISTS` alone can
/// still fail with a unique violation in the catalogs when two sessions race.
const DDL_LOCK_KEY: i64 = 0x7761_6c6c_6162_7901;

/// The flow id recorded in the state table: `flowId`, else `<namespace>/<name>`.
pub fn flow_id(flow: &Flow) -> String {
    match &flow.spec.source.postgres.flow_id {
        Some(id) => id.clone(),
        None => format!(
            "{}/{}",
            flow.metadata.namespace.as_deref().unwrap_or("default"),
            flow.metadata.name.as_deref().unwrap_or_default()
        ),
    }
}

/// This flow's row in the source-state table; every call is a no-op when `ensureState` is
/// false.
#[derive(Debug)]
pub struct SourceState {
    flow_id: String,
    /// `"schema"."table"`, or `None` when `ensureState` is false.
    table: Option<String>,
    /// The publication streams the state table itself: a checkpoint record would be a change
    /// that leads to the next checkpoint record, forever, so checkpoints are not recorded.
    publishes_itself: bool,
    /// Last LSN written, to skip writes when nothing advanced.
    recorded: Mutex<Option<Lsn>>,
}

impl SourceState {
    /// Creates the schema and table when missing and upserts this flow's row as `running`
    /// (keeping `created_at` and `last_confirmed_lsn` of an earlier run).
    pub async fn start(
        client: &Client,
        spec: &PostgresSource,
        flow_id: &str,
    ) -> Result<Self, SourceError> {
        if !spec.ensure_state {
            tracing::debug!("ensureState is false: no source-state table");
            return Ok(Self {
                flow_id: flow_id.to_owned(),
                table: None,
                publishes_itself: false,
                recorded: Mutex::new(None),
            });
        }
        let table = format!(
            "{}.{}",
            quote_ident(&spec.state_schema),
            quote_ident(&spec.state_table)
        );
        create_table(client, spec).await?;
        let name = format!("{}.{}", spec.state_schema, spec.state_table);
        let schemas: Vec<&str> = spec.schemas.iter().map(String::as_str).collect();
        let tables: Vec<&str> = spec.tables.iter().map(String::as_str).collect();
        client
            .execute(
                &format!(
                    "INSERT INTO {table} AS s (flow_id, slot, publication, plugin, tables, schemas,
                        created_at, started_at, updated_at, worker, status)
                     VALUES ($1, $2, $3, 'pgoutput', $4, $5, now(), now(), now(), $6, 'running')
                     ON CONFLICT (flow_id) DO UPDATE SET slot = EXCLUDED.slot,
                        publication = EXCLUDED.publication, plugin = EXCLUDED.plugin,
                        tables = EXCLUDED.tables, schemas = EXCLUDED.schemas,
                        started_at = now(), updated_at = now(), worker = EXCLUDED.worker,
                        status = 'running'"
                ),
                &[
                    &flow_id,
                    &spec.slot,
                    &spec.publication,
                    &tables,
                    &schemas,
                    &worker_identity(),
                ],
            )
            .await
            .map_err(|e| write_error(&name, flow_id, e))?;
        let publishes_itself = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_tables
                                WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
                &[&spec.publication, &spec.state_schema, &spec.state_table],
            )
            .await
            .map_err(SourceError::query(format!(
                "checking whether publication {} covers the source-state table {name}",
                spec.publication
            )))?
            .get(0);
        if publishes_itself {
            tracing::warn!(
                publication = %spec.publication,
                state_table = %name,
                "the publication covers the source-state table: checkpoints are not recorded there (each record would be streamed and cause the next); list tables or schemas that leave out stateSchema, or choose another stateSchema"
            );
        }
        tracing::info!(flow_id, state_table = %name, "recorded flow start in the source-state table");
        Ok(Self {
            flow_id: flow_id.to_owned(),
            table: Some(table),
            publishes_itself,
            recorded: Mutex::new(None),
        })
    }

    /// The flow id of the row.
    pub fn flow_id(&self) -> &str {
        &self.flow_id
    }

    /// Records the last LSN the destinations made durable and confirmed to the slot. Never
    /// moves the recorded LSN backward; skips the write when it did not advance.
    pub async fn record_checkpoint(&self, client: &Client, lsn: Lsn) -> Result<(), SourceError> {
        let Some(table) = &self.table else {
            return Ok(());
        };
        if self.publishes_itself || self.last_recorded().is_some_and(|last| last >= lsn) {
            return Ok(());
        }
        client
            .execute(
                &format!(
                    "UPDATE {table} SET last_confirmed_lsn = $2::text::pg_lsn, updated_at = now()
                     WHERE flow_id = $1
                       AND (last_confirmed_lsn IS NULL OR last_confirmed_lsn < $2::text::pg_lsn)"
                ),
                &[&self.flow_id, &lsn.to_string()],
            )
            .await
            .map_err(|e| write_error(table, &self.flow_id, e))?;
        if let Ok(mut recorded) = self.recorded.lock() {
            *recorded = Some(lsn);
        }
        Ok(())
    }

    /// Records that the worker stopped, with `status` such as `stopped` or `failed`.
    pub async fn record_stopped(&self, client: &Client, status: &str) -> Result<(), SourceError> {
        let Some(table) = &self.table else {
            return Ok(());
        };
        client
            .execute(
                &format!("UPDATE {table} SET status = $2, updated_at = now() WHERE flow_id = $1"),
                &[&self.flow_id, &status],
            )
            .await
            .map_err(|e| write_error(table, &self.flow_id, e))?;
        Ok(())
    }

    fn last_recorded(&self) -> Option<Lsn> {
        self.recorded.lock().ok().and_then(|r| *r)
    }
}

/// Creates schema and table when missing (see [`wallaby_pg::ensure_table`]): a role
/// without CREATE on the database can use a schema and table an administrator prepared.
async fn create_table(client: &Client, spec: &PostgresSource) -> Result<(), SourceError> {
    let name = format!("{}.{}", spec.state_schema, spec.state_table);
    let table = TableDdl {
        name: &spec.state_table,
        columns: STATE_COLUMNS,
        comment: Some(
            "WALlaby source state, one row per flow: for cleanup and auditing; the replication slot is the source of truth for the resume position",
        ),
    };
    let created = ensure_table(client, DDL_LOCK_KEY, &spec.state_schema, &[table])
        .await
        .map_err(|e| match e {
            EnsureError::Lookup(e) => SourceError::query(format!(
                "looking up the source-state table {name}"
            ))(e),
            EnsureError::Create(e) => {
                let hint = if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                    format!(
                        "grant the worker's role CREATE on the database (or create schema {} for it), or set source.postgres.ensureState: false",
                        spec.state_schema
                    )
                } else {
                    "choose another stateSchema/stateTable, or set source.postgres.ensureState: false"
                        .to_owned()
                };
                SourceError::Catalog(format!(
                    "creating the source-state table {name} failed: {}; {hint}",
                    e.as_db_error()
                        .map(|d| d.message().to_owned())
                        .unwrap_or_else(|| e.to_string())
                ))
            }
        })?;
    if created {
        tracing::info!(state_table = %name, "created the source-state table");
    }
    Ok(())
}

/// Columns of the source-state table.
const STATE_COLUMNS: &str = "flow_id text PRIMARY KEY,
     slot text NOT NULL,
     publication text NOT NULL,
     plugin text NOT NULL,
     tables text[] NOT NULL DEFAULT '{}',
     schemas text[] NOT NULL DEFAULT '{}',
     created_at timestamptz NOT NULL DEFAULT now(),
     started_at timestamptz,
     updated_at timestamptz NOT NULL DEFAULT now(),
     last_confirmed_lsn pg_lsn,
     worker text,
     status text NOT NULL";

fn write_error(table: &str, flow_id: &str, e: tokio_postgres::Error) -> SourceError {
    let reason = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string());
    SourceError::Catalog(format!(
        "writing the row of flow {flow_id:?} in the source-state table {table} failed: {reason}; check that the worker's role may write it (or that its columns match this version), or set source.postgres.ensureState: false"
    ))
}

/// `hostname/pid` of this worker (the pod name in Kubernetes).
fn worker_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{host}/{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(json: &str) -> Flow {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn flow_id_defaults_to_namespace_and_name() {
        let base = r#"{"apiVersion":"wallaby.dev/v1alpha1","kind":"Flow","metadata":{"name":"orders"%NS%},
            "spec":{"source":{"postgres":{"dsn":"postgres://u@h/d","slot":"s","publication":"p"%ID%}},
            "destinations":[{"name":"d"}]}}"#;
        let cases = [
            ("", "", "default/orders"),
            (r#","namespace":"shop""#, "", "shop/orders"),
            (
                r#","namespace":"shop""#,
                r#","flowId":"orders-v1""#,
                "orders-v1",
            ),
        ];
        for (ns, id, want) in cases {
            let f = flow(&base.replace("%NS%", ns).replace("%ID%", id));
            assert_eq!(flow_id(&f), want, "namespace {ns:?}, flowId {id:?}");
        }
    }
}
