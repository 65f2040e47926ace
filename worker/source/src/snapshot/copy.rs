//! Reading one partition of a table inside a snapshot: the table described as a
//! [`Relation`] (the shape pgoutput gives the stream), the partition's predicate (a hash of
//! a column, or a range of heap pages), and `COPY … TO STDOUT` rows (text, or binary where
//! every column has a binary decoder) decoded straight into the typed values the stream's
//! text cells decode to, so snapshot rows and streamed rows are encoded identically.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::SnapshotError;
use wallaby_codec::{Row, TableSchema, Value};

use crate::setup::{TableName, quote_ident};
use wallaby_pipeline::change::{Cell, Column, Relation};

/// A table to copy, as the stream would describe it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// The table.
    pub name: TableName,
    /// Columns (published ones: not dropped, not generated), key and replica identity.
    pub relation: Arc<Relation>,
    /// Heap pages when described (plans page-range partitions).
    pub pages: u64,
    /// A partitioned table (no heap of its own: page ranges do not apply).
    pub partitioned: bool,
}

/// Which rows of a table one partition holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Slice {
    /// Every row.
    Whole,
    /// Rows whose column hashes to `index` modulo `count` (NULLs go to partition 0).
    Hash {
        /// Column hashed.
        column: String,
        /// This partition.
        index: u32,
        /// Partitions in all.
        count: u32,
    },
    /// Rows stored in heap pages `[from, to)`; `to: None` is unbounded, so rows in pages
    /// added after planning are not missed.
    Pages {
        /// First page.
        from: u64,
        /// End page (exclusive).
        to: Option<u64>,
    },
}

impl Slice {
    /// The `WHERE` clause selecting this partition (empty for the whole table).
    pub fn predicate(&self) -> String {
        match self {
            Self::Whole => String::new(),
            Self::Hash {
                column,
                index,
                count,
            } => format!(
                " WHERE COALESCE((hashtext({}::text) & 2147483647) % {count}, 0) = {index}",
                quote_ident(column)
            ),
            Self::Pages { from, to } => match to {
                Some(to) => format!(" WHERE ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid"),
                None => format!(" WHERE ctid >= '({from},0)'::tid"),
            },
        }
    }
}

/// The partitions of a table: `count` hash partitions of `column`, else `count` page
/// ranges of its heap, else the whole table.
pub fn plan(table: &TableInfo, column: Option<&str>, count: u32) -> Vec<Slice> {
    if count <= 1 {
        return vec![Slice::Whole];
    }
    if let Some(column) = column {
        return (0..count)
            .map(|index| Slice::Hash {
                column: column.to_owned(),
                index,
                count,
            })
            .collect();
    }
    if table.partitioned || table.pages < 2 {
        return vec![Slice::Whole];
    }
    let count = u64::from(count).min(table.pages);
    let per = table.pages.div_ceil(count);
    let mut slices = Vec::new();
    let mut from = 0;
    while from < table.pages {
        let to = from + per;
        slices.push(Slice::Pages {
            from,
            to: (to < table.pages).then_some(to),
        });
        from = to;
    }
    slices
}

