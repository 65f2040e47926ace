//! Change events as the source emits them, in commit order, and their JSON-lines record
//! (the `file` destination's format): schema, table, op, key, before, after, unchanged
//! TOAST columns, commit LSN, commit time, xid.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::encoding::PayloadEncoding;
use crate::error::DestinationError;
use crate::lsn::Lsn;

/// A table as described by the last pgoutput Relation message.
#[derive(Debug, Clone)]
pub struct Relation {
    /// Relation OID.
    pub id: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Columns in table order.
    pub columns: Vec<Column>,
    /// Indexes into `columns` of the key: the primary key, or the replica identity when the
    /// table has none.
    pub key: Vec<usize>,
    /// Indexes of the replica identity columns (what an old tuple of kind `K` carries).
    pub identity: Vec<usize>,
}

/// A column of a relation.
#[derive(Debug, Clone)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

/// One column value of a tuple, in pgoutput's text format.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// Text representation.
    Text(Bytes),
    /// An unchanged TOASTed value that PostgreSQL did not send.
    UnchangedToast,
}

/// Operation of a change (the codec's, so records and events share one type).
pub use wallaby_codec::Op;

/// A row-level change.
#[derive(Debug, Clone)]
pub struct RowChange {
    /// The table.
    pub relation: Arc<Relation>,
    /// Operation.
    pub op: Op,
    /// Old values (key columns only unless `REPLICA IDENTITY FULL`).
    pub before: Option<Vec<Cell>>,
    /// `before` holds only the replica identity columns (pgoutput old tuple kind `K`).
    pub before_is_identity: bool,
    /// New values.
    pub after: Option<Vec<Cell>>,
    /// WAL position of the change (the XLogData start of its message); with the table
    /// and key, the idempotency key of the change.
    pub lsn: Lsn,
}

/// Typed rows of one table, decoded ahead of the pipeline; the batcher stamps their
/// transaction fields (commit LSN, commit time, xid) from the enclosing `Begin`.
#[derive(Debug, Clone)]
pub struct DecodedRows {
    /// Relation OID (groups the rows with others of the same table and schema).
    pub relation_id: u32,
    /// Schema the rows were decoded with.
    pub schema: Arc<wallaby_codec::TableSchema>,
    /// The changes, in order.
    pub changes: Vec<wallaby_codec::Change>,
    /// Bytes to charge to the memory budget for all of them (the same measure as a row's
    /// text cells are charged).
    pub bytes: u64,
    /// The rows already encoded for every destination (a snapshot's copy workers do
    /// this when each destination writes a table group as one payload); `changes` is
    /// then empty, and the piece is never split across batches.
    pub encoded: Option<Arc<EncodedRows>>,
}

impl DecodedRows {
    /// Rows held.
    pub fn len(&self) -> u64 {
        match &self.encoded {
            Some(e) => e.rows,
            None => self.changes.len() as u64,
        }
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Rows of one table encoded ahead of the pipeline: one payload per distinct
/// [`PayloadEncoding`] of the flow's destinations,
/// each exactly what the destination's own encoding of the rows as `read` changes at
/// `lsn` would give.
#[derive(Debug)]
pub struct EncodedRows {
    /// Rows in each payload.
    pub rows: u64,
    /// Commit LSN (and change LSN) of every row.
    pub lsn: u64,
    /// The payloads.
    pub payloads: Vec<(PayloadEncoding, Bytes)>,
}

impl EncodedRows {
    /// The payload for `encoding`, the writing destination's own (of the rows of
    /// `table`). The copy workers encode for every destination of the flow, so a
    /// destination without an encoding, or a missing payload, is an internal error.
    pub fn payload(
        &self,
        encoding: Option<&PayloadEncoding>,
        table: &str,
    ) -> Result<&Bytes, DestinationError> {
        encoding
            .and_then(|wanted| self.payloads.iter().find(|(e, _)| e == wanted))
            .map(|(_, p)| p)
            .ok_or_else(|| {
                DestinationError::permanent(format!(
                    "internal error: no {} payload among the rows of {table} encoded ahead",
                    encoding.map_or("matching", |e| e.format.as_str())
                ))
            })
    }
}

/// What the source emits.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// A transaction starts; its changes follow, then `Commit`.
    Begin {
        /// Transaction id.
        xid: u32,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// Commit time.
        commit_time: DateTime<Utc>,
    },
    /// A row change (or a truncate of one table).
    Row(RowChange),
    /// Rows of one table already decoded to typed changes (the snapshot's copy workers
    /// decode in parallel, so the pipeline only groups them into batches).
    Decoded(DecodedRows),
    /// A `pg_logical_emit_message` message.
    Message {
        /// Transactional messages are delivered inside their transaction.
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// Prefix given by the emitter.
        prefix: String,
        /// Payload.
        content: Bytes,
    },
    /// The transaction committed.
    Commit {
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End of the commit record: the position to confirm once delivered.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: DateTime<Utc>,
    },
}

/// Transaction context stamped on every record.
#[derive(Debug, Clone, Copy)]
pub struct TxnMeta {
    /// Transaction id.
    pub xid: u32,
    /// Commit LSN.
    pub commit_lsn: Lsn,
    /// Commit time.
    pub commit_time: DateTime<Utc>,
}

/// Text value to JSON: booleans and integers become JSON scalars, `json`/`jsonb` are
/// embedded, everything else keeps PostgreSQL's exact text (numeric, floats with NaN,
/// timestamps, bytea as `\x…`). The mapping is documented in docs/destinations.md.
fn cell_json(type_oid: u32, cell: &Cell) -> Value {
    let Cell::Text(text) = cell else {
        return Value::Null;
    };
    let s = String::from_utf8_lossy(text);
    match type_oid {
        16 => Value::Bool(s == "t"),
        20 | 21 | 23 | 26 => s
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(s.into_owned())),
        114 | 3802 => serde_json::from_str(&s).unwrap_or_else(|_| Value::String(s.into_owned())),
        _ => Value::String(s.into_owned()),
    }
}

