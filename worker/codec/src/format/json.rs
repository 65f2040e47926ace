//! JSON lines: a header line `{"wallaby_schema": <descriptor>}`, then one object per change.
//! Values are typed JSON where JSON has a type (numbers, booleans, objects, arrays) and
//! canonical strings otherwise (ISO-8601 temporals, base64 bytea, exact numeric text).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value as J, json};

use super::reads::Native;
use super::{Layout, Res, Wire, mismatch, parse_op};
use crate::binary;
use crate::schema::TypeInfo;
use crate::value::{Change, RangeValue, Row, Value};

/// The parts of a JSON-lines payload that depend only on the table: the header line and
/// each column's `"name":` key, escaped once, so a change is written straight into the
/// output buffer without an intermediate `serde_json::Value` tree.
#[derive(Debug)]
pub(crate) struct Prepared {
    header: Vec<u8>,
    table_field: Vec<u8>,
    column_keys: Vec<Vec<u8>>,
    absent_names: Vec<Vec<u8>>,
}

impl Prepared {
    pub(crate) fn new(layout: &Layout<'_>) -> Res<Self> {
        let mut header = Vec::with_capacity(256);
        write_line(
            &mut header,
            &json!({ "wallaby_schema": layout.descriptor() }),
        )?;
        let mut table_field = b"{\"table\":".to_vec();
        put(&mut table_field, layout.table().as_str())?;
        let mut column_keys = Vec::with_capacity(layout.schema.columns.len());
        let mut absent_names = Vec::with_capacity(layout.schema.columns.len());
        for column in &layout.schema.columns {
            let mut name = Vec::with_capacity(column.name.len() + 2);
            put(&mut name, column.name.as_str())?;
            let mut key = name.clone();
            key.push(b':');
            column_keys.push(key);
            absent_names.push(name);
        }
        Ok(Self {
            header,
            table_field,
            column_keys,
            absent_names,
        })
    }

    /// Appends the header line and one line per change to `out`.
    pub(crate) fn encode_into(
        &self,
        layout: &Layout<'_>,
        changes: &[Change],
        out: &mut Vec<u8>,
    ) -> Res<()> {
        out.extend_from_slice(&self.header);
        for (n, change) in changes.iter().enumerate() {
            let start = out.len();
            self.write_change(layout, change, out)
                .map_err(|e| format!("change {n}: {e}"))?;
            if n == 0 {
                // Size the buffer once from the first line instead of doubling it ~10 times.
                let line = out.len() - start;
                out.reserve((changes.len() - 1) * (line + line / 8));
            }
        }
        Ok(())
    }

    fn write_change(&self, layout: &Layout<'_>, c: &Change, out: &mut Vec<u8>) -> Res<()> {
        out.extend_from_slice(&self.table_field);
        out.extend_from_slice(b",\"schema_version\":");
        put(out, &layout.schema.version)?;
        out.extend_from_slice(b",\"op\":\"");
        out.extend_from_slice(c.op.as_str().as_bytes());
        out.extend_from_slice(b"\",\"commit_lsn\":");
        put(out, &c.commit_lsn)?;
        out.extend_from_slice(b",\"lsn\":");
        put(out, &c.lsn)?;
        out.extend_from_slice(b",\"commit_time\":");
        write_timestamp(out, c.commit_time_micros, true)?;
        out.extend_from_slice(b",\"xid\":");
        put(out, &c.xid)?;
        out.extend_from_slice(b",\"before\":");
        self.write_row(layout, c.before.as_ref(), "before", out)?;
        out.extend_from_slice(b",\"after\":");
        self.write_row(layout, c.after.as_ref(), "after", out)?;
        out.extend_from_slice(b",\"before_absent\":");
        self.write_absent(c.before.as_ref(), out)?;
        out.extend_from_slice(b",\"after_absent\":");
        self.write_absent(c.after.as_ref(), out)?;
        out.extend_from_slice(b"}\n");
        Ok(())
    }

    fn write_row(
        &self,
        layout: &Layout<'_>,
        row: Option<&Row>,
        which: &str,
        out: &mut Vec<u8>,
    ) -> Res<()> {
        let Some(row) = row else {
            out.extend_from_slice(b"null");
            return Ok(());
        };
        layout.check_row(row, which)?;
        out.push(b'{');
        let columns = self
            .column_keys
            .iter()
            .zip(&layout.schema.columns)
            .zip(&layout.wires)
            .zip(&row.values);
        for (i, (((key, column), wire), v)) in columns.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(key);
            write_value(out, wire, v)
                .map_err(|e| format!("{which} column {:?}: {e}", column.name))?;
        }
        out.push(b'}');
        Ok(())
    }

    fn write_absent(&self, row: Option<&Row>, out: &mut Vec<u8>) -> Res<()> {
        out.push(b'[');
        let absent = row.map_or(&[][..], |r| &r.absent[..]);
        for (n, &i) in absent.iter().enumerate() {
            let name = self.absent_names.get(i).ok_or_else(|| {
                format!(
                    "absent column index {i} is out of range ({} columns)",
                    self.absent_names.len()
                )
            })?;
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(name);
        }
        out.push(b']');
        Ok(())
    }
}

/// What follows the `after` object on a snapshot read's line.
pub(crate) const READ_SUFFIX: &[u8] = b"},\"before_absent\":[],\"after_absent\":[]}\n";

