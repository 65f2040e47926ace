//! `payloadMode: wal`: a table group re-encoded as pgoutput protocol messages (protocol
//! version 1: Relation, Begin, Insert / Update / Delete / Truncate, Commit), so a consumer
//! that already parses PostgreSQL's logical replication stream can take the body as is.
//!
//! The worker decodes pgoutput as it reads it (and may spill or spool the decoded form),
//! so the bytes are rebuilt from the typed changes: every value is PostgreSQL's own text
//! (`text::render`), unchanged TOAST stays `u`, a key-only old row stays `K`. What cannot
//! be rebuilt is documented on [`encode`].

use wallaby_codec::{Change, Op, Row, TableSchema, text};

/// MIME type of a `wal` body.
pub const CONTENT_TYPE: &str = "application/vnd.wallaby.pgoutput";

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The group as a sequence of frames `lsn: u64 | length: u32 | pgoutput message`
/// (big-endian, as on the wire; `lsn` is the `XLogData` start of the message: the change's
/// LSN, or the commit LSN for Begin and Commit).
///
/// A Relation message opens the body; each run of changes of one transaction is wrapped
/// in Begin / Commit. Differences from the server's own stream: the relation id is a
/// stable id derived from the qualified name (PostgreSQL's OID is not kept after
/// decoding), the replica identity byte is `d` when the table has key columns and `n`
/// otherwise, Commit's end LSN is the commit LSN, and changes of other tables of the same
/// transaction are in their own request.
pub fn encode(schema: &TableSchema, changes: &[Change]) -> Vec<u8> {
    let mut out = Vec::new();
    let relation_id = relation_id(schema);
    let first_lsn = changes.first().map_or(0, |c| c.lsn);
    frame(&mut out, first_lsn, &relation(schema, relation_id));
    // The transaction being framed: (xid, commit LSN, commit time). A transaction's
    // changes are contiguous in a group and share its commit time.
    let mut open: Option<(u32, u64, i64)> = None;
    for change in changes {
        let tx = (change.xid, change.commit_lsn, change.commit_time_micros);
        if open.map(|(xid, lsn, _)| (xid, lsn)) != Some((tx.0, tx.1)) {
            if let Some((_, commit_lsn, time)) = open {
                frame(&mut out, commit_lsn, &commit(commit_lsn, time));
            }
            frame(&mut out, change.commit_lsn, &begin(change));
            open = Some(tx);
        }
        frame(
            &mut out,
            change.lsn,
            &row_message(schema, relation_id, change),
        );
    }
    if let Some((_, commit_lsn, time)) = open {
        frame(&mut out, commit_lsn, &commit(commit_lsn, time));
    }
    out
}

