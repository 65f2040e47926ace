//! Arrow: the typed, columnar form of the shared layout. Builds one `RecordBatch` per payload
//! (column by column, never row by row) and reads it back; Parquet reuses both directions.
//! The payload itself is an Arrow IPC stream: schema message + one record batch.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    ArrowPrimitiveType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type,
    Int64Type, Time64MicrosecondType, TimestampMicrosecondType, UInt8Type, UInt32Type, UInt64Type,
};
use arrow_array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Decimal128Array, FixedSizeBinaryArray, ListArray,
    MapArray, PrimitiveArray, RecordBatch, StringArray, StructArray, TimestampMicrosecondArray,
};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, Field, FieldRef, Fields, Schema, SchemaRef, TimeUnit};

use super::{Layout, Res, Wire, base_type, mismatch, parse_op};
use crate::schema::TypeKind;
use crate::value::{Change, Op, RangeValue, Row, Value};

static NULL: Value = Value::Null;

/// Schema metadata key holding the JSON schema descriptor.
pub(crate) const SCHEMA_KEY: &str = "wallaby.schema";

pub(crate) fn encode(layout: &Layout<'_>, changes: &[Change]) -> Res<Vec<u8>> {
    write(&to_batch(layout, changes)?)
}

/// The Arrow IPC stream of one record batch.
pub(crate) fn write(batch: &RecordBatch) -> Res<Vec<u8>> {
    let mut out = Vec::new();
    let mut writer = arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())
        .map_err(|e| e.to_string())?;
    writer.write(batch).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    drop(writer);
    Ok(out)
}

pub(crate) fn decode(layout: &Layout<'_>, payload: &[u8]) -> Res<Vec<Change>> {
    let reader = arrow_ipc::reader::StreamReader::try_new(Cursor::new(payload), None)
        .map_err(|e| format!("not an Arrow IPC stream: {e}"))?;
    check_schema(layout, &reader.schema())?;
    let mut changes = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| format!("bad record batch: {e}"))?;
        changes.extend(from_batch(layout, &batch)?);
    }
    Ok(changes)
}

// ---------------------------------------------------------------------------------------
// schema

fn f(name: &str, dt: DataType) -> Field {
    Field::new(name, dt, true)
}

fn list_of(dt: DataType) -> DataType {
    DataType::List(Arc::new(f("item", dt)))
}

fn dims_fields() -> Fields {
    Fields::from(vec![f("len", DataType::Int32), f("lower", DataType::Int32)])
}

fn map_entries() -> FieldRef {
    Arc::new(Field::new(
        "entries",
        DataType::Struct(Fields::from(vec![
            Field::new("key", DataType::Utf8, false),
            f("value", DataType::Utf8),
        ])),
        false,
    ))
}

fn struct_fields(w: &Wire) -> Option<Fields> {
    match data_type(w) {
        DataType::Struct(fields) => Some(fields),
        _ => None,
    }
}

pub(crate) fn data_type(w: &Wire) -> DataType {
    match w {
        Wire::Bool => DataType::Boolean,
        Wire::Int2 => DataType::Int16,
        Wire::Int4 => DataType::Int32,
        Wire::Int8 | Wire::Money => DataType::Int64,
        Wire::Oid => DataType::UInt32,
        Wire::Float4 => DataType::Float32,
        Wire::Float8 | Wire::NumericF64 => DataType::Float64,
        Wire::Numeric | Wire::Str(_) | Wire::PgText(_) | Wire::JsonDoc => DataType::Utf8,
        Wire::Bin(_) => DataType::Binary,
        Wire::Uuid => DataType::FixedSizeBinary(16),
        Wire::Date => DataType::Date32,
        Wire::Time => DataType::Time64(TimeUnit::Microsecond),
        Wire::TimeTz => DataType::Struct(Fields::from(vec![
            f("micros", DataType::Time64(TimeUnit::Microsecond)),
            f("offset_seconds", DataType::Int32),
        ])),
        Wire::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        Wire::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        Wire::Interval => DataType::Struct(Fields::from(vec![
            f("months", DataType::Int32),
            f("days", DataType::Int32),
            f("micros", DataType::Int64),
        ])),
        Wire::Inet => DataType::Struct(Fields::from(vec![
            f("addr", DataType::Binary),
            f("prefix", DataType::UInt8),
        ])),
        Wire::Composite(attrs) => DataType::Struct(
            attrs
                .iter()
                .map(|(name, aw)| f(name, data_type(aw)))
                .collect::<Vec<_>>()
                .into(),
        ),
        Wire::Range(ew) => {
            let et = data_type(ew);
            DataType::Struct(Fields::from(vec![
                f("empty", DataType::Boolean),
                f("lower", et.clone()),
                f("upper", et),
                f("lower_inclusive", DataType::Boolean),
                f("upper_inclusive", DataType::Boolean),
            ]))
        }
        Wire::Array(ew) => DataType::Struct(Fields::from(vec![
            f("dims", list_of(DataType::Struct(dims_fields()))),
            f("elements", list_of(data_type(ew))),
        ])),
        Wire::Hstore => DataType::Map(map_entries(), false),
        Wire::Vector => list_of(DataType::Float32),
        Wire::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
    }
}

