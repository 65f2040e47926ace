//! PostgreSQL's binary send format (`COPY … (FORMAT binary)`) decoded into the same
//! [`Value`]s the text decoder gives, for the common scalar types only: a reader copying
//! whole tables uses it where [`supports`] says every column can, and text otherwise.

use crate::CodecError;
use crate::schema::{TypeInfo, TypeKind};
use crate::value::Value;

/// Microseconds from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch for timestamps).
const EPOCH_SHIFT_MICROS: i64 = 946_684_800_000_000;
/// Days from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch for dates).
const EPOCH_SHIFT_DAYS: i32 = 10_957;

/// Whether values of `ty` decode from the binary format to exactly what their text gives.
pub fn supports(ty: &TypeInfo) -> bool {
    let ty = base(ty);
    match ty.kind {
        TypeKind::Bool
        | TypeKind::Int2
        | TypeKind::Int4
        | TypeKind::Int8
        | TypeKind::Oid
        | TypeKind::Float4
        | TypeKind::Float8
        | TypeKind::Numeric
        | TypeKind::Bytea
        | TypeKind::Uuid
        | TypeKind::Json
        | TypeKind::Jsonb
        | TypeKind::Date
        | TypeKind::Time
        | TypeKind::Timestamp
        | TypeKind::TimestampTz => true,
        // text, bpchar, varchar and name send their characters as they print; "char" and
        // extensions' text-like types do not all.
        TypeKind::Text => matches!(ty.oid, 19 | 25 | 1042 | 1043),
        _ => false,
    }
}

/// Decodes the binary send format of a value of `ty` (which [`supports`] accepts).
pub fn decode(ty: &TypeInfo, bytes: &[u8]) -> Result<Value, CodecError> {
    decode_inner(base(ty), bytes).map_err(|reason| CodecError::Text {
        type_name: ty.name.clone(),
        text: format!("binary {:02x?}", &bytes[..bytes.len().min(32)]),
        reason,
    })
}

fn base(ty: &TypeInfo) -> &TypeInfo {
    match &ty.kind {
        TypeKind::Domain(inner) => base(inner),
        _ => ty,
    }
}

pub(crate) fn fixed<const N: usize>(bytes: &[u8]) -> Result<[u8; N], String> {
    bytes
        .try_into()
        .map_err(|_| format!("expected {N} bytes, got {}", bytes.len()))
}

fn utf8(bytes: &[u8]) -> Result<String, String> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|e| format!("not UTF-8: {e}"))
}

fn decode_inner(ty: &TypeInfo, bytes: &[u8]) -> Result<Value, String> {
    Ok(match ty.kind {
        TypeKind::Bool => Value::Bool(fixed::<1>(bytes)?[0] != 0),
        TypeKind::Int2 => Value::Int2(i16::from_be_bytes(fixed(bytes)?)),
        TypeKind::Int4 => Value::Int4(i32::from_be_bytes(fixed(bytes)?)),
        TypeKind::Int8 => Value::Int8(i64::from_be_bytes(fixed(bytes)?)),
        TypeKind::Oid => Value::Oid(u32::from_be_bytes(fixed(bytes)?)),
        TypeKind::Float4 => Value::Float4(f32::from_be_bytes(fixed(bytes)?)),
        TypeKind::Float8 => Value::Float8(f64::from_be_bytes(fixed(bytes)?)),
        TypeKind::Numeric => Value::Numeric(numeric_text(bytes)?),
        TypeKind::Text if supports(ty) => Value::Text(utf8(bytes)?),
        TypeKind::Bytea => Value::Bytes(bytes.to_vec()),
        TypeKind::Uuid => Value::Uuid(fixed(bytes)?),
        TypeKind::Json => Value::Json(utf8(bytes)?),
        TypeKind::Jsonb => Value::Json(utf8(jsonb_text(bytes)?)?),
        TypeKind::Date => Value::Date(date_days(bytes)?),
        TypeKind::Time => Value::Time(i64::from_be_bytes(fixed(bytes)?)),
        TypeKind::Timestamp | TypeKind::TimestampTz => {
            let micros = timestamp_micros(bytes)?;
            if ty.kind == TypeKind::Timestamp {
                Value::Timestamp(micros)
            } else {
                Value::TimestampTz(micros)
            }
        }
        _ => return Err(format!("no binary decoder for type {}", ty.name)),
    })
}

/// The text of a `jsonb` value's binary form (a version byte, then the text).
pub(crate) fn jsonb_text(bytes: &[u8]) -> Result<&[u8], String> {
    match bytes.split_first() {
        Some((1, text)) => Ok(text),
        Some((v, _)) => Err(format!("unknown jsonb binary version {v}")),
        None => Err("empty jsonb value".into()),
    }
}

/// A `date`'s binary form as days since 1970-01-01 (±infinity kept as `i32::MIN/MAX`).
pub(crate) fn date_days(bytes: &[u8]) -> Result<i32, String> {
    match i32::from_be_bytes(fixed(bytes)?) {
        d @ (i32::MIN | i32::MAX) => Ok(d),
        d => d
            .checked_add(EPOCH_SHIFT_DAYS)
            .ok_or_else(|| "date out of range".into()),
    }
}