/// Logical decoding messages (`pg_logical_emit_message`) as pgoutput `M` messages, one
/// frame each.
pub fn encode_messages(messages: &[wallaby_pipeline::batch::LogicalMessage]) -> Vec<u8> {
    let mut out = Vec::new();
    for msg in messages {
        let mut m = vec![b'M', u8::from(msg.commit_lsn.is_some())];
        m.extend_from_slice(&msg.lsn.0.to_be_bytes());
        cstring(&mut m, &msg.prefix);
        m.extend_from_slice(
            &u32::try_from(msg.content.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        m.extend_from_slice(&msg.content);
        frame(&mut out, msg.lsn.0, &m);
    }
    out
}

/// A stable 32-bit id of `schema.table` (FNV-1a), never 0 (pgoutput's invalid OID).
pub fn relation_id(schema: &TableSchema) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in schema.qualified_name().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

fn frame(out: &mut Vec<u8>, lsn: u64, message: &[u8]) {
    out.extend_from_slice(&lsn.to_be_bytes());
    out.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(message);
}

fn cstring(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn relation(schema: &TableSchema, id: u32) -> Vec<u8> {
    let mut m = vec![b'R'];
    m.extend_from_slice(&id.to_be_bytes());
    cstring(&mut m, &schema.schema);
    cstring(&mut m, &schema.table);
    m.push(if schema.columns.iter().any(|c| c.key) {
        b'd'
    } else {
        b'n'
    });
    let n = i16::try_from(schema.columns.len()).unwrap_or(i16::MAX);
    m.extend_from_slice(&n.to_be_bytes());
    for c in &schema.columns {
        m.push(u8::from(c.key));
        cstring(&mut m, &c.name);
        m.extend_from_slice(&c.ty.oid.to_be_bytes());
        m.extend_from_slice(&c.ty.typmod.to_be_bytes());
    }
    m
}

fn pg_time(unix_micros: i64) -> i64 {
    unix_micros.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

fn begin(change: &Change) -> Vec<u8> {
    let mut m = vec![b'B'];
    m.extend_from_slice(&change.commit_lsn.to_be_bytes());
    m.extend_from_slice(&pg_time(change.commit_time_micros).to_be_bytes());
    m.extend_from_slice(&change.xid.to_be_bytes());
    m
}

fn commit(commit_lsn: u64, time: i64) -> Vec<u8> {
    let mut m = vec![b'C', 0];
    m.extend_from_slice(&commit_lsn.to_be_bytes());
    m.extend_from_slice(&commit_lsn.to_be_bytes());
    m.extend_from_slice(&pg_time(time).to_be_bytes());
    m
}

/// A TupleData; columns PostgreSQL did not send are written as `absent` (`u` for
/// unchanged TOAST in a new tuple, `n` for the non-identity columns of a key tuple).
fn tuple(out: &mut Vec<u8>, schema: &TableSchema, row: &Row, absent: u8) {
    let n = i16::try_from(row.values.len()).unwrap_or(i16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    for (i, (value, column)) in row.values.iter().zip(&schema.columns).enumerate() {
        if row.absent.contains(&i) {
            out.push(absent);
            continue;
        }
        if matches!(value, wallaby_codec::Value::Null) {
            out.push(b'n');
            continue;
        }
        let text = text::render(&column.ty, value);
        out.push(b't');
        out.extend_from_slice(&i32::try_from(text.len()).unwrap_or(i32::MAX).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
}

/// An old tuple: `K` when PostgreSQL sent only the identity (other columns absent).
fn old_tuple(out: &mut Vec<u8>, schema: &TableSchema, row: &Row) {
    if row.absent.is_empty() {
        out.push(b'O');
    } else {
        out.push(b'K');
    }
    tuple(out, schema, row, b'n');
}

fn row_message(schema: &TableSchema, relation_id: u32, change: &Change) -> Vec<u8> {
    let mut m = Vec::new();
    match change.op {
        // pgoutput has no snapshot message: a snapshot row is an insert on the wire.
        Op::Insert | Op::Read => {
            m.push(b'I');
            m.extend_from_slice(&relation_id.to_be_bytes());
            m.push(b'N');
            if let Some(after) = &change.after {
                tuple(&mut m, schema, after, b'u');
            }
        }
        Op::Update => {
            m.push(b'U');
            m.extend_from_slice(&relation_id.to_be_bytes());
            if let Some(before) = &change.before {
                old_tuple(&mut m, schema, before);
            }
            m.push(b'N');
            if let Some(after) = &change.after {
                tuple(&mut m, schema, after, b'u');
            }
        }
        Op::Delete => {
            m.push(b'D');
            m.extend_from_slice(&relation_id.to_be_bytes());
            match &change.before {
                Some(before) => old_tuple(&mut m, schema, before),
                None => {
                    m.push(b'K');
                    m.extend_from_slice(&0i16.to_be_bytes());
                }
            }
        }
        Op::Truncate => {
            m.push(b'T');
            m.extend_from_slice(&1u32.to_be_bytes());
            m.push(0);
            m.extend_from_slice(&relation_id.to_be_bytes());
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pg_walstream::{LogicalReplicationMessage, LogicalReplicationParser};
    use wallaby_codec::{ColumnSchema, Value};

    use super::*;
    use wallaby_codec::builtin_type;

    fn schema() -> TableSchema {
        let col = |name: &str, oid: u32, key: bool| ColumnSchema {
            name: name.into(),
            ty: Arc::new(builtin_type(oid, -1).unwrap()),
            key,
            mapped_type: None,
        };
        TableSchema {
            schema: "public".into(),
            table: "t".into(),
            columns: vec![col("id", 23, true), col("body", 25, false)],
            version: 1,
        }
    }

    fn change(op: Op, xid: u32, before: Option<Row>, after: Option<Row>) -> Change {
        Change {
            op,
            commit_lsn: 0x100 + u64::from(xid),
            lsn: 0x10 + u64::from(xid),
            commit_time_micros: 1_700_000_000_000_000,
            xid,
            before,
            after,
        }
    }

    /// Splits frames and parses each message with pg_walstream's own pgoutput parser.
    fn parse(body: &[u8]) -> Vec<LogicalReplicationMessage> {
        let mut parser = LogicalReplicationParser::with_protocol_version(1);
        let mut rest = body;
        let mut out = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[8..12].try_into().unwrap()) as usize;
            let message = &rest[12..12 + len];
            out.push(parser.parse_wal_message(message).unwrap().message);
            rest = &rest[12 + len..];
        }
        out
    }

    #[test]
    fn a_group_parses_back_as_pgoutput() {
        let s = schema();
        let row = |id: i32, body: Option<&str>, absent: Vec<usize>| Row {
            values: vec![
                Value::Int4(id),
                body.map_or(Value::Null, |b| Value::Text(b.into())),
            ],
            absent,
        };
        let changes = vec![
            change(Op::Insert, 7, None, Some(row(1, Some("a"), vec![]))),
            change(Op::Update, 7, None, Some(row(1, None, vec![1]))),
            change(Op::Delete, 8, Some(row(1, None, vec![1])), None),
        ];
        let messages = parse(&encode(&s, &changes));
        use LogicalReplicationMessage as M;
        let id = relation_id(&s);
        let text = |t: &pg_walstream::TupleData, i: usize| {
            let c = t.get_column(i).unwrap();
            if c.is_unchanged() {
                "<unchanged>".to_owned()
            } else if c.is_null() {
                "<null>".to_owned()
            } else {
                c.as_string().unwrap()
            }
        };
        assert_eq!(messages.len(), 8, "{messages:#?}");
        match &messages[0] {
            M::Relation {
                relation_id,
                namespace,
                relation_name,
                columns,
                ..
            } => {
                assert_eq!(*relation_id, id);
                assert_eq!((&**namespace, &**relation_name), ("public", "t"));
                let cols: Vec<(String, u32, u8)> = columns
                    .iter()
                    .map(|c| (c.name.to_string(), c.type_id, c.flags))
                    .collect();
                assert_eq!(cols, [("id".into(), 23, 1), ("body".into(), 25, 0)]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &messages[1],
            M::Begin {
                xid: 7,
                final_lsn: 0x107,
                ..
            }
        ));
        match &messages[2] {
            M::Insert { relation_id, tuple } => {
                assert_eq!(*relation_id, id);
                assert_eq!((text(tuple, 0), text(tuple, 1)), ("1".into(), "a".into()));
            }
            other => panic!("{other:?}"),
        }
        match &messages[3] {
            M::Update {
                new_tuple,
                old_tuple,
                ..
            } => {
                assert!(old_tuple.is_none());
                assert_eq!(text(new_tuple, 1), "<unchanged>", "unchanged TOAST stays u");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &messages[4],
            M::Commit {
                commit_lsn: 0x107,
                ..
            }
        ));
        assert!(matches!(&messages[5], M::Begin { xid: 8, .. }));
        match &messages[6] {
            M::Delete {
                key_type,
                old_tuple,
                ..
            } => {
                assert_eq!(*key_type, 'K');
                assert_eq!(
                    (text(old_tuple, 0), text(old_tuple, 1)),
                    ("1".into(), "<null>".into())
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            &messages[7],
            M::Commit {
                commit_lsn: 0x108,
                ..
            }
        ));
    }
}
