//! `wallaby-ddl`: DDL governance. Capture of schema changes on the source ([`capture`]), the durable
//! schema history and DDL log ([`history`]), per-destination plans ([`plan`]), the gate
//! that holds the stream before a statement ([`gate`]) and where decisions come from
//! ([`desk`]). The lifecycle is described in docs/ddl.md.

pub mod capture;
pub mod desk;
pub mod gate;
pub mod history;
pub mod plan;

use std::sync::Mutex;

use wallaby_crds::flow::{EffectiveDdlPolicy, SchemaChange};

use wallaby_pipeline::change::Relation;
use wallaby_pipeline::lsn::Lsn;
use wallaby_pipeline::metrics::Metrics;
use wallaby_pipeline::runner::Progress;

/// DDL governance failures; each says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DdlError {
    /// A query on the source failed.
    #[error("{what}: {message}")]
    Sql {
        /// What was being done.
        what: String,
        /// The server's message.
        message: String,
    },
    /// The capture could not be installed.
    #[error("installing the DDL capture (event trigger {trigger}) failed: {message}; {hint}")]
    Install {
        /// Trigger name.
        trigger: String,
        /// The server's message.
        message: String,
        /// What to do.
        hint: String,
    },
    /// A capture message could not be read.
    #[error("DDL message is not a capture payload: {0}")]
    Message(String),
    /// Stored history could not be read back.
    #[error("the schema history / DDL log is inconsistent: {0}")]
    Corrupt(String),
    /// No such statement.
    #[error("{0}")]
    NotFound(String),
    /// A decision was already taken.
    #[error("the DDL at {lsn} is already {decision}: a decision is final")]
    Decided {
        /// Position.
        lsn: Lsn,
        /// The decision it has.
        decision: String,
    },
    /// The Kubernetes API refused or failed.
    #[error("{0}")]
    Api(String),
    /// A statement was rejected: the flow stops before it.
    #[error(
        "DDL at {lsn} was rejected ({statement:?}); the flow is stopped and the slot held before it; to go on, {how}"
    )]
    Rejected {
        /// Position.
        lsn: Lsn,
        /// Statement.
        statement: String,
        /// What to do.
        how: String,
    },
    /// An environment default is not a boolean.
    #[error("{name}={value:?}: expected true or false")]
    Env {
        /// Variable.
        name: &'static str,
        /// Value.
        value: String,
    },
}

impl DdlError {
    pub(crate) fn sql(what: impl Into<String>, e: tokio_postgres::Error) -> Self {
        Self::Sql {
            what: what.into(),
            message: e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| e.to_string()),
        }
    }
}

/// The version of a relation description met in the stream, recorded when new; a new
/// shape of a known table that no captured statement announced is reported as drift.
pub async fn note_stream_shape(
    history: &history::SchemaHistory,
    relation: &Relation,
    lsn: Lsn,
    progress: &Mutex<Progress>,
    metrics: &Metrics,
    captured: bool,
) -> Result<u32, DdlError> {
    let table = format!("{}.{}", relation.schema, relation.table);
    let resolved = history
        .resolve(&table, &history::shape_of(relation), lsn, "stream", None)
        .await?;
    if let Some((Some(previous), changes)) = &resolved.new {
        let text = history::summary(changes);
        metrics.schema_change("stream");
        tracing::warn!(
            table = %table,
            from = previous,
            to = resolved.version,
            lsn = %lsn,
            changes = %text,
            "schema drift: {table} changed ({text}) with no captured DDL statement{}",
            if captured { " matching it" } else { " (captureDDL is off)" }
        );
        progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .last_schema_change = Some(SchemaChange {
            table,
            version: resolved.version,
            lsn: lsn.to_string(),
            source: "stream".into(),
            summary: text,
        });
    }
    Ok(resolved.version)
}

/// Operator-wide (or, standalone, machine-wide) defaults of the DDL policy:
/// `WALLABY_DDL_GATE`, `WALLABY_DDL_AUTO_APPROVE`, `WALLABY_DDL_AUTO_APPLY`.
pub fn env_defaults() -> Result<EffectiveDdlPolicy, DdlError> {
    defaults_from(|name| std::env::var(name).ok())
}

fn defaults_from(get: impl Fn(&str) -> Option<String>) -> Result<EffectiveDdlPolicy, DdlError> {
    let mut p = EffectiveDdlPolicy::default();
    for (name, field) in [
        ("WALLABY_DDL_GATE", &mut p.gate),
        ("WALLABY_DDL_AUTO_APPROVE", &mut p.auto_approve),
        ("WALLABY_DDL_AUTO_APPLY", &mut p.auto_apply),
    ] {
        if let Some(value) = get(name) {
            *field = match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => return Err(DdlError::Env { name, value }),
            };
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_defaults_override_the_built_in_ones() {
        let p = defaults_from(|n| (n == "WALLABY_DDL_GATE").then(|| "true".into())).unwrap();
        assert!(p.gate && p.auto_approve && p.auto_apply);
        let err =
            defaults_from(|n| (n == "WALLABY_DDL_AUTO_APPLY").then(|| "maybe".into())).unwrap_err();
        assert!(err.to_string().contains("WALLABY_DDL_AUTO_APPLY"), "{err}");
    }
}
