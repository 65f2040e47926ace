//! Change batches: source events decoded into typed [`Change`]s, grouped per table schema,
//! cut by count (`batchSize`), bytes (`batchMaxBytes`) and time (`batchTimeout`), and
//! charged against the pipeline's memory budget until every destination is done with them.
//! A batch may end inside a transaction; its checkpoint is then the end of the last
//! transaction it completed (or none), so the slot only ever moves to transaction ends.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wallaby_codec::{Change, Row, TableSchema, Value};

use crate::change::{Cell, DecodedRows, EncodedRows, Op, Relation, RowChange};
use crate::lsn::Lsn;

/// Fixed cost charged per row on top of its values (the `Change`, its vectors and their
/// allocations, as measured with the 1M-row test).
pub const ROW_OVERHEAD: u64 = 160;
/// Cost charged per typed value on top of its text.
pub const VALUE_OVERHEAD: u64 = 64;
/// Budget permits are KiB so that a `u32` permit count covers terabytes.
const PERMIT_UNIT: u64 = 1024;

/// The changes of one table (one schema version) in a batch, in commit order.
#[derive(Debug)]
pub struct TableChanges {
    /// Schema the changes conform to.
    pub schema: Arc<TableSchema>,
    /// Changes.
    pub changes: Vec<Change>,
    /// Rows encoded ahead (a snapshot's copy workers), after `changes`' rows; only
    /// destinations with a [`payload_encoding`](crate::destination::Destination::payload_encoding)
    /// receive batches holding them.
    pub encoded: Vec<Arc<EncodedRows>>,
}

impl ChangeBatch {
    /// Whether a table group holds rows encoded ahead.
    pub fn has_encoded(&self) -> bool {
        self.tables.iter().any(|g| !g.encoded.is_empty())
    }
}

/// A `pg_logical_emit_message` carried through to destinations.
#[derive(Debug, Clone)]
pub struct LogicalMessage {
    /// LSN of the message.
    pub lsn: Lsn,
    /// Commit LSN of its transaction (transactional messages only).
    pub commit_lsn: Option<Lsn>,
    /// Prefix given by the emitter.
    pub prefix: String,
    /// Payload.
    pub content: bytes::Bytes,
}

/// One unit of delivery to every destination.
#[derive(Debug)]
pub struct ChangeBatch {
    /// Position of this batch in the run (1, 2, …).
    pub seq: u64,
    /// Row changes grouped by table schema, in first-seen order.
    pub tables: Vec<TableChanges>,
    /// Logical messages.
    pub messages: Vec<LogicalMessage>,
    /// Rows (changes) in the batch.
    pub rows: u64,
    /// Bytes charged to the memory budget.
    pub bytes: u64,
    /// Transactions whose commit is in this batch.
    pub transactions: u64,
    /// End LSN of the last transaction completed in this batch: what the slot may confirm
    /// once the batch is durable. `None` when the batch only holds part of a transaction.
    pub checkpoint: Option<Lsn>,
    /// Commit time of that transaction.
    pub checkpoint_time: Option<DateTime<Utc>>,
    /// Rows per (qualified table, op) for metrics and counters.
    pub op_counts: Vec<(String, Op, u64)>,
    /// The `batch` span: open from dispatch until the last destination is done with the
    /// batch; each destination's write is a child span.
    pub span: tracing::Span,
    /// Memory-budget reservation, released when the last destination drops the batch.
    _permit: Option<OwnedSemaphorePermit>,
}

impl ChangeBatch {
    /// An empty batch charged to no memory budget, for a batch rebuilt from disk (the
    /// secondary spool): its memory is the reader's own, not the pipeline's. The caller
    /// fills the fields.
    pub fn without_budget(seq: u64) -> Self {
        Self {
            seq,
            tables: Vec::new(),
            messages: Vec::new(),
            rows: 0,
            bytes: 0,
            transactions: 0,
            checkpoint: None,
            checkpoint_time: None,
            op_counts: Vec::new(),
            span: tracing::Span::none(),
            _permit: None,
        }
    }