impl Prepared {
    /// The header line.
    pub(crate) fn header(&self) -> &[u8] {
        &self.header
    }

    /// Column `i`'s `"name":` key.
    pub(crate) fn column_key(&self, i: usize) -> &[u8] {
        &self.column_keys[i]
    }

    /// A snapshot read's line up to the opening brace of its `after` object: what
    /// [`Self::write_change`] writes for a `read` change of schema version
    /// `schema_version` at `lsn` and `commit_time_micros`.
    pub(crate) fn read_prefix(
        &self,
        schema_version: u32,
        lsn: u64,
        commit_time_micros: i64,
    ) -> Res<Vec<u8>> {
        let mut out = Vec::with_capacity(192);
        out.extend_from_slice(&self.table_field);
        out.extend_from_slice(b",\"schema_version\":");
        put(&mut out, &schema_version)?;
        out.extend_from_slice(b",\"op\":\"read\",\"commit_lsn\":");
        put(&mut out, &lsn)?;
        out.extend_from_slice(b",\"lsn\":");
        put(&mut out, &lsn)?;
        out.extend_from_slice(b",\"commit_time\":");
        write_timestamp(&mut out, commit_time_micros, true)?;
        out.extend_from_slice(b",\"xid\":0,\"before\":null,\"after\":{");
        Ok(out)
    }
}

/// Writes one binary COPY field of a column (of a type
/// [`binary::supports`](crate::binary::supports) accepts) as [`write_value`] writes the
/// value [`binary::decode`](crate::binary::decode) gives: the [`Native`] types straight from
/// the bytes, other types through the typed value. `last` is the column's [`LastDay`].
pub(crate) fn write_binary_field(
    out: &mut Vec<u8>,
    native: Option<Native>,
    w: &Wire,
    ty: &TypeInfo,
    bytes: &[u8],
    scratch: &mut String,
    last: &mut LastDay,
) -> Res<()> {
    let utf8 = |b| std::str::from_utf8(b).map_err(|e| format!("not UTF-8: {e}"));
    match native {
        Some(Native::Bool) => {
            let b = binary::fixed::<1>(bytes)?[0] != 0;
            out.extend_from_slice(if b { b"true" } else { b"false" });
            Ok(())
        }
        Some(Native::Int2) => put(out, &i16::from_be_bytes(binary::fixed(bytes)?)),
        Some(Native::Int4) => put(out, &i32::from_be_bytes(binary::fixed(bytes)?)),
        Some(Native::Int8) => put(out, &i64::from_be_bytes(binary::fixed(bytes)?)),
        Some(Native::Oid) => put(out, &u32::from_be_bytes(binary::fixed(bytes)?)),
        Some(Native::Text | Native::Json) => {
            put_str(out, utf8(bytes)?);
            Ok(())
        }
        Some(Native::Jsonb) => {
            put_str(out, utf8(binary::jsonb_text(bytes)?)?);
            Ok(())
        }
        Some(Native::Numeric) => {
            scratch.clear();
            binary::numeric_into(bytes, scratch)?;
            put_str(out, scratch);
            Ok(())
        }
        Some(Native::Timestamp) => {
            write_timestamp_in(out, binary::timestamp_micros(bytes)?, false, last)
        }
        Some(Native::TimestampTz) => {
            write_timestamp_in(out, binary::timestamp_micros(bytes)?, true, last)
        }
        Some(
            Native::Float4
            | Native::Float8
            | Native::Bytea
            | Native::Uuid
            | Native::Date
            | Native::Time,
        )
        | None => {
            let value = binary::decode(ty, bytes).map_err(|e| e.to_string())?;
            write_value(out, w, &value)
        }
    }
}

pub(crate) fn encode(layout: &Layout<'_>, changes: &[Change]) -> Res<Vec<u8>> {
    let prepared = Prepared::new(layout)?;
    let mut out = Vec::new();
    prepared.encode_into(layout, changes, &mut out)?;
    Ok(out)
}

fn write_line(out: &mut Vec<u8>, line: &J) -> Res<()> {
    serde_json::to_writer(&mut *out, line).map_err(|e| e.to_string())?;
    out.push(b'\n');
    Ok(())
}

/// Serializes one scalar or string into `out` (serde_json's escaping and number
/// formatting, no intermediate value).
fn put<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) -> Res<()> {
    serde_json::to_writer(&mut *out, v).map_err(|e| e.to_string())
}

/// Appends `s` as a JSON string, byte for byte as serde_json writes it, scanning eight bytes
/// at a time for the bytes that need escaping (quote, backslash, control characters): long
/// text values (TOASTed documents, wide rows) are copied in runs, not looked at one byte at a
/// time.
fn put_str(out: &mut Vec<u8>, s: &str) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Whether any byte of `w` is zero / below 0x20 (exact as a test of "any"; which byte is
    // not told, so a flagged word is looked at byte by byte).
    let has_zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGHS != 0;
    let has_control = |w: u64| w.wrapping_sub(ONES * 0x20) & !w & HIGHS != 0;
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut clean = 0;
    let mut at = 0;
    while at < bytes.len() {
        let end = if let Some(word) = bytes.get(at..at + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            let w = u64::from_le_bytes(w);
            if !has_control(w) && !has_zero(w ^ (ONES * 0x22)) && !has_zero(w ^ (ONES * 0x5C)) {
                at += 8;
                continue;
            }
            at + 8
        } else {
            bytes.len()
        };
        for (i, &b) in bytes.iter().enumerate().take(end).skip(at) {
            let short: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0x08 => b"\\b",
                0x0C => b"\\f",
                0..=0x1F => b"",
                _ => continue,
            };
            out.extend_from_slice(&bytes[clean..i]);
            if short.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xF)]);
            } else {
                out.extend_from_slice(short);
            }
            clean = i + 1;
        }
        at = end;
    }
    out.extend_from_slice(&bytes[clean..]);
    out.push(b'"');
}

