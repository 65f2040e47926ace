//! Snapshot reads encoded straight from `COPY … (FORMAT binary)` fields, without a
//! [`Value`] per field or a [`Change`](crate::Change) per row: the copy of a whole table is
//! where the per-row cost dominates. Arrow and Parquet append to column builders, JSON
//! writes each line straight into the payload. The result is the payload
//! [`Encoder::encode`](super::Encoder::encode) gives for the same rows as `read` changes,
//! byte for byte: the common scalar types are handled natively, every other column (a
//! `typeMappings` override, say) goes through [`binary::decode`] and the shared code, so
//! no type has a second meaning here.

use std::sync::Arc;

use arrow_array::ArrayRef;
use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Date32Builder, FixedSizeBinaryBuilder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, StringBuilder,
    Time64MicrosecondBuilder, TimestampMicrosecondBuilder, UInt32Builder,
};
use arrow_schema::SchemaRef;

use super::{
    BinKind, Layout, Res, StrKind, Wire, WireFormat, arrow, base_type, error, json, parquet,
};
use crate::CodecError;
use crate::binary;
use crate::schema::{TableSchema, TypeInfo, TypeKind};
use crate::value::Value;

/// Encodes rows read by a snapshot, appended one binary COPY tuple at a time, as one
/// payload (Arrow, Parquet or JSON lines) per [`begin`](Self::begin) …
/// [`finish`](Self::finish).
#[derive(Debug)]
pub struct ReadEncoder {
    format: WireFormat,
    schema: Arc<TableSchema>,
    target: Target,
    /// LSN and commit time of the rows of the payload being built (`None` before
    /// [`begin`](Self::begin)).
    piece: Option<(u64, i64)>,
    rows: usize,
    scratch: String,
}

/// Where rows go.
#[derive(Debug)]
enum Target {
    /// Arrow and Parquet: one builder per column, and the payloads' Arrow schema.
    Columns {
        builders: Vec<Column>,
        schema: SchemaRef,
    },
    /// JSON lines: written as they come.
    Json {
        prepared: json::Prepared,
        wires: Vec<Wire>,
        /// How each column is written, and the date its last timestamp had.
        fields: Vec<(Option<Native>, json::LastDay)>,
        /// The line up to the `after` object (per payload: it holds the commit time).
        prefix: Vec<u8>,
        out: Vec<u8>,
    },
}

/// One column's builder.
#[derive(Debug)]
enum Column {
    Bool(BooleanBuilder),
    Int2(Int16Builder),
    Int4(Int32Builder),
    Int8(Int64Builder),
    Oid(UInt32Builder),
    Float4(Float32Builder),
    Float8(Float64Builder),
    /// text, varchar, bpchar, name, json: the characters as sent.
    Text(StringBuilder),
    /// jsonb: a version byte, then the text.
    Jsonb(StringBuilder),
    Numeric(StringBuilder),
    Bytes(BinaryBuilder),
    Uuid(FixedSizeBinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    Timestamp(TimestampMicrosecondBuilder),
    TimestampTz(TimestampMicrosecondBuilder),
    /// Anything else: typed values, built by the shared Arrow builder.
    Values {
        ty: Arc<TypeInfo>,
        wire: Wire,
        values: Vec<Value>,
    },
}

/// The column types encoded straight from their binary COPY bytes, when written as their own
/// wire type (no `typeMappings` override): the one choice behind both the Arrow builders
/// and the JSON writers. Every other column goes through [`binary::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Native {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    /// text, varchar, bpchar, name: the characters as sent.
    Text,
    Json,
    /// A version byte, then the text.
    Jsonb,
    Numeric,
    Bytea,
    Uuid,
    Date,
    Time,
    Timestamp,
    TimestampTz,
}

