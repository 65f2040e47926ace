//! Durable schema history and DDL log, in the source database's state schema: every
//! version of every table's shape keyed by the LSN it starts at, and every captured DDL
//! statement with its decision and per-destination results. Kept next to the slot whose
//! LSNs they refer to (not in a resource status, which has a size limit), so a restarted
//! worker numbers versions exactly as before and standalone and in-cluster runs share it.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_postgres::Client;

use super::DdlError;
use super::capture::CapturedColumn;
use wallaby_pg::{EnsureError, TableDdl, ensure_table, quote_ident};
use wallaby_pipeline::change::Relation;
use wallaby_pipeline::lsn::Lsn;

/// Advisory lock serialising the creation of the history tables.
const CREATE_LOCK_KEY: i64 = 0x7761_6c6c_6162_7903;

/// One column of a recorded shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShapeColumn {
    /// Column name.
    pub name: String,
    /// Attribute number when known (captured statements; not in relation descriptions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attnum: Option<i32>,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_mod: i32,
    /// SQL type when known (`format_type`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub type_name: String,
    /// Part of the replica identity.
    pub key: bool,
}

impl From<&CapturedColumn> for ShapeColumn {
    fn from(c: &CapturedColumn) -> Self {
        Self {
            name: c.name.clone(),
            attnum: c.attnum,
            type_oid: c.type_oid,
            type_mod: c.type_mod,
            type_name: c.type_name.clone(),
            key: c.key,
        }
    }
}

/// The shape pgoutput describes a relation with.
pub fn shape_of(relation: &Relation) -> Vec<ShapeColumn> {
    relation
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| ShapeColumn {
            name: c.name.clone(),
            attnum: None,
            type_oid: c.type_oid,
            type_mod: c.type_modifier,
            type_name: String::new(),
            key: relation.identity.contains(&i),
        })
        .collect()
}

/// Same columns, types and key (attribute numbers and type names are informative).
pub fn same_shape(a: &[ShapeColumn], b: &[ShapeColumn]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name
                && x.type_oid == y.type_oid
                && x.type_mod == y.type_mod
                && x.key == y.key
        })
}

/// One version of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchemaVersion {
    /// `schema.table`.
    pub table: String,
    /// 1, 2, …
    pub version: u32,
    /// Where it starts.
    pub lsn: Lsn,
    /// `ddl` or `stream`.
    pub source: String,
    /// Columns.
    pub columns: Vec<ShapeColumn>,
    /// The statement that made it (captured DDL only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
}

/// What a new version changed, for logs, status and plans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnChange {
    /// A column appeared.
    Added(ShapeColumn),
    /// A column went away.
    Dropped(ShapeColumn),
    /// Same attribute, new name.
    Renamed {
        /// Old name.
        from: String,
        /// The column now.
        to: ShapeColumn,
    },
    /// Same column, new type or modifier.
    Retyped {
        /// Before.
        from: ShapeColumn,
        /// After.
        to: ShapeColumn,
    },
    /// The replica identity changed on this column.
    Key {
        /// The column now.
        column: ShapeColumn,
    },
}

fn type_label(c: &ShapeColumn) -> String {
    if c.type_name.is_empty() {
        format!("oid {}", c.type_oid)
    } else {
        c.type_name.clone()
    }
}

impl std::fmt::Display for ColumnChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Added(c) => write!(f, "+{} {}", c.name, type_label(c)),
            Self::Dropped(c) => write!(f, "-{}", c.name),
            Self::Renamed { from, to } => write!(f, "{from} renamed to {}", to.name),
            Self::Retyped { from, to } => {
                write!(f, "{} {} -> {}", to.name, type_label(from), type_label(to))
            }
            Self::Key { column } => write!(
                f,
                "{} {} the key",
                column.name,
                if column.key { "joins" } else { "leaves" }
            ),
        }
    }
}

