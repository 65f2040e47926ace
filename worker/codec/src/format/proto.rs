//! Protocol Buffers: a proto2 `FileDescriptorProto` is built per table schema (proto2 so
//! every optional field has presence: NULL is an unset field), changes are `DynamicMessage`s,
//! and the payload is one length-delimited [`WireBatch`] carrying the serialized
//! `FileDescriptorSet`, the JSON schema descriptor and the serialized change messages, so a
//! consumer decodes it without generated code.

use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, Kind, MessageDescriptor, ReflectMessage as _, Value as P,
};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, FieldDescriptorProto, FieldOptions, FileDescriptorProto, FileDescriptorSet,
};

use super::avro::field_names;
use super::{Layout, Res, Wire, mismatch, parse_op};
use crate::value::{Change, RangeValue, Row, Value};

/// The envelope of a Protobuf payload. Its own schema is fixed (see
/// `docs/wire-formats.md`); the change messages inside are described by
/// `file_descriptor_set`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireBatch {
    /// Qualified table name, `schema.table`.
    #[prost(string, tag = "1")]
    pub table: String,
    /// `TableSchema.version`.
    #[prost(uint32, tag = "2")]
    pub schema_version: u32,
    /// The JSON schema descriptor (columns with PostgreSQL type name, OID, typmod).
    #[prost(string, tag = "3")]
    pub schema_descriptor: String,
    /// Serialized `google.protobuf.FileDescriptorSet` describing the change message.
    #[prost(bytes = "vec", tag = "4")]
    pub file_descriptor_set: Vec<u8>,
    /// Full name of the change message in `file_descriptor_set`.
    #[prost(string, tag = "5")]
    pub change_message: String,
    /// Serialized change messages, in order.
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub changes: Vec<Vec<u8>>,
}

// ---------------------------------------------------------------------------------------
// descriptor

/// A protobuf identifier from any PostgreSQL name.
fn ident(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if clean.starts_with(|c: char| c.is_ascii_alphabetic()) {
        clean
    } else {
        format!("x{clean}")
    }
}

fn package(layout: &Layout<'_>) -> String {
    format!(
        "wallaby.{}.{}.v{}",
        ident(&layout.schema.schema),
        ident(&layout.schema.table),
        layout.schema.version
    )
}

struct Builder {
    package: String,
    messages: Vec<DescriptorProto>,
    counter: usize,
}

type FieldType = (Type, Option<String>);

fn field(
    name: &str,
    number: usize,
    label: Label,
    (ty, type_name): FieldType,
) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.to_string()),
        number: i32::try_from(number).ok(),
        label: Some(label as i32),
        r#type: Some(ty as i32),
        type_name,
        ..Default::default()
    }
}

impl Builder {
    /// Adds a message and returns its type reference.
    fn message(&mut self, kind: &str, fields: Vec<FieldDescriptorProto>) -> FieldType {
        self.counter += 1;
        let name = format!("{kind}{}", self.counter);
        self.named(name, fields)
    }

    fn named(&mut self, name: String, fields: Vec<FieldDescriptorProto>) -> FieldType {
        let full = format!(".{}.{name}", self.package);
        self.messages.push(DescriptorProto {
            name: Some(name),
            field: fields,
            ..Default::default()
        });
        (Type::Message, Some(full))
    }