impl Native {
    /// How a column of type `ty` written as `wire` is encoded, if natively.
    pub(super) fn of(ty: &TypeInfo, wire: &Wire) -> Option<Self> {
        Some(match (&base_type(ty).kind, wire) {
            (TypeKind::Bool, Wire::Bool) => Self::Bool,
            (TypeKind::Int2, Wire::Int2) => Self::Int2,
            (TypeKind::Int4, Wire::Int4) => Self::Int4,
            (TypeKind::Int8, Wire::Int8) => Self::Int8,
            (TypeKind::Oid, Wire::Oid) => Self::Oid,
            (TypeKind::Float4, Wire::Float4) => Self::Float4,
            (TypeKind::Float8, Wire::Float8) => Self::Float8,
            (TypeKind::Text, Wire::Str(StrKind::Text)) if binary::supports(ty) => Self::Text,
            (TypeKind::Json, Wire::Str(StrKind::Json)) => Self::Json,
            (TypeKind::Jsonb, Wire::Str(StrKind::Json)) => Self::Jsonb,
            (TypeKind::Numeric, Wire::Numeric) => Self::Numeric,
            (TypeKind::Bytea, Wire::Bin(BinKind::Bytes)) => Self::Bytea,
            (TypeKind::Uuid, Wire::Uuid) => Self::Uuid,
            (TypeKind::Date, Wire::Date) => Self::Date,
            (TypeKind::Time, Wire::Time) => Self::Time,
            (TypeKind::Timestamp, Wire::Timestamp) => Self::Timestamp,
            (TypeKind::TimestampTz, Wire::TimestampTz) => Self::TimestampTz,
            _ => return None,
        })
    }
}

