//! Connection errors, each with what the user can do about it.

use crate::PgConnection;

/// A connection could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The manifest's connection settings are unusable.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached or refused the login.
    #[error("cannot connect to PostgreSQL at {target}: {reason}. {hint}")]
    Connect {
        /// `user@host:port/dbname`.
        target: String,
        /// The server's or the network's message.
        reason: String,
        /// What to check.
        hint: &'static str,
    },
    /// A query failed.
    #[error("{context}: {source}")]
    Query {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The session would print values in a form the worker does not read.
    #[error("{0}")]
    Settings(String),
}

impl PgError {
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

    /// Maps a query error to [`PgError::Query`] with `context`.
    pub fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| Self::Query { context, source }
    }
}

/// The error and its causes on one line (tokio-postgres hides the OS error in `source`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
