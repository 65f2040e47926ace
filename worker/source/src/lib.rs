//! `wallaby-source`: everything read from PostgreSQL. Preflight checks, publication and
//! slot lifecycle, the replication stream decoded into [`wallaby_pipeline::change`] events
//! in commit order (spill files, TOAST, type resolution), and the snapshot copy.
//!
//! ```text
//!  PostgreSQL walsender ──pgoutput──▶ ReplicationReader (pg_walstream transport + parser)
//!        ▲                                   │ streamed chunks ──▶ spill file per xid
//!        │                                   │ (replayed at StreamCommit, dropped at abort)
//!        │                                   │ toastFetch stage on every row
//!        │                                   │ SourceEvent (Begin / Row / Commit / Message)
//!        │ standby status (flush LSN)        ▼
//!        └──────────── SharedLsnFeedback ◀── pipeline (acks only what destinations fsynced)
//! ```

pub mod reader;
pub mod setup;
pub mod types;

pub mod state;

pub mod snapshot;
pub mod spill;
pub mod toast;

pub use state::SourceState;
pub use wallaby_pg::PgConnection;

/// Errors of the source, each with what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The manifest's connection settings are unusable.
    #[error("{0}")]
    Config(String),
    /// Connecting failed, or a connection setting is unusable.
    #[error(transparent)]
    Pg(#[from] wallaby_pg::PgError),
    /// The server is not set up for logical replication.
    #[error("{0}")]
    Replication(String),
    /// A table, publication or slot is missing or wrong.
    #[error("{0}")]
    Catalog(String),
    /// A query failed.
    #[error("{context}: {source}")]
    Query {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The replication stream failed.
    #[error("replication stream of slot {slot:?} failed: {message}")]
    Stream { slot: String, message: String },
    /// A streamed transaction could not be spilled or read back.
    #[error(transparent)]
    Spill(#[from] spill::SpillError),
}

impl SourceError {
    pub(crate) fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| Self::Query { context, source }
    }
}