impl Column {
    fn new(ty: &Arc<TypeInfo>, wire: &Wire) -> Self {
        let Some(native) = Native::of(ty, wire) else {
            return Self::Values {
                ty: ty.clone(),
                wire: wire.clone(),
                values: Vec::new(),
            };
        };
        match native {
            Native::Bool => Self::Bool(BooleanBuilder::new()),
            Native::Int2 => Self::Int2(Int16Builder::new()),
            Native::Int4 => Self::Int4(Int32Builder::new()),
            Native::Int8 => Self::Int8(Int64Builder::new()),
            Native::Oid => Self::Oid(UInt32Builder::new()),
            Native::Float4 => Self::Float4(Float32Builder::new()),
            Native::Float8 => Self::Float8(Float64Builder::new()),
            Native::Text | Native::Json => Self::Text(StringBuilder::new()),
            Native::Jsonb => Self::Jsonb(StringBuilder::new()),
            Native::Numeric => Self::Numeric(StringBuilder::new()),
            Native::Bytea => Self::Bytes(BinaryBuilder::new()),
            Native::Uuid => Self::Uuid(FixedSizeBinaryBuilder::new(16)),
            Native::Date => Self::Date(Date32Builder::new()),
            Native::Time => Self::Time(Time64MicrosecondBuilder::new()),
            Native::Timestamp => Self::Timestamp(TimestampMicrosecondBuilder::new()),
            Native::TimestampTz => {
                Self::TimestampTz(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
            }
        }
    }

    fn push_null(&mut self) {
        match self {
            Self::Bool(b) => b.append_null(),
            Self::Int2(b) => b.append_null(),
            Self::Int4(b) => b.append_null(),
            Self::Int8(b) => b.append_null(),
            Self::Oid(b) => b.append_null(),
            Self::Float4(b) => b.append_null(),
            Self::Float8(b) => b.append_null(),
            Self::Text(b) | Self::Jsonb(b) | Self::Numeric(b) => b.append_null(),
            Self::Bytes(b) => b.append_null(),
            Self::Uuid(b) => b.append_null(),
            Self::Date(b) => b.append_null(),
            Self::Time(b) => b.append_null(),
            Self::Timestamp(b) | Self::TimestampTz(b) => b.append_null(),
            Self::Values { values, .. } => values.push(Value::Null),
        }
    }

    /// Appends one value from its binary send format; the conversions are
    /// [`binary::decode`]'s.
    fn push(&mut self, bytes: &[u8], scratch: &mut String) -> Result<(), String> {
        match self {
            Self::Bool(b) => b.append_value(binary::fixed::<1>(bytes)?[0] != 0),
            Self::Int2(b) => b.append_value(i16::from_be_bytes(binary::fixed(bytes)?)),
            Self::Int4(b) => b.append_value(i32::from_be_bytes(binary::fixed(bytes)?)),
            Self::Int8(b) => b.append_value(i64::from_be_bytes(binary::fixed(bytes)?)),
            Self::Oid(b) => b.append_value(u32::from_be_bytes(binary::fixed(bytes)?)),
            Self::Float4(b) => b.append_value(f32::from_be_bytes(binary::fixed(bytes)?)),
            Self::Float8(b) => b.append_value(f64::from_be_bytes(binary::fixed(bytes)?)),
            Self::Text(b) => b.append_value(utf8(bytes)?),
            Self::Jsonb(b) => b.append_value(utf8(binary::jsonb_text(bytes)?)?),
            Self::Numeric(b) => {
                scratch.clear();
                binary::numeric_into(bytes, scratch)?;
                b.append_value(scratch.as_str());
            }
            Self::Bytes(b) => b.append_value(bytes),
            Self::Uuid(b) => b
                .append_value(binary::fixed::<16>(bytes)?)
                .map_err(|e| e.to_string())?,
            Self::Date(b) => b.append_value(binary::date_days(bytes)?),
            Self::Time(b) => b.append_value(i64::from_be_bytes(binary::fixed(bytes)?)),
            Self::Timestamp(b) | Self::TimestampTz(b) => {
                b.append_value(binary::timestamp_micros(bytes)?);
            }
            Self::Values { ty, values, .. } => {
                values.push(binary::decode(ty, bytes).map_err(|e| e.to_string())?);
            }
        }
        Ok(())
    }

    /// The column so far as an array; the builder starts again empty, sized for `rows`
    /// rows like the last ones (a snapshot's payloads are alike).
    fn finish(&mut self, rows: usize) -> Res<ArrayRef> {
        /// Finishes `$b` and puts `$new` (a builder sized from the array `$a`) in its place.
        macro_rules! again {
            ($b:expr, |$a:ident| $new:expr) => {{
                let $a = $b.finish();
                *$b = $new;
                Arc::new($a) as ArrayRef
            }};
        }
        Ok(match self {
            Self::Bool(b) => again!(b, |a| BooleanBuilder::with_capacity(rows)),
            Self::Int2(b) => again!(b, |a| Int16Builder::with_capacity(rows)),
            Self::Int4(b) => again!(b, |a| Int32Builder::with_capacity(rows)),
            Self::Int8(b) => again!(b, |a| Int64Builder::with_capacity(rows)),
            Self::Oid(b) => again!(b, |a| UInt32Builder::with_capacity(rows)),
            Self::Float4(b) => again!(b, |a| Float32Builder::with_capacity(rows)),
            Self::Float8(b) => again!(b, |a| Float64Builder::with_capacity(rows)),
            Self::Text(b) | Self::Jsonb(b) | Self::Numeric(b) => again!(b, |a| {
                StringBuilder::with_capacity(rows, a.value_data().len())
            }),
            Self::Bytes(b) => again!(b, |a| {
                BinaryBuilder::with_capacity(rows, a.value_data().len())
            }),
            Self::Uuid(b) => again!(b, |a| FixedSizeBinaryBuilder::with_capacity(rows, 16)),
            Self::Date(b) => again!(b, |a| Date32Builder::with_capacity(rows)),
            Self::Time(b) => again!(b, |a| Time64MicrosecondBuilder::with_capacity(rows)),
            Self::Timestamp(b) => {
                again!(b, |a| TimestampMicrosecondBuilder::with_capacity(rows))
            }
            Self::TimestampTz(b) => again!(b, |a| {
                TimestampMicrosecondBuilder::with_capacity(rows).with_timezone("UTC")
            }),
            Self::Values { wire, values, .. } => {
                let refs: Vec<&Value> = values.iter().collect();
                let array = arrow::build(wire, &refs)?;
                values.clear();
                array
            }
        })
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))
}