    /// Whether the batch carries nothing (an `emitEmpty` tick).
    pub fn is_empty(&self) -> bool {
        self.rows == 0 && self.messages.is_empty()
    }
}

/// Failure while building a batch.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// A value's text did not parse as its column's type.
    #[error("{0}")]
    Decode(Box<DecodeError>),
    /// The column types of a table could not be resolved.
    #[error("resolving the column types of {table}: {message}")]
    Schema {
        /// Qualified table.
        table: String,
        /// Why.
        message: String,
    },
    /// The source broke its own protocol.
    #[error("{0}")]
    Protocol(String),
}

/// A value that did not decode, with where it was.
#[derive(Debug, thiserror::Error)]
#[error("table {table}, column {column} ({type_name}): {source}")]
pub struct DecodeError {
    /// Qualified table.
    pub table: String,
    /// Column.
    pub column: String,
    /// PostgreSQL type.
    pub type_name: String,
    /// Why.
    #[source]
    pub source: wallaby_codec::CodecError,
}

/// Turns a pgoutput relation into a typed table schema (type resolution through
/// `pg_type`, destination type overrides are applied per destination later).
#[async_trait]
pub trait SchemaSource: Send {
    /// The schema of `relation` at `version`.
    async fn table_schema(
        &mut self,
        relation: &Relation,
        version: u32,
    ) -> Result<TableSchema, String>;

    /// The version number of `relation`'s shape, first met at `lsn`; `next` is what a
    /// count kept in memory by this run would give (the default). A durable history
    /// (`wallaby_ddl::history`) keeps numbers stable across restarts.
    async fn version(&mut self, relation: &Relation, lsn: Lsn, next: u32) -> Result<u32, String> {
        let _ = (relation, lsn);
        Ok(next)
    }
}

/// Schema versions per relation: a new version whenever a Relation message changes the
/// columns (names, types or modifiers).
#[derive(Debug, Default)]
struct SchemaRegistry {
    by_relation: HashMap<u32, (Arc<Relation>, Arc<TableSchema>)>,
}

fn same_shape(a: &Relation, b: &Relation) -> bool {
    a.schema == b.schema
        && a.table == b.table
        && a.key == b.key
        && a.columns.len() == b.columns.len()
        && a.columns.iter().zip(&b.columns).all(|(x, y)| {
            x.name == y.name && x.type_oid == y.type_oid && x.type_modifier == y.type_modifier
        })
}

/// Assembles batches; owned by the pipeline.
#[derive(Debug)]
pub struct Batcher {
    budget: Arc<Semaphore>,
    budget_bytes: u64,
    registry: SchemaRegistry,
    next_seq: u64,
    current: Option<ChangeBatch>,
    /// Open transaction: (xid, commit lsn, commit time).
    txn: Option<(u32, Lsn, DateTime<Utc>)>,
    /// Position of the table group for a schema in the current batch.
    group_index: HashMap<(u32, u32), usize>,
    /// (relation id, schema version, op) → index in the batch's `op_counts` (one table name
    /// per relation and version, so no name is built or hashed per row).
    op_index: HashMap<(u32, u32, Op), usize>,
}

impl Batcher {
    /// A batcher charging `budget` (shared with nothing else) of `budget_bytes`.
    pub fn new(budget_bytes: u64) -> Self {
        let permits = (budget_bytes / PERMIT_UNIT).clamp(1, Semaphore::MAX_PERMITS as u64);
        Self {
            budget: Arc::new(Semaphore::new(permits as usize)),
            budget_bytes,
            registry: SchemaRegistry::default(),
            next_seq: 1,
            current: None,
            txn: None,
            group_index: HashMap::new(),
            op_index: HashMap::new(),
        }
    }

