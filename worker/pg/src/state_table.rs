//! The worker's own tables on the source (source state, snapshot progress, schema history
//! and DDL log): created when missing, under an advisory lock so that concurrent starts
//! do not collide in the catalogs.

use tokio_postgres::Client;

use crate::quote_ident;

/// One table of a [`ensure_table`] call.
#[derive(Debug, Clone, Copy)]
pub struct TableDdl<'a> {
    /// Table name, unquoted (created in the schema of the call).
    pub name: &'a str,
    /// Column and constraint list, without the parentheses.
    pub columns: &'a str,
    /// `COMMENT ON TABLE`, when set.
    pub comment: Option<&'a str>,
}

/// Where [`ensure_table`] failed.
#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    /// Looking the tables up failed.
    #[error("{0}")]
    Lookup(#[source] tokio_postgres::Error),
    /// Creating schema or tables failed (often: no CREATE privilege).
    #[error("{0}")]
    Create(#[source] tokio_postgres::Error),
}

impl EnsureError {
    /// The driver's error.
    pub fn into_source(self) -> tokio_postgres::Error {
        match self {
            Self::Lookup(e) | Self::Create(e) => e,
        }
    }
}

/// Creates `schema` and `tables` unless every table exists. Existence is checked first,
/// so nothing is executed on a normal start (a DDL script on every start would take locks
/// and, with DDL capture installed, emit capture messages) and a role without CREATE on
/// the database can use tables an administrator prepared. The creation runs as one
/// simple-query batch, one transaction holding `pg_advisory_xact_lock(lock_key)`. Returns
/// whether anything was created.
pub async fn ensure_table(
    client: &Client,
    lock_key: i64,
    schema: &str,
    tables: &[TableDdl<'_>],
) -> Result<bool, EnsureError> {
    let schema_q = quote_ident(schema);
    let names: Vec<String> = tables
        .iter()
        .map(|t| format!("{schema_q}.{}", quote_ident(t.name)))
        .collect();
    let exists: bool = client
        .query_one(
            "SELECT bool_and(to_regclass(n) IS NOT NULL) FROM unnest($1::text[]) AS n",
            &[&names],
        )
        .await
        .map_err(EnsureError::Lookup)?
        .get::<_, Option<bool>>(0)
        .unwrap_or(true);
    if exists {
        return Ok(false);
    }
    let mut sql = format!(
        "SELECT pg_advisory_xact_lock({lock_key});\nCREATE SCHEMA IF NOT EXISTS {schema_q};"
    );
    for (table, name) in tables.iter().zip(&names) {
        sql.push_str(&format!(
            "\nCREATE TABLE IF NOT EXISTS {name} ({});",
            table.columns
        ));
        if let Some(comment) = table.comment {
            sql.push_str(&format!(
                "\nCOMMENT ON TABLE {name} IS '{}';",
                comment.replace('\'', "''")
            ));
        }
    }
    client
        .batch_execute(&sql)
        .await
        .map_err(EnsureError::Create)?;
    Ok(true)
}