    fn wire_type(&mut self, w: &Wire) -> FieldType {
        use Label::{Optional, Repeated};
        match w {
            Wire::Bool => (Type::Bool, None),
            Wire::Int2 | Wire::Int4 | Wire::Date => (Type::Int32, None),
            Wire::Int8 | Wire::Money | Wire::Time | Wire::Timestamp | Wire::TimestampTz => {
                (Type::Int64, None)
            }
            Wire::Oid => (Type::Uint32, None),
            Wire::Float4 => (Type::Float, None),
            Wire::Float8 | Wire::NumericF64 => (Type::Double, None),
            Wire::Numeric
            | Wire::Str(_)
            | Wire::PgText(_)
            | Wire::JsonDoc
            | Wire::Decimal { .. } => (Type::String, None),
            Wire::Bin(_) | Wire::Uuid => (Type::Bytes, None),
            Wire::TimeTz => self.message(
                "TimeTz",
                vec![
                    field("micros", 1, Optional, (Type::Int64, None)),
                    field("offset_seconds", 2, Optional, (Type::Int32, None)),
                ],
            ),
            Wire::Interval => self.message(
                "Interval",
                vec![
                    field("months", 1, Optional, (Type::Int32, None)),
                    field("days", 2, Optional, (Type::Int32, None)),
                    field("micros", 3, Optional, (Type::Int64, None)),
                ],
            ),
            Wire::Inet => self.message(
                "Inet",
                vec![
                    field("addr", 1, Optional, (Type::Bytes, None)),
                    field("prefix", 2, Optional, (Type::Uint32, None)),
                ],
            ),
            Wire::Composite(attrs) => {
                let names = field_names(attrs.iter().map(|(n, _)| n.as_str()));
                let fields = attrs
                    .iter()
                    .zip(names)
                    .enumerate()
                    .map(|(i, ((_, aw), name))| {
                        let t = self.wire_type(aw);
                        field(&name, i + 1, Optional, t)
                    })
                    .collect();
                self.message("Composite", fields)
            }
            Wire::Range(ew) => {
                let t = self.wire_type(ew);
                self.message(
                    "Range",
                    vec![
                        field("empty", 1, Optional, (Type::Bool, None)),
                        field("lower", 2, Optional, t.clone()),
                        field("upper", 3, Optional, t),
                        field("lower_inclusive", 4, Optional, (Type::Bool, None)),
                        field("upper_inclusive", 5, Optional, (Type::Bool, None)),
                    ],
                )
            }
            Wire::Array(ew) => {
                let t = self.wire_type(ew);
                let elem = self.message("Element", vec![field("value", 1, Optional, t)]);
                let dim = self.message(
                    "Dim",
                    vec![
                        field("len", 1, Optional, (Type::Int32, None)),
                        field("lower", 2, Optional, (Type::Int32, None)),
                    ],
                );
                self.message(
                    "Array",
                    vec![
                        field("dims", 1, Repeated, dim),
                        field("elements", 2, Repeated, elem),
                    ],
                )
            }
            Wire::Hstore => {
                let entry = self.message(
                    "HstoreEntry",
                    vec![
                        field("key", 1, Optional, (Type::String, None)),
                        field("value", 2, Optional, (Type::String, None)),
                    ],
                );
                self.message("Hstore", vec![field("entries", 1, Repeated, entry)])
            }
            Wire::Vector => {
                let mut values = field("values", 1, Repeated, (Type::Float, None));
                values.options = Some(FieldOptions {
                    packed: Some(true),
                    ..Default::default()
                });
                self.message("Vector", vec![values])
            }
        }
    }
}

/// The descriptor set and the change message's full name.
fn descriptor_set(layout: &Layout<'_>) -> (FileDescriptorSet, String) {
    use Label::{Optional, Repeated};
    let package = package(layout);
    let mut b = Builder {
        package: package.clone(),
        messages: Vec::new(),
        counter: 0,
    };
    let names = field_names(layout.schema.columns.iter().map(|c| c.name.as_str()));
    let columns = layout
        .wires
        .iter()
        .zip(&names)
        .enumerate()
        .map(|(i, (w, name))| {
            let t = b.wire_type(w);
            field(name, i + 1, Optional, t)
        })
        .collect();
    let row = b.named("Row".into(), columns);
    let change = vec![
        field("op", 1, Optional, (Type::String, None)),
        field("commit_lsn", 2, Optional, (Type::Uint64, None)),
        field("lsn", 3, Optional, (Type::Uint64, None)),
        field("commit_time_micros", 4, Optional, (Type::Int64, None)),
        field("xid", 5, Optional, (Type::Uint32, None)),
        field("before", 6, Optional, row.clone()),
        field("after", 7, Optional, row),
        field("before_absent", 8, Repeated, (Type::String, None)),
        field("after_absent", 9, Repeated, (Type::String, None)),
    ];
    b.named("Change".into(), change);
    let file = FileDescriptorProto {
        name: Some(format!("{}.proto", package.replace('.', "/"))),
        package: Some(package.clone()),
        message_type: b.messages,
        syntax: Some("proto2".into()),
        ..Default::default()
    };
    (
        FileDescriptorSet { file: vec![file] },
        format!("{package}.Change"),
    )
}