fn row_fields(layout: &Layout<'_>) -> Fields {
    layout
        .schema
        .columns
        .iter()
        .zip(&layout.wires)
        .map(|(col, w)| {
            let mut md = HashMap::from([
                ("pg.type".to_string(), col.ty.name.clone()),
                ("pg.oid".to_string(), col.ty.oid.to_string()),
                ("pg.typmod".to_string(), col.ty.typmod.to_string()),
                ("pg.key".to_string(), col.key.to_string()),
            ]);
            if let Some(m) = &col.mapped_type {
                md.insert("pg.mapped_type".into(), m.clone());
            }
            if let TypeKind::Enum(labels) = &base_type(&col.ty).kind {
                md.insert(
                    "pg.enum_labels".into(),
                    serde_json::Value::from(labels.clone()).to_string(),
                );
            }
            if matches!(w, Wire::JsonDoc) {
                md.insert("ARROW:extension:name".into(), "arrow.json".into());
                md.insert("ARROW:extension:metadata".into(), "{}".into());
            }
            f(&col.name, data_type(w)).with_metadata(md)
        })
        .collect::<Vec<_>>()
        .into()
}

pub(crate) fn arrow_schema(layout: &Layout<'_>) -> Schema {
    let row = DataType::Struct(row_fields(layout));
    let absent = list_of(DataType::Utf8);
    let metadata = HashMap::from([
        (SCHEMA_KEY.to_string(), layout.descriptor().to_string()),
        ("wallaby.table".to_string(), layout.table()),
        (
            "wallaby.schema_version".to_string(),
            layout.schema.version.to_string(),
        ),
        (
            "wallaby.layout_version".to_string(),
            super::LAYOUT_VERSION.to_string(),
        ),
    ]);
    Schema::new(vec![
        Field::new("op", DataType::Utf8, false),
        Field::new("commit_lsn", DataType::UInt64, false),
        Field::new("lsn", DataType::UInt64, false),
        Field::new(
            "commit_time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("xid", DataType::UInt32, false),
        f("before", row.clone()),
        f("after", row),
        Field::new("before_absent", absent.clone(), false),
        Field::new("after_absent", absent, false),
    ])
    .with_metadata(metadata)
}

pub(crate) fn check_schema(layout: &Layout<'_>, schema: &Schema) -> Res<()> {
    layout.check_descriptor(&embedded(schema)?)
}

/// The JSON descriptor in an Arrow schema's metadata.
pub(crate) fn embedded(schema: &Schema) -> Res<serde_json::Value> {
    let descriptor = schema
        .metadata()
        .get(SCHEMA_KEY)
        .ok_or_else(|| format!("payload schema has no {SCHEMA_KEY:?} metadata"))?;
    serde_json::from_str(descriptor)
        .map_err(|e| format!("{SCHEMA_KEY:?} metadata is not JSON: {e}"))
}

pub(crate) fn descriptor(payload: &[u8]) -> Res<serde_json::Value> {
    let reader = arrow_ipc::reader::StreamReader::try_new(Cursor::new(payload), None)
        .map_err(|e| format!("not an Arrow IPC stream: {e}"))?;
    embedded(&reader.schema())
}

// ---------------------------------------------------------------------------------------
// building arrays

fn err(e: arrow_schema::ArrowError) -> String {
    e.to_string()
}

fn nulls(valid: Vec<bool>) -> Option<NullBuffer> {
    if valid.iter().all(|v| *v) {
        None
    } else {
        Some(NullBuffer::from(valid))
    }
}

/// Non-null values through `pick` (a wrong variant is an error), NULL as `None`.
fn pick<'v, T>(
    w: &Wire,
    vals: &[&'v Value],
    pick: impl Fn(&'v Value) -> Option<T>,
) -> Res<Vec<Option<T>>> {
    vals.iter()
        .map(|v| match v {
            Value::Null => Ok(None),
            v => pick(v).map(Some).ok_or_else(|| mismatch(w, v)),
        })
        .collect()
}

fn prim<T: ArrowPrimitiveType>(
    w: &Wire,
    vals: &[&Value],
    get: impl Fn(&Value) -> Option<T::Native>,
) -> Res<ArrayRef> {
    Ok(Arc::new(
        pick(w, vals, get)?
            .into_iter()
            .collect::<PrimitiveArray<T>>(),
    ))
}

fn strings<'v>(
    w: &Wire,
    vals: &[&'v Value],
    get: impl Fn(&'v Value) -> Option<&'v str>,
) -> Res<ArrayRef> {
    Ok(Arc::new(StringArray::from(pick(w, vals, get)?)))
}

fn struct_of(w: &Wire, children: Vec<ArrayRef>, valid: Vec<bool>) -> Res<ArrayRef> {
    let fields = struct_fields(w).ok_or_else(|| format!("{w:?} is not a struct"))?;
    let len = valid.len();
    Ok(Arc::new(
        StructArray::try_new_with_length(fields, children, nulls(valid), len).map_err(err)?,
    ))
}

fn list(item: DataType, lengths: Vec<usize>, values: ArrayRef, valid: Vec<bool>) -> Res<ArrayRef> {
    Ok(Arc::new(
        ListArray::try_new(
            Arc::new(f("item", item)),
            OffsetBuffer::from_lengths(lengths),
            values,
            nulls(valid),
        )
        .map_err(err)?,
    ))
}

fn valid_of(vals: &[&Value]) -> Vec<bool> {
    vals.iter().map(|v| !matches!(v, Value::Null)).collect()
}

pub(crate) fn build(w: &Wire, vals: &[&Value]) -> Res<ArrayRef> {
    match w {
        Wire::Bool => Ok(Arc::new(BooleanArray::from(pick(w, vals, |v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })?))),
        Wire::Int2 => prim::<Int16Type>(w, vals, |v| match v {
            Value::Int2(i) => Some(*i),
            _ => None,
        }),
        Wire::Int4 => prim::<Int32Type>(w, vals, |v| match v {
            Value::Int4(i) => Some(*i),
            _ => None,
        }),
        Wire::Int8 => prim::<Int64Type>(w, vals, |v| match v {
            Value::Int8(i) => Some(*i),
            _ => None,
        }),
        Wire::Money => prim::<Int64Type>(w, vals, |v| match v {
            Value::Money(i) => Some(*i),
            _ => None,
        }),
        Wire::Oid => prim::<UInt32Type>(w, vals, |v| match v {
            Value::Oid(i) => Some(*i),
            _ => None,
        }),
        Wire::Float4 => prim::<Float32Type>(w, vals, |v| match v {
            Value::Float4(x) => Some(*x),
            _ => None,
        }),
        Wire::Float8 => prim::<Float64Type>(w, vals, |v| match v {
            Value::Float8(x) => Some(*x),
            _ => None,
        }),
        Wire::Numeric => strings(w, vals, |v| match v {
            Value::Numeric(s) => Some(s.as_str()),
            _ => None,
        }),
        Wire::Str(kind) => strings(w, vals, |v| kind.unwrap(v)),
        Wire::JsonDoc => strings(w, vals, |v| match v {
            Value::Json(s) => Some(s.as_str()),
            _ => None,
        }),
        Wire::PgText(ty) => {
            let texts: Vec<Option<String>> = vals
                .iter()
                .map(|v| match v {
                    Value::Null => None,
                    v => Some(super::pg_text(ty, v)),
                })
                .collect();
            Ok(Arc::new(StringArray::from(texts)))
        }
        Wire::NumericF64 => {
            let xs = pick(w, vals, |v| match v {
                Value::Numeric(s) => Some(s.as_str()),
                _ => None,
            })?
            .into_iter()
            .map(|s| s.map(super::numeric_to_f64).transpose())
            .collect::<Res<Vec<_>>>()?;
            Ok(Arc::new(PrimitiveArray::<Float64Type>::from(xs)))
        }
        Wire::Decimal { precision, scale } => {
            let xs = pick(w, vals, |v| match v {
                Value::Numeric(s) => Some(s.as_str()),
                _ => None,
            })?
            .into_iter()
            .map(|s| {
                s.map(|s| super::numeric_to_decimal(s, *precision, *scale))
                    .transpose()
                    .map(Option::flatten)
            })
            .collect::<Res<Vec<_>>>()?;
            Ok(Arc::new(
                Decimal128Array::from(xs)
                    .with_precision_and_scale(*precision, *scale)
                    .map_err(err)?,
            ))
        }
        Wire::Bin(kind) => Ok(Arc::new(BinaryArray::from(pick(w, vals, |v| {
            kind.unwrap(v)
        })?))),
        Wire::Uuid => {
            let bytes = pick(w, vals, |v| match v {
                Value::Uuid(u) => Some(u.as_slice()),
                _ => None,
            })?;
            Ok(Arc::new(
                FixedSizeBinaryArray::try_from_sparse_iter_with_size(bytes.into_iter(), 16)
                    .map_err(err)?,
            ))
        }
        Wire::Date => prim::<Date32Type>(w, vals, |v| match v {
            Value::Date(d) => Some(*d),
            _ => None,
        }),
        Wire::Time => prim::<Time64MicrosecondType>(w, vals, |v| match v {
            Value::Time(t) => Some(*t),
            _ => None,
        }),
        Wire::Timestamp => prim::<TimestampMicrosecondType>(w, vals, |v| match v {
            Value::Timestamp(t) => Some(*t),
            _ => None,
        }),
        Wire::TimestampTz => {
            let ts = pick(w, vals, |v| match v {
                Value::TimestampTz(t) => Some(*t),
                _ => None,
            })?;
            Ok(Arc::new(
                TimestampMicrosecondArray::from(ts).with_timezone("UTC"),
            ))
        }
        Wire::TimeTz => {
            let parts = pick(w, vals, |v| match v {
                Value::TimeTz {
                    micros,
                    offset_seconds,
                } => Some((*micros, *offset_seconds)),
                _ => None,
            })?;
            let valid = parts.iter().map(Option::is_some).collect();
            let micros: Vec<Option<i64>> = parts.iter().map(|p| p.map(|p| p.0)).collect();
            let offsets: Vec<Option<i32>> = parts.iter().map(|p| p.map(|p| p.1)).collect();
            struct_of(
                w,
                vec![
                    Arc::new(PrimitiveArray::<Time64MicrosecondType>::from(micros)),
                    Arc::new(PrimitiveArray::<Int32Type>::from(offsets)),
                ],
                valid,
            )
        }
        Wire::Interval => {
            let parts = pick(w, vals, |v| match v {
                Value::Interval {
                    months,
                    days,
                    micros,
                } => Some((*months, *days, *micros)),
                _ => None,
            })?;
            let valid = parts.iter().map(Option::is_some).collect();
            let months: Vec<Option<i32>> = parts.iter().map(|p| p.map(|p| p.0)).collect();
            let days: Vec<Option<i32>> = parts.iter().map(|p| p.map(|p| p.1)).collect();
            let micros: Vec<Option<i64>> = parts.iter().map(|p| p.map(|p| p.2)).collect();
            struct_of(
                w,
                vec![
                    Arc::new(PrimitiveArray::<Int32Type>::from(months)),
                    Arc::new(PrimitiveArray::<Int32Type>::from(days)),
                    Arc::new(PrimitiveArray::<Int64Type>::from(micros)),
                ],
                valid,
            )
        }
        Wire::Inet => {
            let parts = pick(w, vals, |v| match v {
                Value::Inet { addr, prefix } => Some((addr.as_slice(), *prefix)),
                _ => None,
            })?;
            let valid = parts.iter().map(Option::is_some).collect();
            let addrs: Vec<Option<&[u8]>> = parts.iter().map(|p| p.map(|p| p.0)).collect();
            let prefixes: Vec<Option<u8>> = parts.iter().map(|p| p.map(|p| p.1)).collect();
            struct_of(
                w,
                vec![
                    Arc::new(BinaryArray::from(addrs)),
                    Arc::new(PrimitiveArray::<UInt8Type>::from(prefixes)),
                ],
                valid,
            )
        }
        Wire::Composite(attrs) => {
            let fields = pick(w, vals, |v| match v {
                Value::Composite(fields) => Some(fields.as_slice()),
                _ => None,
            })?;
            for fs in fields.iter().flatten() {
                if fs.len() != attrs.len() {
                    return Err(format!(
                        "composite has {} fields, its type has {} attributes",
                        fs.len(),
                        attrs.len()
                    ));
                }
            }
            let children = attrs
                .iter()
                .enumerate()
                .map(|(j, (name, aw))| {
                    let column: Vec<&Value> = fields
                        .iter()
                        .map(|fs| fs.and_then(|fs| fs.get(j)).unwrap_or(&NULL))
                        .collect();
                    build(aw, &column).map_err(|e| format!("attribute {name:?}: {e}"))
                })
                .collect::<Res<Vec<_>>>()?;
            struct_of(w, children, valid_of(vals))
        }
        Wire::Range(ew) => {
            let ranges = pick(w, vals, |v| match v {
                Value::Range(r) => Some(r.as_ref()),
                _ => None,
            })?;
            let mut empty = Vec::with_capacity(ranges.len());
            let mut lowers = Vec::with_capacity(ranges.len());
            let mut uppers = Vec::with_capacity(ranges.len());
            let mut lis = Vec::with_capacity(ranges.len());
            let mut uis = Vec::with_capacity(ranges.len());
            for r in &ranges {
                match r {
                    None => {
                        empty.push(None);
                        lowers.push(&NULL);
                        uppers.push(&NULL);
                        lis.push(None);
                        uis.push(None);
                    }
                    Some(RangeValue::Empty) => {
                        empty.push(Some(true));
                        lowers.push(&NULL);
                        uppers.push(&NULL);
                        lis.push(Some(false));
                        uis.push(Some(false));
                    }
                    Some(RangeValue::Bounds {
                        lower,
                        upper,
                        lower_inclusive,
                        upper_inclusive,
                    }) => {
                        empty.push(Some(false));
                        lowers.push(lower.as_ref().unwrap_or(&NULL));
                        uppers.push(upper.as_ref().unwrap_or(&NULL));
                        lis.push(Some(*lower_inclusive));
                        uis.push(Some(*upper_inclusive));
                    }
                }
            }
            struct_of(
                w,
                vec![
                    Arc::new(BooleanArray::from(empty)),
                    build(ew, &lowers).map_err(|e| format!("range lower bound: {e}"))?,
                    build(ew, &uppers).map_err(|e| format!("range upper bound: {e}"))?,
                    Arc::new(BooleanArray::from(lis)),
                    Arc::new(BooleanArray::from(uis)),
                ],
                valid_of(vals),
            )
        }
        Wire::Array(ew) => {
            let arrays = pick(w, vals, |v| match v {
                Value::Array { dims, elements } => Some((dims.as_slice(), elements.as_slice())),
                _ => None,
            })?;
            let dims_len: Vec<usize> = arrays.iter().map(|a| a.map_or(0, |a| a.0.len())).collect();
            let elem_len: Vec<usize> = arrays.iter().map(|a| a.map_or(0, |a| a.1.len())).collect();
            let all_dims: Vec<(i32, i32)> = arrays
                .iter()
                .flatten()
                .flat_map(|a| a.0.iter().copied())
                .collect();
            let all_elems: Vec<&Value> = arrays.iter().flatten().flat_map(|a| a.1.iter()).collect();
            let dims_struct: ArrayRef = Arc::new(
                StructArray::try_new_with_length(
                    dims_fields(),
                    vec![
                        Arc::new(PrimitiveArray::<Int32Type>::from_iter_values(
                            all_dims.iter().map(|d| d.0),
                        )),
                        Arc::new(PrimitiveArray::<Int32Type>::from_iter_values(
                            all_dims.iter().map(|d| d.1),
                        )),
                    ],
                    None,
                    all_dims.len(),
                )
                .map_err(err)?,
            );
            let valid = valid_of(vals);
            let elements = build(ew, &all_elems).map_err(|e| format!("array element: {e}"))?;
            struct_of(
                w,
                vec![
                    list(
                        DataType::Struct(dims_fields()),
                        dims_len,
                        dims_struct,
                        valid.clone(),
                    )?,
                    list(data_type(ew), elem_len, elements, valid.clone())?,
                ],
                valid,
            )
        }
        Wire::Hstore => {
            let maps = pick(w, vals, |v| match v {
                Value::Hstore(pairs) => Some(pairs.as_slice()),
                _ => None,
            })?;
            let lengths: Vec<usize> = maps.iter().map(|m| m.map_or(0, <[_]>::len)).collect();
            let pairs: Vec<&(String, Option<String>)> =
                maps.iter().flatten().flat_map(|m| m.iter()).collect();
            let keys = StringArray::from_iter_values(pairs.iter().map(|p| p.0.as_str()));
            let values: StringArray = pairs.iter().map(|p| p.1.as_deref()).collect();
            let DataType::Struct(entry_fields) = map_entries().data_type().clone() else {
                return Err("hstore entries are not a struct".into());
            };
            let entries = StructArray::try_new_with_length(
                entry_fields,
                vec![Arc::new(keys), Arc::new(values)],
                None,
                pairs.len(),
            )
            .map_err(err)?;
            Ok(Arc::new(
                MapArray::try_new(
                    map_entries(),
                    OffsetBuffer::from_lengths(lengths),
                    entries,
                    nulls(valid_of(vals)),
                    false,
                )
                .map_err(err)?,
            ))
        }
        Wire::Vector => {
            let vectors = pick(w, vals, |v| match v {
                Value::Vector(xs) => Some(xs.as_slice()),
                _ => None,
            })?;
            let lengths: Vec<usize> = vectors.iter().map(|v| v.map_or(0, <[_]>::len)).collect();
            let values = PrimitiveArray::<Float32Type>::from_iter_values(
                vectors.iter().flatten().flat_map(|v| v.iter().copied()),
            );
            list(DataType::Float32, lengths, Arc::new(values), valid_of(vals))
        }
    }
}

fn rows_array(layout: &Layout<'_>, rows: &[Option<&Row>], which: &str) -> Res<ArrayRef> {
    let fields = row_fields(layout);
    if rows.iter().all(Option::is_none) {
        // No row of the batch has this tuple (inserts' `before`, deletes' `after`): the
        // same all-NULL struct without building each column from NULL values.
        return Ok(arrow_array::new_null_array(
            &DataType::Struct(fields),
            rows.len(),
        ));
    }
    let children = layout
        .schema
        .columns
        .iter()
        .zip(&layout.wires)
        .enumerate()
        .map(|(j, (col, w))| {
            let column: Vec<&Value> = rows
                .iter()
                .map(|r| r.and_then(|r| r.values.get(j)).unwrap_or(&NULL))
                .collect();
            build(w, &column).map_err(|e| format!("{which} column {:?}: {e}", col.name))
        })
        .collect::<Res<Vec<_>>>()?;
    let valid = rows.iter().map(Option::is_some).collect();
    Ok(Arc::new(
        StructArray::try_new_with_length(fields, children, nulls(valid), rows.len())
            .map_err(err)?,
    ))
}

/// `n` empty lists of column names.
fn no_absent(n: usize) -> Res<ArrayRef> {
    let values = StringArray::from_iter_values(std::iter::empty::<&str>());
    list(DataType::Utf8, vec![0; n], Arc::new(values), vec![true; n])
}

fn absent_array(layout: &Layout<'_>, rows: &[Option<&Row>]) -> Res<ArrayRef> {
    if rows.iter().flatten().all(|r| r.absent.is_empty()) {
        // The common case: every list is empty.
        return no_absent(rows.len());
    }
    let names = rows
        .iter()
        .map(|r| r.map_or(Ok(Vec::new()), |r| layout.absent_names(r)))
        .collect::<Res<Vec<_>>>()?;
    let lengths: Vec<usize> = names.iter().map(Vec::len).collect();
    let values = StringArray::from_iter_values(names.iter().flatten());
    let valid = vec![true; rows.len()];
    list(DataType::Utf8, lengths, Arc::new(values), valid)
}

pub(crate) fn to_batch(layout: &Layout<'_>, changes: &[Change]) -> Res<RecordBatch> {
    let before: Vec<Option<&Row>> = changes.iter().map(|c| c.before.as_ref()).collect();
    let after: Vec<Option<&Row>> = changes.iter().map(|c| c.after.as_ref()).collect();
    for row in before.iter().chain(&after).flatten() {
        layout.check_row(row, "a")?;
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            changes.iter().map(|c| c.op.as_str()),
        )),
        Arc::new(PrimitiveArray::<UInt64Type>::from_iter_values(
            changes.iter().map(|c| c.commit_lsn),
        )),
        Arc::new(PrimitiveArray::<UInt64Type>::from_iter_values(
            changes.iter().map(|c| c.lsn),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                changes.iter().map(|c| c.commit_time_micros),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(PrimitiveArray::<UInt32Type>::from_iter_values(
            changes.iter().map(|c| c.xid),
        )),
        rows_array(layout, &before, "before")?,
        rows_array(layout, &after, "after")?,
        absent_array(layout, &before)?,
        absent_array(layout, &after)?,
    ];
    RecordBatch::try_new(Arc::new(arrow_schema(layout)), columns).map_err(err)
}

/// The record batch of `n` snapshot reads (op `read`, no `before`, nothing absent) at
/// `lsn` and `commit_time_micros`, whose `after` columns are `after` (one array per
/// column, built elsewhere): what [`to_batch`] gives for the same rows as [`Change`]s.
/// `schema` is the layout's [`arrow_schema`], built once by the caller.
pub(crate) fn read_batch(
    schema: &SchemaRef,
    n: usize,
    lsn: u64,
    commit_time_micros: i64,
    after: Vec<ArrayRef>,
) -> Res<RecordBatch> {
    let fields = match schema.field_with_name("after").map_err(err)?.data_type() {
        DataType::Struct(fields) => fields.clone(),
        other => {
            return Err(format!(
                "the layout's after column is a {other}, not a struct"
            ));
        }
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            Op::Read.as_str(),
            n,
        ))),
        Arc::new(PrimitiveArray::<UInt64Type>::from_value(lsn, n)),
        Arc::new(PrimitiveArray::<UInt64Type>::from_value(lsn, n)),
        Arc::new(TimestampMicrosecondArray::from_value(commit_time_micros, n).with_timezone("UTC")),
        Arc::new(PrimitiveArray::<UInt32Type>::from_value(0, n)),
        arrow_array::new_null_array(&DataType::Struct(fields.clone()), n),
        Arc::new(StructArray::try_new_with_length(fields, after, None, n).map_err(err)?),
        no_absent(n)?,
        no_absent(n)?,
    ];
    RecordBatch::try_new(schema.clone(), columns).map_err(err)
}

