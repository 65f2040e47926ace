//! Parquet: the Arrow record batch of the shared layout written as one complete Parquet file
//! (snappy, dictionary encoding where it pays, the writer's default), read back with the Arrow reader. The Arrow schema (with its
//! `wallaby.schema` metadata) travels in the file's `ARROW:schema` key-value metadata, so
//! readers get the exact Arrow types back.

use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::{Layout, Res, Wire, arrow};
use crate::value::Change;

pub(crate) fn encode(layout: &Layout<'_>, changes: &[Change]) -> Res<Vec<u8>> {
    check_no_empty_struct(layout)?;
    let batch = arrow::to_batch(layout, changes)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut out = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).map_err(|e| e.to_string())?;
    writer.write(&batch).map_err(|e| e.to_string())?;
    writer.close().map_err(|e| e.to_string())?;
    Ok(out)
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
fn check_no_empty_struct(layout: &Layout<'_>) -> Res<()> {
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