/// A `timestamp[tz]`'s binary form as microseconds since 1970-01-01 (±infinity kept as
/// `i64::MIN/MAX`).
pub(crate) fn timestamp_micros(bytes: &[u8]) -> Result<i64, String> {
    match i64::from_be_bytes(fixed(bytes)?) {
        m @ (i64::MIN | i64::MAX) => Ok(m),
        m => m
            .checked_add(EPOCH_SHIFT_MICROS)
            .ok_or_else(|| "timestamp out of range".into()),
    }
}

/// `numeric`'s binary form (base-10000 digits, weight, sign, display scale) printed as
/// PostgreSQL's `numeric_out` prints it.
fn numeric_text(bytes: &[u8]) -> Result<String, String> {
    let mut out = String::new();
    numeric_into(bytes, &mut out)?;
    Ok(out)
}

/// [`numeric_text`] appended to `out`.
pub(crate) fn numeric_into(bytes: &[u8], out: &mut String) -> Result<(), String> {
    let word = |i: usize| -> Result<u16, String> {
        bytes
            .get(i * 2..i * 2 + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("numeric value cut short at {} bytes", bytes.len()))
    };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(word(1)? as i16);
    let sign = word(2)?;
    let dscale = i32::from(word(3)?);
    match sign {
        0xC000 => {
            out.push_str("NaN");
            return Ok(());
        }
        0xD000 => {
            out.push_str("Infinity");
            return Ok(());
        }
        0xF000 => {
            out.push_str("-Infinity");
            return Ok(());
        }
        0x0000 | 0x4000 => {}
        other => return Err(format!("unknown numeric sign {other:#06x}")),
    }
    if bytes.len() != 8 + ndigits * 2 {
        return Err(format!(
            "numeric value of {ndigits} digits has {} bytes",
            bytes.len()
        ));
    }
    for i in 0..ndigits {
        let d = word(4 + i)?;
        if d >= 10_000 {
            return Err(format!("numeric digit {d} out of range"));
        }
    }
    // Digits past the stored ones are zeros.
    let digit = |i: i32| -> u16 {
        usize::try_from(i)
            .ok()
            .filter(|i| *i < ndigits)
            .map_or(0, |i| {
                u16::from_be_bytes([bytes[8 + i * 2], bytes[9 + i * 2]])
            })
    };
    out.reserve(8 + 4 * ndigits + dscale.max(0) as usize);
    if sign == 0x4000 {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        for i in 0..=weight {
            let d = digit(i);
            if i == 0 {
                push_number(out, d);
            } else {
                push_padded(out, d);
            }
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut written = 0;
        let mut i = weight + 1;
        while written < dscale {
            let d = digit(i);
            let four = [d / 1000, d / 100 % 10, d / 10 % 10, d % 10];
            for x in four {
                if written == dscale {
                    break;
                }
                out.push(char::from(b'0' + x as u8));
                written += 1;
            }
            i += 1;
        }
    }
    Ok(())
}

/// A base-10000 digit without leading zeros.
fn push_number(out: &mut String, n: u16) {
    let digits = [n / 1000, n / 100 % 10, n / 10 % 10, n % 10];
    let first = digits.iter().position(|d| *d != 0).unwrap_or(3);
    for d in &digits[first..] {
        out.push(char::from(b'0' + *d as u8));
    }
}

fn push_padded(out: &mut String, d: u16) {
    for x in [d / 1000, d / 100 % 10, d / 10 % 10, d % 10] {
        out.push(char::from(b'0' + x as u8));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn numeric(ndigits: u16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        for w in [ndigits, weight as u16, sign, dscale] {
            b.extend_from_slice(&w.to_be_bytes());
        }
        for d in digits {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b
    }

    #[test]
    fn numeric_binary_prints_as_numeric_out() {
        let cases: &[(Vec<u8>, &str)] = &[
            (numeric(0, 0, 0, 0, &[]), "0"),
            (numeric(0, 0, 0, 2, &[]), "0.00"),
            (numeric(1, 0, 0, 2, &[12]), "12.00"),
            (numeric(2, 0, 0x4000, 2, &[1234, 5000]), "-1234.50"),
            (numeric(2, 1, 0, 0, &[1, 0]), "10000"),
            (numeric(1, 1, 0, 0, &[1]), "10000"),
            (numeric(1, -1, 0, 5, &[12]), "0.00120"),
            (numeric(1, -2, 0, 8, &[5]), "0.00000005"),
            (numeric(3, 0, 0, 9, &[3, 1415, 9265]), "3.141592650"),
            (numeric(0, 0, 0xC000, 0, &[]), "NaN"),
            (numeric(0, 0, 0xD000, 0, &[]), "Infinity"),
            (numeric(0, 0, 0xF000, 0, &[]), "-Infinity"),
        ];
        for (bytes, want) in cases {
            assert_eq!(numeric_text(bytes).unwrap(), *want);
        }
        assert!(numeric_text(&[0, 1]).is_err());
        assert!(numeric_text(&numeric(2, 0, 0, 0, &[1])).is_err());
    }
}