fn change_descriptor(fds: &[u8], name: &str) -> Res<MessageDescriptor> {
    let pool = DescriptorPool::decode(fds).map_err(|e| format!("bad descriptor set: {e}"))?;
    pool.get_message_by_name(name)
        .ok_or_else(|| format!("descriptor set has no message {name:?}"))
}

// ---------------------------------------------------------------------------------------
// encode

fn set(msg: &mut DynamicMessage, number: usize, value: P) -> Res<()> {
    let fd = u32::try_from(number)
        .ok()
        .and_then(|n| msg.descriptor().get_field(n))
        .ok_or_else(|| format!("message {} has no field {number}", msg.descriptor().name()))?;
    msg.try_set_field(&fd, value)
        .map_err(|e| format!("field {}: {e}", fd.name()))
}

fn child(msg: &DynamicMessage, number: usize) -> Res<Kind> {
    u32::try_from(number)
        .ok()
        .and_then(|n| msg.descriptor().get_field(n))
        .map(|fd| fd.kind())
        .ok_or_else(|| format!("message {} has no field {number}", msg.descriptor().name()))
}

/// Sets field `number` to `v` unless `v` is NULL (an unset field).
fn set_value(msg: &mut DynamicMessage, number: usize, w: &Wire, v: &Value) -> Res<()> {
    if matches!(v, Value::Null) {
        return Ok(());
    }
    let kind = child(msg, number)?;
    match to_proto(w, v, &kind)? {
        Some(p) => set(msg, number, p),
        None => Ok(()),
    }
}

fn new_message(kind: &Kind) -> Res<DynamicMessage> {
    kind.as_message()
        .map(|md| DynamicMessage::new(md.clone()))
        .ok_or_else(|| format!("expected a message field, descriptor has {kind:?}"))
}