impl ReadEncoder {
    /// Whether rows are encoded straight from binary COPY fields in `format` (Arrow,
    /// Parquet, JSON).
    pub fn supports(format: WireFormat) -> bool {
        matches!(
            format,
            WireFormat::Arrow | WireFormat::Parquet | WireFormat::Json
        )
    }

    /// An encoder of `schema`'s rows (its `typeMappings` applied) in `format`, which
    /// [`supports`](Self::supports) must accept.
    pub fn new(format: WireFormat, schema: Arc<TableSchema>) -> Result<Self, CodecError> {
        let fail = |reason: String| error(format, "encode", &schema, reason);
        if !Self::supports(format) {
            return Err(fail(format!(
                "{} is not encoded straight from COPY fields",
                format.as_str()
            )));
        }
        let layout = Layout::new(&schema).map_err(fail)?;
        let target = match format {
            WireFormat::Json => Target::Json {
                prepared: json::Prepared::new(&layout).map_err(fail)?,
                wires: layout.wires.clone(),
                fields: schema
                    .columns
                    .iter()
                    .zip(&layout.wires)
                    .map(|(c, w)| (Native::of(&c.ty, w), json::LastDay::default()))
                    .collect(),
                prefix: Vec::new(),
                out: Vec::new(),
            },
            _ => {
                if format == WireFormat::Parquet {
                    parquet::check_no_empty_struct(&layout).map_err(fail)?;
                }
                Target::Columns {
                    builders: schema
                        .columns
                        .iter()
                        .zip(&layout.wires)
                        .map(|(c, w)| Column::new(&c.ty, w))
                        .collect(),
                    schema: Arc::new(arrow::arrow_schema(&layout)),
                }
            }
        };
        Ok(Self {
            format,
            schema,
            target,
            piece: None,
            rows: 0,
            scratch: String::new(),
        })
    }

    fn fail(&self, reason: String) -> CodecError {
        error(self.format, "encode", &self.schema, reason)
    }

    /// Starts a payload of `read` changes at `lsn` (commit and change LSN) committed at
    /// `commit_time_micros`.
    pub fn begin(&mut self, lsn: u64, commit_time_micros: i64) -> Result<(), CodecError> {
        if self.rows > 0 {
            return Err(self.fail("a payload was begun while rows were pending".into()));
        }
        if let Target::Json {
            prepared,
            prefix,
            out,
            ..
        } = &mut self.target
        {
            *prefix = prepared
                .read_prefix(self.schema.version, lsn, commit_time_micros)
                .map_err(|reason| error(self.format, "encode", &self.schema, reason))?;
            out.clear();
            out.extend_from_slice(prepared.header());
        }
        self.piece = Some((lsn, commit_time_micros));
        Ok(())
    }

