//! Parquet: the Arrow record batch of the shared layout written as one complete Parquet file
//! (snappy), read back with the Arrow reader. The Arrow schema (with its `wallaby.schema`
//! metadata) travels in the file's `ARROW:schema` key-value metadata, so readers get the
//! exact Arrow types back.

use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::{Layout, Res, arrow};
use crate::value::Change;

pub(crate) fn encode(layout: &Layout<'_>, changes: &[Change]) -> Res<Vec<u8>> {
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
