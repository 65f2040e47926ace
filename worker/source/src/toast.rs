//! Unchanged TOAST columns (`toastFetch`): PostgreSQL leaves a large value that an UPDATE did
//! not change out of the new tuple. This stage fills those cells, per row and in commit
//! order, right before the row leaves the source. The modes and their consistency caveats
//! are documented in docs/toast.md.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use bytes::Bytes;
use lru::LruCache;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use wallaby_crds::flow::ToastFetch;

use super::SourceError;
use wallaby_pipeline::change::{Cell, Op, Relation, RowChange};

/// Cache key: relation id and the key columns' text (`None` for NULL).
type CacheKey = (u32, Vec<Option<Bytes>>);

/// A row as last seen, with the relation version its cells follow.
#[derive(Debug)]
struct CachedRow {
    relation: Arc<Relation>,
    cells: Vec<Cell>,
}

/// A re-select statement built for one relation version and one set of columns.
#[derive(Debug)]
struct Statement {
    relation: Arc<Relation>,
    sql: String,
}

/// The `toastFetch` stage.
pub struct ToastStage {
    mode: ToastFetch,
    catalog: Arc<Client>,
    cache: Option<ToastCache>,
    /// (relation id, fetched columns) → statement.
    statements: HashMap<(u32, Vec<usize>), Statement>,
}

impl std::fmt::Debug for ToastStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToastStage")
            .field("mode", &self.mode)
            .field("cached", &self.cache.as_ref().map(|c| c.rows.len()))
            .finish_non_exhaustive()
    }
}

impl ToastStage {
    /// `catalog` is a normal SQL connection to the source database (used by `source` and
    /// `full`); `cache_size` bounds the LRU of `cache` (entries, one row each).
    pub fn new(mode: ToastFetch, cache_size: u32, catalog: Arc<Client>) -> Self {
        let cache = (mode == ToastFetch::Cache).then(|| ToastCache::new(cache_size));
        Self {
            mode,
            catalog,
            cache,
            statements: HashMap::new(),
        }
    }

    /// The mode.
    pub fn mode(&self) -> ToastFetch {
        self.mode
    }

    /// Fills what the mode can of `change`'s unchanged TOAST cells; whatever stays unknown
    /// stays [`Cell::UnchangedToast`] (and the record lists it as unchanged).
    pub async fn apply(&mut self, change: &mut RowChange) -> Result<(), SourceError> {
        match self.mode {
            ToastFetch::Off => Ok(()),
            ToastFetch::Cache => {
                if let Some(cache) = self.cache.as_mut() {
                    cache.apply(change);
                }
                Ok(())
            }
            ToastFetch::Source | ToastFetch::Full => {
                if !has_unchanged(change) {
                    return Ok(());
                }
                fill_from_full_before(change);
                if !has_unchanged(change) {
                    return Ok(());
                }
                self.fetch(change).await
            }
        }
    }

    /// `source`: re-select the missing columns; `full`: re-select the row and take all of it.
    async fn fetch(&mut self, change: &mut RowChange) -> Result<(), SourceError> {
        let relation = change.relation.clone();
        let Some(after) = change.after.as_mut() else {
            return Ok(());
        };
        let name = format!("{}.{}", relation.schema, relation.table);
        let Some(key) = key_text(&relation, after) else {
            tracing::debug!(table = %name, "toastFetch: the row's key is not in the new tuple (no key, or a NULL or unchanged key column); unchanged columns stay flagged");
            return Ok(());
        };
        let columns: Vec<usize> = match self.mode {
            ToastFetch::Full => (0..relation.columns.len()).collect(),
            _ => unchanged_columns(after),
        };
        let sql = self.statement(&relation, &columns).await?;
        let params: Vec<&(dyn ToSql + Sync)> =
            key.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
        let rows = match self.catalog.query(&sql, &params).await {
            Ok(rows) => rows,
            Err(e)
                if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                    || e.code() == Some(&SqlState::UNDEFINED_COLUMN) =>
            {
                tracing::debug!(table = %name, error = %e, "toastFetch: the table or column no longer exists; unchanged columns stay flagged");
                return Ok(());
            }
            Err(e) => {
                return Err(SourceError::Query {
                    context: format!(
                        "toastFetch {}: re-selecting unchanged TOAST columns of {name} by key (grant SELECT on it, or set toastFetch: off)",
                        mode_name(self.mode)
                    ),
                    source: e,
                });
            }
        };
        let [row] = rows.as_slice() else {
            tracing::debug!(table = %name, matches = rows.len(), "toastFetch: the row is gone (deleted or its key changed since this change) or its key is not unique; unchanged columns stay flagged");
            return Ok(());
        };
        for (n, &i) in columns.iter().enumerate() {
            let value: Option<String> = row.try_get(n).map_err(|e| SourceError::Query {
                context: format!("toastFetch: reading column {n} of the re-selected row of {name}"),
                source: e,
            })?;
            if let Some(cell) = after.get_mut(i) {
                *cell = match value {
                    Some(text) => Cell::Text(Bytes::from(text)),
                    None => Cell::Null,
                };
            }
        }
        Ok(())
    }