fn put_float(out: &mut Vec<u8>, f: f64) -> Res<()> {
    if f.is_finite() {
        put(out, &f)
    } else if f.is_nan() {
        put(out, "NaN")
    } else if f > 0.0 {
        put(out, "Infinity")
    } else {
        put(out, "-Infinity")
    }
}

/// Writes `"YYYY-MM-DDTHH:MM:SS[.ffffff][Z]"` as [`timestamp_text`] renders it, composed in
/// a fixed buffer (every row of most tables carries a timestamp); other years and the
/// infinities go through [`timestamp_text`].
fn write_timestamp(out: &mut Vec<u8>, micros: i64, utc: bool) -> Res<()> {
    write_timestamp_in(out, micros, utc, &mut LastDay::default())
}

/// The date part (`"YYYY-MM-DD`) of the last timestamp a column wrote: rows read together
/// mostly share their day, and the calendar arithmetic is then done once.
#[derive(Debug, Default, Clone)]
pub(crate) struct LastDay {
    day: Option<i64>,
    text: [u8; 11],
}

/// [`write_timestamp`], reusing `last`'s date part when the day is the same.
fn write_timestamp_in(out: &mut Vec<u8>, micros: i64, utc: bool, last: &mut LastDay) -> Res<()> {
    fn two(buf: &mut [u8], at: usize, v: u64) {
        buf[at] = b'0' + (v / 10 % 10) as u8;
        buf[at + 1] = b'0' + (v % 10) as u8;
    }
    if micros == i64::MIN || micros == i64::MAX {
        return put(out, timestamp_text(micros, utc).as_str());
    }
    let day = micros.div_euclid(MICROS_PER_DAY);
    if last.day != Some(day) {
        let (y, m, d) = civil_from_days(day);
        if !(0..=9999).contains(&y) {
            return put(out, timestamp_text(micros, utc).as_str());
        }
        let y = y.unsigned_abs();
        let mut text = *b"\"0000-00-00";
        two(&mut text, 1, y / 100);
        two(&mut text, 3, y % 100);
        two(&mut text, 6, u64::from(m));
        two(&mut text, 9, u64::from(d));
        *last = LastDay {
            day: Some(day),
            text,
        };
    }
    let of_day = micros.rem_euclid(MICROS_PER_DAY).unsigned_abs();
    let (secs, frac) = (of_day / 1_000_000, of_day % 1_000_000);
    let mut buf = *b"\"0000-00-00T00:00:00.000000Z\"";
    buf[..11].copy_from_slice(&last.text);
    two(&mut buf, 12, secs / 3600);
    two(&mut buf, 15, secs / 60 % 60);
    two(&mut buf, 18, secs % 60);
    let mut end = 20;
    if frac != 0 {
        two(&mut buf, 21, frac / 10_000);
        two(&mut buf, 23, frac / 100 % 100);
        two(&mut buf, 25, frac % 100);
        end = 27;
    }
    if utc {
        buf[end] = b'Z';
        end += 1;
    }
    buf[end] = b'"';
    out.extend_from_slice(&buf[..=end]);
    Ok(())
}

/// Writes a value as [`to_json`] renders it: the common scalar types directly, the nested
/// ones (composites, ranges, arrays, …) through [`to_json`].
fn write_value(out: &mut Vec<u8>, w: &Wire, v: &Value) -> Res<()> {
    match (w, v) {
        (_, Value::Null) => {
            out.extend_from_slice(b"null");
            Ok(())
        }
        (Wire::Bool, Value::Bool(b)) => put(out, b),
        (Wire::Int2, Value::Int2(i)) => put(out, i),
        (Wire::Int4, Value::Int4(i)) => put(out, i),
        (Wire::Int8, Value::Int8(i)) => put(out, i),
        (Wire::Oid, Value::Oid(i)) => put(out, i),
        (Wire::Money, Value::Money(m)) => put(out, m),
        (Wire::Float4, Value::Float4(f)) => put_float(out, f64::from(*f)),
        (Wire::Float8, Value::Float8(f)) => put_float(out, *f),
        (Wire::Numeric, Value::Numeric(s)) => put(out, s.as_str()),
        (Wire::Str(kind), v) => {
            put_str(out, kind.unwrap(v).ok_or_else(|| mismatch(w, v))?);
            Ok(())
        }
        (Wire::Date, Value::Date(d)) => put(out, date_text(*d).as_str()),
        (Wire::Timestamp, Value::Timestamp(t)) => write_timestamp(out, *t, false),
        (Wire::TimestampTz, Value::TimestampTz(t)) => write_timestamp(out, *t, true),
        (Wire::Uuid, Value::Uuid(u)) => put(out, uuid_text(u).as_str()),
        (w, v) => put(out, &to_json(w, v)?),
    }
}