// ---------------------------------------------------------------------------------------
// reading arrays

fn expected(what: &str, a: &dyn Array) -> String {
    format!("expected {what}, payload has {}", a.data_type())
}

fn as_prim<T: ArrowPrimitiveType>(a: &dyn Array) -> Res<&PrimitiveArray<T>> {
    a.as_primitive_opt::<T>()
        .ok_or_else(|| expected(&T::DATA_TYPE.to_string(), a))
}

fn as_struct(a: &dyn Array, n: usize) -> Res<&StructArray> {
    let s = a.as_struct_opt().ok_or_else(|| expected("a struct", a))?;
    if s.num_columns() == n {
        Ok(s)
    } else {
        Err(format!(
            "expected a struct of {n} fields, payload has {}",
            a.data_type()
        ))
    }
}

fn as_str(a: &dyn Array, i: usize) -> Res<String> {
    Ok(a.as_string_opt::<i32>()
        .ok_or_else(|| expected("Utf8", a))?
        .value(i)
        .to_string())
}

fn as_list(a: &dyn Array) -> Res<&ListArray> {
    a.as_list_opt::<i32>().ok_or_else(|| expected("a list", a))
}

fn list_range(l: &ListArray, i: usize) -> std::ops::Range<usize> {
    let offsets = l.value_offsets();
    // Offsets are validated non-negative by ListArray.
    let start = usize::try_from(offsets[i]).unwrap_or(0);
    let end = usize::try_from(offsets[i + 1]).unwrap_or(0);
    start..end
}

