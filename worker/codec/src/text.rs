//! PostgreSQL text format ⇄ [`Value`]: `decode` parses what pgoutput (and a text-format
//! query result) prints, `render` prints exactly what PostgreSQL would under the session
//! settings the worker sets on every connection (DateStyle ISO, TimeZone UTC, IntervalStyle
//! postgres, extra_float_digits 1, bytea_output hex, lc_monetary C).

mod container;
mod datetime;
mod scalar;

use crate::CodecError;
use crate::schema::{TypeInfo, TypeKind};
use crate::value::Value;

/// A stand-in element type when a value's shape does not match its declared type (a
/// composite value under an `Unknown` type, say): fields then render as plain text.
static UNKNOWN: TypeInfo = TypeInfo {
    oid: 0,
    name: String::new(),
    typmod: -1,
    kind: TypeKind::Unknown,
};

/// Parses PostgreSQL's text output of a value of type `ty`.
pub fn decode(ty: &TypeInfo, text: &str) -> Result<Value, CodecError> {
    decode_inner(ty, text).map_err(|reason| CodecError::Text {
        type_name: ty.name.clone(),
        text: text.chars().take(200).collect(),
        reason,
    })
}

/// Prints `value` exactly as PostgreSQL prints a value of type `ty`. `Value::Null` prints
/// as an empty string (callers handle NULL themselves).
pub fn render(ty: &TypeInfo, value: &Value) -> String {
    let mut out = String::new();
    render_into(ty, value, &mut out);
    out
}

/// The type a value is really stored as: domains are their base type.
fn base(ty: &TypeInfo) -> &TypeInfo {
    match &ty.kind {
        TypeKind::Domain(inner) => base(inner),
        _ => ty,
    }
}

/// Decoding with a bare reason; [`decode`] adds the type and the text. Nested values
/// (array elements, fields, bounds) come back through here.
pub(crate) fn decode_inner(ty: &TypeInfo, text: &str) -> Result<Value, String> {
    let ty = base(ty);
    let value = match &ty.kind {
        TypeKind::Bool => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => return Err("expected t or f".into()),
        },
        TypeKind::Int2 => Value::Int2(parse_int(text)?),
        TypeKind::Int4 => Value::Int4(parse_int(text)?),
        TypeKind::Int8 => Value::Int8(parse_int(text)?),
        TypeKind::Oid => Value::Oid(parse_int(text)?),
        TypeKind::Float4 => Value::Float4(scalar::parse_float(text)?),
        TypeKind::Float8 => Value::Float8(scalar::parse_float(text)?),
        TypeKind::Numeric => Value::Numeric(scalar::check_numeric(text)?),
        TypeKind::Money => Value::Money(scalar::parse_money(text)?),
        TypeKind::Text => Value::Text(text.to_owned()),
        TypeKind::Bytea => Value::Bytes(scalar::parse_bytea(text)?),
        TypeKind::Uuid => Value::Uuid(scalar::parse_uuid(text)?),
        TypeKind::Json | TypeKind::Jsonb => Value::Json(text.to_owned()),
        TypeKind::Xml => Value::Xml(text.to_owned()),
        TypeKind::Date => Value::Date(datetime::parse_date(text)?),
        TypeKind::Time => Value::Time(datetime::parse_time(text)?),
        TypeKind::TimeTz => {
            let (micros, offset_seconds) = datetime::parse_timetz(text)?;
            Value::TimeTz {
                micros,
                offset_seconds,
            }
        }
        TypeKind::Timestamp => Value::Timestamp(datetime::parse_timestamp(text, false)?),
        TypeKind::TimestampTz => Value::TimestampTz(datetime::parse_timestamp(text, true)?),
        TypeKind::Interval => {
            let (months, days, micros) = datetime::parse_interval(text)?;
            Value::Interval {
                months,
                days,
                micros,
            }
        }
        TypeKind::Inet | TypeKind::Cidr => {
            let (addr, prefix) = scalar::parse_inet(text)?;
            Value::Inet { addr, prefix }
        }
        TypeKind::MacAddr => Value::MacAddr(scalar::parse_mac(text, 6)?),
        TypeKind::MacAddr8 => Value::MacAddr(scalar::parse_mac(text, 8)?),
        TypeKind::Bit | TypeKind::VarBit => {
            if !text.bytes().all(|b| b == b'0' || b == b'1') {
                return Err("a bit string holds only 0 and 1".into());
            }
            Value::Bits(text.to_owned())
        }
        TypeKind::Enum(_) => Value::Enum(text.to_owned()),
        // `base` already unwrapped domains.
        TypeKind::Domain(inner) => return decode_inner(inner, text),
        TypeKind::Composite(fields) => container::parse_composite(fields, text)?,
        TypeKind::Range(element) => container::parse_range(element, text)?,
        TypeKind::Array(element) => container::parse_array(element, text)?,
        TypeKind::Hstore => Value::Hstore(container::parse_hstore(text)?),
        TypeKind::Ltree => Value::Ltree(text.to_owned()),
        TypeKind::Vector => Value::Vector(container::parse_vector(text)?),
        TypeKind::Geometry | TypeKind::Geography => Value::Ewkb(scalar::parse_hex(text)?),
        TypeKind::Unknown => Value::Unknown(text.to_owned()),
    };
    Ok(value)
}