/// `None` when the value travels as an unset field (decimal NaN).
fn to_proto(w: &Wire, v: &Value, kind: &Kind) -> Res<Option<P>> {
    Ok(Some(match (w, v) {
        (Wire::Bool, Value::Bool(b)) => P::Bool(*b),
        (Wire::Int2, Value::Int2(i)) => P::I32(i32::from(*i)),
        (Wire::Int4, Value::Int4(i)) | (Wire::Date, Value::Date(i)) => P::I32(*i),
        (Wire::Int8, Value::Int8(i))
        | (Wire::Money, Value::Money(i))
        | (Wire::Time, Value::Time(i))
        | (Wire::Timestamp, Value::Timestamp(i))
        | (Wire::TimestampTz, Value::TimestampTz(i)) => P::I64(*i),
        (Wire::Oid, Value::Oid(i)) => P::U32(*i),
        (Wire::Float4, Value::Float4(x)) => P::F32(*x),
        (Wire::Float8, Value::Float8(x)) => P::F64(*x),
        (Wire::Numeric, Value::Numeric(s)) | (Wire::JsonDoc, Value::Json(s)) => {
            P::String(s.clone())
        }
        (Wire::Str(kind), v) => P::String(kind.unwrap(v).ok_or_else(|| mismatch(w, v))?.into()),
        (Wire::PgText(ty), v) => P::String(super::pg_text(ty, v)),
        (Wire::NumericF64, Value::Numeric(s)) => P::F64(super::numeric_to_f64(s)?),
        (Wire::Decimal { precision, scale }, Value::Numeric(s)) => {
            match super::numeric_to_decimal(s, *precision, *scale)? {
                Some(unscaled) => P::String(super::decimal_text(unscaled, *scale)),
                None => return Ok(None),
            }
        }
        (Wire::Bin(k), v) => P::Bytes(k.unwrap(v).ok_or_else(|| mismatch(w, v))?.to_vec().into()),
        (Wire::Uuid, Value::Uuid(u)) => P::Bytes(u.to_vec().into()),
        (
            Wire::TimeTz,
            Value::TimeTz {
                micros,
                offset_seconds,
            },
        ) => {
            let mut m = new_message(kind)?;
            set(&mut m, 1, P::I64(*micros))?;
            set(&mut m, 2, P::I32(*offset_seconds))?;
            P::Message(m)
        }
        (
            Wire::Interval,
            Value::Interval {
                months,
                days,
                micros,
            },
        ) => {
            let mut m = new_message(kind)?;
            set(&mut m, 1, P::I32(*months))?;
            set(&mut m, 2, P::I32(*days))?;
            set(&mut m, 3, P::I64(*micros))?;
            P::Message(m)
        }
        (Wire::Inet, Value::Inet { addr, prefix }) => {
            let mut m = new_message(kind)?;
            set(&mut m, 1, P::Bytes(addr.clone().into()))?;
            set(&mut m, 2, P::U32(u32::from(*prefix)))?;
            P::Message(m)
        }
        (Wire::Composite(attrs), Value::Composite(fields)) => {
            if attrs.len() != fields.len() {
                return Err(format!(
                    "composite has {} fields, its type has {} attributes",
                    fields.len(),
                    attrs.len()
                ));
            }
            let mut m = new_message(kind)?;
            for (i, ((name, aw), f)) in attrs.iter().zip(fields).enumerate() {
                set_value(&mut m, i + 1, aw, f).map_err(|e| format!("attribute {name:?}: {e}"))?;
            }
            P::Message(m)
        }
        (Wire::Range(ew), Value::Range(r)) => {
            let mut m = new_message(kind)?;
            match r.as_ref() {
                RangeValue::Empty => set(&mut m, 1, P::Bool(true))?,
                RangeValue::Bounds {
                    lower,
                    upper,
                    lower_inclusive,
                    upper_inclusive,
                } => {
                    set(&mut m, 1, P::Bool(false))?;
                    if let Some(lower) = lower {
                        set_value(&mut m, 2, ew, lower)?;
                    }
                    if let Some(upper) = upper {
                        set_value(&mut m, 3, ew, upper)?;
                    }
                    set(&mut m, 4, P::Bool(*lower_inclusive))?;
                    set(&mut m, 5, P::Bool(*upper_inclusive))?;
                }
            }
            P::Message(m)
        }
        (Wire::Array(ew), Value::Array { dims, elements }) => {
            let mut m = new_message(kind)?;
            let dim_kind = child(&m, 1)?;
            let elem_kind = child(&m, 2)?;
            let dims = dims
                .iter()
                .map(|(len, lower)| {
                    let mut d = new_message(&dim_kind)?;
                    set(&mut d, 1, P::I32(*len))?;
                    set(&mut d, 2, P::I32(*lower))?;
                    Ok(P::Message(d))
                })
                .collect::<Res<Vec<_>>>()?;
            let elements = elements
                .iter()
                .map(|e| {
                    let mut em = new_message(&elem_kind)?;
                    set_value(&mut em, 1, ew, e).map_err(|e| format!("array element: {e}"))?;
                    Ok(P::Message(em))
                })
                .collect::<Res<Vec<_>>>()?;
            set(&mut m, 1, P::List(dims))?;
            set(&mut m, 2, P::List(elements))?;
            P::Message(m)
        }
        (Wire::Hstore, Value::Hstore(pairs)) => {
            let mut m = new_message(kind)?;
            let entry_kind = child(&m, 1)?;
            let entries = pairs
                .iter()
                .map(|(k, v)| {
                    let mut e = new_message(&entry_kind)?;
                    set(&mut e, 1, P::String(k.clone()))?;
                    if let Some(v) = v {
                        set(&mut e, 2, P::String(v.clone()))?;
                    }
                    Ok(P::Message(e))
                })
                .collect::<Res<Vec<_>>>()?;
            set(&mut m, 1, P::List(entries))?;
            P::Message(m)
        }
        (Wire::Vector, Value::Vector(xs)) => {
            let mut m = new_message(kind)?;
            set(&mut m, 1, P::List(xs.iter().map(|x| P::F32(*x)).collect()))?;
            P::Message(m)
        }
        (w, v) => return Err(mismatch(w, v)),
    }))
}

fn row_message(layout: &Layout<'_>, kind: &Kind, row: &Row, which: &str) -> Res<P> {
    layout.check_row(row, which)?;
    let mut m = new_message(kind)?;
    for (i, ((col, w), v)) in layout
        .schema
        .columns
        .iter()
        .zip(&layout.wires)
        .zip(&row.values)
        .enumerate()
    {
        set_value(&mut m, i + 1, w, v)
            .map_err(|e| format!("{which} column {:?}: {e}", col.name))?;
    }
    Ok(P::Message(m))
}