pub(crate) fn read(w: &Wire, a: &dyn Array, i: usize) -> Res<Value> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match w {
        Wire::Bool => Value::Bool(
            a.as_boolean_opt()
                .ok_or_else(|| expected("Boolean", a))?
                .value(i),
        ),
        Wire::Int2 => Value::Int2(as_prim::<Int16Type>(a)?.value(i)),
        Wire::Int4 => Value::Int4(as_prim::<Int32Type>(a)?.value(i)),
        Wire::Int8 => Value::Int8(as_prim::<Int64Type>(a)?.value(i)),
        Wire::Money => Value::Money(as_prim::<Int64Type>(a)?.value(i)),
        Wire::Oid => Value::Oid(as_prim::<UInt32Type>(a)?.value(i)),
        Wire::Float4 => Value::Float4(as_prim::<Float32Type>(a)?.value(i)),
        Wire::Float8 => Value::Float8(as_prim::<Float64Type>(a)?.value(i)),
        Wire::Numeric => Value::Numeric(as_str(a, i)?),
        Wire::Str(kind) => kind.wrap(as_str(a, i)?),
        Wire::JsonDoc => Value::Json(as_str(a, i)?),
        Wire::PgText(ty) => super::from_pg_text(ty, &as_str(a, i)?)?,
        Wire::NumericF64 => super::f64_to_numeric(as_prim::<Float64Type>(a)?.value(i)),
        Wire::Decimal { scale, .. } => {
            super::decimal_to_numeric(as_prim::<Decimal128Type>(a)?.value(i), *scale)
        }
        Wire::Bin(kind) => kind.wrap(
            a.as_binary_opt::<i32>()
                .ok_or_else(|| expected("Binary", a))?
                .value(i)
                .to_vec(),
        ),
        Wire::Uuid => {
            let b = a
                .as_fixed_size_binary_opt()
                .ok_or_else(|| expected("FixedSizeBinary(16)", a))?
                .value(i);
            Value::Uuid(
                b.try_into()
                    .map_err(|_| format!("uuid has {} bytes, expected 16", b.len()))?,
            )
        }
        Wire::Date => Value::Date(as_prim::<Date32Type>(a)?.value(i)),
        Wire::Time => Value::Time(as_prim::<Time64MicrosecondType>(a)?.value(i)),
        Wire::Timestamp => Value::Timestamp(as_prim::<TimestampMicrosecondType>(a)?.value(i)),
        Wire::TimestampTz => Value::TimestampTz(as_prim::<TimestampMicrosecondType>(a)?.value(i)),
        Wire::TimeTz => {
            let s = as_struct(a, 2)?;
            Value::TimeTz {
                micros: as_prim::<Time64MicrosecondType>(s.column(0))?.value(i),
                offset_seconds: as_prim::<Int32Type>(s.column(1))?.value(i),
            }
        }
        Wire::Interval => {
            let s = as_struct(a, 3)?;
            Value::Interval {
                months: as_prim::<Int32Type>(s.column(0))?.value(i),
                days: as_prim::<Int32Type>(s.column(1))?.value(i),
                micros: as_prim::<Int64Type>(s.column(2))?.value(i),
            }
        }
        Wire::Inet => {
            let s = as_struct(a, 2)?;
            Value::Inet {
                addr: s
                    .column(0)
                    .as_binary_opt::<i32>()
                    .ok_or_else(|| expected("Binary", s.column(0)))?
                    .value(i)
                    .to_vec(),
                prefix: as_prim::<UInt8Type>(s.column(1))?.value(i),
            }
        }
        Wire::Composite(attrs) => {
            let s = as_struct(a, attrs.len())?;
            Value::Composite(
                attrs
                    .iter()
                    .enumerate()
                    .map(|(j, (name, aw))| {
                        read(aw, s.column(j), i).map_err(|e| format!("attribute {name:?}: {e}"))
                    })
                    .collect::<Res<_>>()?,
            )
        }
        Wire::Range(ew) => {
            let s = as_struct(a, 5)?;
            let flag = |j: usize| -> Res<bool> {
                let c = s.column(j);
                Ok(c.as_boolean_opt()
                    .ok_or_else(|| expected("Boolean", c))?
                    .value(i))
            };
            if flag(0)? {
                Value::Range(Box::new(RangeValue::Empty))
            } else {
                let bound = |j: usize| -> Res<Option<Value>> {
                    match read(ew, s.column(j), i)? {
                        Value::Null => Ok(None),
                        v => Ok(Some(v)),
                    }
                };
                Value::Range(Box::new(RangeValue::Bounds {
                    lower: bound(1)?,
                    upper: bound(2)?,
                    lower_inclusive: flag(3)?,
                    upper_inclusive: flag(4)?,
                }))
            }
        }
        Wire::Array(ew) => {
            let s = as_struct(a, 2)?;
            let dims_list = as_list(s.column(0))?;
            let dims_struct = as_struct(dims_list.values(), 2)?;
            let lens = as_prim::<Int32Type>(dims_struct.column(0))?;
            let lowers = as_prim::<Int32Type>(dims_struct.column(1))?;
            let dims = list_range(dims_list, i)
                .map(|k| (lens.value(k), lowers.value(k)))
                .collect();
            let elems_list = as_list(s.column(1))?;
            let values = elems_list.values();
            let elements = list_range(elems_list, i)
                .map(|k| read(ew, values, k).map_err(|e| format!("array element: {e}")))
                .collect::<Res<_>>()?;
            Value::Array { dims, elements }
        }
        Wire::Hstore => {
            let m: &MapArray = a.as_map_opt().ok_or_else(|| expected("a map", a))?;
            let keys = m
                .keys()
                .as_string_opt::<i32>()
                .ok_or_else(|| expected("Utf8 keys", m.keys()))?;
            let values = m
                .values()
                .as_string_opt::<i32>()
                .ok_or_else(|| expected("Utf8 values", m.values()))?;
            let offsets = m.value_offsets();
            let start = usize::try_from(offsets[i]).unwrap_or(0);
            let end = usize::try_from(offsets[i + 1]).unwrap_or(0);
            Value::Hstore(
                (start..end)
                    .map(|k| {
                        let v = (!values.is_null(k)).then(|| values.value(k).to_string());
                        (keys.value(k).to_string(), v)
                    })
                    .collect(),
            )
        }
        Wire::Vector => {
            let l = as_list(a)?;
            let xs = as_prim::<Float32Type>(l.values())?;
            Value::Vector(list_range(l, i).map(|k| xs.value(k)).collect())
        }
    })
}

