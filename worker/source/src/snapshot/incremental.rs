//! Copying tables while the stream runs (DBLog-style watermarks): a table added to a
//! running flow, or partitions an interrupted snapshot left, are read in small chunks
//! between two transactional logical messages, and the chunk's rows enter the event stream
//! at the high watermark, minus the keys the stream changed inside the window.
//!
//! ```text
//!  copier:  emit low(id) ─▶ COPY chunk (rows held) ─▶ hand rows to the gate ─▶ emit high(id)
//!  stream:  … Begin Msg(low) Commit … Row(k1) … Begin Msg(high) ⇢ Row(read)… Commit …
//!  gate:    after low: remember keys of the table; at high: drop chunk rows whose key was
//!           seen, insert the others there; watermark messages are not forwarded
//! ```
//!
//! Every change of the table is streamed (it is in the publication); a chunk row is either
//! older than none of them (no change in the window: the row enters before every later
//! change) or dropped (a change in the window carries it). So the final state equals the
//! source while the other tables keep streaming.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use pg_walstream::CancellationToken;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;
use tokio_stream::StreamExt;

use super::copy::{self, Slice};
use super::store::SnapshotStore;
use super::{Job, SnapshotError, SnapshotProgress, lock_progress};
use crate::PgConnection;
use wallaby_pipeline::change::{Cell, Op, RowChange, SourceEvent};
use wallaby_pipeline::lsn::Lsn;

/// Prefix of the watermark messages.
pub const WATERMARK_PREFIX: &str = "wallaby.snapshot";
/// Heap pages per chunk (2 MiB of heap at the default block size): the rows of one chunk
/// are held in memory until its high watermark.
const CHUNK_PAGES: u64 = 256;
/// How often the copier looks at the slot's confirmed position.
const CONFIRM_POLL: Duration = Duration::from_millis(100);

/// A chunk read between its watermarks, waiting for the high one.
#[derive(Debug)]
pub struct Chunk {
    id: u64,
    rows: Vec<RowChange>,
    delivered: oneshot::Sender<Delivered>,
}

/// Where a chunk entered the stream.
#[derive(Debug, Clone, Copy)]
struct Delivered {
    rows: u64,
    /// End of the watermark's transaction: durable once the slot confirmed it.
    end_lsn: Lsn,
}

/// The key of a row at `key` positions (`None` for NULL or an unsent value).
fn key_of(cells: &[Cell], key: &[usize]) -> Vec<Option<Bytes>> {
    key.iter()
        .map(|i| match cells.get(*i) {
            Some(Cell::Text(b)) => Some(b.clone()),
            _ => None,
        })
        .collect()
}

/// An open watermark window.
#[derive(Debug)]
struct Window {
    id: u64,
    table: String,
    keys: HashSet<Vec<Option<Bytes>>>,
    truncated: bool,
}

