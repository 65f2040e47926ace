//! `wallaby-worker ddl …`: the standalone desk. Lists captured statements, records
//! decisions and apply confirmations in the DDL log (a running worker polls it), prints
//! the schema history, and installs the capture as a privileged user.

use std::path::Path;
use std::sync::Arc;

use crate::standalone::Resolved;
use wallaby_ddl::capture::CaptureSpec;
use wallaby_ddl::history::{DdlEvent, DdlLog, HistoryTables, SchemaHistory};
use wallaby_pg::quote_ident;
use wallaby_source::state;

/// One `ddl` command.
#[derive(Debug, Clone)]
pub enum Action {
    /// Install the capture (needs a superuser), or print its SQL.
    Install {
        /// Print the SQL instead of running it.
        print: bool,
    },
    /// Read or write the flow's DDL log / schema history.
    Log(LogAction),
}

/// Commands on the DDL log and the schema history.
#[derive(Debug, Clone)]
pub enum LogAction {
    /// Statements, optionally only in one state.
    List {
        /// `pending`, `approved`, `applied`, `rejected`, `failed`.
        state: Option<String>,
    },
    /// Approve statement `id` (CLI id or LSN).
    Approve(String),
    /// Reject statement `id`.
    Reject(String),
    /// Confirm the manual apply of statement `id`.
    Apply(String),
    /// The schema versions of the flow's tables.
    History {
        /// Only this table (`schema.table`).
        table: Option<String>,
    },
}

fn line(e: &DdlEvent) -> String {
    format!(
        "{id:>4}  {lsn:<14} {state:<9} {decision:<9} {tables:<30} {statement}",
        id = e.id,
        lsn = e.lsn.to_string(),
        state = e.state,
        decision = e.decision,
        tables = e.tables.join(","),
        statement = e.statement.split_whitespace().collect::<Vec<_>>().join(" "),
    )
}

/// Runs `action` for the flow of `resolved`; returns what to print.
pub async fn run(resolved: &Resolved, state_dir: &Path, action: Action) -> anyhow::Result<String> {
    let pg = &resolved.flow.spec.source.postgres;
    let capture = CaptureSpec::of(pg);
    let conn = crate::run::source_connection(resolved, state_dir, "wallaby-worker/ddl".into())?;
    let action = match action {
        // Run by a DBA as a superuser: the schema (shared with the worker's state tables
        // by default) stays usable by the flow's role.
        Action::Install { print: true } => {
            return Ok(format!(
                "{}\nGRANT USAGE, CREATE ON SCHEMA {} TO {};",
                capture.install_sql(),
                quote_ident(&capture.schema),
                quote_ident(conn.user())
            ));
        }
        Action::Install { print: false } => None,
        Action::Log(a) => Some(a),
    };
    let client = Arc::new(conn.connect().await?);
    let Some(action) = action else {
        let installed = capture.ensure(&client).await?;
        return Ok(if installed {
            format!(
                "installed event triggers {0} and {0}_drop (prefix {1})",
                capture.trigger, capture.prefix
            )
        } else {
            format!(
                "event triggers {0} and {0}_drop are already installed",
                capture.trigger
            )
        });
    };
    let flow_id = state::flow_id(&resolved.flow);
    let tables = HistoryTables::in_schema(&pg.state_schema);
    tables.ensure(&client).await?;
    let log = DdlLog::new(client.clone(), tables.clone(), flow_id.clone());
    let out = match action {
        LogAction::List { state } => {
            let events = log.list(state.as_deref()).await?;
            let mut out = format!(
                "{:>4}  {:<14} {:<9} {:<9} {:<30} STATEMENT\n",
                "ID", "LSN", "STATE", "DECISION", "TABLES"
            );
            for e in &events {
                out.push_str(&line(e));
                out.push('\n');
            }
            out
        }
        LogAction::Approve(id) => {
            let e = log.find(&id).await?;
            let e = log.decide(e.lsn, "Approved").await?;
            format!("approved {} at {}: {}", e.id, e.lsn, e.statement)
        }
        LogAction::Reject(id) => {
            let e = log.find(&id).await?;
            let e = log.decide(e.lsn, "Rejected").await?;
            format!("rejected {} at {}: {}", e.id, e.lsn, e.statement)
        }
        LogAction::Apply(id) => {
            let e = log.find(&id).await?;
            if e.decision != "Approved" {
                anyhow::bail!(
                    "DDL {} at {} is {}: only an approved statement can be confirmed as applied",
                    e.id,
                    e.lsn,
                    e.decision
                );
            }
            let e = log.confirm_apply(e.lsn).await?;
            format!("confirmed the apply of {} at {}", e.id, e.lsn)
        }
        LogAction::History { table } => {
            let history = SchemaHistory::new(client.clone(), tables, flow_id);
            let versions = match table {
                Some(t) => history.versions(&t).await?,
                None => history.all().await?,
            };
            serde_json::to_string_pretty(&versions)?
        }
    };
    Ok(out)
}
