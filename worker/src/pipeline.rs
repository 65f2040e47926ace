//! Batcher, fan-out and checkpoint: records are written to every destination as they
//! arrive; at a batch boundary (`batchSize` rows or `batchTimeout`) every destination is
//! made durable, and only then does the confirmed position advance to the end of the last
//! committed transaction in the batch. Progress never moves backward and never passes a
//! transaction that is not fully durable.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pg_walstream::SharedLsnFeedback;
use tokio::sync::mpsc;
use tokio::time::Instant;
use wallaby_crds::flow::Counters;

use crate::change::{Op, SourceEvent, TxnMeta, message_record};
use crate::destination::file::FileDestination;
use crate::lsn::Lsn;
use crate::metrics::Metrics;

/// Shared view of the pipeline for status reports.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    /// Last confirmed position and the commit time of its transaction.
    pub checkpoint: Option<(Lsn, DateTime<Utc>)>,
    /// Commit time of the oldest transaction received but not yet confirmed.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// The counters reported in `Flow.status.counters` (rows and bytes as written,
    /// transactions and batches as made durable).
    pub counters: Counters,
}

/// Failure of a destination write; the worker stops without confirming the batch.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A destination could not write or sync.
    #[error("destination {destination:?} failed: {source}")]
    Destination {
        destination: String,
        #[source]
        source: std::io::Error,
    },
    /// The source broke its own protocol.
    #[error("{0}")]
    Protocol(String),
}

/// The batching / fan-out / ack stage.
#[derive(Debug)]
pub struct Pipeline {
    destinations: Vec<(String, FileDestination)>,
    batch_size: u64,
    batch_timeout: Duration,
    feedback: Arc<SharedLsnFeedback>,
    progress: Arc<Mutex<Progress>>,
    metrics: Metrics,
}

/// State of the batch being assembled.
#[derive(Debug, Default)]
struct Batch {
    rows: u64,
    txns: u64,
    started: Option<Instant>,
    /// End LSN and commit time of the last transaction committed in this batch.
    last_commit: Option<(Lsn, DateTime<Utc>)>,
    // --- observability: encoded bytes and per-destination write time of this batch ---
    bytes: u64,
    write_time: Vec<Duration>,
}

impl Pipeline {
    /// Builds the stage.
    pub fn new(
        destinations: Vec<(String, FileDestination)>,
        batch_size: u32,
        batch_timeout: Duration,
        feedback: Arc<SharedLsnFeedback>,
        progress: Arc<Mutex<Progress>>,
        metrics: Metrics,
    ) -> Self {
        Self {
            destinations,
            batch_size: batch_size.into(),
            batch_timeout,
            feedback,
            progress,
            metrics,
        }
    }