    /// `SELECT <columns as output-function text> FROM <table> WHERE <key> = $n::text::<type>`.
    /// `format('%s', v)` renders a value with its type's output function, exactly as pgoutput
    /// does (a `::text` cast differs for some types, e.g. `true::text` is `true`, not `t`).
    async fn statement(
        &mut self,
        relation: &Arc<Relation>,
        columns: &[usize],
    ) -> Result<String, SourceError> {
        let id = (relation.id, columns.to_vec());
        if let Some(s) = self.statements.get(&id)
            && Arc::ptr_eq(&s.relation, relation)
        {
            return Ok(s.sql.clone());
        }
        let select: Vec<String> = columns
            .iter()
            .filter_map(|&i| relation.columns.get(i))
            .map(|c| {
                let q = quote_ident(&c.name);
                format!("CASE WHEN {q} IS NULL THEN NULL ELSE format('%s', {q}) END")
            })
            .collect();
        let mut conditions = Vec::new();
        for (n, &k) in relation.key.iter().enumerate() {
            let Some(col) = relation.columns.get(k) else {
                continue;
            };
            let type_name: String = self
                .catalog
                .query_one(
                    "SELECT format_type($1::oid, $2::int4)",
                    &[&col.type_oid, &col.type_modifier],
                )
                .await
                .map_err(SourceError::query(format!(
                    "toastFetch: naming the type of key column {} of {}.{}",
                    col.name, relation.schema, relation.table
                )))?
                .get(0);
            conditions.push(format!(
                "{} = ${}::text::{type_name}",
                quote_ident(&col.name),
                n + 1
            ));
        }
        let sql = format!(
            "SELECT {} FROM {}.{} WHERE {}",
            select.join(", "),
            quote_ident(&relation.schema),
            quote_ident(&relation.table),
            conditions.join(" AND ")
        );
        self.statements.insert(
            id,
            Statement {
                relation: relation.clone(),
                sql: sql.clone(),
            },
        );
        Ok(sql)
    }
}

/// `cache`: a bounded LRU of the last row seen per key, filled from inserts and updates in
/// commit order; it starts empty at every start of the worker.
#[derive(Debug)]
pub struct ToastCache {
    rows: LruCache<CacheKey, CachedRow>,
}