fn change_message(layout: &Layout<'_>, desc: &MessageDescriptor, c: &Change) -> Res<Vec<u8>> {
    let mut m = DynamicMessage::new(desc.clone());
    set(&mut m, 1, P::String(c.op.as_str().into()))?;
    set(&mut m, 2, P::U64(c.commit_lsn))?;
    set(&mut m, 3, P::U64(c.lsn))?;
    set(&mut m, 4, P::I64(c.commit_time_micros))?;
    set(&mut m, 5, P::U32(c.xid))?;
    let row_kind = child(&m, 6)?;
    for (number, absent_number, row, which) in
        [(6, 8, &c.before, "before"), (7, 9, &c.after, "after")]
    {
        if let Some(row) = row {
            let p = row_message(layout, &row_kind, row, which)?;
            set(&mut m, number, p)?;
            let names = layout.absent_names(row)?;
            set(
                &mut m,
                absent_number,
                P::List(names.into_iter().map(|n| P::String(n.into())).collect()),
            )?;
        }
    }
    Ok(m.encode_to_vec())
}

pub(crate) fn encode(layout: &Layout<'_>, changes: &[Change]) -> Res<Vec<u8>> {
    let (fds, name) = descriptor_set(layout);
    let fds = fds.encode_to_vec();
    let desc = change_descriptor(&fds, &name)?;
    let changes = changes
        .iter()
        .enumerate()
        .map(|(n, c)| change_message(layout, &desc, c).map_err(|e| format!("change {n}: {e}")))
        .collect::<Res<Vec<_>>>()?;
    let batch = WireBatch {
        table: layout.table(),
        schema_version: layout.schema.version,
        schema_descriptor: layout.descriptor().to_string(),
        file_descriptor_set: fds,
        change_message: name,
        changes,
    };
    Ok(batch.encode_length_delimited_to_vec())
}

// ---------------------------------------------------------------------------------------
// decode

fn field_of(m: &DynamicMessage, number: usize) -> Res<Option<P>> {
    let fd = u32::try_from(number)
        .ok()
        .and_then(|n| m.descriptor().get_field(n))
        .ok_or_else(|| format!("message {} has no field {number}", m.descriptor().name()))?;
    Ok(m.has_field(&fd).then(|| m.get_field(&fd).into_owned()))
}

fn required(m: &DynamicMessage, number: usize) -> Res<P> {
    field_of(m, number)?
        .ok_or_else(|| format!("message {} lacks field {number}", m.descriptor().name()))
}

fn list_of(m: &DynamicMessage, number: usize) -> Res<Vec<P>> {
    match field_of(m, number)? {
        None => Ok(Vec::new()),
        Some(P::List(items)) => Ok(items),
        Some(other) => Err(got("a repeated field", &other)),
    }
}

fn got(what: &str, p: &P) -> String {
    let shown: String = format!("{p:?}").chars().take(80).collect();
    format!("expected {what}, payload has {shown}")
}

fn i32_of(p: &P) -> Res<i32> {
    p.as_i32().ok_or_else(|| got("int32", p))
}

fn i64_of(p: &P) -> Res<i64> {
    p.as_i64().ok_or_else(|| got("int64", p))
}

fn bool_of(p: &P) -> Res<bool> {
    p.as_bool().ok_or_else(|| got("bool", p))
}

fn string_of(p: &P) -> Res<String> {
    p.as_str()
        .map(str::to_string)
        .ok_or_else(|| got("string", p))
}

fn bytes_of(p: &P) -> Res<Vec<u8>> {
    p.as_bytes()
        .map(|b| b.to_vec())
        .ok_or_else(|| got("bytes", p))
}

fn message_of(p: &P) -> Res<&DynamicMessage> {
    p.as_message().ok_or_else(|| got("a message", p))
}

fn get_value(m: &DynamicMessage, number: usize, w: &Wire) -> Res<Value> {
    match field_of(m, number)? {
        None => Ok(Value::Null),
        Some(p) => from_proto(w, &p),
    }
}