/// Decodes one payload, or several appended one after the other (a file written batch after
/// batch): every `wallaby_schema` line is checked and applies to the lines after it.
pub(crate) fn decode(layout: &Layout<'_>, payload: &[u8]) -> Res<Vec<Change>> {
    let text = std::str::from_utf8(payload).map_err(|e| format!("payload is not UTF-8: {e}"))?;
    let table = layout.table();
    let mut seen_header = false;
    let mut changes = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let j: J = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        if let Some(descriptor) = j.get("wallaby_schema") {
            layout
                .check_descriptor(descriptor)
                .map_err(|e| format!("line {}: {e}", i + 1))?;
            seen_header = true;
            continue;
        }
        if !seen_header {
            return Err(format!(
                "line {}: a change before any {{\"wallaby_schema\": …}} header line",
                i + 1
            ));
        }
        changes.push(
            change_from_json(layout, &table, &j).map_err(|e| format!("line {}: {e}", i + 1))?,
        );
    }
    if seen_header {
        Ok(changes)
    } else {
        Err("payload has no {\"wallaby_schema\": …} header line".into())
    }
}

pub(crate) fn descriptor(payload: &[u8]) -> Res<J> {
    let text = std::str::from_utf8(payload).map_err(|e| format!("payload is not UTF-8: {e}"))?;
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .ok_or("payload is empty")?;
    let header: J = serde_json::from_str(line).map_err(|e| format!("line 1: {e}"))?;
    header
        .get("wallaby_schema")
        .cloned()
        .ok_or_else(|| "the first line is not a {\"wallaby_schema\": …} header".into())
}

fn change_from_json(layout: &Layout<'_>, table: &str, j: &J) -> Res<Change> {
    let get = |k: &str| j.get(k).ok_or_else(|| format!("missing field {k:?}"));
    let u64_of = |k: &str| -> Res<u64> {
        get(k)?
            .as_u64()
            .ok_or_else(|| format!("field {k:?} is not an unsigned integer"))
    };
    let line_table = get("table")?.as_str();
    if line_table != Some(table) {
        return Err(format!(
            "change is for table {line_table:?}, expected {table:?}"
        ));
    }
    let version = u64_of("schema_version")?;
    if version != u64::from(layout.schema.version) {
        return Err(format!(
            "change has schema version {version}, expected {}",
            layout.schema.version
        ));
    }
    let op = parse_op(get("op")?.as_str().ok_or("field \"op\" is not a string")?)?;
    let commit_time = get("commit_time")?
        .as_str()
        .ok_or("field \"commit_time\" is not a string")
        .map_err(String::from)
        .and_then(|s| parse_timestamp(s, true))?;
    let xid = u32::try_from(u64_of("xid")?).map_err(|_| "field \"xid\" is out of range")?;
    let row = |k: &str, absent_key: &str| -> Res<Option<Row>> {
        let obj = match get(k)? {
            J::Null => return Ok(None),
            J::Object(obj) => obj,
            _ => return Err(format!("field {k:?} is not an object or null")),
        };
        let values = layout
            .schema
            .columns
            .iter()
            .zip(&layout.wires)
            .map(|(col, wire)| {
                let v = obj
                    .get(&col.name)
                    .ok_or_else(|| format!("{k} has no column {:?}", col.name))?;
                from_json(wire, v).map_err(|e| format!("{k} column {:?}: {e}", col.name))
            })
            .collect::<Res<Vec<_>>>()?;
        let names: Vec<&str> = get(absent_key)?
            .as_array()
            .ok_or_else(|| format!("field {absent_key:?} is not an array"))?
            .iter()
            .map(|n| {
                n.as_str()
                    .ok_or_else(|| format!("{absent_key} holds a non-string"))
            })
            .collect::<Res<_>>()?;
        let absent = layout.absent_indexes(&names)?;
        Ok(Some(Row { values, absent }))
    };
    Ok(Change {
        op,
        commit_lsn: u64_of("commit_lsn")?,
        lsn: u64_of("lsn")?,
        commit_time_micros: commit_time,
        xid,
        before: row("before", "before_absent")?,
        after: row("after", "after_absent")?,
    })
}

// ---------------------------------------------------------------------------------------
// values

fn float_json(f: f64) -> J {
    if f.is_nan() {
        J::from("NaN")
    } else if f == f64::INFINITY {
        J::from("Infinity")
    } else if f == f64::NEG_INFINITY {
        J::from("-Infinity")
    } else {
        serde_json::Number::from_f64(f).map_or(J::Null, J::Number)
    }
}

fn float_of(j: &J) -> Res<f64> {
    match j {
        J::Number(n) => n.as_f64().ok_or_else(|| format!("{n} is not a float")),
        J::String(s) if s == "NaN" => Ok(f64::NAN),
        J::String(s) if s == "Infinity" => Ok(f64::INFINITY),
        J::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
        other => Err(format!("{other} is not a float")),
    }
}

fn str_of(j: &J) -> Res<&str> {
    j.as_str().ok_or_else(|| format!("{j} is not a string"))
}

fn int_of<T: TryFrom<i64>>(j: &J) -> Res<T> {
    j.as_i64()
        .and_then(|i| T::try_from(i).ok())
        .ok_or_else(|| format!("{j} is not an integer in range"))
}