impl ToastCache {
    /// A cache of at most `size` rows (at least one).
    pub fn new(size: u32) -> Self {
        Self {
            rows: LruCache::new(NonZeroUsize::new(size as usize).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// Fills unchanged cells from the last value seen for the same key (a miss leaves them
    /// flagged), then remembers this row.
    pub fn apply(&mut self, change: &mut RowChange) {
        let cache = &mut self.rows;
        let relation = change.relation.clone();
        match change.op {
            Op::Truncate => {
                let stale: Vec<CacheKey> = cache
                    .iter()
                    .filter(|((id, _), _)| *id == relation.id)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in stale {
                    cache.pop(&k);
                }
            }
            Op::Delete => {
                if let Some(k) = change.before.as_deref().and_then(|b| old_key(change, b)) {
                    cache.pop(&k);
                }
            }
            Op::Insert | Op::Update | Op::Read => {
                fill_from_full_before(change);
                let old = change.before.as_deref().and_then(|b| old_key(change, b));
                let Some(after) = change.after.as_mut() else {
                    return;
                };
                let Some(new) = cache_key(&relation, after) else {
                    return;
                };
                let previous = cache.pop(old.as_ref().unwrap_or(&new));
                if let Some(previous) = previous {
                    for i in unchanged_columns(after) {
                        if let Some(cell) = previous.cell(&relation, i) {
                            after[i] = cell;
                        }
                    }
                }
                cache.put(
                    new,
                    CachedRow {
                        relation,
                        cells: after.clone(),
                    },
                );
            }
        }
    }
}

impl CachedRow {
    /// The cached value of column `i` of `relation`, matched by name when the table was
    /// described again since (columns can shift after `DROP COLUMN`).
    fn cell(&self, relation: &Relation, i: usize) -> Option<Cell> {
        let j = if std::ptr::eq(self.relation.as_ref(), relation) {
            i
        } else {
            let name = &relation.columns.get(i)?.name;
            self.relation.columns.iter().position(|c| &c.name == name)?
        };
        match self.cells.get(j)? {
            Cell::UnchangedToast => None,
            known => Some(known.clone()),
        }
    }
}

fn mode_name(mode: ToastFetch) -> &'static str {
    match mode {
        ToastFetch::Off => "off",
        ToastFetch::Source => "source",
        ToastFetch::Full => "full",
        ToastFetch::Cache => "cache",
    }
}

fn has_unchanged(change: &RowChange) -> bool {
    change
        .after
        .as_ref()
        .is_some_and(|a| a.contains(&Cell::UnchangedToast))
}

fn unchanged_columns(cells: &[Cell]) -> Vec<usize> {
    cells
        .iter()
        .enumerate()
        .filter(|(_, c)| **c == Cell::UnchangedToast)
        .map(|(i, _)| i)
        .collect()
}

/// Under `REPLICA IDENTITY FULL` the old tuple carries every value (PostgreSQL detoasts it
/// into the WAL), so an unchanged column is known exactly without asking anyone.
fn fill_from_full_before(change: &mut RowChange) {
    if change.before_is_identity {
        return;
    }
    let (Some(before), Some(after)) = (change.before.as_ref(), change.after.as_mut()) else {
        return;
    };
    if before.len() != after.len() {
        return;
    }
    for (a, b) in after.iter_mut().zip(before) {
        if *a == Cell::UnchangedToast && *b != Cell::UnchangedToast {
            *a = b.clone();
        }
    }
}

/// The key columns' text, when every one of them is a known non-NULL value.
fn key_text(relation: &Relation, cells: &[Cell]) -> Option<Vec<String>> {
    if relation.key.is_empty() {
        return None;
    }
    relation
        .key
        .iter()
        .map(|&k| match cells.get(k)? {
            Cell::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
            Cell::Null | Cell::UnchangedToast => None,
        })
        .collect()
}

fn cache_key(relation: &Relation, cells: &[Cell]) -> Option<CacheKey> {
    if relation.key.is_empty() {
        return None;
    }
    let values = relation
        .key
        .iter()
        .map(|&k| match cells.get(k)? {
            Cell::Text(t) => Some(Some(t.clone())),
            Cell::Null => Some(None),
            Cell::UnchangedToast => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some((relation.id, values))
}

/// The key of the old row, when the old tuple carries the key columns: always under
/// `REPLICA IDENTITY FULL`, and for an identity-only tuple when the key is the identity.
fn old_key(change: &RowChange, before: &[Cell]) -> Option<CacheKey> {
    let relation = &change.relation;
    if change.before_is_identity && relation.key != relation.identity {
        return None;
    }
    cache_key(relation, before)
}

/// `"name"` with embedded quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wallaby_pipeline::change::Column;

    fn relation() -> Arc<Relation> {
        Arc::new(Relation {
            id: 3,
            schema: "public".into(),
            table: "docs".into(),
            columns: ["id", "title", "body"]
                .iter()
                .map(|n| Column {
                    name: (*n).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
            key: vec![0],
            identity: vec![0],
        })
    }

    fn text(s: &str) -> Cell {
        Cell::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn change(
        rel: &Arc<Relation>,
        op: Op,
        before: Option<Vec<Cell>>,
        after: Option<Vec<Cell>>,
    ) -> RowChange {
        RowChange {
            lsn: wallaby_pipeline::lsn::Lsn(0),
            relation: rel.clone(),
            op,
            before_is_identity: true,
            before,
            after,
        }
    }

    #[test]
    fn quote_ident_doubles_quotes() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
    }

    #[test]
    fn full_old_tuple_fills_unchanged_columns_exactly() {
        let rel = relation();
        let mut c = change(
            &rel,
            Op::Update,
            Some(vec![text("1"), text("old"), text("big")]),
            Some(vec![text("1"), text("new"), Cell::UnchangedToast]),
        );
        c.before_is_identity = false;
        fill_from_full_before(&mut c);
        assert_eq!(c.after.unwrap()[2], text("big"));
    }

    #[test]
    fn keys_need_known_values() {
        let rel = relation();
        assert_eq!(
            key_text(&rel, &[text("7"), Cell::Null, Cell::Null]),
            Some(vec!["7".to_owned()])
        );
        assert_eq!(key_text(&rel, &[Cell::Null]), None);
        assert_eq!(key_text(&rel, &[Cell::UnchangedToast]), None);
        assert_eq!(
            unchanged_columns(&[text("1"), Cell::UnchangedToast]),
            vec![1]
        );
    }

    #[test]
    fn cache_fills_from_inserts_and_updates_and_forgets_deleted_and_evicted_rows() {
        let rel = relation();
        let mut cache = ToastCache::new(2);
        let mut run = |op, before: Option<Vec<Cell>>, after: Option<Vec<Cell>>| {
            let mut c = change(&rel, op, before, after);
            cache.apply(&mut c);
            c.after
        };
        run(
            Op::Insert,
            None,
            Some(vec![text("1"), text("a"), text("big-1")]),
        );
        // Miss: row 2 was never seen.
        let got = run(
            Op::Update,
            None,
            Some(vec![text("2"), text("b"), Cell::UnchangedToast]),
        );
        assert_eq!(got.unwrap()[2], Cell::UnchangedToast);
        // Hit, and the filled row is remembered for the next update.
        let got = run(
            Op::Update,
            None,
            Some(vec![text("1"), text("a2"), Cell::UnchangedToast]),
        );
        assert_eq!(got.unwrap()[2], text("big-1"));
        let got = run(
            Op::Update,
            None,
            Some(vec![text("1"), text("a3"), Cell::UnchangedToast]),
        );
        assert_eq!(got.unwrap()[2], text("big-1"));
        // A key change moves the entry (identity old tuple = key).
        let got = run(
            Op::Update,
            Some(vec![text("1"), Cell::Null, Cell::Null]),
            Some(vec![text("10"), text("a4"), Cell::UnchangedToast]),
        );
        assert_eq!(got.unwrap()[2], text("big-1"));
        // Delete forgets.
        run(
            Op::Delete,
            Some(vec![text("10"), Cell::Null, Cell::Null]),
            None,
        );
        let got = run(
            Op::Update,
            None,
            Some(vec![text("10"), text("x"), Cell::UnchangedToast]),
        );
        assert_eq!(got.unwrap()[2], Cell::UnchangedToast);
        // Bounded: with room for 2 rows, the least recently used goes.
        for id in ["20", "21", "22"] {
            run(
                Op::Insert,
                None,
                Some(vec![text(id), text("t"), text(&format!("big-{id}"))]),
            );
        }
        let got = run(
            Op::Update,
            None,
            Some(vec![text("20"), text("t"), Cell::UnchangedToast]),
        );
        assert_eq!(got.unwrap()[2], Cell::UnchangedToast);
        let got = run(
            Op::Update,
            None,
            Some(vec![text("22"), text("t"), Cell::UnchangedToast]),
        );
        assert_eq!(got.unwrap()[2], text("big-22"));
        // Truncate forgets the table.
        run(Op::Truncate, None, None);
        let got = run(
            Op::Update,
            None,
            Some(vec![text("22"), text("t"), Cell::UnchangedToast]),
        );
        assert_eq!(got.unwrap()[2], Cell::UnchangedToast);
    }
}