/// Describes `name` from the catalog: its published columns in order, its primary key (or
/// replica identity) as the key, and its replica identity columns.
pub async fn describe(client: &Client, name: &TableName) -> Result<TableInfo, SnapshotError> {
    let query = |what: &'static str| {
        let table = name.to_string();
        move |source| SnapshotError::Query {
            what: format!("{what} of {table}"),
            source,
        }
    };
    let row = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, c.relkind::text,
                    (pg_relation_size(c.oid) / current_setting('block_size')::bigint)::bigint
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&name.schema, &name.table],
        )
        .await
        .map_err(query("looking up the table"))?
        .ok_or_else(|| SnapshotError::MissingTable(name.to_string()))?;
    let oid: u32 = row.get(0);
    let identity_kind: String = row.get(1);
    let kind: String = row.get(2);
    let pages: i64 = row.get(3);
    let columns: Vec<Column> = client
        .query(
            "SELECT attname::text, atttypid, atttypmod FROM pg_attribute
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
             ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(query("reading the columns"))?
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_oid: r.get(1),
            type_modifier: r.get(2),
        })
        .collect();
    let index_columns = |primary: bool| {
        let sql = format!(
            "SELECT a.attname::text
             FROM pg_index i
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1 AND {} ORDER BY k.ord",
            if primary {
                "i.indisprimary"
            } else {
                "i.indisreplident"
            }
        );
        async move {
            client.query(&sql, &[&oid]).await.map(|rows| {
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
            })
        }
    };
    let positions = |names: &[String]| -> Vec<usize> {
        names
            .iter()
            .filter_map(|n| columns.iter().position(|c| &c.name == n))
            .collect()
    };
    let pk = positions(
        &index_columns(true)
            .await
            .map_err(query("reading the primary key"))?,
    );
    // What pgoutput flags as key columns in its Relation message.
    let identity = match identity_kind.as_str() {
        "f" => (0..columns.len()).collect(),
        "i" => positions(
            &index_columns(false)
                .await
                .map_err(query("reading the replica identity index"))?,
        ),
        "n" => Vec::new(),
        _ => pk.clone(),
    };
    let key = if pk.is_empty() { identity.clone() } else { pk };
    Ok(TableInfo {
        name: name.clone(),
        relation: Arc::new(Relation {
            id: oid,
            schema: name.schema.clone(),
            table: name.table.clone(),
            columns,
            key,
            identity,
        }),
        pages: pages.max(0) as u64,
        partitioned: kind == "p",
    })
}

/// `COPY (SELECT <columns> FROM <table><predicate>) TO STDOUT`: the published columns in
/// relation order, so copied rows line up with the stream's.
fn copy_with(table: &TableInfo, predicate: &str) -> String {
    let columns: Vec<String> = table
        .relation
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    format!(
        "COPY (SELECT {} FROM {}{predicate}) TO STDOUT",
        columns.join(", "),
        table.name.quoted(),
    )
}

/// `COPY (SELECT <columns> FROM <table> <predicate>) TO STDOUT`.
pub fn copy_statement(table: &TableInfo, slice: &Slice) -> String {
    copy_with(table, &slice.predicate())
}

/// The COPY of heap pages `[from, to)` of a partition (`to: None`: to the end).
pub fn copy_chunk_statement(
    table: &TableInfo,
    slice: &Slice,
    from: u64,
    to: Option<u64>,
) -> String {
    let pages = Slice::Pages { from, to }.predicate();
    let combined = match slice {
        // The chunk's range lies inside the partition's.
        Slice::Whole | Slice::Pages { .. } => pages,
        Slice::Hash { .. } => format!(
            "{} AND {}",
            slice.predicate(),
            pages.trim_start().trim_start_matches("WHERE ")
        ),
    };
    copy_with(table, &combined)
}

/// Splits one line of COPY text output (without its newline) into cells: `\N` is NULL,
/// backslash escapes are undone, and a field without escapes is shared, not copied.
pub fn parse_line(line: &Bytes, columns: usize) -> Result<Vec<Cell>, String> {
    let mut cells = Vec::with_capacity(columns);
    let mut start = 0;
    let bytes = line.as_ref();
    loop {
        let end = bytes[start..]
            .iter()
            .position(|b| *b == b'\t')
            .map_or(bytes.len(), |p| start + p);
        let field = &bytes[start..end];
        cells.push(if field == b"\\N" {
            Cell::Null
        } else if field.contains(&b'\\') {
            Cell::Text(unescape(field)?)
        } else {
            Cell::Text(line.slice(start..end))
        });
        if end == bytes.len() {
            break;
        }
        start = end + 1;
    }
    if cells.len() != columns {
        return Err(format!(
            "a COPY row has {} fields, the table {columns} columns",
            cells.len()
        ));
    }
    Ok(cells)
}