/// The changes from `old` to `new`: columns matched by attribute number when both sides
/// have it (so a rename is a rename), else by name.
pub fn diff(old: &[ShapeColumn], new: &[ShapeColumn]) -> Vec<ColumnChange> {
    let by_attnum =
        old.iter().all(|c| c.attnum.is_some()) && new.iter().all(|c| c.attnum.is_some());
    let find = |c: &ShapeColumn, in_: &[ShapeColumn]| -> Option<usize> {
        if by_attnum {
            in_.iter().position(|o| o.attnum == c.attnum)
        } else {
            in_.iter().position(|o| o.name == c.name)
        }
    };
    let mut out = Vec::new();
    for o in old {
        if find(o, new).is_none() {
            out.push(ColumnChange::Dropped(o.clone()));
        }
    }
    for n in new {
        match find(n, old) {
            None => out.push(ColumnChange::Added(n.clone())),
            Some(i) => {
                let o = &old[i];
                if o.name != n.name {
                    out.push(ColumnChange::Renamed {
                        from: o.name.clone(),
                        to: n.clone(),
                    });
                }
                if o.type_oid != n.type_oid || o.type_mod != n.type_mod {
                    out.push(ColumnChange::Retyped {
                        from: o.clone(),
                        to: n.clone(),
                    });
                }
                if o.key != n.key {
                    out.push(ColumnChange::Key { column: n.clone() });
                }
            }
        }
    }
    out
}

/// `; `-joined changes, or `no column change`.
pub fn summary(changes: &[ColumnChange]) -> String {
    if changes.is_empty() {
        return "no column change".into();
    }
    changes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Names of the two tables in the state schema.
#[derive(Debug, Clone)]
pub struct HistoryTables {
    state_schema: String,
    versions: String,
    events: String,
}

impl HistoryTables {
    /// The tables in `state_schema`.
    pub fn in_schema(state_schema: &str) -> Self {
        let schema = quote_ident(state_schema);
        Self {
            versions: format!("{schema}.schema_history"),
            events: format!("{schema}.ddl_events"),
            state_schema: state_schema.to_owned(),
        }
    }

    /// Creates both tables if missing. When both exist nothing is executed: a DDL script on
    /// every start would take locks and, with capture installed, emit capture messages.
    pub async fn ensure(&self, client: &Client) -> Result<(), DdlError> {
        let tables = [
            TableDdl {
                name: "schema_history",
                columns: VERSIONS_COLUMNS,
                comment: Some(
                    "WALlaby schema history: each version of each table of a flow, from the LSN it starts at",
                ),
            },
            TableDdl {
                name: "ddl_events",
                columns: EVENTS_COLUMNS,
                comment: Some(
                    "WALlaby DDL log: captured statements of each flow, their decision and per-destination results",
                ),
            },
        ];
        ensure_table(client, CREATE_LOCK_KEY, &self.state_schema, &tables)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                EnsureError::Lookup(e) => DdlError::sql("looking up the schema-history tables", e),
                EnsureError::Create(e) => DdlError::sql("creating the schema-history tables", e),
            })
    }
}

/// Columns of the schema history.
const VERSIONS_COLUMNS: &str = "flow_id text NOT NULL,
     table_name text NOT NULL,
     version int NOT NULL,
     lsn pg_lsn NOT NULL,
     source text NOT NULL,
     columns jsonb NOT NULL,
     statement text,
     recorded_at timestamptz NOT NULL DEFAULT now(),
     PRIMARY KEY (flow_id, table_name, version)";

/// Columns of the DDL log.
const EVENTS_COLUMNS: &str = "id bigserial UNIQUE,
     flow_id text NOT NULL,
     lsn pg_lsn NOT NULL,
     approval text,
     tag text NOT NULL,
     statement text NOT NULL,
     tables text[] NOT NULL,
     plan jsonb NOT NULL DEFAULT '[]',
     gated boolean NOT NULL,
     decision text NOT NULL DEFAULT 'Pending',
     state text NOT NULL DEFAULT 'Pending',
     apply_confirmed boolean NOT NULL DEFAULT false,
     results jsonb NOT NULL DEFAULT '[]',
     message text,
     created_at timestamptz NOT NULL DEFAULT now(),
     decided_at timestamptz,
     applied_at timestamptz,
     PRIMARY KEY (flow_id, lsn)";

/// A table's versions as loaded.
type Versions = Vec<SchemaVersion>;

/// The schema history of one flow, shared by the DDL stage and the pipeline's schema
/// source (a cache over the table; writes go through first).
#[derive(Debug)]
pub struct SchemaHistory {
    client: Arc<Client>,
    tables: HistoryTables,
    flow_id: String,
    cache: Mutex<HashMap<String, Versions>>,
}

/// How a shape was resolved to a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The version.
    pub version: u32,
    /// Set when this call recorded a new version: what changed from the one before (empty
    /// for a table's first version).
    pub new: Option<(Option<u32>, Vec<ColumnChange>)>,
}

