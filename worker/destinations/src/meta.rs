//! Metadata columns, soft delete and append mode (`metaColumns`, `softDelete`,
//! `appendMode` of a Destination): a wrapper that rewrites each batch before the sink
//! encodes it, the same way for every destination type.
//!
//! The columns describe the change that produced the row: when it was written
//! (`syncedAt`), whether it deletes the row (`deleted`), where it sits in the source's
//! history (`watermark`: commit time or commit LSN) and what the source did (`op`).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use wallaby_codec::{Change, ColumnSchema, Op, Row, TableSchema, Value};
use wallaby_crds::destination::{DestinationSpec, WatermarkSource};

use wallaby_codec::builtin_type;
use wallaby_pipeline::batch::{ChangeBatch, TableChanges};
use wallaby_pipeline::destination::{Destination, DestinationError, WriteAck};

const OID_BOOL: u32 = 16;
const OID_INT8: u32 = 20;
const OID_TEXT: u32 = 25;
const OID_TIMESTAMPTZ: u32 = 1184;

/// One metadata column the destination adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    SyncedAt,
    Deleted,
    Watermark(WatermarkSource),
    Op,
}

/// What a Destination asks for, resolved once at start.
#[derive(Debug, Clone)]
pub struct MetaOptions {
    /// Columns appended to every table, in this order.
    columns: Vec<(String, Field)>,
    soft_delete: bool,
    append_mode: bool,
}

impl MetaOptions {
    /// The options of a Destination, or `None` when it asks for none of them.
    ///
    /// `metaColumns.enabled` adds every column whose name is not `-`. Without it,
    /// `softDelete` still adds the `deleted` column and `appendMode` the `op` column: the
    /// rewrite would lose information without them.
    pub fn from_spec(spec: &DestinationSpec) -> Option<Self> {
        let enabled = spec.meta_columns.as_ref().is_some_and(|m| m.enabled);
        if !enabled && !spec.soft_delete && !spec.append_mode {
            return None;
        }
        let names = spec.meta_columns.clone().unwrap_or_default();
        let mut columns = Vec::new();
        let mut add = |name: &str, field: Field| {
            if name != "-" && !name.is_empty() {
                columns.push((name.to_owned(), field));
            }
        };
        if enabled {
            add(&names.synced_at, Field::SyncedAt);
        }
        if enabled || spec.soft_delete || spec.append_mode {
            add(&names.deleted, Field::Deleted);
        }
        if enabled {
            add(&names.watermark, Field::Watermark(names.watermark_source));
        }
        if enabled || spec.append_mode {
            add(&names.op, Field::Op);
        }
        Some(Self {
            columns,
            soft_delete: spec.soft_delete,
            append_mode: spec.append_mode,
        })
    }
}

/// A sink whose batches are rewritten by [`MetaOptions`] first.
#[derive(Debug)]
pub struct MetaDestination {
    inner: Box<dyn Destination>,
    options: MetaOptions,
    /// Extended schema per (table, version), built once.
    schemas: HashMap<(String, u32), Arc<TableSchema>>,
}

impl MetaDestination {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Destination>, options: MetaOptions) -> Self {
        Self {
            inner,
            options,
            schemas: HashMap::new(),
        }
    }

    fn schema(&mut self, schema: &Arc<TableSchema>) -> Result<Arc<TableSchema>, DestinationError> {
        let key = (schema.qualified_name(), schema.version);
        if let Some(s) = self.schemas.get(&key) {
            return Ok(s.clone());
        }
        let mut extended = (**schema).clone();
        for (name, field) in &self.options.columns {
            if schema.columns.iter().any(|c| &c.name == name) {
                return Err(DestinationError::permanent(format!(
                    "metadata column {name:?} collides with column {name:?} of {}",
                    schema.qualified_name()
                ))
                .with_hint(
                    "rename the metadata column in spec.metaColumns (e.g. op: __wallaby_op): \
                     metadata columns must not exist in the source tables",
                ));
            }
            let oid = match field {
                Field::SyncedAt | Field::Watermark(WatermarkSource::Timestamp) => OID_TIMESTAMPTZ,
                Field::Deleted => OID_BOOL,
                Field::Watermark(WatermarkSource::Lsn) => OID_INT8,
                Field::Op => OID_TEXT,
            };
            let ty = builtin_type(oid, -1).ok_or_else(|| {
                DestinationError::permanent(format!(
                    "built-in type {oid} of metadata column {name:?} is unknown to the codec"
                ))
            })?;
            extended.columns.push(ColumnSchema {
                name: name.clone(),
                ty: Arc::new(ty),
                key: false,
                mapped_type: None,
            });
        }
        let extended = Arc::new(extended);
        self.schemas.insert(key, extended.clone());
        Ok(extended)
    }

    /// The batch as the sink sees it. Row counts, LSNs and the checkpoint are kept: the
    /// rewrite changes what is written, not what is acknowledged.
    fn rewrite(&mut self, batch: &ChangeBatch) -> Result<ChangeBatch, DestinationError> {
        let synced_at = chrono::Utc::now().timestamp_micros();
        let mut out = ChangeBatch::without_budget(batch.seq);
        out.messages = batch.messages.clone();
        out.rows = batch.rows;
        out.bytes = batch.bytes;
        out.transactions = batch.transactions;
        out.checkpoint = batch.checkpoint;
        out.checkpoint_time = batch.checkpoint_time;
        out.op_counts = batch.op_counts.clone();
        out.span = batch.span.clone();
        for group in &batch.tables {
            let schema = self.schema(&group.schema)?;
            let changes = group
                .changes
                .iter()
                .map(|c| self.options.rewrite_change(c, synced_at))
                .collect();
            out.tables.push(TableChanges {
                schema,
                changes,
                encoded: Vec::new(),
            });
        }
        Ok(out)
    }
}