fn tuple_json(rel: &Relation, cells: &[Cell], only: Option<&[usize]>) -> Value {
    let mut map = Map::new();
    let mut put = |i: usize| {
        if let (Some(col), Some(cell)) = (rel.columns.get(i), cells.get(i))
            && *cell != Cell::UnchangedToast
        {
            map.insert(col.name.clone(), cell_json(col.type_oid, cell));
        }
    };
    match only {
        Some(idx) => idx.iter().copied().for_each(&mut put),
        None => (0..cells.len()).for_each(&mut put),
    }
    Value::Object(map)
}

impl RowChange {
    /// The JSON-lines record of this change.
    pub fn to_record(&self, txn: &TxnMeta) -> Value {
        let rel = &self.relation;
        // The key comes from the new row, or from the old one for deletes.
        let key_source = self.after.as_ref().or(self.before.as_ref());
        let key = match key_source {
            Some(cells) if self.op != Op::Truncate => tuple_json(rel, cells, Some(&rel.key)),
            _ => Value::Null,
        };
        let unchanged: Vec<Value> = self
            .after
            .iter()
            .flat_map(|cells| cells.iter().enumerate())
            .filter(|(_, c)| **c == Cell::UnchangedToast)
            .filter_map(|(i, _)| rel.columns.get(i).map(|c| Value::String(c.name.clone())))
            .collect();
        serde_json::json!({
            "schema": rel.schema,
            "table": rel.table,
            "op": self.op.as_str(),
            "key": key,
            "before": self.before.as_ref().map(|c| {
                tuple_json(rel, c, self.before_is_identity.then_some(rel.identity.as_slice()))
            }),
            "after": self.after.as_ref().map(|c| tuple_json(rel, c, None)),
            "unchanged_toast": unchanged,
            "lsn": txn.commit_lsn.to_string(),
            "commit_time": txn.commit_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "xid": txn.xid,
        })
    }
}

/// The record of a logical message.
pub fn message_record(
    txn: Option<&TxnMeta>,
    lsn: Lsn,
    transactional: bool,
    prefix: &str,
    content: &[u8],
) -> Value {
    let content = match std::str::from_utf8(content) {
        Ok(s) => Value::String(s.to_owned()),
        Err(_) => {
            let hex: String = content.iter().map(|b| format!("{b:02x}")).collect();
            Value::String(format!("\\x{hex}"))
        }
    };
    serde_json::json!({
        "op": "message",
        "transactional": transactional,
        "prefix": prefix,
        "content": content,
        "lsn": txn.map(|t| t.commit_lsn).unwrap_or(lsn).to_string(),
        "message_lsn": lsn.to_string(),
        "commit_time": txn.map(|t| t.commit_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        "xid": txn.map(|t| t.xid),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel() -> Arc<Relation> {
        Arc::new(Relation {
            id: 1,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                },
                Column {
                    name: "ok".into(),
                    type_oid: 16,
                    type_modifier: -1,
                },
                Column {
                    name: "doc".into(),
                    type_oid: 3802,
                    type_modifier: -1,
                },
                Column {
                    name: "big".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
            key: vec![0],
            identity: vec![0],
        })
    }

    fn text(s: &str) -> Cell {
        Cell::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn update_record_flags_unchanged_toast_and_keys_by_primary_key() {
        let change = RowChange {
            lsn: Lsn(0),
            relation: rel(),
            op: Op::Update,
            before: None,
            before_is_identity: false,
            after: Some(vec![
                text("7"),
                text("t"),
                text(r#"{"a": 1}"#),
                Cell::UnchangedToast,
            ]),
        };
        let txn = TxnMeta {
            xid: 9,
            commit_lsn: Lsn(0x1_0000_0010),
            commit_time: DateTime::from_timestamp(0, 0).unwrap(),
        };
        let r = change.to_record(&txn);
        assert_eq!(r["key"], serde_json::json!({"id": 7}));
        assert_eq!(
            r["after"],
            serde_json::json!({"id": 7, "ok": true, "doc": {"a": 1}})
        );
        assert_eq!(r["unchanged_toast"], serde_json::json!(["big"]));
        assert_eq!(r["lsn"], "1/10");
        assert_eq!(r["before"], Value::Null);
    }
}