impl SchemaHistory {
    /// The history of `flow_id` in `tables` (created by [`HistoryTables::ensure`]).
    pub fn new(client: Arc<Client>, tables: HistoryTables, flow_id: String) -> Self {
        Self {
            client,
            tables,
            flow_id,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The tables.
    pub fn tables(&self) -> &HistoryTables {
        &self.tables
    }

    async fn load(&self, table: &str) -> Result<Versions, DdlError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT version, lsn::text, source, columns::text, statement FROM {}
                     WHERE flow_id = $1 AND table_name = $2 ORDER BY version",
                    self.tables.versions
                ),
                &[&self.flow_id, &table],
            )
            .await
            .map_err(|e| DdlError::sql(format!("reading the schema history of {table}"), e))?;
        rows.iter()
            .map(|r| {
                let version: i32 = r.get(0);
                let lsn: String = r.get(1);
                let columns: String = r.get(3);
                Ok(SchemaVersion {
                    table: table.to_owned(),
                    version: u32::try_from(version).unwrap_or(0),
                    lsn: lsn
                        .parse()
                        .map_err(|e| DdlError::Corrupt(format!("{table}: lsn {lsn}: {e}")))?,
                    source: r.get(2),
                    columns: serde_json::from_str(&columns)
                        .map_err(|e| DdlError::Corrupt(format!("{table} v{version}: {e}")))?,
                    statement: r.get(4),
                })
            })
            .collect()
    }

    /// Every version of `table`, oldest first.
    pub async fn versions(&self, table: &str) -> Result<Versions, DdlError> {
        let mut cache = self.cache.lock().await;
        if let Some(v) = cache.get(table) {
            return Ok(v.clone());
        }
        let loaded = self.load(table).await?;
        cache.insert(table.to_owned(), loaded.clone());
        Ok(loaded)
    }

    /// The version of `columns` for `table` seen at `lsn`: an existing version of the same
    /// shape (the latest starting at or before `lsn`, else the latest), or a new one
    /// recorded from `source`.
    pub async fn resolve(
        &self,
        table: &str,
        columns: &[ShapeColumn],
        lsn: Lsn,
        source: &str,
        statement: Option<&str>,
    ) -> Result<Resolved, DdlError> {
        let mut cache = self.cache.lock().await;
        let versions = match cache.get(table) {
            Some(v) => v.clone(),
            None => {
                let loaded = self.load(table).await?;
                cache.insert(table.to_owned(), loaded.clone());
                loaded
            }
        };
        let matching = versions
            .iter()
            .filter(|v| same_shape(&v.columns, columns))
            .collect::<Vec<_>>();
        if let Some(v) = matching
            .iter()
            .rfind(|v| v.lsn <= lsn)
            .or_else(|| matching.last())
        {
            return Ok(Resolved {
                version: v.version,
                new: None,
            });
        }
        let previous = versions.iter().rfind(|v| v.lsn <= lsn).or(versions.last());
        let version = versions.last().map_or(1, |v| v.version + 1);
        let columns_json = serde_json::to_string(columns)
            .map_err(|e| DdlError::Corrupt(format!("{table}: {e}")))?;
        // A concurrent writer of the same flow (a replaced worker still stopping) may have
        // taken the number: then the row is re-read on the next call.
        self.client
            .execute(
                &format!(
                    "INSERT INTO {} (flow_id, table_name, version, lsn, source, columns, statement)
                     VALUES ($1, $2, $3, $4::text::pg_lsn, $5, $6::text::jsonb, $7)
                     ON CONFLICT (flow_id, table_name, version) DO NOTHING",
                    self.tables.versions
                ),
                &[
                    &self.flow_id,
                    &table,
                    &i32::try_from(version).unwrap_or(i32::MAX),
                    &lsn.to_string(),
                    &source,
                    &columns_json,
                    &statement,
                ],
            )
            .await
            .map_err(|e| DdlError::sql(format!("recording version {version} of {table}"), e))?;
        let changes = previous
            .map(|p| diff(&p.columns, columns))
            .unwrap_or_default();
        let entry = cache.entry(table.to_owned()).or_default();
        entry.push(SchemaVersion {
            table: table.to_owned(),
            version,
            lsn,
            source: source.to_owned(),
            columns: columns.to_vec(),
            statement: statement.map(str::to_owned),
        });
        Ok(Resolved {
            version,
            new: Some((previous.map(|p| p.version), changes)),
        })
    }

    /// Every table of the flow with its versions (for `wallaby-worker ddl history`).
    pub async fn all(&self) -> Result<Vec<SchemaVersion>, DdlError> {
        let names: Vec<String> = self
            .client
            .query(
                &format!(
                    "SELECT DISTINCT table_name FROM {} WHERE flow_id = $1 ORDER BY 1",
                    self.tables.versions
                ),
                &[&self.flow_id],
            )
            .await
            .map_err(|e| DdlError::sql("listing the schema history", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut out = Vec::new();
        for n in names {
            out.extend(self.load(&n).await?);
        }
        Ok(out)
    }
}

/// Records the current shape of each table of `publication` the history does not know
/// yet, at `start` (where the stream begins), through the capture's column function, so the
/// first captured statement on a table has a "before". Called before the stream starts: a
/// statement committed between `start` and this call would be seen as the starting shape.
pub async fn seed_from_catalog(
    client: &Client,
    history: &SchemaHistory,
    capture: &super::capture::CaptureSpec,
    publication: &str,
    start: Lsn,
) -> Result<(), DdlError> {
    let columns_fn = format!(
        "{}.{}",
        quote_ident(&capture.schema),
        quote_ident(&format!("{}_columns", capture.trigger))
    );
    let rows = client
        .query(
            &format!(
                "SELECT schemaname::text || '.' || tablename::text,
                        {columns_fn}(format('%I.%I', schemaname, tablename)::regclass)::text
                 FROM pg_publication_tables WHERE pubname = $1"
            ),
            &[&publication],
        )
        .await
        .map_err(|e| DdlError::sql("reading the published tables' columns", e))?;
    for row in rows {
        let table: String = row.get(0);
        if !history.versions(&table).await?.is_empty() {
            continue;
        }
        let captured: Vec<CapturedColumn> = serde_json::from_str(&row.get::<_, String>(1))
            .map_err(|e| DdlError::Corrupt(format!("{table}: {e}")))?;
        let columns: Vec<ShapeColumn> = captured.iter().map(ShapeColumn::from).collect();
        history
            .resolve(&table, &columns, start, "catalog", None)
            .await?;
    }
    Ok(())
}

/// A DDL statement in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DdlEvent {
    /// Short handle for the CLI.
    pub id: i64,
    /// Position of the message.
    pub lsn: Lsn,
    /// DDLApproval name (when one was created).
    pub approval: Option<String>,
    /// Command tag.
    pub tag: String,
    /// Statement.
    pub statement: String,
    /// Tables, `schema.table`.
    pub tables: Vec<String>,
    /// Per-destination plan: `[{name, actions}]`.
    pub plan: serde_json::Value,
    /// Whether the flow stops for it.
    pub gated: bool,
    /// `Pending`, `Approved`, `Rejected`.
    pub decision: String,
    /// `Pending`, `Approved`, `Applied`, `Rejected`, `Failed`.
    pub state: String,
    /// Someone confirmed the manual apply (`autoApply: false`).
    pub apply_confirmed: bool,
    /// Per-destination results: `[{name, state, message}]`.
    pub results: serde_json::Value,
    /// Last message.
    pub message: Option<String>,
    /// When it was captured (RFC 3339).
    pub created_at: String,
}

