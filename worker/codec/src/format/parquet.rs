//! Parquet: the Arrow record batch of the shared layout written as one complete Parquet file
//! (snappy, dictionary encoding where it pays, the writer's default), read back with the Arrow reader. The Arrow schema (with its
//! `wallaby.schema` metadata) travels in the file's `ARROW:schema` key-value metadata, so
//! readers get the exact Arrow types back.

use std::collections::HashSet;

use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::{Layout, Res, Wire, arrow};
use crate::value::Change;

pub(crate) fn encode(layout: &Layout<'_>, changes: &[Change]) -> Res<Vec<u8>> {
    check_no_empty_struct(layout)?;
    write(&arrow::to_batch(layout, changes)?)
}

/// One Parquet file holding `batch`.
pub(crate) fn write(batch: &RecordBatch) -> Res<Vec<u8>> {
    let mut props = WriterProperties::builder().set_compression(Compression::SNAPPY);
    for path in mostly_distinct(batch) {
        props = props.set_column_dictionary_enabled(path, false);
    }
    let props = props.build();
    let mut out = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).map_err(|e| e.to_string())?;
    writer.write(batch).map_err(|e| e.to_string())?;
    writer.close().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Values sampled per column to judge whether its dictionary pays.
const SAMPLE: usize = 1024;

/// The row columns (`before.<c>`, `after.<c>`) whose sampled values are mostly distinct
/// (more than half): a dictionary would cost the writer hashing every value and save
/// nothing, as with keys, names and timestamps. Low-cardinality columns, and the
/// envelope's (the same op, LSN and commit time on many rows), keep theirs.
fn mostly_distinct(batch: &RecordBatch) -> Vec<ColumnPath> {
    let mut paths = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let Some(row) = column.as_struct_opt() else {
            continue;
        };
        for (child, values) in row.fields().iter().zip(row.columns()) {
            if distinct_ratio(values.as_ref()).is_some_and(|r| r > 0.5) {
                paths.push(ColumnPath::new(vec![
                    field.name().clone(),
                    child.name().clone(),
                ]));
            }
        }
    }
    paths
}

/// Distinct values over non-null values among the first [`SAMPLE`] of a flat column
/// (strings, bytes, fixed-width values); `None` for nested columns or too few values.
fn distinct_ratio(array: &dyn Array) -> Option<f64> {
    let n = array.len().min(SAMPLE);
    let data;
    let mut seen: HashSet<&[u8]> = HashSet::with_capacity(n);
    let mut values = 0usize;
    match array.data_type() {
        DataType::Utf8 => {
            let a = array.as_string::<i32>();
            for i in (0..n).filter(|i| a.is_valid(*i)) {
                values += 1;
                seen.insert(a.value(i).as_bytes());
            }
        }
        DataType::Binary => {
            let a = array.as_binary::<i32>();
            for i in (0..n).filter(|i| a.is_valid(*i)) {
                values += 1;
                seen.insert(a.value(i));
            }
        }
        dt => {
            let width = match dt {
                DataType::FixedSizeBinary(w) => usize::try_from(*w).ok()?,
                dt => dt.primitive_width()?,
            };
            data = array.to_data();
            let buffer = data.buffers().first()?.as_slice();
            let offset = data.offset();
            for i in (0..n).filter(|i| array.is_valid(*i)) {
                values += 1;
                let at = (offset + i) * width;
                seen.insert(buffer.get(at..at + width)?);
            }
        }
    }
    (values >= 64).then(|| seen.len() as f64 / values as f64)
}

pub(crate) fn decode(layout: &Layout<'_>, payload: &[u8]) -> Res<Vec<Change>> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(Bytes::copy_from_slice(payload))
        .map_err(|e| format!("not a Parquet file: {e}"))?;
    arrow::check_schema(layout, builder.schema())?;
    let reader = builder.build().map_err(|e| e.to_string())?;
    let mut changes = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| format!("bad row group: {e}"))?;
        changes.extend(arrow::from_batch(layout, &batch)?);
    }
    Ok(changes)
}

pub(crate) fn descriptor(payload: &[u8]) -> Res<serde_json::Value> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(Bytes::copy_from_slice(payload))
        .map_err(|e| format!("not a Parquet file: {e}"))?;
    arrow::embedded(builder.schema())
}

/// Parquet cannot store a group without fields; say which object needs another format.
pub(crate) fn check_no_empty_struct(layout: &Layout<'_>) -> Res<()> {
    fn empty_composite(w: &Wire) -> bool {
        match w {
            Wire::Composite(attrs) => {
                attrs.is_empty() || attrs.iter().any(|(_, aw)| empty_composite(aw))
            }
            Wire::Range(ew) | Wire::Array(ew) => empty_composite(ew),
            _ => false,
        }
    }
    if layout.schema.columns.is_empty() {
        return Err(
            "the table has no columns and Parquet cannot store an empty group; use the arrow, avro, proto or json format for it"
                .into(),
        );
    }
    for (col, w) in layout.schema.columns.iter().zip(&layout.wires) {
        if empty_composite(w) {
            return Err(format!(
                "column {:?} holds a composite type with no attributes and Parquet cannot store an empty group; map it to string in typeMappings or use another format",
                col.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use parquet::file::reader::{FileReader, SerializedFileReader};

    use crate::schema::{TableSchema, TypeKind, test_column};
    use crate::value::{Change, Op, Row, Value};
    use crate::{WireFormat, encode};

    /// Unique columns are written without a dictionary, repetitive ones with one.
    #[test]
    fn a_dictionary_only_where_values_repeat() {
        let schema = TableSchema {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![
                test_column("id", 20, "int8", TypeKind::Int8, None),
                test_column("name", 25, "text", TypeKind::Text, None),
                test_column("status", 25, "text", TypeKind::Text, None),
                test_column("qty", 23, "int4", TypeKind::Int4, None),
            ],
            version: 1,
        };
        let changes: Vec<Change> = (0..500i64)
            .map(|i| Change {
                op: Op::Insert,
                commit_lsn: 7,
                lsn: 7 + i as u64,
                commit_time_micros: 1,
                xid: 3,
                before: None,
                after: Some(Row {
                    values: vec![
                        Value::Int8(i),
                        Value::Text(format!("name {i}")),
                        Value::Text(["new", "paid", "shipped"][i as usize % 3].into()),
                        Value::Int4(i as i32 % 10),
                    ],
                    absent: Vec::new(),
                }),
            })
            .collect();
        let payload = encode(WireFormat::Parquet, &schema, &changes).unwrap();
        let reader = SerializedFileReader::new(bytes::Bytes::from(payload.clone())).unwrap();
        let group = reader.metadata().row_group(0);
        let dictionary = |path: &str| {
            (0..group.num_columns())
                .map(|i| group.column(i))
                .find(|c| c.column_path().string() == path)
                .unwrap()
                .dictionary_page_offset()
                .is_some()
        };
        assert!(!dictionary("after.id") && !dictionary("after.name"));
        assert!(dictionary("after.status") && dictionary("after.qty"));
        assert!(dictionary("op") && dictionary("commit_lsn"));
        assert_eq!(
            crate::decode(WireFormat::Parquet, &schema, &payload).unwrap(),
            changes
        );
    }
}