fn parse_int<T: std::str::FromStr>(text: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    text.parse::<T>().map_err(|e| e.to_string())
}

/// Renders by the value's variant; the type decides only what the variant cannot tell
/// (inet or cidr) and the element types of containers.
pub(crate) fn render_into(ty: &TypeInfo, value: &Value, out: &mut String) {
    use std::fmt::Write;
    let ty = base(ty);
    match value {
        Value::Null => {}
        Value::Bool(b) => out.push(if *b { 't' } else { 'f' }),
        Value::Int2(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Int4(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Int8(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Oid(v) => {
            let _ = write!(out, "{v}");
        }
        Value::Float4(v) => scalar::render_float4(*v, out),
        Value::Float8(v) => scalar::render_float8(*v, out),
        Value::Money(v) => scalar::render_money(*v, out),
        Value::Numeric(s)
        | Value::Text(s)
        | Value::Json(s)
        | Value::Xml(s)
        | Value::Enum(s)
        | Value::Ltree(s)
        | Value::Bits(s)
        | Value::Unknown(s) => out.push_str(s),
        Value::Bytes(b) => {
            out.push_str("\\x");
            scalar::push_hex(b, false, out);
        }
        Value::Uuid(u) => scalar::render_uuid(u, out),
        Value::Date(d) => datetime::render_date(*d, out),
        Value::Time(t) => datetime::render_time(*t, out),
        Value::TimeTz {
            micros,
            offset_seconds,
        } => {
            datetime::render_time(*micros, out);
            datetime::render_offset(*offset_seconds, out);
        }
        Value::Timestamp(t) => datetime::render_timestamp(*t, false, out),
        Value::TimestampTz(t) => datetime::render_timestamp(*t, true, out),
        Value::Interval {
            months,
            days,
            micros,
        } => datetime::render_interval(*months, *days, *micros, out),
        Value::Inet { addr, prefix } => {
            scalar::render_inet(addr, *prefix, matches!(ty.kind, TypeKind::Cidr), out)
        }
        Value::MacAddr(bytes) => scalar::render_mac(bytes, out),
        Value::Composite(fields) => container::render_composite(ty, fields, out),
        Value::Range(range) => container::render_range(ty, range, out),
        Value::Array { dims, elements } => container::render_array(ty, dims, elements, out),
        Value::Hstore(pairs) => container::render_hstore(pairs, out),
        Value::Vector(v) => container::render_vector(v, out),
        Value::Ewkb(bytes) => scalar::push_hex(bytes, true, out),
    }
}

#[cfg(test)]
mod tests;