fn read_row(
    layout: &Layout<'_>,
    rows: &StructArray,
    absent: &ListArray,
    i: usize,
    which: &str,
) -> Res<Option<Row>> {
    if rows.is_null(i) {
        return Ok(None);
    }
    let values = layout
        .schema
        .columns
        .iter()
        .zip(&layout.wires)
        .enumerate()
        .map(|(j, (col, w))| {
            read(w, rows.column(j), i).map_err(|e| format!("{which} column {:?}: {e}", col.name))
        })
        .collect::<Res<Vec<_>>>()?;
    let names = absent
        .values()
        .as_string_opt::<i32>()
        .ok_or_else(|| expected("a list of Utf8", absent))?;
    let names: Vec<&str> = list_range(absent, i).map(|k| names.value(k)).collect();
    Ok(Some(Row {
        values,
        absent: layout.absent_indexes(&names)?,
    }))
}

pub(crate) fn from_batch(layout: &Layout<'_>, batch: &RecordBatch) -> Res<Vec<Change>> {
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| format!("payload has no {name:?} column"))
    };
    let ops = col("op")?
        .as_string_opt::<i32>()
        .ok_or("\"op\" is not Utf8")?;
    let commit_lsn = as_prim::<UInt64Type>(col("commit_lsn")?)?;
    let lsn = as_prim::<UInt64Type>(col("lsn")?)?;
    let commit_time = as_prim::<TimestampMicrosecondType>(col("commit_time")?)?;
    let xid = as_prim::<UInt32Type>(col("xid")?)?;
    let n = layout.schema.columns.len();
    let before = as_struct(col("before")?, n)?;
    let after = as_struct(col("after")?, n)?;
    let before_absent = as_list(col("before_absent")?)?;
    let after_absent = as_list(col("after_absent")?)?;
    (0..batch.num_rows())
        .map(|i| {
            Ok(Change {
                op: parse_op(ops.value(i))?,
                commit_lsn: commit_lsn.value(i),
                lsn: lsn.value(i),
                commit_time_micros: commit_time.value(i),
                xid: xid.value(i),
                before: read_row(layout, before, before_absent, i, "before")?,
                after: read_row(layout, after, after_absent, i, "after")?,
            })
        })
        .collect()
}