fn to_json(w: &Wire, v: &Value) -> Res<J> {
    if matches!(v, Value::Null) {
        return Ok(J::Null);
    }
    Ok(match (w, v) {
        (Wire::Bool, Value::Bool(b)) => J::Bool(*b),
        (Wire::Int2, Value::Int2(i)) => J::from(*i),
        (Wire::Int4, Value::Int4(i)) => J::from(*i),
        (Wire::Int8, Value::Int8(i)) => J::from(*i),
        (Wire::Oid, Value::Oid(i)) => J::from(*i),
        (Wire::Float4, Value::Float4(f)) => float_json(f64::from(*f)),
        (Wire::Float8, Value::Float8(f)) => float_json(*f),
        (Wire::Numeric, Value::Numeric(s)) => J::from(s.as_str()),
        (Wire::Money, Value::Money(m)) => J::from(*m),
        (Wire::Str(kind), v) => J::from(kind.unwrap(v).ok_or_else(|| mismatch(w, v))?),
        (Wire::Bin(kind), v) => {
            let b = kind.unwrap(v).ok_or_else(|| mismatch(w, v))?;
            match kind {
                super::BinKind::Bytes => J::from(BASE64.encode(b)),
                super::BinKind::MacAddr => J::from(hex_join(b, ":")),
                super::BinKind::Ewkb => J::from(hex_join(b, "")),
            }
        }
        (Wire::Uuid, Value::Uuid(u)) => J::from(uuid_text(u)),
        (Wire::Date, Value::Date(d)) => J::from(date_text(*d)),
        (Wire::Time, Value::Time(t)) => J::from(time_text(*t)?),
        (
            Wire::TimeTz,
            Value::TimeTz {
                micros,
                offset_seconds,
            },
        ) => J::from(format!(
            "{}{}",
            time_text(*micros)?,
            offset_text(*offset_seconds)
        )),
        (Wire::Timestamp, Value::Timestamp(t)) => J::from(timestamp_text(*t, false)),
        (Wire::TimestampTz, Value::TimestampTz(t)) => J::from(timestamp_text(*t, true)),
        (
            Wire::Interval,
            Value::Interval {
                months,
                days,
                micros,
            },
        ) => json!({"months": months, "days": days, "micros": micros}),
        (Wire::Inet, Value::Inet { addr, prefix }) => J::from(inet_text(addr, *prefix)?),
        (Wire::Composite(attrs), Value::Composite(fields)) => {
            if attrs.len() != fields.len() {
                return Err(format!(
                    "composite has {} fields, its type has {} attributes",
                    fields.len(),
                    attrs.len()
                ));
            }
            let mut obj = Map::new();
            for ((name, aw), f) in attrs.iter().zip(fields) {
                obj.insert(
                    name.clone(),
                    to_json(aw, f).map_err(|e| format!("attribute {name:?}: {e}"))?,
                );
            }
            J::Object(obj)
        }
        (Wire::Range(ew), Value::Range(r)) => match r.as_ref() {
            RangeValue::Empty => json!({"empty": true}),
            RangeValue::Bounds {
                lower,
                upper,
                lower_inclusive,
                upper_inclusive,
            } => {
                let bound = |b: &Option<Value>| b.as_ref().map_or(Ok(J::Null), |b| to_json(ew, b));
                json!({
                    "lower": bound(lower)?,
                    "upper": bound(upper)?,
                    "lower_inclusive": lower_inclusive,
                    "upper_inclusive": upper_inclusive,
                })
            }
        },
        (Wire::Array(ew), Value::Array { dims, elements }) => {
            let elems = elements
                .iter()
                .map(|e| to_json(ew, e))
                .collect::<Res<Vec<_>>>()?;
            let plain = match dims.as_slice() {
                [] => elements.is_empty(),
                [(len, 1)] => *len > 0 && usize::try_from(*len).ok() == Some(elements.len()),
                _ => false,
            };
            if plain {
                J::Array(elems)
            } else {
                let dims: Vec<J> = dims
                    .iter()
                    .map(|(len, lower)| json!([len, lower]))
                    .collect();
                json!({"dims": dims, "elements": elems})
            }
        }
        (Wire::Hstore, Value::Hstore(pairs)) => {
            J::Array(pairs.iter().map(|(k, v)| json!([k, v])).collect())
        }
        (Wire::Vector, Value::Vector(xs)) => {
            J::Array(xs.iter().map(|x| float_json(f64::from(*x))).collect())
        }
        (Wire::PgText(ty), v) => J::from(super::pg_text(ty, v)),
        (Wire::NumericF64, Value::Numeric(s)) => float_json(super::numeric_to_f64(s)?),
        (Wire::Decimal { precision, scale }, Value::Numeric(s)) => {
            match super::numeric_to_decimal(s, *precision, *scale)? {
                Some(unscaled) => J::from(super::decimal_text(unscaled, *scale)),
                None => J::Null,
            }
        }
        (Wire::JsonDoc, Value::Json(s)) => {
            serde_json::from_str(s).map_err(|e| format!("json value is not valid JSON: {e}"))?
        }
        (w, v) => return Err(mismatch(w, v)),
    })
}