/// What to record of a new statement.
#[derive(Debug, Clone)]
pub struct NewDdlEvent<'a> {
    /// Position.
    pub lsn: Lsn,
    /// DDLApproval name.
    pub approval: Option<&'a str>,
    /// Command tag.
    pub tag: &'a str,
    /// Statement.
    pub statement: &'a str,
    /// Tables.
    pub tables: &'a [String],
    /// Plan.
    pub plan: &'a serde_json::Value,
    /// Gated.
    pub gated: bool,
    /// Initial decision (`Approved` when automatic).
    pub decision: &'a str,
    /// Initial state.
    pub state: &'a str,
}

/// The DDL log of one flow.
#[derive(Debug, Clone)]
pub struct DdlLog {
    client: Arc<Client>,
    tables: HistoryTables,
    flow_id: String,
}

const EVENT_COLUMNS: &str = "id, lsn::text, approval, tag, statement, tables, plan::text, gated, decision, state, apply_confirmed, results::text, message, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')";

fn event_of(r: &tokio_postgres::Row) -> Result<DdlEvent, DdlError> {
    let lsn: String = r.get(1);
    let plan: String = r.get(6);
    let results: String = r.get(11);
    Ok(DdlEvent {
        id: r.get(0),
        lsn: lsn
            .parse()
            .map_err(|e| DdlError::Corrupt(format!("ddl event lsn {lsn}: {e}")))?,
        approval: r.get(2),
        tag: r.get(3),
        statement: r.get(4),
        tables: r.get(5),
        plan: serde_json::from_str(&plan).map_err(|e| DdlError::Corrupt(e.to_string()))?,
        gated: r.get(7),
        decision: r.get(8),
        state: r.get(9),
        apply_confirmed: r.get(10),
        results: serde_json::from_str(&results).map_err(|e| DdlError::Corrupt(e.to_string()))?,
        message: r.get(12),
        created_at: r.get(13),
    })
}