fn from_proto(w: &Wire, p: &P) -> Res<Value> {
    Ok(match w {
        Wire::Bool => Value::Bool(bool_of(p)?),
        Wire::Int2 => Value::Int2(i16::try_from(i32_of(p)?).map_err(|_| got("int2", p))?),
        Wire::Int4 => Value::Int4(i32_of(p)?),
        Wire::Date => Value::Date(i32_of(p)?),
        Wire::Int8 => Value::Int8(i64_of(p)?),
        Wire::Money => Value::Money(i64_of(p)?),
        Wire::Time => Value::Time(i64_of(p)?),
        Wire::Timestamp => Value::Timestamp(i64_of(p)?),
        Wire::TimestampTz => Value::TimestampTz(i64_of(p)?),
        Wire::Oid => Value::Oid(p.as_u32().ok_or_else(|| got("uint32", p))?),
        Wire::Float4 => Value::Float4(p.as_f32().ok_or_else(|| got("float", p))?),
        Wire::Float8 => Value::Float8(p.as_f64().ok_or_else(|| got("double", p))?),
        Wire::NumericF64 => super::f64_to_numeric(p.as_f64().ok_or_else(|| got("double", p))?),
        Wire::Numeric | Wire::Decimal { .. } => Value::Numeric(string_of(p)?),
        Wire::JsonDoc => Value::Json(string_of(p)?),
        Wire::Str(kind) => kind.wrap(string_of(p)?),
        Wire::PgText(ty) => super::from_pg_text(ty, &string_of(p)?)?,
        Wire::Bin(kind) => kind.wrap(bytes_of(p)?),
        Wire::Uuid => Value::Uuid(
            bytes_of(p)?
                .try_into()
                .map_err(|_| got("a 16-byte uuid", p))?,
        ),
        Wire::TimeTz => {
            let m = message_of(p)?;
            Value::TimeTz {
                micros: i64_of(&required(m, 1)?)?,
                offset_seconds: i32_of(&required(m, 2)?)?,
            }
        }
        Wire::Interval => {
            let m = message_of(p)?;
            Value::Interval {
                months: i32_of(&required(m, 1)?)?,
                days: i32_of(&required(m, 2)?)?,
                micros: i64_of(&required(m, 3)?)?,
            }
        }
        Wire::Inet => {
            let m = message_of(p)?;
            let prefix = required(m, 2)?;
            Value::Inet {
                addr: bytes_of(&required(m, 1)?)?,
                prefix: prefix
                    .as_u32()
                    .and_then(|x| u8::try_from(x).ok())
                    .ok_or_else(|| got("a prefix length", &prefix))?,
            }
        }
        Wire::Composite(attrs) => {
            let m = message_of(p)?;
            Value::Composite(
                attrs
                    .iter()
                    .enumerate()
                    .map(|(i, (name, aw))| {
                        get_value(m, i + 1, aw).map_err(|e| format!("attribute {name:?}: {e}"))
                    })
                    .collect::<Res<_>>()?,
            )
        }
        Wire::Range(ew) => {
            let m = message_of(p)?;
            if bool_of(&required(m, 1)?)? {
                Value::Range(Box::new(RangeValue::Empty))
            } else {
                let bound = |n: usize| -> Res<Option<Value>> {
                    match get_value(m, n, ew)? {
                        Value::Null => Ok(None),
                        v => Ok(Some(v)),
                    }
                };
                Value::Range(Box::new(RangeValue::Bounds {
                    lower: bound(2)?,
                    upper: bound(3)?,
                    lower_inclusive: bool_of(&required(m, 4)?)?,
                    upper_inclusive: bool_of(&required(m, 5)?)?,
                }))
            }
        }
        Wire::Array(ew) => {
            let m = message_of(p)?;
            let dims = list_of(m, 1)?
                .iter()
                .map(|d| {
                    let d = message_of(d)?;
                    Ok((i32_of(&required(d, 1)?)?, i32_of(&required(d, 2)?)?))
                })
                .collect::<Res<_>>()?;
            let elements = list_of(m, 2)?
                .iter()
                .map(|e| {
                    get_value(message_of(e)?, 1, ew).map_err(|e| format!("array element: {e}"))
                })
                .collect::<Res<_>>()?;
            Value::Array { dims, elements }
        }
        Wire::Hstore => Value::Hstore(
            list_of(message_of(p)?, 1)?
                .iter()
                .map(|e| {
                    let e = message_of(e)?;
                    let value = field_of(e, 2)?.map(|v| string_of(&v)).transpose()?;
                    Ok((string_of(&required(e, 1)?)?, value))
                })
                .collect::<Res<_>>()?,
        ),
        Wire::Vector => Value::Vector(
            list_of(message_of(p)?, 1)?
                .iter()
                .map(|x| x.as_f32().ok_or_else(|| got("float", x)))
                .collect::<Res<_>>()?,
        ),
    })
}

