//! Idempotency keys that request/response destinations (`http`, `grpc`) send with each
//! request: the same changes give the same key in any process, so a receiver can drop a
//! batch redelivered after a crash.

use sha2::{Digest, Sha256};
use wallaby_codec::{Change, TableSchema};
use wallaby_pipeline::batch::ChangeBatch;

/// The logical messages of a batch as JSON lines (the `file` destination's shape) and
/// their idempotency key, a hash of each message's (prefix, lsn).
pub fn messages_payload(batch: &ChangeBatch) -> (Vec<u8>, String) {
    let mut body = Vec::new();
    let mut hash = Sha256::new();
    for m in &batch.messages {
        let line = serde_json::json!({
            "kind": "message",
            "lsn": m.lsn.to_string(),
            "commit_lsn": m.commit_lsn.map(|l| l.to_string()),
            "transactional": m.commit_lsn.is_some(),
            "prefix": m.prefix,
            "content": String::from_utf8_lossy(&m.content),
        });
        // Writing JSON into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut body, &line);
        body.push(b'\n');
        hash.update(m.prefix.as_bytes());
        hash.update([0]);
        hash.update(m.lsn.0.to_be_bytes());
    }
    (body, hex(&hash.finalize()))
}

/// The idempotency key of a group of changes: SHA-256 over each change's (table, key
/// values, lsn), hex. The same changes give the same key in any process, so a batch
/// re-delivered after a crash carries the header it carried the first time.
pub fn changes_key(schema: &TableSchema, changes: &[Change]) -> String {
    let mut hash = Sha256::new();
    let table = schema.qualified_name();
    for change in changes {
        hash.update(table.as_bytes());
        hash.update([0]);
        for part in change_key_values(schema, change) {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        hash.update(change.lsn.to_be_bytes());
        hash.update([1]);
    }
    hex(&hash.finalize())
}

/// The key of one change as PostgreSQL's text of its key columns (all columns when the
/// table has no key): from the new row, or the old one for a delete.
pub fn change_key_values(schema: &TableSchema, change: &Change) -> Vec<String> {
    let Some(row) = change.after.as_ref().or(change.before.as_ref()) else {
        return Vec::new();
    };
    let keyed = schema.columns.iter().any(|c| c.key);
    schema
        .columns
        .iter()
        .zip(&row.values)
        .filter(|(c, _)| c.key || !keyed)
        .map(|(c, v)| wallaby_codec::text::render(&c.ty, v))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}