impl DdlLog {
    /// The log of `flow_id` in `tables`.
    pub fn new(client: Arc<Client>, tables: HistoryTables, flow_id: String) -> Self {
        Self {
            client,
            tables,
            flow_id,
        }
    }

    /// Records a statement once (a replay after a restart finds the first record, with
    /// whatever decision it got meanwhile).
    pub async fn record(&self, e: NewDdlEvent<'_>) -> Result<DdlEvent, DdlError> {
        let plan = e.plan.to_string();
        self.client
            .execute(
                &format!(
                    "INSERT INTO {} (flow_id, lsn, approval, tag, statement, tables, plan, gated, decision, state, decided_at)
                     VALUES ($1, $2::text::pg_lsn, $3, $4, $5, $6, $7::text::jsonb, $8, $9, $10,
                             CASE WHEN $9 <> 'Pending' THEN now() END)
                     ON CONFLICT (flow_id, lsn) DO NOTHING",
                    self.tables.events
                ),
                &[
                    &self.flow_id,
                    &e.lsn.to_string(),
                    &e.approval,
                    &e.tag,
                    &e.statement,
                    &e.tables,
                    &plan,
                    &e.gated,
                    &e.decision,
                    &e.state,
                ],
            )
            .await
            .map_err(|err| DdlError::sql(format!("recording the DDL at {}", e.lsn), err))?;
        self.get(e.lsn).await?.ok_or_else(|| {
            DdlError::Corrupt(format!("the DDL at {} vanished after recording", e.lsn))
        })
    }