    /// Consumes events until the source hangs up, then makes the rest durable.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<SourceEvent>,
    ) -> Result<(), PipelineError> {
        let mut txn: Option<TxnMeta> = None;
        let mut batch = Batch::default();
        loop {
            let deadline = batch.started.map(|t| t + self.batch_timeout);
            let event = tokio::select! {
                event = events.recv() => event,
                _ = sleep_until(deadline) => {
                    self.flush(&mut batch)?;
                    continue;
                }
            };
            let Some(event) = event else {
                self.flush(&mut batch)?;
                return Ok(());
            };
            match event {
                SourceEvent::Begin {
                    xid,
                    commit_lsn,
                    commit_time,
                } => {
                    txn = Some(TxnMeta {
                        xid,
                        commit_lsn,
                        commit_time,
                    });
                    let mut p = lock(&self.progress);
                    p.oldest_pending.get_or_insert(commit_time);
                }
                SourceEvent::Row(change) => {
                    let meta = txn.as_ref().ok_or_else(|| {
                        PipelineError::Protocol("row change outside a transaction".into())
                    })?;
                    let record = serde_json::to_vec(&change.to_record(meta))
                        .map_err(|e| PipelineError::Protocol(e.to_string()))?;
                    self.write(meta.commit_lsn, &record, &mut batch)?;
                    // --- observability ---
                    let table = format!("{}.{}", change.relation.schema, change.relation.table);
                    self.metrics.rows(&table, change.op.as_str(), 1);
                    let mut p = lock(&self.progress);
                    match change.op {
                        Op::Insert => p.counters.inserts += 1,
                        Op::Update => p.counters.updates += 1,
                        Op::Delete => p.counters.deletes += 1,
                        Op::Truncate => p.counters.truncates += 1,
                    }
                    if change.op != Op::Truncate {
                        p.counters.rows += 1;
                    }
                    p.counters.bytes += record.len() as u64 + 1;
                    batch.rows += 1;
                    batch.started.get_or_insert_with(Instant::now);
                }
                SourceEvent::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => {
                    let meta = if transactional { txn.as_ref() } else { None };
                    let record =
                        message_record(meta, lsn, transactional, &prefix, &content).to_string();
                    self.write(
                        meta.map(|m| m.commit_lsn).unwrap_or(lsn),
                        record.as_bytes(),
                        &mut batch,
                    )?;
                    batch.started.get_or_insert_with(Instant::now);
                }
                SourceEvent::Commit {
                    end_lsn,
                    commit_time,
                    ..
                } => {
                    txn = None;
                    batch.txns += 1;
                    batch.last_commit = Some((end_lsn, commit_time));
                    batch.started.get_or_insert_with(Instant::now);
                    if batch.rows >= self.batch_size {
                        self.flush(&mut batch)?;
                    }
                }
            }
        }
    }

    fn write(&mut self, lsn: Lsn, record: &[u8], batch: &mut Batch) -> Result<(), PipelineError> {
        batch
            .write_time
            .resize(self.destinations.len(), Duration::ZERO);
        for ((name, dest), write_time) in self.destinations.iter_mut().zip(&mut batch.write_time) {
            let started = std::time::Instant::now();
            let result = dest.write(lsn, record);
            *write_time += started.elapsed();
            if let Err(source) = result {
                // --- observability ---
                self.metrics.destination_write(name, 0, *write_time, false);
                self.metrics.error("destination", "write");
                return Err(PipelineError::Destination {
                    destination: name.clone(),
                    source,
                });
            }
        }
        batch.bytes += record.len() as u64 + 1;
        Ok(())
    }

    /// Makes every destination durable, then confirms the last committed transaction.
    fn flush(&mut self, batch: &mut Batch) -> Result<(), PipelineError> {
        // --- observability: a `batch` span over making the batch durable (nothing to
        // observe when nothing arrived since the last flush) ---
        let observed = batch.started.is_some();
        let span = if observed {
            tracing::info_span!(
                "batch",
                rows = batch.rows,
                bytes = batch.bytes,
                transactions = batch.txns,
                lsn = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        if let Some((end_lsn, _)) = batch.last_commit {
            span.record("lsn", tracing::field::display(end_lsn));
        }
        let _batch_span = span.enter();
        for (i, (name, dest)) in self.destinations.iter_mut().enumerate() {
            // --- observability: one child span per destination ---
            let _dest_span = if observed {
                tracing::info_span!("destination.write", destination = %name, bytes = batch.bytes)
            } else {
                tracing::Span::none()
            }
            .entered();
            let started = std::time::Instant::now();
            let result = tokio::task::block_in_place(|| {
                dest.rotate_if_due()?;
                dest.sync()
            });
            // --- observability ---
            let flush_time = started.elapsed();
            let write_time = batch.write_time.get(i).copied().unwrap_or_default();
            if observed || result.is_err() {
                self.metrics
                    .destination_write(name, batch.bytes, write_time, result.is_ok());
                self.metrics.destination_flush(name, flush_time);
            }
            if result.is_err() {
                self.metrics.error("destination", "sync");
            }
            result.map_err(|source| PipelineError::Destination {
                destination: name.clone(),
                source,
            })?;
        }
        // --- observability ---
        if observed {
            self.metrics.batch(batch.rows, batch.bytes);
        }
        if let Some((end_lsn, commit_time)) = batch.last_commit.take() {
            // Only now, with every destination fsynced, may the slot move past this batch.
            self.feedback.update_applied_lsn(end_lsn.0);
            // --- observability ---
            self.metrics.transactions(batch.txns);
            self.metrics.set_confirmed_lsn(end_lsn.0);
            for (name, _) in &self.destinations {
                self.metrics.set_destination_lsn(name, end_lsn.0);
            }
            let mut p = lock(&self.progress);
            p.checkpoint = Some((end_lsn, commit_time));
            p.counters.transactions += batch.txns;
            p.counters.batches += 1;
            p.oldest_pending = None;
            tracing::debug!(lsn = %end_lsn, rows = batch.rows, txns = batch.txns, "batch durable");
        }
        *batch = Batch::default();
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Locks the progress; a poisoned lock only means a status reader panicked, and the
/// counters inside are still consistent, so take them.
pub fn lock(p: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