    /// Bytes currently reserved (batches in assembly or in flight).
    pub fn pending_bytes(&self) -> u64 {
        let total = (self.budget_bytes / PERMIT_UNIT).clamp(1, Semaphore::MAX_PERMITS as u64);
        (total - self.budget.available_permits() as u64) * PERMIT_UNIT
    }

    /// Whether a transaction is open (its commit not yet seen).
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// The batch being assembled, if any.
    pub fn current(&self) -> Option<&ChangeBatch> {
        self.current.as_ref()
    }

    fn batch(&mut self) -> &mut ChangeBatch {
        let seq = &mut self.next_seq;
        self.current.get_or_insert_with(|| {
            let b = ChangeBatch {
                seq: *seq,
                tables: Vec::new(),
                messages: Vec::new(),
                rows: 0,
                bytes: 0,
                transactions: 0,
                checkpoint: None,
                checkpoint_time: None,
                op_counts: Vec::new(),
                span: tracing::Span::none(),
                _permit: None,
            };
            *seq += 1;
            b
        })
    }

    /// Reserves `bytes` of the budget for the current batch, waiting while destinations
    /// still hold earlier batches (this is the back-pressure that bounds memory).
    async fn charge(&mut self, bytes: u64) {
        let total = (self.budget_bytes / PERMIT_UNIT).clamp(1, Semaphore::MAX_PERMITS as u64);
        // Permits are whole KiB of the batch's running total, so small rows are charged
        // what they cost, not a KiB each.
        let (before, held) = match &self.current {
            Some(b) => (
                b.bytes,
                b._permit.as_ref().map_or(0, |p| p.num_permits() as u64),
            ),
            None => (0, 0),
        };
        let needed = (before + bytes).div_ceil(PERMIT_UNIT).min(total);
        let want = needed.saturating_sub(held) as u32;
        // The semaphore is never closed, so acquisition only fails if it were; then the
        // batch proceeds uncharged rather than stalling the flow.
        let permit = if want > 0 {
            self.budget.clone().acquire_many_owned(want).await.ok()
        } else {
            None
        };
        let batch = self.batch();
        batch.bytes += bytes;
        match (&mut batch._permit, permit) {
            (Some(held), Some(p)) => held.merge(p),
            (slot @ None, p) => *slot = p,
            (Some(_), None) => {}
        }
    }

    /// A transaction begins.
    pub fn begin(&mut self, xid: u32, commit_lsn: Lsn, commit_time: DateTime<Utc>) {
        self.txn = Some((xid, commit_lsn, commit_time));
    }

    /// A transaction committed: the current batch may now checkpoint at `end_lsn`.
    pub fn commit(&mut self, end_lsn: Lsn, commit_time: DateTime<Utc>) {
        self.txn = None;
        let batch = self.batch();
        batch.transactions += 1;
        batch.checkpoint = Some(end_lsn);
        batch.checkpoint_time = Some(commit_time);
    }

    /// Adds a logical message.
    pub async fn message(&mut self, transactional: bool, message: LogicalMessage) {
        let bytes = ROW_OVERHEAD + message.content.len() as u64 + message.prefix.len() as u64;
        self.charge(bytes).await;
        let commit_lsn = if transactional {
            self.txn.map(|t| t.1)
        } else {
            None
        };
        self.batch().messages.push(LogicalMessage {
            commit_lsn,
            ..message
        });
    }

