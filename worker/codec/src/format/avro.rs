//! Avro: an object container file whose writer schema is derived from the table (records for
//! structures, `["null", T]` unions for every nullable value, logical types where they are
//! exact). The file metadata `wallaby.schema` carries the schema descriptor.

use std::collections::HashSet;

use apache_avro::types::Value as A;
use apache_avro::{Decimal, Reader, Schema, Uuid, Writer};
use serde_json::{Value as J, json};

use super::{Layout, Res, Wire, mismatch, parse_op};
use crate::value::{Change, RangeValue, Row, Value};

/// File metadata key holding the JSON schema descriptor.
const SCHEMA_KEY: &str = "wallaby.schema";

// ---------------------------------------------------------------------------------------
// schema

/// Avro names are `[A-Za-z_][A-Za-z0-9_]*`; PostgreSQL names are not. A valid, unused name is
/// kept; anything else becomes `_<position>_<name with invalid characters as _>`. The real
/// name travels in the field's `pg.name` attribute.
pub(crate) fn field_names<'n>(names: impl Iterator<Item = &'n str>) -> Vec<String> {
    let mut seen = HashSet::new();
    names
        .enumerate()
        .map(|(i, name)| {
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let out = if valid && !seen.contains(name) && !name.starts_with('_') {
                name.to_string()
            } else {
                let clean: String = name
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect();
                format!("_{i}_{clean}")
            };
            seen.insert(out.clone());
            out
        })
        .collect()
}

/// Unique names for the record types of one writer schema.
#[derive(Default)]
struct Names(usize);

impl Names {
    fn next(&mut self, kind: &str) -> String {
        self.0 += 1;
        format!("{kind}_{}", self.0)
    }
}

fn nullable(t: J) -> J {
    json!(["null", t])
}

fn record(names: &mut Names, kind: &str, fields: Vec<J>) -> J {
    json!({"type": "record", "name": names.next(kind), "fields": fields})
}

fn field(name: &str, t: J) -> J {
    json!({"name": name, "type": t})
}