    /// The statement at `lsn`.
    pub async fn get(&self, lsn: Lsn) -> Result<Option<DdlEvent>, DdlError> {
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM {} WHERE flow_id = $1 AND lsn = $2::text::pg_lsn",
                    self.tables.events
                ),
                &[&self.flow_id, &lsn.to_string()],
            )
            .await
            .map_err(|e| DdlError::sql(format!("reading the DDL at {lsn}"), e))?;
        row.as_ref().map(event_of).transpose()
    }

    /// The statement at `lsn`, which must be in the log.
    pub async fn get_required(&self, lsn: Lsn) -> Result<DdlEvent, DdlError> {
        self.get(lsn)
            .await?
            .ok_or_else(|| DdlError::NotFound(format!("no DDL statement at {lsn}")))
    }

    /// The statement with CLI handle `id` (or at LSN `id` when it has a `/`).
    pub async fn find(&self, id: &str) -> Result<DdlEvent, DdlError> {
        let found = if id.contains('/') {
            let lsn: Lsn = id
                .parse()
                .map_err(|e| DdlError::NotFound(format!("{id}: {e}")))?;
            self.get(lsn).await?
        } else {
            let n: i64 = id
                .parse()
                .map_err(|_| DdlError::NotFound(format!("{id:?} is neither an id nor an LSN")))?;
            let row = self
                .client
                .query_opt(
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM {} WHERE flow_id = $1 AND id = $2",
                        self.tables.events
                    ),
                    &[&self.flow_id, &n],
                )
                .await
                .map_err(|e| DdlError::sql(format!("reading DDL {n}"), e))?;
            row.as_ref().map(event_of).transpose()?
        };
        found.ok_or_else(|| {
            DdlError::NotFound(format!("no DDL statement {id} for flow {}", self.flow_id))
        })
    }

    /// Statements of the flow, oldest first, optionally only in `state`.
    pub async fn list(&self, state: Option<&str>) -> Result<Vec<DdlEvent>, DdlError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM {} WHERE flow_id = $1 AND ($2::text IS NULL OR lower(state) = lower($2)) ORDER BY lsn",
                    self.tables.events
                ),
                &[&self.flow_id, &state],
            )
            .await
            .map_err(|e| DdlError::sql("listing DDL statements", e))?;
        rows.iter().map(event_of).collect()
    }

    /// Records a human decision; a decision is final.
    pub async fn decide(&self, lsn: Lsn, decision: &str) -> Result<DdlEvent, DdlError> {
        let updated = self
            .client
            .execute(
                &format!(
                    "UPDATE {} SET decision = $3, decided_at = now(),
                            state = CASE WHEN state = 'Pending' THEN $3 ELSE state END
                     WHERE flow_id = $1 AND lsn = $2::text::pg_lsn AND decision = 'Pending'",
                    self.tables.events
                ),
                &[&self.flow_id, &lsn.to_string(), &decision],
            )
            .await
            .map_err(|e| DdlError::sql(format!("deciding the DDL at {lsn}"), e))?;
        let event = self.get_required(lsn).await?;
        if updated == 0 && event.decision != decision {
            return Err(DdlError::Decided {
                lsn,
                decision: event.decision,
            });
        }
        Ok(event)
    }

    /// Records that someone applied the change by hand (`autoApply: false`).
    pub async fn confirm_apply(&self, lsn: Lsn) -> Result<DdlEvent, DdlError> {
        self.client
            .execute(
                &format!(
                    "UPDATE {} SET apply_confirmed = true WHERE flow_id = $1 AND lsn = $2::text::pg_lsn",
                    self.tables.events
                ),
                &[&self.flow_id, &lsn.to_string()],
            )
            .await
            .map_err(|e| DdlError::sql(format!("confirming the apply of the DDL at {lsn}"), e))?;
        self.get_required(lsn).await
    }

    /// Mirrors a decision taken elsewhere (the DDLApproval) into the log.
    pub async fn mirror(
        &self,
        lsn: Lsn,
        decision: &str,
        apply_confirmed: bool,
    ) -> Result<(), DdlError> {
        self.client
            .execute(
                &format!(
                    "UPDATE {} SET decision = $3, apply_confirmed = apply_confirmed OR $4,
                            decided_at = coalesce(decided_at, CASE WHEN $3 <> 'Pending' THEN now() END)
                     WHERE flow_id = $1 AND lsn = $2::text::pg_lsn",
                    self.tables.events
                ),
                &[&self.flow_id, &lsn.to_string(), &decision, &apply_confirmed],
            )
            .await
            .map(|_| ())
            .map_err(|e| DdlError::sql(format!("recording the decision on the DDL at {lsn}"), e))
    }

    /// Records the outcome.
    pub async fn finish(
        &self,
        lsn: Lsn,
        state: &str,
        results: &serde_json::Value,
        message: Option<&str>,
    ) -> Result<(), DdlError> {
        self.client
            .execute(
                &format!(
                    "UPDATE {} SET state = $3, results = $4::text::jsonb, message = $5,
                            applied_at = CASE WHEN $3 = 'Applied' THEN now() ELSE applied_at END
                     WHERE flow_id = $1 AND lsn = $2::text::pg_lsn",
                    self.tables.events
                ),
                &[
                    &self.flow_id,
                    &lsn.to_string(),
                    &state,
                    &results.to_string(),
                    &message,
                ],
            )
            .await
            .map(|_| ())
            .map_err(|e| DdlError::sql(format!("recording the outcome of the DDL at {lsn}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, attnum: Option<i32>, oid: u32, key: bool) -> ShapeColumn {
        ShapeColumn {
            name: name.into(),
            attnum,
            type_oid: oid,
            type_mod: -1,
            type_name: match oid {
                23 => "integer".into(),
                20 => "bigint".into(),
                _ => "text".into(),
            },
            key,
        }
    }

    #[test]
    fn attribute_numbers_tell_a_rename_from_drop_and_add() {
        let old = [col("id", Some(1), 23, true), col("a", Some(2), 25, false)];
        let new = [
            col("id", Some(1), 20, true),
            col("b", Some(2), 25, false),
            col("c", Some(3), 25, false),
        ];
        let changes = diff(&old, &new);
        assert_eq!(
            summary(&changes),
            "id integer -> bigint; a renamed to b; +c text"
        );
    }

    #[test]
    fn without_attribute_numbers_columns_match_by_name() {
        let old = [col("id", None, 23, true), col("a", None, 25, false)];
        let new = [col("id", None, 23, true), col("b", None, 25, false)];
        assert_eq!(summary(&diff(&old, &new)), "-a; +b text");
        assert_eq!(summary(&diff(&old, &old)), "no column change");
    }

    #[test]
    fn shapes_compare_names_types_and_key_only() {
        let a = [col("id", Some(1), 23, true)];
        let mut b = [col("id", None, 23, true)];
        b[0].type_name.clear();
        assert!(same_shape(&a, &b));
        b[0].key = false;
        assert!(!same_shape(&a, &b));
    }
}