    /// Decodes and adds a row change.
    pub async fn row(
        &mut self,
        change: &RowChange,
        lsn: Lsn,
        schemas: &mut dyn SchemaSource,
    ) -> Result<(), BatchError> {
        let (xid, commit_lsn, commit_time) = self
            .txn
            .ok_or_else(|| BatchError::Protocol("row change outside a transaction".into()))?;
        let schema = self.schema(&change.relation, lsn, schemas).await?;
        let bytes = row_bytes(change);
        self.charge(bytes).await;

        let decoded = Change {
            op: change.op,
            commit_lsn: commit_lsn.0,
            lsn: lsn.0,
            commit_time_micros: commit_time.timestamp_micros(),
            xid,
            before: match &change.before {
                Some(cells) => Some(decode_row(
                    &schema,
                    cells,
                    change
                        .before_is_identity
                        .then_some(&change.relation.identity),
                )?),
                None => None,
            },
            after: match &change.after {
                Some(cells) => Some(decode_row(&schema, cells, None)?),
                None => None,
            },
        };

        let group = self.group(change.relation.id, &schema);
        let op_slot = self.op_slot(change.relation.id, &schema, change.op);
        let batch = self.batch();
        batch.tables[group].changes.push(decoded);
        batch.op_counts[op_slot].2 += 1;
        batch.rows += 1;
        Ok(())
    }

    /// Adds rows decoded ahead of the batcher, at most `room` of them (at least one), and
    /// returns the rest: the caller dispatches the full batch and hands the rest back. The
    /// rows get the open transaction's commit LSN, commit time and xid.
    pub async fn decoded(
        &mut self,
        mut rows: DecodedRows,
        room: u64,
    ) -> Result<Option<DecodedRows>, BatchError> {
        let (xid, commit_lsn, commit_time) = self
            .txn
            .ok_or_else(|| BatchError::Protocol("decoded rows outside a transaction".into()))?;
        let total = rows.len();
        if total == 0 {
            return Ok(None);
        }
        if let Some(encoded) = rows.encoded.take() {
            // Payloads cannot be split: the piece goes whole.
            self.charge(rows.bytes).await;
            let group = self.group(rows.relation_id, &rows.schema);
            let slot = self.op_slot(rows.relation_id, &rows.schema, Op::Read);
            let batch = self.batch();
            batch.op_counts[slot].2 += total;
            batch.tables[group].encoded.push(encoded);
            batch.rows += total;
            return Ok(None);
        }
        let take = room.clamp(1, total);
        let rest = (take < total).then(|| {
            let changes = rows.changes.split_off(take as usize);
            // The bytes are shared in proportion to the rows (rows of a piece are alike).
            let bytes = rows.bytes * (total - take) / total;
            rows.bytes -= bytes;
            DecodedRows {
                relation_id: rows.relation_id,
                schema: rows.schema.clone(),
                changes,
                bytes,
                encoded: None,
            }
        });
        self.charge(rows.bytes).await;
        let micros = commit_time.timestamp_micros();
        for change in &mut rows.changes {
            change.commit_lsn = commit_lsn.0;
            change.commit_time_micros = micros;
            change.xid = xid;
        }
        let schema = rows.schema;
        let group = self.group(rows.relation_id, &schema);
        let mut counts: Vec<(Op, u64)> = Vec::new();
        for change in &rows.changes {
            match counts.iter_mut().find(|(op, _)| *op == change.op) {
                Some((_, n)) => *n += 1,
                None => counts.push((change.op, 1)),
            }
        }
        for (op, n) in counts {
            let slot = self.op_slot(rows.relation_id, &schema, op);
            self.batch().op_counts[slot].2 += n;
        }
        let batch = self.batch();
        let changes = &mut batch.tables[group].changes;
        if changes.is_empty() {
            *changes = rows.changes;
        } else {
            changes.append(&mut rows.changes);
        }
        batch.rows += take;
        Ok(rest)
    }

    /// Position in the current batch of the changes of `relation_id` at `schema`'s version
    /// (a new, empty group the first time).
    fn group(&mut self, relation_id: u32, schema: &Arc<TableSchema>) -> usize {
        let key = (relation_id, schema.version);
        if let Some(i) = self.group_index.get(&key) {
            return *i;
        }
        let batch = self.batch();
        batch.tables.push(TableChanges {
            schema: schema.clone(),
            changes: Vec::new(),
            encoded: Vec::new(),
        });
        let i = batch.tables.len() - 1;
        self.group_index.insert(key, i);
        i
    }