/// Decodes one line of COPY text output (without its newline) straight into typed values
/// of `schema`'s columns: the values [`parse_line`] followed by the batcher's text decoding
/// give, without a cell per field. `scratch` holds a field while its escapes are undone.
pub fn decode_line(
    line: &[u8],
    schema: &TableSchema,
    scratch: &mut Vec<u8>,
) -> Result<Row, String> {
    let columns = &schema.columns;
    let mut values = Vec::with_capacity(columns.len());
    let mut fields = line.split(|b| *b == b'\t');
    for column in columns {
        let Some(field) = fields.next() else {
            return Err(field_count(line, columns.len()));
        };
        if field == b"\\N" {
            values.push(Value::Null);
            continue;
        }
        let raw = if field.contains(&b'\\') {
            scratch.clear();
            unescape_into(field, scratch)?;
            scratch.as_slice()
        } else {
            field
        };
        let text = std::str::from_utf8(raw).map_err(|e| {
            format!(
                "column {} ({}): the value is not UTF-8: {e}",
                column.name, column.ty.name
            )
        })?;
        let value = wallaby_codec::text::decode(&column.ty, text)
            .map_err(|e| format!("column {} ({}): {e}", column.name, column.ty.name))?;
        values.push(value);
    }
    if fields.next().is_some() {
        return Err(field_count(line, columns.len()));
    }
    Ok(Row {
        values,
        absent: Vec::new(),
    })
}

fn field_count(line: &[u8], columns: usize) -> String {
    format!(
        "a COPY row has {} fields, the table {columns} columns",
        line.split(|b| *b == b'\t').count()
    )
}