fn row_of(
    layout: &Layout<'_>,
    m: &DynamicMessage,
    number: usize,
    absent: usize,
    which: &str,
) -> Res<Option<Row>> {
    let Some(row) = field_of(m, number)? else {
        return Ok(None);
    };
    let row = message_of(&row)?;
    let values = layout
        .schema
        .columns
        .iter()
        .zip(&layout.wires)
        .enumerate()
        .map(|(i, (col, w))| {
            get_value(row, i + 1, w).map_err(|e| format!("{which} column {:?}: {e}", col.name))
        })
        .collect::<Res<Vec<_>>>()?;
    let names = list_of(m, absent)?
        .iter()
        .map(string_of)
        .collect::<Res<Vec<_>>>()?;
    Ok(Some(Row {
        values,
        absent: layout.absent_indexes(&names)?,
    }))
}

/// Decodes one payload, or several length-delimited `WireBatch`es appended one after the
/// other.
pub(crate) fn decode(layout: &Layout<'_>, payload: &[u8]) -> Res<Vec<Change>> {
    let mut buf = payload;
    let mut changes = Vec::new();
    let mut batches = 0usize;
    while !buf.is_empty() || batches == 0 {
        let batch = WireBatch::decode_length_delimited(&mut buf)
            .map_err(|e| format!("batch {batches}: not a length-delimited WireBatch: {e}"))?;
        changes.extend(decode_batch(layout, &batch).map_err(|e| {
            if batches == 0 {
                e
            } else {
                format!("batch {batches}: {e}")
            }
        })?);
        batches += 1;
    }
    Ok(changes)
}

fn decode_batch(layout: &Layout<'_>, batch: &WireBatch) -> Res<Vec<Change>> {
    let descriptor: serde_json::Value = serde_json::from_str(&batch.schema_descriptor)
        .map_err(|e| format!("schema_descriptor is not JSON: {e}"))?;
    layout.check_descriptor(&descriptor)?;
    if batch.table != layout.table() || batch.schema_version != layout.schema.version {
        return Err(format!(
            "batch is for {} schema version {}, expected {} schema version {}",
            batch.table,
            batch.schema_version,
            layout.table(),
            layout.schema.version
        ));
    }
    let desc = change_descriptor(&batch.file_descriptor_set, &batch.change_message)?;
    batch
        .changes
        .iter()
        .enumerate()
        .map(|(n, bytes)| {
            let m = DynamicMessage::decode(desc.clone(), bytes.as_slice())
                .map_err(|e| format!("change {n}: {e}"))?;
            let change = (|| {
                Ok(Change {
                    op: parse_op(&string_of(&required(&m, 1)?)?)?,
                    commit_lsn: required(&m, 2)?
                        .as_u64()
                        .ok_or("commit_lsn is not uint64")?,
                    lsn: required(&m, 3)?.as_u64().ok_or("lsn is not uint64")?,
                    commit_time_micros: i64_of(&required(&m, 4)?)?,
                    xid: required(&m, 5)?.as_u32().ok_or("xid is not uint32")?,
                    before: row_of(layout, &m, 6, 8, "before")?,
                    after: row_of(layout, &m, 7, 9, "after")?,
                })
            })();
            change.map_err(|e: String| format!("change {n}: {e}"))
        })
        .collect()
}

pub(crate) fn descriptor(payload: &[u8]) -> Res<serde_json::Value> {
    let batch = WireBatch::decode_length_delimited(payload)
        .map_err(|e| format!("not a length-delimited WireBatch: {e}"))?;
    serde_json::from_str(&batch.schema_descriptor)
        .map_err(|e| format!("schema_descriptor is not JSON: {e}"))
}