fn from_json(w: &Wire, j: &J) -> Res<Value> {
    if j.is_null() {
        return Ok(Value::Null);
    }
    Ok(match w {
        Wire::Bool => Value::Bool(j.as_bool().ok_or_else(|| format!("{j} is not a boolean"))?),
        Wire::Int2 => Value::Int2(int_of(j)?),
        Wire::Int4 => Value::Int4(int_of(j)?),
        Wire::Int8 => Value::Int8(int_of(j)?),
        Wire::Oid => Value::Oid(int_of(j)?),
        // f32 → f64 → f32 is exact, so the f64 JSON number carries the f32.
        #[allow(clippy::cast_possible_truncation)]
        Wire::Float4 => Value::Float4(float_of(j)? as f32),
        Wire::Float8 => Value::Float8(float_of(j)?),
        Wire::Numeric => Value::Numeric(str_of(j)?.to_string()),
        Wire::Money => Value::Money(int_of(j)?),
        Wire::Str(kind) => kind.wrap(str_of(j)?.to_string()),
        Wire::Bin(kind) => {
            let s = str_of(j)?;
            let bytes = match kind {
                super::BinKind::Bytes => BASE64
                    .decode(s)
                    .map_err(|e| format!("bytea is not base64: {e}"))?,
                super::BinKind::MacAddr => parse_hex(&s.replace(':', ""))?,
                super::BinKind::Ewkb => parse_hex(s)?,
            };
            kind.wrap(bytes)
        }
        Wire::Uuid => {
            let bytes = parse_hex(&str_of(j)?.replace('-', ""))?;
            Value::Uuid(
                bytes
                    .try_into()
                    .map_err(|_| format!("{j} is not a 16-byte uuid"))?,
            )
        }
        Wire::Date => Value::Date(parse_date(str_of(j)?)?),
        Wire::Time => Value::Time(parse_time(str_of(j)?)?),
        Wire::TimeTz => {
            let s = str_of(j)?;
            let at = s
                .rfind(['+', '-'])
                .ok_or_else(|| format!("timetz {s:?} has no zone offset"))?;
            let (time, offset) = s.split_at(at);
            Value::TimeTz {
                micros: parse_time(time)?,
                offset_seconds: parse_offset(offset)?,
            }
        }
        Wire::Timestamp => Value::Timestamp(parse_timestamp(str_of(j)?, false)?),
        Wire::TimestampTz => Value::TimestampTz(parse_timestamp(str_of(j)?, true)?),
        Wire::Interval => {
            let f = |k: &str| j.get(k).ok_or_else(|| format!("interval has no {k:?}"));
            Value::Interval {
                months: int_of(f("months")?)?,
                days: int_of(f("days")?)?,
                micros: int_of(f("micros")?)?,
            }
        }
        Wire::Inet => parse_inet(str_of(j)?)?,
        Wire::Composite(attrs) => {
            let obj = j
                .as_object()
                .ok_or_else(|| format!("composite {j} is not an object"))?;
            Value::Composite(
                attrs
                    .iter()
                    .map(|(name, aw)| {
                        let v = obj
                            .get(name)
                            .ok_or_else(|| format!("composite has no attribute {name:?}"))?;
                        from_json(aw, v).map_err(|e| format!("attribute {name:?}: {e}"))
                    })
                    .collect::<Res<_>>()?,
            )
        }
        Wire::Range(ew) => {
            if j.get("empty").and_then(J::as_bool) == Some(true) {
                Value::Range(Box::new(RangeValue::Empty))
            } else {
                let bound = |k: &str| -> Res<Option<Value>> {
                    match j.get(k) {
                        None | Some(J::Null) => Ok(None),
                        Some(b) => from_json(ew, b).map(Some),
                    }
                };
                let flag = |k: &str| j.get(k).and_then(J::as_bool).unwrap_or(false);
                Value::Range(Box::new(RangeValue::Bounds {
                    lower: bound("lower")?,
                    upper: bound("upper")?,
                    lower_inclusive: flag("lower_inclusive"),
                    upper_inclusive: flag("upper_inclusive"),
                }))
            }
        }
        Wire::Array(ew) => {
            let (dims, elems) = match j {
                J::Array(elems) => {
                    let dims = if elems.is_empty() {
                        Vec::new()
                    } else {
                        vec![(int_of::<i32>(&J::from(elems.len()))?, 1)]
                    };
                    (dims, elems)
                }
                J::Object(obj) => {
                    let dims = obj
                        .get("dims")
                        .and_then(J::as_array)
                        .ok_or("array has no \"dims\" list")?
                        .iter()
                        .map(|d| match d.as_array().map(Vec::as_slice) {
                            Some([len, lower]) => Ok((int_of(len)?, int_of(lower)?)),
                            _ => Err(format!("array dimension {d} is not [length, lower]")),
                        })
                        .collect::<Res<Vec<_>>>()?;
                    let elems = obj
                        .get("elements")
                        .and_then(J::as_array)
                        .ok_or("array has no \"elements\" list")?;
                    (dims, elems)
                }
                other => return Err(format!("{other} is not an array")),
            };
            Value::Array {
                dims,
                elements: elems.iter().map(|e| from_json(ew, e)).collect::<Res<_>>()?,
            }
        }
        Wire::Hstore => Value::Hstore(
            j.as_array()
                .ok_or_else(|| format!("hstore {j} is not a list of pairs"))?
                .iter()
                .map(|p| match p.as_array().map(Vec::as_slice) {
                    Some([J::String(k), J::Null]) => Ok((k.clone(), None)),
                    Some([J::String(k), J::String(v)]) => Ok((k.clone(), Some(v.clone()))),
                    _ => Err(format!("hstore pair {p} is not [key, value|null]")),
                })
                .collect::<Res<_>>()?,
        ),
        // f32 → f64 → f32 is exact.
        #[allow(clippy::cast_possible_truncation)]
        Wire::Vector => Value::Vector(
            j.as_array()
                .ok_or_else(|| format!("vector {j} is not a list"))?
                .iter()
                .map(|x| float_of(x).map(|f| f as f32))
                .collect::<Res<_>>()?,
        ),
        Wire::PgText(ty) => super::from_pg_text(ty, str_of(j)?)?,
        Wire::NumericF64 => super::f64_to_numeric(float_of(j)?),
        Wire::Decimal { .. } => Value::Numeric(str_of(j)?.to_string()),
        Wire::JsonDoc => Value::Json(j.to_string()),
    })
}