/// The stage between the reader and the pipeline: forwards every event, tracks keys inside
/// watermark windows and inserts chunk rows at their high watermark.
pub async fn gate(
    mut input: mpsc::Receiver<SourceEvent>,
    output: mpsc::Sender<SourceEvent>,
    mut chunks: mpsc::Receiver<Chunk>,
    nonce: String,
) {
    let mut window: Option<Window> = None;
    let mut waiting: Option<(oneshot::Sender<Delivered>, u64)> = None;
    while let Some(event) = input.recv().await {
        match &event {
            SourceEvent::Message {
                prefix, content, ..
            } if prefix == WATERMARK_PREFIX => {
                let text = String::from_utf8_lossy(content);
                let mut parts = text.splitn(4, ':');
                let (kind, run, id) = (parts.next(), parts.next(), parts.next());
                let id = id.and_then(|i| i.parse::<u64>().ok());
                if run != Some(nonce.as_str()) {
                    // A watermark of an earlier run, replayed: nothing waits for it.
                    continue;
                }
                match (kind, id) {
                    (Some("low"), Some(id)) => {
                        window = Some(Window {
                            id,
                            table: parts.next().unwrap_or_default().to_owned(),
                            keys: HashSet::new(),
                            truncated: false,
                        });
                    }
                    (Some("high"), Some(id)) if window.as_ref().is_some_and(|w| w.id == id) => {
                        let Some(w) = window.take() else { continue };
                        // The copier handed the rows over before it emitted this message.
                        let chunk = loop {
                            match chunks.try_recv() {
                                Ok(c) if c.id == id => break Some(c),
                                Ok(_) => continue,
                                Err(_) => break None,
                            }
                        };
                        let Some(chunk) = chunk else { continue };
                        let lsn = match &event {
                            SourceEvent::Message { lsn, .. } => *lsn,
                            _ => Lsn(0),
                        };
                        let mut sent = 0u64;
                        for mut row in chunk.rows {
                            let stale = w.truncated
                                || row.after.as_deref().is_some_and(|a| {
                                    !row.relation.key.is_empty()
                                        && w.keys.contains(&key_of(a, &row.relation.key))
                                });
                            if stale {
                                continue;
                            }
                            row.lsn = lsn;
                            if output.send(SourceEvent::Row(row)).await.is_err() {
                                return;
                            }
                            sent += 1;
                        }
                        waiting = Some((chunk.delivered, sent));
                    }
                    _ => {}
                }
                continue;
            }
            SourceEvent::Row(change) => {
                if let Some(w) = window.as_mut()
                    && format!("{}.{}", change.relation.schema, change.relation.table) == w.table
                {
                    if change.op == Op::Truncate {
                        w.truncated = true;
                    }
                    for cells in [&change.before, &change.after].into_iter().flatten() {
                        w.keys.insert(key_of(cells, &change.relation.key));
                    }
                }
            }
            SourceEvent::Commit { end_lsn, .. } => {
                if let Some((tx, rows)) = waiting.take() {
                    let end_lsn = *end_lsn;
                    if output.send(event).await.is_err() {
                        return;
                    }
                    let _ = tx.send(Delivered { rows, end_lsn });
                    continue;
                }
            }
            _ => {}
        }
        if output.send(event).await.is_err() {
            return;
        }
    }
}

/// Page ranges of the chunks of a partition.
fn chunk_ranges(slice: &Slice, pages: u64) -> Vec<(u64, Option<u64>)> {
    let (from, to) = match slice {
        Slice::Pages { from, to } => (*from, *to),
        _ => (0, None),
    };
    let limit = to.unwrap_or(pages.max(from));
    let mut ranges = Vec::new();
    let mut start = from;
    while start + CHUNK_PAGES < limit {
        ranges.push((start, Some(start + CHUNK_PAGES)));
        start += CHUNK_PAGES;
    }
    ranges.push((start, to));
    ranges
}

