//! Where snapshot progress is kept (`stateBackend`): the plan of every partition and which
//! ones destinations made durable, so a restarted worker copies only what is unfinished.
//! `postgres`: a table in the source database; `file`: a JSON file; `none`: nothing.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use wallaby_crds::flow::{SnapshotSpec, SnapshotStateBackend};

use super::SnapshotError;
use super::copy::Slice;
use wallaby_pg::{TableDdl, ensure_table, quote_ident};

/// Advisory lock key serialising the creation of the snapshot-state table.
const SNAPSHOT_LOCK_KEY: i64 = 7_233_377_713_220_469_250;

/// One partition of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionRecord {
    /// `schema.table`.
    pub table: String,
    /// Position in the table's plan.
    pub index: u32,
    /// Rows it holds.
    pub slice: Slice,
    /// Destinations made every row of it durable.
    pub done: bool,
    /// Rows copied (when done).
    pub rows: u64,
}

/// The state file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    /// Plans by state key.
    runs: std::collections::BTreeMap<String, Vec<PartitionRecord>>,
}

/// A snapshot-state backend.
#[derive(Debug, Clone)]
pub enum SnapshotStore {
    /// `"schema"."table"` in the source database.
    Postgres {
        /// Connection to the source database.
        client: Arc<Client>,
        /// Quoted table name.
        table: String,
    },
    /// A JSON file.
    File(PathBuf),
    /// No resumption.
    None,
}

impl SnapshotStore {
    /// Opens the backend `spec` names, creating the state table when missing.
    pub async fn open(spec: &SnapshotSpec, client: Arc<Client>) -> Result<Self, SnapshotError> {
        match spec.state_backend {
            SnapshotStateBackend::None => Ok(Self::None),
            SnapshotStateBackend::File => {
                let path = spec.state_path.as_deref().ok_or_else(|| {
                    SnapshotError::State(
                        "snapshot.stateBackend is file but snapshot.statePath is not set: set it to a path on a persistent volume".into(),
                    )
                })?;
                Ok(Self::File(PathBuf::from(path)))
            }
            SnapshotStateBackend::Postgres => {
                let table = format!(
                    "{}.{}",
                    quote_ident(&spec.state_schema),
                    quote_ident(&spec.state_table)
                );
                let columns = "state_key text NOT NULL,
                     table_name text NOT NULL,
                     partition_index int NOT NULL,
                     slice jsonb NOT NULL,
                     done boolean NOT NULL DEFAULT false,
                     rows_copied bigint NOT NULL DEFAULT 0,
                     updated_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (state_key, table_name, partition_index)";
                let ddl = TableDdl {
                    name: &spec.state_table,
                    columns,
                    comment: None,
                };
                ensure_table(&client, SNAPSHOT_LOCK_KEY, &spec.state_schema, &[ddl])
                    .await
                    .map_err(|e| SnapshotError::Query {
                        what: format!("creating the snapshot-state table {table} (snapshot.stateSchema / stateTable; the role needs CREATE on the database or an existing table)"),
                        source: e.into_source(),
                    })?;
                Ok(Self::Postgres { client, table })
            }
        }
    }

    /// Whether progress survives a restart.
    pub fn is_durable(&self) -> bool {
        !matches!(self, Self::None)
    }

    /// The plan recorded under `key`.
    pub async fn load(&self, key: &str) -> Result<Vec<PartitionRecord>, SnapshotError> {
        match self {
            Self::None => Ok(Vec::new()),
            Self::File(path) => Ok(read_file(path)?.runs.remove(key).unwrap_or_default()),
            Self::Postgres { client, table } => {
                let rows = client
                    .query(
                        &format!(
                            "SELECT table_name, partition_index, slice::text, done, rows_copied
                             FROM {table} WHERE state_key = $1
                             ORDER BY table_name, partition_index"
                        ),
                        &[&key],
                    )
                    .await
                    .map_err(|source| SnapshotError::Query {
                        what: format!("reading snapshot state from {table}"),
                        source,
                    })?;
                rows.iter()
                    .map(|r| {
                        let slice: String = r.get(2);
                        let index: i32 = r.get(1);
                        let rows: i64 = r.get(4);
                        Ok(PartitionRecord {
                            table: r.get(0),
                            index: index.max(0) as u32,
                            slice: serde_json::from_str(&slice).map_err(|e| {
                                SnapshotError::State(format!(
                                    "{table}: unreadable slice {slice:?}: {e}; delete the rows of state key {key:?} to start the snapshot over"
                                ))
                            })?,
                            done: r.get(3),
                            rows: rows.max(0) as u64,
                        })
                    })
                    .collect()
            }
        }
    }