fn avro_type(w: &Wire, names: &mut Names) -> J {
    match w {
        Wire::Bool => json!("boolean"),
        Wire::Int2 | Wire::Int4 => json!("int"),
        Wire::Int8 | Wire::Money | Wire::Oid => json!("long"),
        Wire::Float4 => json!("float"),
        Wire::Float8 | Wire::NumericF64 => json!("double"),
        Wire::Numeric | Wire::Str(_) | Wire::PgText(_) | Wire::JsonDoc => json!("string"),
        Wire::Bin(_) => json!("bytes"),
        Wire::Uuid => json!({"type": "string", "logicalType": "uuid"}),
        Wire::Date => json!({"type": "int", "logicalType": "date"}),
        Wire::Time => json!({"type": "long", "logicalType": "time-micros"}),
        Wire::Timestamp => json!({"type": "long", "logicalType": "local-timestamp-micros"}),
        Wire::TimestampTz => json!({"type": "long", "logicalType": "timestamp-micros"}),
        Wire::TimeTz => record(
            names,
            "TimeTz",
            vec![
                field(
                    "micros",
                    json!({"type": "long", "logicalType": "time-micros"}),
                ),
                field("offset_seconds", json!("int")),
            ],
        ),
        Wire::Interval => record(
            names,
            "Interval",
            vec![
                field("months", json!("int")),
                field("days", json!("int")),
                field("micros", json!("long")),
            ],
        ),
        Wire::Inet => record(
            names,
            "Inet",
            vec![field("addr", json!("bytes")), field("prefix", json!("int"))],
        ),
        Wire::Composite(attrs) => {
            let fields = field_names(attrs.iter().map(|(n, _)| n.as_str()))
                .into_iter()
                .zip(attrs)
                .map(|(avro_name, (name, aw))| {
                    json!({"name": avro_name, "type": nullable(avro_type(aw, names)), "pg.name": name})
                })
                .collect();
            record(names, "Composite", fields)
        }
        Wire::Range(ew) => {
            let et = avro_type(ew, names);
            // The upper bound reuses the record types the lower bound defined.
            let et_ref = type_ref(&et);
            record(
                names,
                "Range",
                vec![
                    field("empty", json!("boolean")),
                    field("lower", nullable(et)),
                    field("upper", nullable(et_ref)),
                    field("lower_inclusive", json!("boolean")),
                    field("upper_inclusive", json!("boolean")),
                ],
            )
        }
        Wire::Array(ew) => {
            let dim = record(
                names,
                "Dim",
                vec![field("len", json!("int")), field("lower", json!("int"))],
            );
            let elem = nullable(avro_type(ew, names));
            record(
                names,
                "Array",
                vec![
                    field("dims", json!({"type": "array", "items": dim})),
                    field("elements", json!({"type": "array", "items": elem})),
                ],
            )
        }
        Wire::Hstore => {
            let entry = record(
                names,
                "HstoreEntry",
                vec![
                    field("key", json!("string")),
                    field("value", nullable(json!("string"))),
                ],
            );
            json!({"type": "array", "items": entry})
        }
        Wire::Vector => json!({"type": "array", "items": "float"}),
        Wire::Decimal { precision, scale } => {
            json!({"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale})
        }
    }
}

/// A named type is defined once; later uses refer to it by name.
fn type_ref(t: &J) -> J {
    match t.get("type").and_then(J::as_str) {
        Some("record") => t.get("name").cloned().unwrap_or(J::Null),
        Some("array") => {
            let items = t.get("items").map(type_ref).unwrap_or(J::Null);
            json!({"type": "array", "items": items})
        }
        _ => t.clone(),
    }
}

fn writer_schema(layout: &Layout<'_>) -> Res<Schema> {
    let mut names = Names::default();
    let avro_names = field_names(layout.schema.columns.iter().map(|c| c.name.as_str()));
    let columns: Vec<J> = layout
        .schema
        .columns
        .iter()
        .zip(&layout.wires)
        .zip(&avro_names)
        .map(|((col, w), avro_name)| {
            // `default: null` lets a reader holding a later version (with this column added)
            // resolve records written before it: Avro's backward-compatible evolution.
            let mut f = json!({
                "name": avro_name,
                "type": nullable(avro_type(w, &mut names)),
                "default": null,
                "pg.name": col.name,
                "pg.type": col.ty.name,
                "pg.oid": col.ty.oid,
                "pg.typmod": col.ty.typmod,
                "pg.key": col.key,
            });
            if let Some(m) = &col.mapped_type {
                f["pg.mapped_type"] = m.clone().into();
            }
            f
        })
        .collect();
    let row = json!({"type": "record", "name": "Row", "fields": columns});
    let absent = json!({"type": "array", "items": "string"});
    let schema = json!({
        "type": "record",
        "name": "Change",
        "namespace": "wallaby",
        "doc": format!("changes of {} (schema version {})", layout.table(), layout.schema.version),
        "wallaby.table": layout.table(),
        "wallaby.schema_version": layout.schema.version,
        "fields": [
            field("op", json!("string")),
            field("commit_lsn", json!("long")),
            field("lsn", json!("long")),
            field("commit_time", json!({"type": "long", "logicalType": "timestamp-micros"})),
            field("xid", json!("long")),
            field("before", nullable(row)),
            field("after", nullable(json!("Row"))),
            field("before_absent", absent.clone()),
            field("after_absent", absent),
        ],
    });
    Schema::parse(&schema).map_err(|e| format!("cannot build the Avro writer schema: {e}"))
}

// ---------------------------------------------------------------------------------------
// encode

fn some(v: A) -> A {
    A::Union(1, Box::new(v))
}

fn none() -> A {
    A::Union(0, Box::new(A::Null))
}

fn opt(w: &Wire, v: &Value) -> Res<A> {
    match v {
        Value::Null => Ok(none()),
        v => to_avro(w, v).map(|a| match a {
            // decimal(p,s) turns NaN/±Infinity into NULL.
            A::Null => none(),
            a => some(a),
        }),
    }
}

fn to_avro(w: &Wire, v: &Value) -> Res<A> {
    Ok(match (w, v) {
        (Wire::Bool, Value::Bool(b)) => A::Boolean(*b),
        (Wire::Int2, Value::Int2(i)) => A::Int(i32::from(*i)),
        (Wire::Int4, Value::Int4(i)) => A::Int(*i),
        (Wire::Int8, Value::Int8(i)) | (Wire::Money, Value::Money(i)) => A::Long(*i),
        (Wire::Oid, Value::Oid(i)) => A::Long(i64::from(*i)),
        (Wire::Float4, Value::Float4(x)) => A::Float(*x),
        (Wire::Float8, Value::Float8(x)) => A::Double(*x),
        (Wire::Numeric, Value::Numeric(s)) | (Wire::JsonDoc, Value::Json(s)) => {
            A::String(s.clone())
        }
        (Wire::Str(kind), v) => A::String(kind.unwrap(v).ok_or_else(|| mismatch(w, v))?.into()),
        (Wire::PgText(ty), v) => A::String(super::pg_text(ty, v)),
        (Wire::NumericF64, Value::Numeric(s)) => A::Double(super::numeric_to_f64(s)?),
        (Wire::Decimal { precision, scale }, Value::Numeric(s)) => {
            match super::numeric_to_decimal(s, *precision, *scale)? {
                Some(unscaled) => A::Decimal(Decimal::from(unscaled.to_be_bytes())),
                None => A::Null,
            }
        }
        (Wire::Bin(kind), v) => A::Bytes(kind.unwrap(v).ok_or_else(|| mismatch(w, v))?.to_vec()),
        (Wire::Uuid, Value::Uuid(u)) => A::Uuid(Uuid::from_bytes(*u)),
        (Wire::Date, Value::Date(d)) => A::Date(*d),
        (Wire::Time, Value::Time(t)) => A::TimeMicros(*t),
        (Wire::Timestamp, Value::Timestamp(t)) => A::LocalTimestampMicros(*t),
        (Wire::TimestampTz, Value::TimestampTz(t)) => A::TimestampMicros(*t),
        (
            Wire::TimeTz,
            Value::TimeTz {
                micros,
                offset_seconds,
            },
        ) => A::Record(vec![
            ("micros".into(), A::TimeMicros(*micros)),
            ("offset_seconds".into(), A::Int(*offset_seconds)),
        ]),
        (
            Wire::Interval,
            Value::Interval {
                months,
                days,
                micros,
            },
        ) => A::Record(vec![
            ("months".into(), A::Int(*months)),
            ("days".into(), A::Int(*days)),
            ("micros".into(), A::Long(*micros)),
        ]),
        (Wire::Inet, Value::Inet { addr, prefix }) => A::Record(vec![
            ("addr".into(), A::Bytes(addr.clone())),
            ("prefix".into(), A::Int(i32::from(*prefix))),
        ]),
        (Wire::Composite(attrs), Value::Composite(fields)) => {
            if attrs.len() != fields.len() {
                return Err(format!(
                    "composite has {} fields, its type has {} attributes",
                    fields.len(),
                    attrs.len()
                ));
            }
            let avro_names = field_names(attrs.iter().map(|(n, _)| n.as_str()));
            A::Record(
                attrs
                    .iter()
                    .zip(fields)
                    .zip(avro_names)
                    .map(|(((name, aw), f), avro_name)| {
                        Ok((
                            avro_name,
                            opt(aw, f).map_err(|e| format!("attribute {name:?}: {e}"))?,
                        ))
                    })
                    .collect::<Res<_>>()?,
            )
        }
        (Wire::Range(ew), Value::Range(r)) => {
            let (empty, lower, upper, li, ui) = match r.as_ref() {
                RangeValue::Empty => (true, none(), none(), false, false),
                RangeValue::Bounds {
                    lower,
                    upper,
                    lower_inclusive,
                    upper_inclusive,
                } => {
                    let bound = |b: &Option<Value>| b.as_ref().map_or(Ok(none()), |b| opt(ew, b));
                    (
                        false,
                        bound(lower)?,
                        bound(upper)?,
                        *lower_inclusive,
                        *upper_inclusive,
                    )
                }
            };
            A::Record(vec![
                ("empty".into(), A::Boolean(empty)),
                ("lower".into(), lower),
                ("upper".into(), upper),
                ("lower_inclusive".into(), A::Boolean(li)),
                ("upper_inclusive".into(), A::Boolean(ui)),
            ])
        }
        (Wire::Array(ew), Value::Array { dims, elements }) => A::Record(vec![
            (
                "dims".into(),
                A::Array(
                    dims.iter()
                        .map(|(len, lower)| {
                            A::Record(vec![
                                ("len".into(), A::Int(*len)),
                                ("lower".into(), A::Int(*lower)),
                            ])
                        })
                        .collect(),
                ),
            ),
            (
                "elements".into(),
                A::Array(
                    elements
                        .iter()
                        .map(|e| opt(ew, e).map_err(|e| format!("array element: {e}")))
                        .collect::<Res<_>>()?,
                ),
            ),
        ]),
        (Wire::Hstore, Value::Hstore(pairs)) => A::Array(
            pairs
                .iter()
                .map(|(k, v)| {
                    A::Record(vec![
                        ("key".into(), A::String(k.clone())),
                        (
                            "value".into(),
                            v.as_ref().map_or_else(none, |v| some(A::String(v.clone()))),
                        ),
                    ])
                })
                .collect(),
        ),
        (Wire::Vector, Value::Vector(xs)) => A::Array(xs.iter().map(|x| A::Float(*x)).collect()),
        (w, v) => return Err(mismatch(w, v)),
    })
}

fn row_to_avro(
    layout: &Layout<'_>,
    avro_names: &[String],
    row: Option<&Row>,
    which: &str,
) -> Res<A> {
    let Some(row) = row else {
        return Ok(none());
    };
    layout.check_row(row, which)?;
    let fields = layout
        .schema
        .columns
        .iter()
        .zip(&layout.wires)
        .zip(&row.values)
        .zip(avro_names)
        .map(|(((col, w), v), avro_name)| {
            Ok((
                avro_name.clone(),
                opt(w, v).map_err(|e| format!("{which} column {:?}: {e}", col.name))?,
            ))
        })
        .collect::<Res<_>>()?;
    Ok(some(A::Record(fields)))
}

fn absent_to_avro(layout: &Layout<'_>, row: Option<&Row>) -> Res<A> {
    let names = row.map_or(Ok(Vec::new()), |r| layout.absent_names(r))?;
    Ok(A::Array(
        names
            .into_iter()
            .map(|n| A::String(n.to_string()))
            .collect(),
    ))
}

// LSNs are u64 and Avro has only signed longs: the bits are carried unchanged.
#[allow(clippy::cast_possible_wrap)]
fn lsn_to_long(lsn: u64) -> A {
    A::Long(lsn as i64)
}

#[allow(clippy::cast_sign_loss)]
fn long_to_lsn(l: i64) -> u64 {
    l as u64
}

pub(crate) fn encode(layout: &Layout<'_>, changes: &[Change]) -> Res<Vec<u8>> {
    let schema = writer_schema(layout)?;
    let avro_names = field_names(layout.schema.columns.iter().map(|c| c.name.as_str()));
    let mut writer = Writer::new(&schema, Vec::new()).map_err(|e| e.to_string())?;
    writer
        .add_user_metadata(SCHEMA_KEY.into(), layout.descriptor().to_string())
        .map_err(|e| e.to_string())?;
    for (n, c) in changes.iter().enumerate() {
        let record = A::Record(vec![
            ("op".into(), A::String(c.op.as_str().into())),
            ("commit_lsn".into(), lsn_to_long(c.commit_lsn)),
            ("lsn".into(), lsn_to_long(c.lsn)),
            (
                "commit_time".into(),
                A::TimestampMicros(c.commit_time_micros),
            ),
            ("xid".into(), A::Long(i64::from(c.xid))),
            (
                "before".into(),
                row_to_avro(layout, &avro_names, c.before.as_ref(), "before")
                    .map_err(|e| format!("change {n}: {e}"))?,
            ),
            (
                "after".into(),
                row_to_avro(layout, &avro_names, c.after.as_ref(), "after")
                    .map_err(|e| format!("change {n}: {e}"))?,
            ),
            (
                "before_absent".into(),
                absent_to_avro(layout, c.before.as_ref())?,
            ),
            (
                "after_absent".into(),
                absent_to_avro(layout, c.after.as_ref())?,
            ),
        ]);
        writer
            .append_value(record)
            .map_err(|e| format!("change {n}: {e}"))?;
    }
    writer.into_inner().map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------
// decode

fn got(what: &str, a: &A) -> String {
    let shown = format!("{a:?}");
    let shown: String = shown.chars().take(80).collect();
    format!("expected {what}, payload has {shown}")
}

fn fields_of(a: &A, n: usize) -> Res<&[(String, A)]> {
    match a {
        A::Record(fields) if fields.len() == n => Ok(fields),
        a => Err(got(&format!("a record of {n} fields"), a)),
    }
}

fn unwrap_union(a: &A) -> &A {
    match a {
        A::Union(_, inner) => inner,
        a => a,
    }
}

fn int(a: &A) -> Res<i32> {
    match a {
        A::Int(i) | A::Date(i) => Ok(*i),
        a => Err(got("int", a)),
    }
}

fn long(a: &A) -> Res<i64> {
    match a {
        A::Long(i) | A::TimeMicros(i) | A::TimestampMicros(i) | A::LocalTimestampMicros(i) => {
            Ok(*i)
        }
        a => Err(got("long", a)),
    }
}

fn string(a: &A) -> Res<String> {
    match a {
        A::String(s) => Ok(s.clone()),
        a => Err(got("string", a)),
    }
}

fn boolean(a: &A) -> Res<bool> {
    match a {
        A::Boolean(b) => Ok(*b),
        a => Err(got("boolean", a)),
    }
}

fn array(a: &A) -> Res<&[A]> {
    match a {
        A::Array(items) => Ok(items),
        a => Err(got("array", a)),
    }
}

fn from_opt(w: &Wire, a: &A) -> Res<Value> {
    match unwrap_union(a) {
        A::Null => Ok(Value::Null),
        a => from_avro(w, a),
    }
}

fn from_avro(w: &Wire, a: &A) -> Res<Value> {
    Ok(match w {
        Wire::Bool => Value::Bool(boolean(a)?),
        Wire::Int2 => Value::Int2(i16::try_from(int(a)?).map_err(|_| got("an int2 in range", a))?),
        Wire::Int4 => Value::Int4(int(a)?),
        Wire::Int8 => Value::Int8(long(a)?),
        Wire::Money => Value::Money(long(a)?),
        Wire::Oid => Value::Oid(u32::try_from(long(a)?).map_err(|_| got("an oid in range", a))?),
        Wire::Float4 => match a {
            A::Float(x) => Value::Float4(*x),
            a => return Err(got("float", a)),
        },
        Wire::Float8 => match a {
            A::Double(x) => Value::Float8(*x),
            a => return Err(got("double", a)),
        },
        Wire::NumericF64 => match a {
            A::Double(x) => super::f64_to_numeric(*x),
            a => return Err(got("double", a)),
        },
        Wire::Numeric => Value::Numeric(string(a)?),
        Wire::JsonDoc => Value::Json(string(a)?),
        Wire::Str(kind) => kind.wrap(string(a)?),
        Wire::PgText(ty) => super::from_pg_text(ty, &string(a)?)?,
        Wire::Decimal { scale, .. } => match a {
            A::Decimal(d) => {
                let bytes = Vec::<u8>::try_from(d).map_err(|e| e.to_string())?;
                if bytes.len() > 16 {
                    return Err(format!(
                        "decimal of {} bytes does not fit 128 bits",
                        bytes.len()
                    ));
                }
                let fill = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
                    0xff
                } else {
                    0
                };
                let mut wide = [fill; 16];
                wide[16 - bytes.len()..].copy_from_slice(&bytes);
                super::decimal_to_numeric(i128::from_be_bytes(wide), *scale)
            }
            a => return Err(got("decimal", a)),
        },
        Wire::Bin(kind) => match a {
            A::Bytes(b) => kind.wrap(b.clone()),
            a => return Err(got("bytes", a)),
        },
        Wire::Uuid => match a {
            A::Uuid(u) => Value::Uuid(*u.as_bytes()),
            a => return Err(got("uuid", a)),
        },
        Wire::Date => Value::Date(int(a)?),
        Wire::Time => Value::Time(long(a)?),
        Wire::Timestamp => Value::Timestamp(long(a)?),
        Wire::TimestampTz => Value::TimestampTz(long(a)?),
        Wire::TimeTz => {
            let f = fields_of(a, 2)?;
            Value::TimeTz {
                micros: long(&f[0].1)?,
                offset_seconds: int(&f[1].1)?,
            }
        }
        Wire::Interval => {
            let f = fields_of(a, 3)?;
            Value::Interval {
                months: int(&f[0].1)?,
                days: int(&f[1].1)?,
                micros: long(&f[2].1)?,
            }
        }
        Wire::Inet => {
            let f = fields_of(a, 2)?;
            Value::Inet {
                addr: match &f[0].1 {
                    A::Bytes(b) => b.clone(),
                    a => return Err(got("bytes", a)),
                },
                prefix: u8::try_from(int(&f[1].1)?).map_err(|_| got("a prefix length", &f[1].1))?,
            }
        }
        Wire::Composite(attrs) => {
            let f = fields_of(a, attrs.len())?;
            Value::Composite(
                attrs
                    .iter()
                    .zip(f)
                    .map(|((name, aw), (_, fa))| {
                        from_opt(aw, fa).map_err(|e| format!("attribute {name:?}: {e}"))
                    })
                    .collect::<Res<_>>()?,
            )
        }
        Wire::Range(ew) => {
            let f = fields_of(a, 5)?;
            if boolean(&f[0].1)? {
                Value::Range(Box::new(RangeValue::Empty))
            } else {
                let bound = |fa: &A| -> Res<Option<Value>> {
                    match from_opt(ew, fa)? {
                        Value::Null => Ok(None),
                        v => Ok(Some(v)),
                    }
                };
                Value::Range(Box::new(RangeValue::Bounds {
                    lower: bound(&f[1].1)?,
                    upper: bound(&f[2].1)?,
                    lower_inclusive: boolean(&f[3].1)?,
                    upper_inclusive: boolean(&f[4].1)?,
                }))
            }
        }
        Wire::Array(ew) => {
            let f = fields_of(a, 2)?;
            let dims = array(&f[0].1)?
                .iter()
                .map(|d| {
                    let d = fields_of(d, 2)?;
                    Ok((int(&d[0].1)?, int(&d[1].1)?))
                })
                .collect::<Res<_>>()?;
            let elements = array(&f[1].1)?
                .iter()
                .map(|e| from_opt(ew, e).map_err(|e| format!("array element: {e}")))
                .collect::<Res<_>>()?;
            Value::Array { dims, elements }
        }
        Wire::Hstore => Value::Hstore(
            array(a)?
                .iter()
                .map(|entry| {
                    let e = fields_of(entry, 2)?;
                    let value = match unwrap_union(&e[1].1) {
                        A::Null => None,
                        v => Some(string(v)?),
                    };
                    Ok((string(&e[0].1)?, value))
                })
                .collect::<Res<_>>()?,
        ),
        Wire::Vector => Value::Vector(
            array(a)?
                .iter()
                .map(|x| match x {
                    A::Float(x) => Ok(*x),
                    x => Err(got("float", x)),
                })
                .collect::<Res<_>>()?,
        ),
    })
}

fn row_from_avro(layout: &Layout<'_>, row: &A, absent: &A, which: &str) -> Res<Option<Row>> {
    let row = match unwrap_union(row) {
        A::Null => return Ok(None),
        row => fields_of(row, layout.schema.columns.len())?,
    };
    let values = layout
        .schema
        .columns
        .iter()
        .zip(&layout.wires)
        .zip(row)
        .map(|((col, w), (_, a))| {
            from_opt(w, a).map_err(|e| format!("{which} column {:?}: {e}", col.name))
        })
        .collect::<Res<_>>()?;
    let names = array(absent)?.iter().map(string).collect::<Res<Vec<_>>>()?;
    Ok(Some(Row {
        values,
        absent: layout.absent_indexes(&names)?,
    }))
}

pub(crate) fn decode(layout: &Layout<'_>, payload: &[u8]) -> Res<Vec<Change>> {
    let reader = Reader::new(payload).map_err(|e| format!("not an Avro container file: {e}"))?;
    layout.check_descriptor(&embedded(&reader)?)?;
    reader
        .enumerate()
        .map(|(n, record)| {
            let record = record.map_err(|e| format!("record {n}: {e}"))?;
            let f = fields_of(&record, 9).map_err(|e| format!("record {n}: {e}"))?;
            let change = Change {
                op: parse_op(&string(&f[0].1)?)?,
                commit_lsn: long_to_lsn(long(&f[1].1)?),
                lsn: long_to_lsn(long(&f[2].1)?),
                commit_time_micros: long(&f[3].1)?,
                xid: u32::try_from(long(&f[4].1)?).map_err(|_| got("an xid", &f[4].1))?,
                before: row_from_avro(layout, &f[5].1, &f[7].1, "before")?,
                after: row_from_avro(layout, &f[6].1, &f[8].1, "after")?,
            };
            Ok(change)
        })
        .collect::<Res<Vec<_>>>()
}

fn embedded<R: std::io::Read>(reader: &Reader<'_, R>) -> Res<J> {
    let descriptor = reader
        .user_metadata()
        .get(SCHEMA_KEY)
        .ok_or_else(|| format!("file has no {SCHEMA_KEY:?} metadata"))?;
    serde_json::from_slice(descriptor)
        .map_err(|e| format!("{SCHEMA_KEY:?} metadata is not JSON: {e}"))
}

pub(crate) fn descriptor(payload: &[u8]) -> Res<J> {
    let reader = Reader::new(payload).map_err(|e| format!("not an Avro container file: {e}"))?;
    embedded(&reader)
}