impl MetaOptions {
    fn rewrite_change(&self, change: &Change, synced_at: i64) -> Change {
        let original = change.op;
        let (op, before, after) = match original {
            Op::Delete if self.append_mode || self.soft_delete => {
                // The deleted row as PostgreSQL sent it (its key, or every column under
                // REPLICA IDENTITY FULL); the other columns stay absent, so a consumer
                // that merges by key keeps their last values.
                let op = if self.append_mode {
                    Op::Insert
                } else {
                    Op::Update
                };
                let before = (!self.append_mode).then(|| change.before.clone()).flatten();
                (op, before, change.before.clone())
            }
            Op::Update if self.append_mode => (Op::Insert, None, change.after.clone()),
            _ => (original, change.before.clone(), change.after.clone()),
        };
        let values: Vec<Value> = self
            .columns
            .iter()
            .map(|(_, field)| match field {
                Field::SyncedAt => Value::TimestampTz(synced_at),
                Field::Deleted => Value::Bool(original == Op::Delete),
                Field::Watermark(WatermarkSource::Timestamp) => {
                    Value::TimestampTz(change.commit_time_micros)
                }
                Field::Watermark(WatermarkSource::Lsn) => {
                    Value::Int8(i64::try_from(change.commit_lsn).unwrap_or(i64::MAX))
                }
                Field::Op => Value::Text(original.as_str().to_owned()),
            })
            .collect();
        let extend = |row: Option<Row>| {
            row.map(|mut r| {
                r.values.extend(values.iter().cloned());
                r
            })
        };
        Change {
            op,
            commit_lsn: change.commit_lsn,
            lsn: change.lsn,
            commit_time_micros: change.commit_time_micros,
            xid: change.xid,
            before: extend(before),
            after: extend(after),
        }
    }
}

#[async_trait]
impl Destination for MetaDestination {
    async fn write(&mut self, batch: &ChangeBatch) -> Result<WriteAck, DestinationError> {
        let rewritten = self.rewrite(batch)?;
        self.inner.write(&rewritten).await
    }