    /// Replaces the plan under `key` (a new snapshot starts from scratch).
    pub async fn reset(&self, key: &str) -> Result<(), SnapshotError> {
        match self {
            Self::None => Ok(()),
            Self::File(path) => {
                let mut state = read_file(path)?;
                state.runs.remove(key);
                write_file(path, &state)
            }
            Self::Postgres { client, table } => client
                .execute(
                    &format!("DELETE FROM {table} WHERE state_key = $1"),
                    &[&key],
                )
                .await
                .map(|_| ())
                .map_err(|source| SnapshotError::Query {
                    what: format!("resetting snapshot state in {table}"),
                    source,
                }),
        }
    }

    /// Adds partitions (pending) to the plan under `key`.
    pub async fn add(&self, key: &str, records: &[PartitionRecord]) -> Result<(), SnapshotError> {
        match self {
            Self::None => Ok(()),
            Self::File(path) => {
                let mut state = read_file(path)?;
                state
                    .runs
                    .entry(key.to_owned())
                    .or_default()
                    .extend(records.iter().cloned());
                write_file(path, &state)
            }
            Self::Postgres { client, table } => {
                for r in records {
                    let slice = serde_json::to_string(&r.slice)
                        .map_err(|e| SnapshotError::State(format!("encoding a slice: {e}")))?;
                    client
                        .execute(
                            &format!(
                                "INSERT INTO {table} (state_key, table_name, partition_index, slice)
                                 VALUES ($1, $2, $3, $4::text::jsonb) ON CONFLICT DO NOTHING"
                            ),
                            &[&key, &r.table, &(r.index as i32), &slice],
                        )
                        .await
                        .map_err(|source| SnapshotError::Query {
                            what: format!("recording the snapshot plan in {table}"),
                            source,
                        })?;
                }
                Ok(())
            }
        }
    }

    /// Records that a partition is durable in every destination.
    pub async fn done(
        &self,
        key: &str,
        table_name: &str,
        index: u32,
        rows: u64,
    ) -> Result<(), SnapshotError> {
        match self {
            Self::None => Ok(()),
            Self::File(path) => {
                let mut state = read_file(path)?;
                if let Some(r) = state.runs.get_mut(key).and_then(|p| {
                    p.iter_mut()
                        .find(|r| r.table == table_name && r.index == index)
                }) {
                    r.done = true;
                    r.rows = rows;
                }
                write_file(path, &state)
            }
            Self::Postgres { client, table } => client
                .execute(
                    &format!(
                        "UPDATE {table} SET done = true, rows_copied = $4, updated_at = now()
                         WHERE state_key = $1 AND table_name = $2 AND partition_index = $3"
                    ),
                    &[&key, &table_name, &(index as i32), &(rows as i64)],
                )
                .await
                .map(|_| ())
                .map_err(|source| SnapshotError::Query {
                    what: format!("recording a finished partition in {table}"),
                    source,
                }),
        }
    }
}

fn read_file(path: &std::path::Path) -> Result<StateFile, SnapshotError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            SnapshotError::State(format!(
                "snapshot state file {}: {e}; delete it to start the snapshot over",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(e) => Err(SnapshotError::State(format!(
            "reading snapshot state file {}: {e}",
            path.display()
        ))),
    }
}

/// Write to a temporary file, fsync, rename: a crash leaves the old or the new state.
fn write_file(path: &std::path::Path, state: &StateFile) -> Result<(), SnapshotError> {
    use std::io::Write;
    let fail = |e: std::io::Error| {
        SnapshotError::State(format!(
            "writing snapshot state file {}: {e}",
            path.display()
        ))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec_pretty(state)
        .map_err(|e| SnapshotError::State(format!("encoding snapshot state: {e}")))?;
    let mut f = std::fs::File::create(&tmp).map_err(fail)?;
    f.write_all(&body).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}
