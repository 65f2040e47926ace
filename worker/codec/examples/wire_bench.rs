//! Encode/decode throughput of every wire format on a typical table; prints figures.
//! `cargo run -p wallaby-codec --example wire_bench -- [rows]` (default 20000); figures from
//! a debug build are several times lower than an optimised one.

use std::error::Error;
use std::sync::Arc;
use std::time::Instant;

use wallaby_codec::{
    Change, ColumnSchema, Op, Row, TableSchema, TypeInfo, TypeKind, Value, WireFormat, decode,
    encode,
};

fn ty(name: &str, oid: u32, kind: TypeKind) -> Arc<TypeInfo> {
    Arc::new(TypeInfo {
        oid,
        name: name.into(),
        typmod: -1,
        kind,
    })
}

fn column(name: &str, ty: Arc<TypeInfo>, key: bool) -> ColumnSchema {
    ColumnSchema {
        name: name.into(),
        ty,
        key,
        mapped_type: None,
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let rows: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(20_000);
    let float8 = ty("float8", 701, TypeKind::Float8);
    let schema = TableSchema {
        schema: "public".into(),
        table: "orders".into(),
        version: 1,
        columns: vec![
            column("id", ty("int8", 20, TypeKind::Int8), true),
            column("customer", ty("text", 25, TypeKind::Text), false),
            column("total", ty("numeric", 1700, TypeKind::Numeric), false),
            column(
                "placed_at",
                ty("timestamptz", 1184, TypeKind::TimestampTz),
                false,
            ),
            column("doc", ty("jsonb", 3802, TypeKind::Jsonb), false),
            column(
                "scores",
                ty("_float8", 1022, TypeKind::Array(float8)),
                false,
            ),
        ],
    };
    let changes: Vec<Change> = (0..rows)
        .map(|i| {
            let n = i64::try_from(i).unwrap_or(i64::MAX);
            let values = vec![
                Value::Int8(n),
                Value::Text(format!("customer-{}", i % 977)),
                Value::Numeric(format!("{}.{:02}", i % 10_000, i % 100)),
                Value::TimestampTz(1_700_000_000_000_000 + n * 1_000),
                Value::Json(format!("{{\"sku\": \"A-{i}\", \"qty\": {}}}", i % 7)),
                Value::Array {
                    dims: vec![(3, 1)],
                    elements: vec![Value::Float8(0.5), Value::Null, Value::Float8(-1.25)],
                },
            ];
            Change {
                op: Op::Insert,
                commit_lsn: 0x1000 + i as u64,
                lsn: 0x1000 + i as u64,
                commit_time_micros: 1_700_000_000_000_000 + n,
                xid: 1000,
                before: None,
                after: Some(Row {
                    values,
                    absent: Vec::new(),
                }),
            }
        })
        .collect();
    println!("{rows} insert changes of a 6-column table");
    println!(
        "{:<8} {:>12} {:>14} {:>14} {:>14}",
        "format", "bytes", "bytes/row", "encode rows/s", "decode rows/s"
    );
    for format in WireFormat::ALL {
        let started = Instant::now();
        let payload = encode(format, &schema, &changes)?;
        let encode_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let back = decode(format, &schema, &payload)?;
        let decode_secs = started.elapsed().as_secs_f64();
        if back.len() != changes.len() {
            return Err(format!("{}: decoded {} changes", format.as_str(), back.len()).into());
        }
        #[allow(clippy::cast_precision_loss)]
        let (per_row, enc, dec) = (
            payload.len() as f64 / rows.max(1) as f64,
            rows as f64 / encode_secs,
            rows as f64 / decode_secs,
        );
        println!(
            "{:<8} {:>12} {:>14.1} {:>14.0} {:>14.0}",
            format.as_str(),
            payload.len(),
            per_row,
            enc,
            dec
        );
    }
    Ok(())
}