/// Signature opening `COPY … (FORMAT binary)` data.
const BINARY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Whether every column of `schema` decodes from `COPY … (FORMAT binary)` (cheaper for
/// the server and for the worker than text); otherwise the table is copied as text.
pub fn binary_copy(schema: &TableSchema) -> bool {
    schema
        .columns
        .iter()
        .all(|c| wallaby_codec::binary::supports(&c.ty))
}

/// Receives a binary COPY tuple: its fields (`None`: NULL) and its size in bytes.
pub type TupleFn<'a> = dyn FnMut(&[Option<&[u8]>], usize) -> Result<(), String> + 'a;

/// Reads `COPY … (FORMAT binary)` data chunk by chunk: the header once, then each complete
/// tuple, keeping a tuple cut between chunks for the next one.
#[derive(Debug, Default)]
pub struct BinaryRows {
    header_done: bool,
    finished: bool,
    carry: Vec<u8>,
    /// The allocation of a tuple's field list, kept empty between chunks (the server sends
    /// a message per row: one list per chunk would be an allocation per row).
    spare: Vec<Option<&'static [u8]>>,
}

impl BinaryRows {
    /// Hands each tuple completed by `data` to `each` as its fields (`None`: NULL) with
    /// its size in bytes; a tuple must have `columns` fields.
    pub fn feed(
        &mut self,
        data: &[u8],
        columns: usize,
        each: &mut TupleFn<'_>,
    ) -> Result<(), String> {
        if self.carry.is_empty() {
            let used = self.parse(data, columns, each)?;
            self.carry.extend_from_slice(&data[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.carry);
            buf.extend_from_slice(data);
            let used = self.parse(&buf, columns, each)?;
            buf.drain(..used);
            self.carry = buf;
        }
        Ok(())
    }

    /// Checks that the data ended with its trailer, after a whole tuple.
    pub fn finish(&self) -> Result<(), String> {
        if !self.carry.is_empty() {
            return Err(format!(
                "binary COPY data ended inside a row ({} bytes left)",
                self.carry.len()
            ));
        }
        if !self.finished {
            return Err("binary COPY data ended without its trailer".into());
        }
        Ok(())
    }

    /// Hands on whole tuples from the start of `buf`; returns the bytes used.
    fn parse(
        &mut self,
        buf: &[u8],
        columns: usize,
        each: &mut TupleFn<'_>,
    ) -> Result<usize, String> {
        let mut pos = 0;
        if !self.header_done {
            // Signature, flags, header extension length, extension.
            let Some(ext) = buf.get(15..19) else {
                return Ok(0);
            };
            if &buf[..11] != BINARY_SIGNATURE {
                return Err("binary COPY data does not start with its signature".into());
            }
            let ext = u32::from_be_bytes([ext[0], ext[1], ext[2], ext[3]]) as usize;
            if buf.len() < 19 + ext {
                return Ok(0);
            }
            pos = 19 + ext;
            self.header_done = true;
        }
        let mut fields = reuse(std::mem::take(&mut self.spare));
        let parsed = self.parse_tuples(buf, pos, columns, &mut fields, each);
        self.spare = reuse(fields);
        parsed
    }

    /// Hands on the whole tuples of `buf` from `pos`, listing each one's fields in `fields`;
    /// returns the bytes used.
    fn parse_tuples<'b>(
        &mut self,
        buf: &'b [u8],
        mut pos: usize,
        columns: usize,
        fields: &mut Vec<Option<&'b [u8]>>,
        each: &mut TupleFn<'_>,
    ) -> Result<usize, String> {
        while pos < buf.len() {
            if self.finished {
                return Err("binary COPY data continues after its trailer".into());
            }
            let Some(count) = buf.get(pos..pos + 2) else {
                break;
            };
            let count = i16::from_be_bytes([count[0], count[1]]);
            if count == -1 {
                self.finished = true;
                pos += 2;
                continue;
            }
            if count as usize != columns {
                return Err(format!(
                    "a COPY row has {count} fields, the table {columns} columns"
                ));
            }
            // The tuple's extent first: a tuple cut by the chunk end waits for the next.
            fields.clear();
            let mut at = pos + 2;
            let mut complete = true;
            for _ in 0..columns {
                let Some(len) = buf.get(at..at + 4) else {
                    complete = false;
                    break;
                };
                let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
                at += 4;
                if len < 0 {
                    fields.push(None);
                    continue;
                }
                let len = len as usize;
                let Some(field) = buf.get(at..at + len) else {
                    complete = false;
                    break;
                };
                fields.push(Some(field));
                at += len;
            }
            if !complete {
                break;
            }
            each(fields, at - pos)?;
            pos = at;
        }
        Ok(pos)
    }
}

/// `fields` emptied, as a list of slices of any lifetime (the allocation is kept: an empty
/// list borrows nothing).
fn reuse<'b>(mut fields: Vec<Option<&[u8]>>) -> Vec<Option<&'b [u8]>> {
    fields.clear();
    fields.into_iter().map(|_| None).collect()
}

/// The typed row of binary COPY `fields` (see [`BinaryRows::feed`]) of `schema`'s columns.
pub fn decode_fields(fields: &[Option<&[u8]>], schema: &TableSchema) -> Result<Row, String> {
    let values = schema
        .columns
        .iter()
        .zip(fields)
        .map(|(column, field)| match field {
            None => Ok(Value::Null),
            Some(bytes) => wallaby_codec::binary::decode(&column.ty, bytes)
                .map_err(|e| format!("column {} ({}): {e}", column.name, column.ty.name)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Row {
        values,
        absent: Vec::new(),
    })
}

/// Undoes COPY text escapes (`\\`, `\b`, `\f`, `\n`, `\r`, `\t`, `\v`, octal, `\xHH`).
fn unescape(field: &[u8]) -> Result<Bytes, String> {
    let mut out = Vec::with_capacity(field.len());
    unescape_into(field, &mut out)?;
    Ok(Bytes::from(out))
}

/// Appends `field` with its COPY text escapes undone to `out`.
fn unescape_into(field: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let Some(&next) = field.get(i + 1) else {
            return Err("a COPY field ends in a lone backslash".into());
        };
        i += 2;
        let byte = match next {
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 0x0b,
            b'0'..=b'7' => {
                let mut v = u32::from(next - b'0');
                let mut digits = 1;
                while digits < 3 && field.get(i).is_some_and(|d| (b'0'..=b'7').contains(d)) {
                    v = v * 8 + u32::from(field[i] - b'0');
                    i += 1;
                    digits += 1;
                }
                (v & 0xff) as u8
            }
            b'x' if field.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u8;
                let mut digits = 0;
                while digits < 2 && field.get(i).is_some_and(u8::is_ascii_hexdigit) {
                    let d = field[i];
                    let n = match d {
                        b'0'..=b'9' => d - b'0',
                        b'a'..=b'f' => d - b'a' + 10,
                        _ => d - b'A' + 10,
                    };
                    v = v * 16 + n;
                    i += 1;
                    digits += 1;
                }
                v
            }
            other => other,
        };
        out.push(byte);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn text(s: &str) -> Cell {
        Cell::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn copy_text_lines_become_pgoutput_cells() {
        let cases: &[(&str, Vec<Cell>)] = &[
            ("1\tapple", vec![text("1"), text("apple")]),
            ("2\t\\N", vec![text("2"), Cell::Null]),
            ("3\t", vec![text("3"), text("")]),
            ("4\ta\\tb\\nc\\\\d", vec![text("4"), text("a\tb\nc\\d")]),
            ("5\t\\101\\x42", vec![text("5"), text("AB")]),
        ];
        for (line, want) in cases {
            let got = parse_line(&Bytes::copy_from_slice(line.as_bytes()), 2).unwrap();
            assert_eq!(&got, want, "{line:?}");
        }
        assert!(parse_line(&Bytes::from_static(b"1"), 2).is_err());
    }

    fn int4_schema() -> TableSchema {
        TableSchema {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![wallaby_codec::ColumnSchema {
                name: "a".into(),
                ty: Arc::new(wallaby_codec::TypeInfo {
                    oid: 23,
                    name: "int4".into(),
                    typmod: -1,
                    kind: wallaby_codec::TypeKind::Int4,
                }),
                key: false,
                mapped_type: None,
            }],
            version: 1,
        }
    }

    #[test]
    fn binary_copy_data_is_read_whole_and_a_cut_stream_is_an_error() {
        let schema = int4_schema();
        let mut data = BINARY_SIGNATURE.to_vec();
        data.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        for v in [7i32, -1] {
            data.extend_from_slice(&1i16.to_be_bytes());
            data.extend_from_slice(&4i32.to_be_bytes());
            data.extend_from_slice(&v.to_be_bytes());
        }
        data.extend_from_slice(&1i16.to_be_bytes());
        data.extend_from_slice(&(-1i32).to_be_bytes());
        let body = data.len();
        data.extend_from_slice(&(-1i16).to_be_bytes());

        let mut rows = Vec::new();
        let mut reader = BinaryRows::default();
        let (a, b) = data.split_at(25);
        let mut each = |fields: &[Option<&[u8]>], _| {
            rows.push(decode_fields(fields, &schema)?);
            Ok(())
        };
        reader.feed(a, 1, &mut each).unwrap();
        reader.feed(b, 1, &mut each).unwrap();
        reader.finish().unwrap();
        let values: Vec<Value> = rows.into_iter().flat_map(|r| r.values).collect();
        assert_eq!(values, vec![Value::Int4(7), Value::Int4(-1), Value::Null]);

        let mut cut = BinaryRows::default();
        cut.feed(&data[..body - 2], 1, &mut |_, _| Ok(())).unwrap();
        assert!(cut.finish().unwrap_err().contains("inside a row"));
        let mut untrailed = BinaryRows::default();
        untrailed
            .feed(&data[..body], 1, &mut |_, _| Ok(()))
            .unwrap();
        assert!(untrailed.finish().unwrap_err().contains("trailer"));
        let mut wrong = data.clone();
        wrong[19..21].copy_from_slice(&2i16.to_be_bytes());
        let err = BinaryRows::default()
            .feed(&wrong, 1, &mut |_, _| Ok(()))
            .unwrap_err();
        assert!(err.contains("2 fields, the table 1 columns"), "{err}");
    }

    #[test]
    fn page_ranges_cover_the_heap_and_leave_the_last_one_open() {
        let table = TableInfo {
            name: TableName::parse("t"),
            relation: Arc::new(Relation {
                id: 1,
                schema: "public".into(),
                table: "t".into(),
                columns: Vec::new(),
                key: Vec::new(),
                identity: Vec::new(),
            }),
            pages: 10,
            partitioned: false,
        };
        assert_eq!(
            plan(&table, None, 3),
            vec![
                Slice::Pages {
                    from: 0,
                    to: Some(4)
                },
                Slice::Pages {
                    from: 4,
                    to: Some(8)
                },
                Slice::Pages { from: 8, to: None },
            ]
        );
        assert_eq!(plan(&table, None, 1), vec![Slice::Whole]);
        assert_eq!(plan(&table, Some("id"), 2).len(), 2);
    }
}