    /// Position in the current batch's `op_counts` of (`relation_id`, `schema`'s version,
    /// `op`): one table name per relation and version, so no name is built per row.
    fn op_slot(&mut self, relation_id: u32, schema: &TableSchema, op: Op) -> usize {
        let key = (relation_id, schema.version, op);
        if let Some(i) = self.op_index.get(&key) {
            return *i;
        }
        let batch = self.batch();
        batch.op_counts.push((schema.qualified_name(), op, 0));
        let i = batch.op_counts.len() - 1;
        self.op_index.insert(key, i);
        i
    }

    async fn schema(
        &mut self,
        relation: &Arc<Relation>,
        lsn: Lsn,
        schemas: &mut dyn SchemaSource,
    ) -> Result<Arc<TableSchema>, BatchError> {
        let next = match self.registry.by_relation.get(&relation.id) {
            Some((known, schema)) if Arc::ptr_eq(known, relation) => return Ok(schema.clone()),
            Some((known, schema)) if same_shape(known, relation) => {
                let schema = schema.clone();
                self.registry
                    .by_relation
                    .insert(relation.id, (relation.clone(), schema.clone()));
                return Ok(schema);
            }
            Some((_, schema)) => schema.version + 1,
            None => 1,
        };
        let table = || format!("{}.{}", relation.schema, relation.table);
        let version = schemas
            .version(relation, lsn, next)
            .await
            .map_err(|message| BatchError::Schema {
                table: table(),
                message,
            })?;
        let schema = schemas
            .table_schema(relation, version)
            .await
            .map_err(|message| BatchError::Schema {
                table: format!("{}.{}", relation.schema, relation.table),
                message,
            })?;
        let schema = Arc::new(schema);
        self.registry
            .by_relation
            .insert(relation.id, (relation.clone(), schema.clone()));
        Ok(schema)
    }

    /// Hands out the batch being assembled (if any) and starts a new one.
    pub fn take(&mut self) -> Option<ChangeBatch> {
        self.group_index.clear();
        self.op_index.clear();
        self.current.take()
    }

    /// An empty batch (for `emitEmpty`).
    pub fn empty(&mut self) -> ChangeBatch {
        self.batch();
        self.take().unwrap_or_else(|| ChangeBatch {
            seq: 0,
            tables: Vec::new(),
            messages: Vec::new(),
            rows: 0,
            bytes: 0,
            transactions: 0,
            checkpoint: None,
            checkpoint_time: None,
            op_counts: Vec::new(),
            span: tracing::Span::none(),
            _permit: None,
        })
    }
}

fn row_bytes(change: &RowChange) -> u64 {
    let cells = |c: &Option<Vec<Cell>>| -> u64 {
        c.as_ref().map_or(0, |cells| {
            cells
                .iter()
                .map(|cell| match cell {
                    Cell::Text(t) => t.len() as u64 + VALUE_OVERHEAD,
                    _ => VALUE_OVERHEAD,
                })
                .sum()
        })
    };
    ROW_OVERHEAD + cells(&change.before) + cells(&change.after)
}