// ---------------------------------------------------------------------------------------
// text forms

fn hex_join(b: &[u8], sep: &str) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(sep)
}

fn parse_hex(s: &str) -> Res<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("{s:?} is not hex bytes"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{s:?} is not hex bytes"))
        })
        .collect()
}

fn uuid_text(u: &[u8; 16]) -> String {
    let h = hex_join(u, "");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn inet_text(addr: &[u8], prefix: u8) -> Res<String> {
    let ip: std::net::IpAddr = match addr.len() {
        4 => <[u8; 4]>::try_from(addr).map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(addr).map(std::net::IpAddr::from),
        n => return Err(format!("inet address has {n} bytes, expected 4 or 16")),
    }
    .map_err(|e| e.to_string())?;
    Ok(format!("{ip}/{prefix}"))
}

fn parse_inet(s: &str) -> Res<Value> {
    let (ip, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("inet {s:?} has no /prefix"))?;
    let ip: std::net::IpAddr = ip.parse().map_err(|e| format!("inet {s:?}: {e}"))?;
    let prefix = prefix
        .parse::<u8>()
        .map_err(|e| format!("inet {s:?}: {e}"))?;
    let addr = match ip {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    Ok(Value::Inet { addr, prefix })
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // d in 1..=31 and m in 1..=12 by construction.
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn ymd_text(days: i64) -> String {
    let mut out = String::with_capacity(10);
    push_ymd(&mut out, days);
    out
}

/// Appends `value` zero-padded to `width` digits (temporal fields: no `format!` per value).
fn push_digits(out: &mut String, value: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut at = buf.len();
    let mut v = value;
    loop {
        at -= 1;
        buf[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let digits = buf.len() - at;
    for _ in digits..width {
        out.push('0');
    }
    // ASCII digits only.
    out.push_str(std::str::from_utf8(&buf[at..]).unwrap_or_default());
}

fn push_ymd(out: &mut String, days: i64) {
    let (y, m, d) = civil_from_days(days);
    if (0..=9999).contains(&y) {
        push_digits(out, y.unsigned_abs(), 4);
    } else {
        // ISO 8601 expanded years, astronomical numbering (year 0 = 1 BC).
        out.push(if y < 0 { '-' } else { '+' });
        push_digits(out, y.unsigned_abs(), 4);
    }
    out.push('-');
    push_digits(out, u64::from(m), 2);
    out.push('-');
    push_digits(out, u64::from(d), 2);
}

/// Appends `HH:MM:SS[.ffffff]` for a non-negative time of day.
fn push_time(out: &mut String, micros: u64) {
    let secs = micros / 1_000_000;
    let frac = micros % 1_000_000;
    push_digits(out, secs / 3600, 2);
    out.push(':');
    push_digits(out, secs / 60 % 60, 2);
    out.push(':');
    push_digits(out, secs % 60, 2);
    if frac != 0 {
        out.push('.');
        push_digits(out, frac, 6);
    }
}

fn parse_ymd(s: &str) -> Res<i64> {
    let bad = || format!("{s:?} is not a date YYYY-MM-DD");
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'-') => (-1, &s[1..]),
        Some(b'+') => (1, &s[1..]),
        _ => (1, s),
    };
    let mut parts = rest.splitn(3, '-');
    let y: i64 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let m: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let d: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    Ok(days_from_civil(sign * y, m, d))
}

fn date_text(d: i32) -> String {
    match d {
        i32::MIN => "-infinity".into(),
        i32::MAX => "infinity".into(),
        d => ymd_text(i64::from(d)),
    }
}

fn parse_date(s: &str) -> Res<i32> {
    match s {
        "-infinity" => Ok(i32::MIN),
        "infinity" => Ok(i32::MAX),
        s => i32::try_from(parse_ymd(s)?).map_err(|_| format!("date {s:?} is out of range")),
    }
}

fn time_text(micros: i64) -> Res<String> {
    if micros < 0 {
        return Err(format!("time of {micros} µs is negative"));
    }
    let mut out = String::with_capacity(15);
    push_time(&mut out, micros.unsigned_abs());
    Ok(out)
}

fn parse_time(s: &str) -> Res<i64> {
    let bad = || format!("{s:?} is not a time HH:MM:SS[.ffffff]");
    let (hms, frac) = s.split_once('.').unwrap_or((s, ""));
    let mut parts = hms.split(':');
    let mut next = || -> Res<i64> { parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad) };
    let (h, m, sec) = (next()?, next()?, next()?);
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let frac: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().map_err(|_| bad())?
    };
    Ok(((h * 60 + m) * 60 + sec) * 1_000_000 + frac)
}

fn offset_text(offset_seconds: i32) -> String {
    let sign = if offset_seconds < 0 { '-' } else { '+' };
    let o = offset_seconds.unsigned_abs();
    let (h, m, s) = (o / 3600, o / 60 % 60, o % 60);
    if s == 0 {
        format!("{sign}{h:02}:{m:02}")
    } else {
        format!("{sign}{h:02}:{m:02}:{s:02}")
    }
}

fn parse_offset(s: &str) -> Res<i32> {
    let bad = || format!("{s:?} is not a zone offset ±HH:MM[:SS]");
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'-') => (-1, &s[1..]),
        Some(b'+') => (1, &s[1..]),
        _ => return Err(bad()),
    };
    let mut total = 0i32;
    let mut unit = 3600;
    for part in rest.split(':') {
        if unit == 0 {
            return Err(bad());
        }
        total += part.parse::<i32>().map_err(|_| bad())? * unit;
        unit /= 60;
    }
    Ok(sign * total)
}

