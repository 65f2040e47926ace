//! The PostgreSQL source: preflight checks, publication and slot lifecycle, and the
//! replication stream decoded into [`crate::change`] events in commit order.
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

pub mod connection;
pub mod reader;
pub mod setup;
pub mod types;

pub mod state;

pub mod spill;
pub mod toast;

pub use connection::PgConnection;
pub use state::SourceState;

/// Errors of the source, each with what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The manifest's connection settings are unusable.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached or refused the login.
    #[error("cannot connect to PostgreSQL at {target}: {reason}. {hint}")]
    Connect {
        target: String,
        reason: String,
        hint: &'static str,
    },
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
    /// Classifies a connection failure into a message that names the fix.
    pub fn connect(conn: &PgConnection, e: &tokio_postgres::Error) -> Self {
        let text = e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_else(|| error_chain(e));
        let hint = if text.contains("password authentication failed")
            || text.contains("authentication")
        {
            "Check the user and password in the Secret of source.postgres.secretRef"
        } else if text.contains("does not exist") {
            "Check the database and user names in source.postgres.dsn"
        } else if text.contains("refused") || text.contains("timed out") || text.contains("resolve")
        {
            "Is the server running and reachable? Check host and port in source.postgres.dsn"
        } else if text.contains("TLS") || text.contains("tls") || text.contains("certificate") {
            "Check source.postgres.sslMode and sslRootCert"
        } else {
            "Check source.postgres.dsn and its Secret"
        };
        Self::Connect {
            target: conn.describe(),
            reason: text,
            hint,
        }
    }

    pub(crate) fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| Self::Query { context, source }
    }
}

/// The error and its causes on one line (tokio-postgres hides the OS error in `source`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