fn decode_row(
    schema: &TableSchema,
    cells: &[Cell],
    identity_only: Option<&Vec<usize>>,
) -> Result<Row, BatchError> {
    let mut row = Row {
        values: Vec::with_capacity(cells.len()),
        absent: Vec::new(),
    };
    for (i, cell) in cells.iter().enumerate() {
        let Some(column) = schema.columns.get(i) else {
            return Err(BatchError::Protocol(format!(
                "tuple of {} has {} values but the relation has {} columns",
                schema.qualified_name(),
                cells.len(),
                schema.columns.len()
            )));
        };
        let not_sent = identity_only.is_some_and(|ids| !ids.contains(&i));
        let value = match cell {
            _ if not_sent => {
                row.absent.push(i);
                Value::Null
            }
            Cell::Null => Value::Null,
            Cell::UnchangedToast => {
                row.absent.push(i);
                Value::Null
            }
            Cell::Text(text) => {
                let text = std::str::from_utf8(text).map_err(|e| {
                    BatchError::Decode(Box::new(DecodeError {
                        table: schema.qualified_name(),
                        column: column.name.clone(),
                        type_name: column.ty.name.clone(),
                        source: wallaby_codec::CodecError::Text {
                            type_name: column.ty.name.clone(),
                            text: String::from_utf8_lossy(&text[..text.len().min(200)]).into(),
                            reason: format!("not UTF-8: {e}"),
                        },
                    }))
                })?;
                wallaby_codec::text::decode(&column.ty, text).map_err(|source| {
                    BatchError::Decode(Box::new(DecodeError {
                        table: schema.qualified_name(),
                        column: column.name.clone(),
                        type_name: column.ty.name.clone(),
                        source,
                    }))
                })?
            }
        };
        row.values.push(value);
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;

    use super::*;
    use crate::change::Column;

    /// Resolves every column as `text` (type resolution itself is tested against the
    /// real server in tests/type_matrix.rs).
    struct TextSchemas;

    #[async_trait]
    impl SchemaSource for TextSchemas {
        async fn table_schema(
            &mut self,
            relation: &Relation,
            version: u32,
        ) -> Result<TableSchema, String> {
            Ok(TableSchema {
                schema: relation.schema.clone(),
                table: relation.table.clone(),
                columns: relation
                    .columns
                    .iter()
                    .map(|c| wallaby_codec::ColumnSchema {
                        name: c.name.clone(),
                        ty: Arc::new(wallaby_codec::TypeInfo {
                            oid: 25,
                            name: "text".into(),
                            typmod: -1,
                            kind: wallaby_codec::TypeKind::Text,
                        }),
                        key: false,
                        mapped_type: None,
                    })
                    .collect(),
                version,
            })
        }
    }

    fn relation(columns: &[&str]) -> Arc<Relation> {
        Arc::new(Relation {
            id: 7,
            schema: "public".into(),
            table: "t".into(),
            columns: columns
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

    fn insert(rel: &Arc<Relation>, value: &str) -> RowChange {
        RowChange {
            relation: rel.clone(),
            op: Op::Insert,
            before: None,
            before_is_identity: false,
            after: Some(
                rel.columns
                    .iter()
                    .map(|_| Cell::Text(bytes::Bytes::copy_from_slice(value.as_bytes())))
                    .collect(),
            ),
            lsn: Lsn(1),
        }
    }

    #[tokio::test]
    async fn a_batch_cut_inside_a_transaction_confirms_only_completed_ones() {
        let mut b = Batcher::new(1 << 20);
        let rel = relation(&["a"]);
        let now = Utc::now();
        b.begin(1, Lsn(100), now);
        b.row(&insert(&rel, "x"), Lsn(90), &mut TextSchemas)
            .await
            .unwrap();
        b.commit(Lsn(110), now);
        b.begin(2, Lsn(200), now);
        b.row(&insert(&rel, "y"), Lsn(190), &mut TextSchemas)
            .await
            .unwrap();
        let first = b.take().unwrap();
        assert_eq!((first.rows, first.transactions), (2, 1));
        assert_eq!(
            first.checkpoint,
            Some(Lsn(110)),
            "only the committed transaction"
        );
        assert!(b.in_transaction());
        b.row(&insert(&rel, "z"), Lsn(195), &mut TextSchemas)
            .await
            .unwrap();
        let middle = b.take().unwrap();
        assert_eq!(
            middle.checkpoint, None,
            "part of a transaction confirms nothing"
        );
        b.commit(Lsn(210), now);
        assert_eq!(b.take().unwrap().checkpoint, Some(Lsn(210)));
        assert_eq!(
            (first.seq, middle.seq),
            (1, 2),
            "batches are numbered in order"
        );
    }

    #[tokio::test]
    async fn decoded_rows_fill_the_batch_up_to_its_room_and_get_the_transaction_fields() {
        let mut b = Batcher::new(1 << 20);
        let schema = Arc::new(
            TextSchemas
                .table_schema(&relation(&["a"]), 1)
                .await
                .unwrap(),
        );
        let change = |v: &str| Change {
            op: Op::Read,
            commit_lsn: 0,
            lsn: 5,
            commit_time_micros: 0,
            xid: 0,
            before: None,
            after: Some(Row {
                values: vec![Value::Text(v.into())],
                absent: Vec::new(),
            }),
        };
        let rows = DecodedRows {
            relation_id: 7,
            schema,
            changes: vec![change("x"), change("y"), change("z")],
            bytes: 300,
            encoded: None,
        };
        let now = Utc::now();
        b.begin(3, Lsn(100), now);
        let rest = b.decoded(rows, 2).await.unwrap().expect("one row left");
        assert_eq!((rest.changes.len(), rest.bytes), (1, 100));
        let first = b.take().unwrap();
        assert_eq!((first.rows, first.bytes), (2, 200));
        let c = &first.tables[0].changes[1];
        assert_eq!(
            (c.commit_lsn, c.lsn, c.xid, c.commit_time_micros),
            (100, 5, 3, now.timestamp_micros())
        );
        assert_eq!(first.op_counts, vec![("public.t".to_owned(), Op::Read, 2)]);
        assert!(
            b.decoded(rest, 0).await.unwrap().is_none(),
            "at least one row is taken"
        );
        b.commit(Lsn(110), now);
        let second = b.take().unwrap();
        assert_eq!((second.rows, second.checkpoint), (1, Some(Lsn(110))));
    }

    #[tokio::test]
    async fn the_memory_budget_holds_reading_until_destinations_release_batches() {
        // 64 KiB budget, rows of ~20 KiB: the fourth row must wait for the first batch.
        let mut b = Batcher::new(64 << 10);
        let rel = relation(&["a"]);
        let big = "x".repeat(20 << 10);
        b.begin(1, Lsn(100), Utc::now());
        for _ in 0..3 {
            b.row(&insert(&rel, &big), Lsn(1), &mut TextSchemas)
                .await
                .unwrap();
        }
        let held = b.take().unwrap();
        assert!(b.pending_bytes() >= 60 << 10, "{}", b.pending_bytes());
        let blocked = tokio::time::timeout(
            Duration::from_millis(200),
            b.row(&insert(&rel, &big), Lsn(1), &mut TextSchemas),
        )
        .await;
        assert!(blocked.is_err(), "the budget is spent: reading waits");
        drop(held);
        tokio::time::timeout(
            Duration::from_secs(5),
            b.row(&insert(&rel, &big), Lsn(1), &mut TextSchemas),
        )
        .await
        .expect("released budget lets reading go on")
        .unwrap();
    }

    #[tokio::test]
    async fn a_changed_relation_gets_a_new_schema_version_and_decodes_typed_values() {
        let mut b = Batcher::new(1 << 20);
        b.begin(1, Lsn(100), Utc::now());
        b.row(&insert(&relation(&["a"]), "1"), Lsn(1), &mut TextSchemas)
            .await
            .unwrap();
        // Same shape, new Arc (PostgreSQL re-sent the Relation): same version.
        b.row(&insert(&relation(&["a"]), "2"), Lsn(2), &mut TextSchemas)
            .await
            .unwrap();
        b.row(
            &insert(&relation(&["a", "b"]), "3"),
            Lsn(3),
            &mut TextSchemas,
        )
        .await
        .unwrap();
        let batch = b.take().unwrap();
        let versions: Vec<(u32, usize)> = batch
            .tables
            .iter()
            .map(|t| (t.schema.version, t.changes.len()))
            .collect();
        assert_eq!(versions, vec![(1, 2), (2, 1)]);
        assert_eq!(
            batch.tables[1].changes[0].after.as_ref().unwrap().values,
            vec![Value::Text("3".into()), Value::Text("3".into())]
        );
    }
}