    /// Appends one row from its binary COPY fields (`None`: NULL), in column order. An
    /// error names the column; the encoder must not be used after one.
    pub fn push_row(&mut self, fields: &[Option<&[u8]>]) -> Result<(), CodecError> {
        if self.piece.is_none() {
            return Err(self.fail("a row was pushed before its payload was begun".into()));
        }
        if fields.len() != self.schema.columns.len() {
            return Err(self.fail(format!(
                "a row has {} fields, the table {} columns",
                fields.len(),
                self.schema.columns.len()
            )));
        }
        let columns = &self.schema.columns;
        let failed = |i: usize, bytes: &[u8], reason: String| {
            let c = &columns[i];
            CodecError::Text {
                type_name: c.ty.name.clone(),
                text: format!("binary {:02x?}", &bytes[..bytes.len().min(32)]),
                reason: format!("column {}: {reason}", c.name),
            }
        };
        match &mut self.target {
            Target::Columns { builders, .. } => {
                for (i, (column, field)) in builders.iter_mut().zip(fields).enumerate() {
                    match field {
                        None => column.push_null(),
                        Some(bytes) => column
                            .push(bytes, &mut self.scratch)
                            .map_err(|reason| failed(i, bytes, reason))?,
                    }
                }
            }
            Target::Json {
                prepared,
                wires,
                fields: writers,
                prefix,
                out,
            } => {
                out.extend_from_slice(prefix);
                for (i, (field, (writer, last))) in fields.iter().zip(writers).enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(prepared.column_key(i));
                    match field {
                        None => out.extend_from_slice(b"null"),
                        Some(bytes) => {
                            json::write_binary_field(
                                out,
                                *writer,
                                &wires[i],
                                &columns[i].ty,
                                bytes,
                                &mut self.scratch,
                                last,
                            )
                            .map_err(|reason| failed(i, bytes, reason))?;
                        }
                    }
                }
                out.extend_from_slice(json::READ_SUFFIX);
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Rows appended since the payload was begun.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The payload of the rows appended since [`begin`](Self::begin); the next payload
    /// is begun again.
    pub fn finish(&mut self) -> Result<Vec<u8>, CodecError> {
        let Some((lsn, commit_time_micros)) = self.piece.take() else {
            return Err(self.fail("a payload was finished before it was begun".into()));
        };
        let n = std::mem::take(&mut self.rows);
        let fail = |reason: String| error(self.format, "encode", &self.schema, reason);
        match &mut self.target {
            Target::Json { out, .. } => {
                // The next payload is about as large.
                let capacity = out.len();
                Ok(std::mem::replace(out, Vec::with_capacity(capacity)))
            }
            Target::Columns { builders, schema } => {
                let after = builders
                    .iter_mut()
                    .map(|c| c.finish(n))
                    .collect::<Res<Vec<_>>>()
                    .map_err(fail)?;
                let batch =
                    arrow::read_batch(schema, n, lsn, commit_time_micros, after).map_err(fail)?;
                match self.format {
                    WireFormat::Parquet => parquet::write(&batch),
                    _ => arrow::write(&batch),
                }
                .map_err(fail)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::schema::test_column as column;
    use crate::value::{Change, Row};

    fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [digits.len() as u16, weight as u16, sign, dscale] {
            b.extend_from_slice(&w.to_be_bytes());
        }
        for d in digits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    /// Every natively appended type, and a mapped column (numeric → float64) that goes
    /// through typed values, with NULLs: the payload equals the row encoder's, byte for byte.
    #[test]
    fn reads_encode_as_the_row_encoder_encodes_read_changes() {
        let schema = Arc::new(TableSchema {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![
                column("id", 20, "int8", TypeKind::Int8, None),
                column("flag", 16, "bool", TypeKind::Bool, None),
                column("small", 21, "int2", TypeKind::Int2, None),
                column("n", 23, "int4", TypeKind::Int4, None),
                column("o", 26, "oid", TypeKind::Oid, None),
                column("r", 700, "float4", TypeKind::Float4, None),
                column("d", 701, "float8", TypeKind::Float8, None),
                column("name", 25, "text", TypeKind::Text, None),
                column("v", 1043, "varchar", TypeKind::Text, None),
                column("doc", 114, "json", TypeKind::Json, None),
                column("docb", 3802, "jsonb", TypeKind::Jsonb, None),
                column("price", 1700, "numeric", TypeKind::Numeric, None),
                column("ratio", 1700, "numeric", TypeKind::Numeric, Some("float64")),
                column("blob", 17, "bytea", TypeKind::Bytea, None),
                column("u", 2950, "uuid", TypeKind::Uuid, None),
                column("day", 1082, "date", TypeKind::Date, None),
                column("at", 1083, "time", TypeKind::Time, None),
                column("ts", 1114, "timestamp", TypeKind::Timestamp, None),
                column("tstz", 1184, "timestamptz", TypeKind::TimestampTz, None),
            ],
            version: 3,
        });
        let row = |i: i64| -> Vec<Option<Vec<u8>>> {
            let mut jsonb = vec![1u8];
            jsonb.extend_from_slice(format!("{{\"i\": {i}}}").as_bytes());
            vec![
                Some(i.to_be_bytes().to_vec()),
                Some(vec![u8::from(i % 2 == 0)]),
                Some((i as i16).to_be_bytes().to_vec()),
                (i % 3 != 0).then(|| (i as i32 * 7).to_be_bytes().to_vec()),
                Some((i as u32).to_be_bytes().to_vec()),
                Some((i as f32 / 3.0).to_be_bytes().to_vec()),
                Some((i as f64 / 7.0).to_be_bytes().to_vec()),
                Some(format!("item \u{e9} {i}").into_bytes()),
                (i % 4 != 1).then(|| b"v".to_vec()),
                Some(format!("[{i}]").into_bytes()),
                Some(jsonb),
                Some(numeric(
                    0,
                    if i % 2 == 0 { 0 } else { 0x4000 },
                    2,
                    &[i as u16, 5000],
                )),
                (i % 5 != 2).then(|| numeric(-1, 0, 4, &[1234])),
                Some(vec![0, 1, i as u8]),
                Some([i as u8; 16].to_vec()),
                Some((i as i32 - 400).to_be_bytes().to_vec()),
                Some((i * 1_000_000).to_be_bytes().to_vec()),
                // Days apart, with an infinity and a year past 9999 between them (written
                // as text, around the date part kept from the row before).
                Some(
                    match i {
                        7 => i64::MAX,
                        8 => 320_000_000_000_000_000,
                        _ => i * 86_400_000_000,
                    }
                    .to_be_bytes()
                    .to_vec(),
                ),
                (i % 6 != 5).then(|| (-i * 3_600_000_000).to_be_bytes().to_vec()),
            ]
        };
        let rows: Vec<Vec<Option<Vec<u8>>>> = (0..40).map(row).collect();
        let (lsn, time) = (0x1_6B37_4D48, 1_700_000_000_123_456);
        let changes: Vec<Change> = rows
            .iter()
            .map(|fields| {
                let values = schema
                    .columns
                    .iter()
                    .zip(fields)
                    .map(|(c, f)| match f {
                        None => Value::Null,
                        Some(b) => binary::decode(&c.ty, b).unwrap(),
                    })
                    .collect();
                Change::read(
                    lsn,
                    time,
                    Row {
                        values,
                        absent: Vec::new(),
                    },
                )
            })
            .collect();
        for format in [WireFormat::Parquet, WireFormat::Arrow, WireFormat::Json] {
            let mut encoder = ReadEncoder::new(format, schema.clone()).unwrap();
            // Twice: a finished encoder starts again empty.
            for _ in 0..2 {
                encoder.begin(lsn, time).unwrap();
                for fields in &rows {
                    let fields: Vec<Option<&[u8]>> = fields.iter().map(|f| f.as_deref()).collect();
                    encoder.push_row(&fields).unwrap();
                }
                assert_eq!(encoder.rows(), rows.len());
                let payload = encoder.finish().unwrap();
                assert_eq!(encoder.rows(), 0);
                let want = crate::encode(format, &schema, &changes).unwrap();
                assert!(payload == want, "{format:?}: payloads differ");
                assert_eq!(crate::decode(format, &schema, &payload).unwrap(), changes);
            }
        }
    }

    #[test]
    fn bad_fields_and_formats_are_errors_naming_the_column() {
        let schema = Arc::new(TableSchema {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![column("n", 23, "int4", TypeKind::Int4, None)],
            version: 1,
        });
        let mut encoder = ReadEncoder::new(WireFormat::Parquet, schema.clone()).unwrap();
        let err = encoder.push_row(&[None]).unwrap_err().to_string();
        assert!(err.contains("before its payload was begun"), "{err}");
        encoder.begin(1, 2).unwrap();
        let err = encoder
            .push_row(&[Some(&[0, 1][..])])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("column n") && err.contains("expected 4 bytes"),
            "{err}"
        );
        let err = encoder.push_row(&[None, None]).unwrap_err().to_string();
        assert!(err.contains("2 fields, the table 1 columns"), "{err}");
        assert!(ReadEncoder::new(WireFormat::Avro, schema).is_err());
    }
}
