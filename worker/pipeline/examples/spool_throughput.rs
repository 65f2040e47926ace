//! Measures the secondary spool: appends (serialize + write + fsync per batch) and reads
//! (read + CRC + decode) of batches of a typical row shape, in a temporary directory.
//!
//! `cargo run -p wallaby-worker --example spool_throughput -- [rows per batch] [batches]`

use std::sync::Arc;
use std::time::Instant;

use wallaby_codec::{Change, ColumnSchema, Op, Row, TableSchema, TypeInfo, TypeKind, Value};
use wallaby_pipeline::batch::{ChangeBatch, TableChanges};
use wallaby_pipeline::lsn::Lsn;
use wallaby_pipeline::spool::{SEGMENT_BYTES, SecondarySpool};

fn schema() -> Arc<TableSchema> {
    let col = |name: &str, oid: u32, ty: &str, kind: TypeKind, key: bool| ColumnSchema {
        name: name.into(),
        ty: Arc::new(TypeInfo {
            oid,
            name: ty.into(),
            typmod: -1,
            kind,
        }),
        key,
        mapped_type: None,
    };
    Arc::new(TableSchema {
        schema: "public".into(),
        table: "orders".into(),
        columns: vec![
            col("id", 20, "int8", TypeKind::Int8, true),
            col("customer", 25, "text", TypeKind::Text, false),
            col("amount", 1700, "numeric", TypeKind::Numeric, false),
            col("created", 1184, "timestamptz", TypeKind::TimestampTz, false),
            col("note", 25, "text", TypeKind::Text, false),
        ],
        version: 1,
    })
}

fn batch(seq: u64, rows: u64) -> ChangeBatch {
    let schema = schema();
    let commit_lsn = seq * 1_000_000;
    let changes = (0..rows)
        .map(|i| Change {
            op: Op::Insert,
            commit_lsn,
            lsn: commit_lsn + i,
            commit_time_micros: 1_700_000_000_000_000 + i as i64,
            xid: seq as u32,
            before: None,
            after: Some(Row {
                values: vec![
                    Value::Int8((seq * rows + i) as i64),
                    Value::Text(format!("customer-{}", i % 977)),
                    Value::Numeric(format!("{}.{:02}", i * 7, i % 100)),
                    Value::TimestampTz(1_700_000_000_000_000 + i as i64),
                    Value::Text("x".repeat(64)),
                ],
                absent: Vec::new(),
            }),
        })
        .collect();
    let mut b = ChangeBatch::without_budget(seq);
    b.rows = rows;
    b.bytes = rows * 300;
    b.transactions = 1;
    b.checkpoint = Some(Lsn(commit_lsn + rows + 1));
    b.tables.push(TableChanges {
        schema,
        changes,
        encoded: Vec::new(),
    });
    b
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rows: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let batches: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let dir = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (mut spool, mut reader) = SecondarySpool::open(&dir.path().join("b"), SEGMENT_BYTES)?;
    let prepared: Vec<ChangeBatch> = (1..=batches).map(|s| batch(s, rows)).collect();

    // Serialization alone, to tell the codec's share from the disk's.
    let started = Instant::now();
    for b in &prepared {
        spool.frame(b)?;
    }
    let encode = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut bytes = 0u64;
    for b in &prepared {
        bytes += spool.append(b)?;
    }
    let append = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let read_rows = runtime.block_on(async {
        let mut n = 0u64;
        for _ in 0..batches {
            if let Some(s) = reader.next().await? {
                n += s
                    .batch
                    .tables
                    .iter()
                    .map(|g| g.changes.len() as u64)
                    .sum::<u64>();
            }
        }
        Ok::<_, anyhow::Error>(n)
    })?;
    let read = started.elapsed().as_secs_f64();

    let mib = bytes as f64 / (1024.0 * 1024.0);
    let total_rows = (rows * batches) as f64;
    println!(
        "spool: {batches} batches × {rows} rows, {mib:.1} MiB on disk ({:.0} bytes/row)",
        bytes as f64 / total_rows
    );
    println!(
        "append (encode + write + fsync per batch): {:.1} MiB/s, {:.0} rows/s, {:.0} batches/s",
        mib / append,
        total_rows / append,
        batches as f64 / append
    );
    println!(
        "encode only: {:.1} MiB/s, {:.0} rows/s",
        mib / encode,
        total_rows / encode
    );
    println!(
        "read (read + CRC + decode): {:.1} MiB/s, {:.0} rows/s ({read_rows} rows)",
        mib / read,
        read_rows as f64 / read
    );
    Ok(())
}