/// Copies `jobs` one chunk at a time through the [`gate`], recording a partition as done
/// once the slot confirmed its last chunk (`confirmed`).
#[allow(clippy::too_many_arguments)]
pub async fn copy_while_streaming(
    conn: PgConnection,
    jobs: Vec<Job>,
    store: SnapshotStore,
    key: String,
    chunks: mpsc::Sender<Chunk>,
    confirmed: Arc<AtomicU64>,
    progress: SnapshotProgress,
    nonce: String,
    cancel: CancellationToken,
) -> Result<(), SnapshotError> {
    let client = conn.connect().await?;
    let mut next_id = 0u64;
    for job in jobs {
        let table = job.table.name.to_string();
        {
            let mut p = lock_progress(&progress);
            if let Some(t) = p.iter_mut().find(|t| t.table == table) {
                t.state = "Copying".into();
            }
        }
        let fail = |message: String| SnapshotError::Copy {
            table: table.clone(),
            index: job.index,
            message,
        };
        let ranges = if job.table.partitioned {
            vec![(0, None)]
        } else {
            chunk_ranges(&job.slice, job.table.pages)
        };
        let mut rows = 0u64;
        let mut last_end = Lsn(0);
        for (from, to) in ranges {
            next_id += 1;
            let id = next_id;
            emit(&client, &format!("low:{nonce}:{id}:{table}"))
                .await
                .map_err(&fail)?;
            let statement = if job.table.partitioned {
                copy::copy_statement(&job.table, &job.slice)
            } else {
                copy::copy_chunk_statement(&job.table, &job.slice, from, to)
            };
            let read = read_rows(&client, &job, &statement).await.map_err(&fail)?;
            let (tx, rx) = oneshot::channel();
            if chunks
                .send(Chunk {
                    id,
                    rows: read,
                    delivered: tx,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
            emit(&client, &format!("high:{nonce}:{id}"))
                .await
                .map_err(&fail)?;
            let delivered = tokio::select! {
                d = rx => match d {
                    Ok(d) => d,
                    // The stream stopped before the high watermark arrived.
                    Err(_) => return Ok(()),
                },
                _ = cancel.cancelled() => return Ok(()),
            };
            rows += delivered.rows;
            last_end = delivered.end_lsn;
        }
        // Done only once the destinations made the last chunk durable.
        while confirmed.load(Ordering::Acquire) < last_end.0 {
            tokio::select! {
                _ = tokio::time::sleep(CONFIRM_POLL) => {}
                _ = cancel.cancelled() => return Ok(()),
            }
        }
        store.done(&key, &table, job.index, rows).await?;
        tracing::info!(table = %table, partition = job.index, rows, "snapshot: partition done (while streaming)");
        let mut p = lock_progress(&progress);
        if let Some(t) = p.iter_mut().find(|t| t.table == table) {
            t.rows_copied += rows;
            t.partitions_done += 1;
            if t.partitions_done >= t.partitions_total {
                t.state = "Done".into();
            }
        }
    }
    Ok(())
}

/// A transactional logical message (its own transaction).
async fn emit(client: &Client, content: &str) -> Result<(), String> {
    client
        .execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&WATERMARK_PREFIX, &content],
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("emitting watermark {content:?}: {e}"))
}