    async fn flush(&mut self) -> Result<(), DestinationError> {
        self.inner.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file Destination with `extra` JSON fields.
    fn spec(extra: &str) -> DestinationSpec {
        serde_json::from_str(&format!(
            r#"{{"type": "file", "file": {{"path": "/tmp/x"}}{extra}}}"#
        ))
        .unwrap()
    }

    fn row(values: &[Value]) -> Row {
        Row {
            values: values.to_vec(),
            absent: Vec::new(),
        }
    }

    fn change(op: Op, before: Option<Row>, after: Option<Row>) -> Change {
        Change {
            op,
            commit_lsn: 0x16_B374_D848,
            lsn: 0x16_B374_D800,
            commit_time_micros: 1_700_000_000_000_000,
            xid: 7,
            before,
            after,
        }
    }

    #[derive(Debug)]
    struct Unused;

    #[async_trait]
    impl Destination for Unused {
        async fn write(&mut self, _: &ChangeBatch) -> Result<WriteAck, DestinationError> {
            Err(DestinationError::permanent("not written to in this test"))
        }
        async fn flush(&mut self) -> Result<(), DestinationError> {
            Ok(())
        }
    }

    #[test]
    fn nothing_asked_means_no_wrapper() {
        assert!(MetaOptions::from_spec(&spec("")).is_none());
        let off = spec(r#", "metaColumns": {"enabled": false}"#);
        assert!(MetaOptions::from_spec(&off).is_none());
    }

    #[test]
    fn enabled_adds_four_columns_and_a_dash_drops_the_watermark() {
        let all = MetaOptions::from_spec(&spec(
            r#", "metaColumns": {"enabled": true, "watermarkSource": "lsn"}"#,
        ))
        .unwrap();
        let names: Vec<&str> = all.columns.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "__ds_synced_at",
                "__ds_is_deleted",
                "__ds_watermark",
                "__ds_op"
            ]
        );
        let c = all.rewrite_change(&change(Op::Insert, None, Some(row(&[Value::Int4(1)]))), 42);
        assert_eq!(
            c.after.unwrap().values,
            [
                Value::Int4(1),
                Value::TimestampTz(42),
                Value::Bool(false),
                Value::Int8(0x16_B374_D848),
                Value::Text("insert".into())
            ]
        );
        let no_wm = MetaOptions::from_spec(&spec(
            r#", "metaColumns": {"enabled": true, "watermark": "-", "op": "kind"}"#,
        ))
        .unwrap();
        let names: Vec<&str> = no_wm.columns.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["__ds_synced_at", "__ds_is_deleted", "kind"]);
    }

    #[test]
    fn soft_delete_turns_a_delete_into_an_update_flagged_deleted() {
        let o = MetaOptions::from_spec(&spec(r#", "softDelete": true"#)).unwrap();
        let key = Row {
            values: vec![Value::Int4(7), Value::Null],
            absent: vec![1],
        };
        let c = o.rewrite_change(&change(Op::Delete, Some(key), None), 1);
        assert_eq!(c.op, Op::Update);
        let after = c.after.unwrap();
        assert_eq!(
            after.values,
            [Value::Int4(7), Value::Null, Value::Bool(true)]
        );
        assert_eq!(after.absent, [1], "non-key columns stay absent, not null");
        assert!(c.before.is_some());
        // Inserts and updates carry deleted = false.
        let c = o.rewrite_change(
            &change(Op::Insert, None, Some(row(&[Value::Int4(1), Value::Null]))),
            1,
        );
        assert_eq!(c.op, Op::Insert);
        assert_eq!(c.after.unwrap().values[2], Value::Bool(false));
    }

    #[test]
    fn append_mode_turns_updates_and_deletes_into_inserts_keeping_the_op() {
        let o = MetaOptions::from_spec(&spec(r#", "appendMode": true"#)).unwrap();
        let names: Vec<&str> = o.columns.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["__ds_is_deleted", "__ds_op"]);
        let u = o.rewrite_change(
            &change(
                Op::Update,
                Some(row(&[Value::Int4(1)])),
                Some(row(&[Value::Int4(2)])),
            ),
            1,
        );
        assert_eq!(u.op, Op::Insert);
        assert!(u.before.is_none());
        assert_eq!(
            u.after.unwrap().values,
            [
                Value::Int4(2),
                Value::Bool(false),
                Value::Text("update".into())
            ]
        );
        let d = o.rewrite_change(&change(Op::Delete, Some(row(&[Value::Int4(2)])), None), 1);
        assert_eq!(d.op, Op::Insert);
        assert_eq!(
            d.after.unwrap().values,
            [
                Value::Int4(2),
                Value::Bool(true),
                Value::Text("delete".into())
            ]
        );
    }

    #[test]
    fn a_colliding_column_is_a_permanent_error_naming_both() {
        let o = MetaOptions::from_spec(&spec(r#", "appendMode": true"#)).unwrap();
        let mut d = MetaDestination::new(Box::new(Unused), o);
        let schema = Arc::new(TableSchema {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![ColumnSchema {
                name: "__ds_op".into(),
                ty: Arc::new(builtin_type(OID_TEXT, -1).unwrap()),
                key: false,
                mapped_type: None,
            }],
            version: 1,
        });
        let e = d.schema(&schema).unwrap_err();
        assert_eq!(
            e.class,
            wallaby_pipeline::destination::ErrorClass::Permanent
        );
        assert!(
            e.message
                .contains("\"__ds_op\" collides with column \"__ds_op\" of public.t")
        );
    }
}