/// ISO 8601 timestamp (`Z` suffix when `utc`); `i64::MIN` / `i64::MAX` are
/// `-infinity` / `infinity` as in PostgreSQL.
fn timestamp_text(micros: i64, utc: bool) -> String {
    match micros {
        i64::MIN => "-infinity".into(),
        i64::MAX => "infinity".into(),
        t => {
            let mut out = String::with_capacity(28);
            push_ymd(&mut out, t.div_euclid(MICROS_PER_DAY));
            out.push('T');
            // rem_euclid is in 0..MICROS_PER_DAY: a valid time of day.
            push_time(&mut out, t.rem_euclid(MICROS_PER_DAY).unsigned_abs());
            if utc {
                out.push('Z');
            }
            out
        }
    }
}

fn parse_timestamp(s: &str, utc: bool) -> Res<i64> {
    match s {
        "-infinity" => return Ok(i64::MIN),
        "infinity" => return Ok(i64::MAX),
        _ => {}
    }
    let body = if utc {
        s.strip_suffix('Z')
            .ok_or_else(|| format!("timestamptz {s:?} does not end in Z"))?
    } else {
        s
    };
    let (date, time) = body
        .split_once('T')
        .ok_or_else(|| format!("{s:?} is not an ISO 8601 timestamp"))?;
    // i128: the day's start may lie below i64::MIN even when the instant does not.
    let micros =
        i128::from(parse_ymd(date)?) * i128::from(MICROS_PER_DAY) + i128::from(parse_time(time)?);
    i64::try_from(micros).map_err(|_| format!("timestamp {s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        let mut cases: Vec<String> = (0u8..=127).map(|b| char::from(b).to_string()).collect();
        cases.push(String::new());
        cases.push("plain ascii text, long enough for several words of eight".into());
        cases.push("quote \" in the middle, backslash \\ too, tab\t, nul \0, bell \u{7}".into());
        cases.push("unicode é, ü, 日本語, emoji 🦘, and \u{1f} after".into());
        cases.push("x".repeat(63) + "\n" + &"y".repeat(9));
        for b in 0u8..=127 {
            for at in 0..17 {
                let mut s = "abcdefghijklmnopq".to_string();
                s.insert(at, char::from(b));
                cases.push(s);
            }
        }
        for case in &cases {
            let mut direct = Vec::new();
            put_str(&mut direct, case);
            assert_eq!(
                String::from_utf8(direct).unwrap(),
                serde_json::to_string(case).unwrap(),
                "{case:?}"
            );
        }
    }

    #[test]
    fn temporal_text_round_trips() {
        for t in [
            0,
            1,
            -1,
            1_700_000_000_123_456,
            -210_866_803_200_000_000,
            9_224_318_015_999_999,
            i64::MIN + 1,
            i64::MAX - 1,
        ] {
            let s = timestamp_text(t, true);
            assert_eq!(parse_timestamp(&s, true), Ok(t), "{s}");
            for utc in [true, false] {
                let mut direct = Vec::new();
                write_timestamp(&mut direct, t, utc).unwrap();
                let text = timestamp_text(t, utc);
                assert_eq!(direct, serde_json::to_vec(&text).unwrap(), "{text}");
            }
        }
        assert_eq!(timestamp_text(0, true), "1970-01-01T00:00:00Z");
        assert_eq!(
            timestamp_text(1_700_000_000_000_042, true),
            "2023-11-14T22:13:20.000042Z"
        );
        assert_eq!(date_text(2_932_896), "9999-12-31");
        assert_eq!(date_text(2_932_897), "+10000-01-01");
        assert_eq!(time_text(86_400_000_000), Ok("24:00:00".into()));
        assert_eq!(timestamp_text(-1, false), "1969-12-31T23:59:59.999999");
        assert_eq!(date_text(-719_529), "-0001-12-31");
        for d in [0, -719_529, 2_000_000, i32::MIN + 1, i32::MAX - 1] {
            assert_eq!(parse_date(&date_text(d)), Ok(d));
        }
        assert_eq!(offset_text(-(5 * 3600 + 30 * 60 + 7)), "-05:30:07");
        assert_eq!(parse_offset("-05:30:07"), Ok(-(5 * 3600 + 30 * 60 + 7)));
    }
}