/// Every row of one chunk as `read` changes.
async fn read_rows(client: &Client, job: &Job, statement: &str) -> Result<Vec<RowChange>, String> {
    let stream = client
        .copy_out(statement)
        .await
        .map_err(|e| format!("{statement}: {e}"))?;
    let mut stream = std::pin::pin!(stream);
    let relation = job.table.relation.clone();
    let columns = relation.columns.len();
    let mut rows = Vec::new();
    while let Some(chunk) = stream.next().await {
        let data = chunk.map_err(|e| format!("reading COPY data: {e}"))?;
        let mut start = 0;
        while start < data.len() {
            let end = data[start..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(data.len(), |p| start + p);
            let line = data.slice(start..end);
            start = end + 1;
            rows.push(RowChange {
                relation: relation.clone(),
                op: Op::Read,
                before: None,
                before_is_identity: false,
                after: Some(copy::parse_line(&line, columns)?),
                lsn: Lsn(0),
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use wallaby_pipeline::change::{Column, Relation};

    fn relation() -> Arc<Relation> {
        Arc::new(Relation {
            id: 1,
            schema: "public".into(),
            table: "t".into(),
            columns: vec![Column {
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
            }],
            key: vec![0],
            identity: vec![0],
        })
    }

    fn row(op: Op, id: &str) -> RowChange {
        let cells = Some(vec![Cell::Text(Bytes::copy_from_slice(id.as_bytes()))]);
        RowChange {
            relation: relation(),
            op,
            before: if op == Op::Delete {
                cells.clone()
            } else {
                None
            },
            before_is_identity: false,
            after: if op == Op::Delete { None } else { cells },
            lsn: Lsn(1),
        }
    }

    fn txn(events: Vec<SourceEvent>, end: u64) -> Vec<SourceEvent> {
        let mut all = vec![SourceEvent::Begin {
            xid: 1,
            commit_lsn: Lsn(end - 1),
            commit_time: chrono::Utc::now(),
        }];
        all.extend(events);
        all.push(SourceEvent::Commit {
            commit_lsn: Lsn(end - 1),
            end_lsn: Lsn(end),
            commit_time: chrono::Utc::now(),
        });
        all
    }

    fn mark(text: &str, lsn: u64) -> SourceEvent {
        SourceEvent::Message {
            transactional: true,
            lsn: Lsn(lsn),
            prefix: WATERMARK_PREFIX.into(),
            content: Bytes::copy_from_slice(text.as_bytes()),
        }
    }

    #[tokio::test]
    async fn the_gate_drops_chunk_rows_changed_inside_the_window_and_hides_watermarks() {
        let (in_tx, in_rx) = mpsc::channel(64);
        let (out_tx, mut out_rx) = mpsc::channel(64);
        let (chunk_tx, chunk_rx) = mpsc::channel(1);
        let gate = tokio::spawn(gate(in_rx, out_tx, chunk_rx, "run".into()));
        let (done_tx, done_rx) = oneshot::channel();
        chunk_tx
            .send(Chunk {
                id: 7,
                rows: vec![row(Op::Read, "1"), row(Op::Read, "2"), row(Op::Read, "3")],
                delivered: done_tx,
            })
            .await
            .unwrap();
        let mut events = Vec::new();
        events.extend(txn(vec![mark("low:other-run:7:public.t", 9)], 10));
        events.extend(txn(vec![mark("low:run:7:public.t", 19)], 20));
        events.extend(txn(vec![SourceEvent::Row(row(Op::Update, "2"))], 30));
        events.extend(txn(vec![SourceEvent::Row(row(Op::Delete, "3"))], 40));
        events.extend(txn(vec![mark("high:run:7", 49)], 50));
        for e in events {
            in_tx.send(e).await.unwrap();
        }
        drop(in_tx);
        gate.await.unwrap();
        let mut out = Vec::new();
        while let Some(e) = out_rx.recv().await {
            out.push(e);
        }
        assert!(
            !out.iter().any(|e| matches!(e, SourceEvent::Message { .. })),
            "a watermark was forwarded"
        );
        let reads: Vec<(String, Lsn)> = out
            .iter()
            .filter_map(|e| match e {
                SourceEvent::Row(r) if r.op == Op::Read => Some((
                    String::from_utf8_lossy(match &r.after.as_ref().unwrap()[0] {
                        Cell::Text(b) => b,
                        _ => panic!("text"),
                    })
                    .into_owned(),
                    r.lsn,
                )),
                _ => None,
            })
            .collect();
        assert_eq!(reads, vec![("1".to_owned(), Lsn(49))]);
        // The read row sits inside the high watermark's transaction, before its commit.
        let last_read = out
            .iter()
            .rposition(|e| matches!(e, SourceEvent::Row(r) if r.op == Op::Read))
            .unwrap();
        assert!(matches!(
            out[last_read + 1],
            SourceEvent::Commit {
                end_lsn: Lsn(50),
                ..
            }
        ));
        let delivered = done_rx.await.unwrap();
        assert_eq!((delivered.rows, delivered.end_lsn), (1, Lsn(50)));
    }

    #[test]
    fn chunks_cover_the_partition_and_keep_its_open_end() {
        assert_eq!(chunk_ranges(&Slice::Whole, 10), vec![(0, None)]);
        assert_eq!(
            chunk_ranges(&Slice::Whole, 600),
            vec![(0, Some(256)), (256, Some(512)), (512, None)]
        );
        assert_eq!(
            chunk_ranges(
                &Slice::Pages {
                    from: 100,
                    to: Some(400)
                },
                1000
            ),
            vec![(100, Some(356)), (356, Some(400))]
        );
    }
}
