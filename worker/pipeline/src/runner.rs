//! Batcher → fan-out → ack tracker → checkpoint.
//!
//! ```text
//! SourceEvent ─▶ Batcher ─Arc<ChangeBatch>─┬─▶ runner(dest 0) ─write/flush (retry)─┐
//!  (commit order) (count/bytes/time,        ├─▶ runner(dest 1) ─────────────────────┤ AckEvent
//!                  memory budget)           └─▶ …  (≤ parallelism writes at once)   │
//!                                                                                   ▼
//!              slot feedback ◀── AckTracker (all: min of durable; primary: primary's)
//!
//! ackPolicy primary, secondary:  dispatch ─▶ spooler(i) ─append+fsync─▶ SecondarySpool
//!                                               │                         ▼
//!                       AckTracker ◀─ Spooled(i, checkpoint): gates   runner(dest i)
//! ```
//!
//! Each destination has its own runner task and queue, so a slow destination delays only
//! itself until the memory budget is spent; the slot advances only over transaction ends
//! that the required destinations reported *durable*, cumulatively, never backward. Under
//! `ackPolicy: primary` a secondary reads from its durable spool instead of a queue, so the
//! slot follows the primary while nothing a secondary still needs is lost to a crash.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pg_walstream::SharedLsnFeedback;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;
use wallaby_crds::flow::Counters;

use crate::ack::{AckMode, AckTracker};
use crate::batch::{BatchError, Batcher, ChangeBatch, LogicalMessage, SchemaSource};
use crate::change::{DecodedRows, Op, SourceEvent};
use crate::destination::{Destination, DestinationError, WriteAck};
use crate::lsn::Lsn;
use crate::metrics::Metrics;
use crate::retry::{RetryDecision, RetryPolicy};
use crate::spool::{SEGMENT_BYTES, SecondarySpool, SpoolError, SpoolHandle, SpoolReader};

/// Batches queued per destination before the pipeline waits (under `ackPolicy: all`).
const QUEUE_BATCHES: usize = 8;

/// Source events taken in one go once the first is there (see `Pipeline::run`).
const DRAIN_EVENTS: usize = 256;
/// How long a stop waits for required destinations to make what was read durable.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// How long a stopping flow lets secondaries finish the batch they are writing; what they
/// have not made durable stays in their spool for the next run.
const SECONDARY_STOP_GRACE: Duration = Duration::from_secs(5);

/// Health of one destination as the status reports it.
#[derive(Debug, Clone, Default)]
pub struct DestinationState {
    /// Destination name.
    pub name: String,
    /// Highest transaction end it made durable.
    pub lsn: Option<Lsn>,
    /// Last error (with its class and hint), cleared by the next success.
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_time: Option<DateTime<Utc>>,
    /// Failed attempts in a row.
    pub failed_attempts: u32,
    /// The destination no longer receives batches (a secondary that gave up or fell
    /// behind its buffer); the text says why.
    pub detached: Option<String>,
}

/// Shared view of the pipeline for status reports and metrics.
#[derive(Debug, Default, Clone)]
pub struct Progress {
    /// Last confirmed position and the commit time of its transaction.
    pub checkpoint: Option<(Lsn, DateTime<Utc>)>,
    /// Commit time of the oldest transaction received but not yet confirmed.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// The counters reported in `Flow.status.counters` (rows and bytes as made durable by
    /// the required destinations).
    pub counters: Counters,
    /// Per destination.
    pub destinations: Vec<DestinationState>,
    /// Bytes held under the memory budget.
    pub pending_bytes: u64,
    /// Snapshot progress per table (initial snapshot, backfill, added tables).
    pub snapshot: Vec<wallaby_crds::flow::TableSnapshotProgress>,
    /// The DDL gate holding the stream, if any.
    pub ddl_gate: Option<GateView>,
    /// The last schema change seen.
    pub last_schema_change: Option<wallaby_crds::flow::SchemaChange>,
}

/// A DDL gate holding the stream, as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateView {
    /// The DDLApproval (in a cluster) or DDL-log entry name.
    pub approval: Option<String>,
    /// Position of the statement.
    pub lsn: Lsn,
    /// `AwaitingApproval`, `AwaitingApply` or `Rejected`.
    pub reason: String,
    /// What is waiting and what to do.
    pub message: String,
}

/// Why the pipeline stopped the flow.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A destination the slot depends on gave up after its retries.
    #[error(
        "destination {destination:?} gave up after {attempts} attempt(s): {error}; the slot was not advanced past LSN {held_at}"
    )]
    GaveUp {
        /// Destination.
        destination: String,
        /// Attempts made.
        attempts: u32,
        /// Last error.
        error: DestinationError,
        /// The slot's confirmed position.
        held_at: Lsn,
    },
    /// A change could not be decoded.
    #[error("{0}")]
    Batch(#[from] BatchError),
    /// The source broke its own protocol.
    #[error("{0}")]
    Protocol(String),
    /// A secondary's spool could not be opened, so the slot could not be kept safe for it.
    #[error("destination {destination:?}: {source}")]
    Spool {
        /// Destination.
        destination: String,
        /// Why.
        #[source]
        source: SpoolError,
    },
    /// Destinations did not make the last changes durable before the stop deadline.
    #[error(
        "destinations did not finish within {0:?} of the stop; changes after the slot's confirmed position are delivered again after the restart"
    )]
    Stuck(Duration),
}

/// Settings of the stage, validated at the edge.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Rows per batch.
    pub batch_size: u64,
    /// Bytes per batch.
    pub batch_max_bytes: u64,
    /// Longest a batch stays open.
    pub batch_timeout: Duration,
    /// Bytes of changes held at once (assembling plus in flight).
    pub memory_budget: u64,
    /// Concurrent destination writes.
    pub parallelism: u32,
    /// Ack policy.
    pub ack: AckMode,
    /// Bytes of unread spool a secondary (under `ackPolicy: primary`) may hold before it
    /// is detached.
    pub secondary_buffer_bytes: u64,
    /// Where secondaries spool (`<state_dir>/spool`): one directory per destination.
    pub spool_dir: PathBuf,
    /// Emit empty batches on timeout.
    pub emit_empty: bool,
}

/// A destination with its name and retry policy.
#[derive(Debug)]
pub struct DestinationSlot {
    /// Destination name.
    pub name: String,
    /// The sink.
    pub sink: Box<dyn Destination>,
    /// Retry policy.
    pub retry: RetryPolicy,
}

/// Handles shared between the pipeline and the rest of the worker.
#[derive(Debug, Clone)]
pub struct PipelineHandles {
    /// Status view.
    pub progress: Arc<Mutex<Progress>>,
    /// Slot feedback cell of the replication stream.
    pub feedback: Arc<SharedLsnFeedback>,
    /// The confirmed position, for the reader's idle-keepalive logic.
    pub confirmed: Arc<AtomicU64>,
}

/// What runners report.
#[derive(Debug)]
enum AckEvent {
    /// Everything up to `lsn` is durable at the destination.
    Durable {
        dest: usize,
        lsn: Lsn,
        bytes: u64,
        transactions: u64,
        counts: Vec<(String, Op, u64)>,
    },
    /// An attempt failed; a retry follows.
    Failed {
        dest: usize,
        attempt: u32,
        error: DestinationError,
    },
    /// Retries are exhausted.
    GaveUp {
        dest: usize,
        attempts: u32,
        error: DestinationError,
    },
    /// A secondary's spool holds everything up to `lsn` (fsynced).
    Spooled { dest: usize, lsn: Lsn },
    /// A secondary's unread spool passed its buffer at batch `seq`; the spooler deleted
    /// the spool and stopped.
    Overflow { dest: usize, seq: u64 },
    /// A secondary's spool cannot be written or read any more.
    SpoolFailed { dest: usize, error: SpoolError },
}

struct Lane {
    /// Queue of a required destination's runner, or of a secondary's spooler.
    tx: Option<mpsc::Sender<Arc<ChangeBatch>>>,
    /// Spool of a secondary (`ackPolicy: primary`).
    spool: Option<SpoolHandle>,
    /// Stops the runner of a detached destination (it may be stuck in a write).
    abort: Option<tokio::task::AbortHandle>,
}

/// Where a runner takes its batches from.
enum Feed {
    Queue(mpsc::Receiver<Arc<ChangeBatch>>),
    Spool(SpoolReader),
}

impl Feed {
    /// Whether another batch is already queued: a flush may then wait for it, so one
    /// flush makes several batches durable (group commit).
    fn has_next(&self) -> bool {
        match self {
            Self::Queue(rx) => !rx.is_empty(),
            Self::Spool(_) => false,
        }
    }

    /// The next batch and, for a spool, the position to commit once it is durable.
    async fn next(
        &mut self,
        index: usize,
        acks: &mpsc::UnboundedSender<AckEvent>,
    ) -> Option<(Arc<ChangeBatch>, Option<u64>)> {
        match self {
            Self::Queue(rx) => rx.recv().await.map(|b| (b, None)),
            Self::Spool(reader) => match reader.next().await {
                Ok(Some(s)) => Some((Arc::new(s.batch), Some(s.end))),
                Ok(None) => None,
                Err(error) => {
                    let _ = acks.send(AckEvent::SpoolFailed { dest: index, error });
                    None
                }
            },
        }
    }
}

/// The batching / fan-out / ack stage.
#[derive(Debug)]
pub struct Pipeline {
    config: PipelineConfig,
    destinations: Vec<DestinationSlot>,
    handles: PipelineHandles,
    start: Lsn,
    schemas: Box<dyn SchemaSource>,
    metrics: Metrics,
}

impl std::fmt::Debug for dyn SchemaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SchemaSource")
    }
}

impl Pipeline {
    /// Builds the stage; `start` is the slot's confirmed position.
    pub fn new(
        config: PipelineConfig,
        destinations: Vec<DestinationSlot>,
        handles: PipelineHandles,
        start: Lsn,
        schemas: Box<dyn SchemaSource>,
        metrics: Metrics,
    ) -> Self {
        {
            let mut p = lock(&handles.progress);
            p.destinations = destinations
                .iter()
                .map(|d| DestinationState {
                    name: d.name.clone(),
                    lsn: Some(start),
                    ..DestinationState::default()
                })
                .collect();
        }
        handles.confirmed.store(start.0, Ordering::Release);
        Self {
            config,
            destinations,
            handles,
            start,
            schemas,
            metrics,
        }
    }

    /// Consumes events until the source hangs up, then waits for every destination to
    /// make the rest durable. Returns the first reason to stop the flow.
    pub async fn run(self, mut events: mpsc::Receiver<SourceEvent>) -> Result<(), PipelineError> {
        let Self {
            config,
            destinations,
            handles,
            start,
            mut schemas,
            metrics,
        } = self;
        let names: Vec<String> = destinations.iter().map(|d| d.name.clone()).collect();
        let mut tracker = AckTracker::new(config.ack, destinations.len(), start);
        let parallelism = Arc::new(Semaphore::new(config.parallelism.max(1) as usize));
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
        // Required destinations are drained at stop; secondaries only finish their batch.
        let mut runners = JoinSet::new();
        let mut secondaries = JoinSet::new();
        let mut lanes = Vec::new();
        for (index, slot) in destinations.into_iter().enumerate() {
            if matches!(config.ack, AckMode::Primary(p) if p != index) {
                let dir = config.spool_dir.join(&slot.name);
                let (spool, reader) =
                    SecondarySpool::open(&dir, SEGMENT_BYTES).map_err(|source| {
                        PipelineError::Spool {
                            destination: slot.name.clone(),
                            source,
                        }
                    })?;
                // The secondary gates the slot from the start: what its spool holds may
                // be ahead of its own position, never behind what the slot passed.
                tracker.spooled(index, spool.end_lsn().max(start));
                let own = reader.durable_lsn().unwrap_or(start);
                tracker.recovered(index, own);
                if let Some(d) = lock(&handles.progress).destinations.get_mut(index) {
                    d.lsn = Some(own);
                }
                let unread = spool.unread_bytes();
                if unread > 0 {
                    tracing::info!(destination = %slot.name, unread_bytes = unread, from = %own, to = %spool.end_lsn(), "secondary catches up from its spool");
                }
                let abort = secondaries.spawn(run_destination(
                    index,
                    slot,
                    Feed::Spool(reader),
                    ack_tx.clone(),
                    Some(parallelism.clone()),
                    metrics.clone(),
                ));
                // The spooler appends apart from dispatch, so an fsync never delays the
                // primary; it is drained at stop like a required runner.
                let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
                lanes.push(Lane {
                    tx: Some(tx),
                    spool: Some(spool.handle()),
                    abort: Some(abort),
                });
                runners.spawn(run_spooler(
                    index,
                    spool,
                    rx,
                    ack_tx.clone(),
                    config.secondary_buffer_bytes,
                ));
                continue;
            }
            discard_stale_spool(&config.spool_dir, &slot.name);
            let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
            lanes.push(Lane {
                tx: Some(tx),
                spool: None,
                abort: None,
            });
            // Under `ackPolicy: primary` the primary never queues behind a secondary.
            let limit = match config.ack {
                AckMode::Primary(_) => None,
                AckMode::All => Some(parallelism.clone()),
            };
            lanes[index].abort = Some(runners.spawn(run_destination(
                index,
                slot,
                Feed::Queue(rx),
                ack_tx.clone(),
                limit,
                metrics.clone(),
            )));
        }
        drop(ack_tx);

        let mut batcher = Batcher::new(config.memory_budget);
        let mut opened: Option<Instant> = None;
        let mut state = Flow {
            tracker: &mut tracker,
            lanes: &mut lanes,
            names: &names,
            handles: &handles,
            secondary_limit: config.secondary_buffer_bytes,
            metrics: &metrics,
            checkpoints: VecDeque::new(),
        };

        // Phase 1: read, batch and dispatch until the source hangs up.
        let mut source_open = true;
        while source_open {
            let deadline = opened.map(|t| t + config.batch_timeout);
            tokio::select! {
                biased;
                ack = ack_rx.recv() => {
                    if let Some(ack) = ack {
                        state.on_ack(ack)?;
                    }
                    continue;
                }
                _ = sleep_until(deadline) => {
                    opened = None;
                    match batcher.take() {
                        Some(batch) => state.dispatch(batch).await?,
                        None if config.emit_empty => state.dispatch(batcher.empty()).await?,
                        None => {}
                    }
                    continue;
                }
                event = events.recv() => match event {
                    None => source_open = false,
                    Some(first) => {
                        // Events already queued are taken without going back through the
                        // select (a timer and three branches per event); acks and the batch
                        // timeout are looked at again after at most DRAIN_EVENTS.
                        let mut next = Some(first);
                        let mut drained = 0;
                        while let Some(event) = next.take() {
                            opened.get_or_insert_with(Instant::now);
                            let full = match event {
                                SourceEvent::Begin { xid, commit_lsn, commit_time } => {
                                    batcher.begin(xid, commit_lsn, commit_time);
                                    let mut p = lock(&handles.progress);
                                    p.oldest_pending.get_or_insert(commit_time);
                                    false
                                }
                                SourceEvent::Row(change) => {
                                    let lsn = change.lsn;
                                    batcher.row(&change, lsn, schemas.as_mut()).await?;
                                    batcher.current().is_some_and(|b| {
                                        b.rows >= config.batch_size || b.bytes >= config.batch_max_bytes
                                    })
                                }
                                SourceEvent::Decoded(rows) => {
                                    let mut next_rows = Some(rows);
                                    while let Some(rows) = next_rows.take() {
                                        let room = batch_room(batcher.current(), &config, &rows);
                                        if rows.encoded.is_some()
                                            && room < rows.len()
                                            && batcher.current().is_some_and(|b| b.rows > 0)
                                            && let Some(batch) = batcher.take()
                                        {
                                            // An encoded piece goes whole: into the next batch.
                                            opened = Some(Instant::now());
                                            state.dispatch(batch).await?;
                                        }
                                        next_rows = batcher.decoded(rows, room).await?;
                                        if next_rows.is_some() && let Some(batch) = batcher.take() {
                                            opened = Some(Instant::now());
                                            state.dispatch(batch).await?;
                                        }
                                    }
                                    batcher.current().is_some_and(|b| {
                                        b.rows >= config.batch_size || b.bytes >= config.batch_max_bytes
                                    })
                                }
                                SourceEvent::Message { transactional, lsn, prefix, content } => {
                                    batcher
                                        .message(transactional, LogicalMessage { lsn, commit_lsn: None, prefix, content })
                                        .await;
                                    false
                                }
                                SourceEvent::Commit { end_lsn, commit_time, .. } => {
                                    batcher.commit(end_lsn, commit_time);
                                    batcher.current().is_some_and(|b| {
                                        b.rows >= config.batch_size || b.bytes >= config.batch_max_bytes
                                    })
                                }
                            };
                            if full && let Some(batch) = batcher.take() {
                                opened = None;
                                state.dispatch(batch).await?;
                            }
                            drained += 1;
                            if drained < DRAIN_EVENTS {
                                next = events.try_recv().ok();
                            }
                        }
                        let pending = batcher.pending_bytes();
                        lock(&handles.progress).pending_bytes = pending;
                        metrics.set_pending_bytes(pending);
                    }
                },
            }
        }

        // Phase 2: the source is gone (stop or error): deliver what was read, then let the
        // required runners drain and make it durable.
        if let Some(batch) = batcher.take() {
            state.dispatch(batch).await?;
        }
        for lane in state.lanes.iter_mut() {
            lane.tx = None;
        }
        // A required destination hung in a write must not hang the stop: after the grace
        // period its runner is dropped; what it had not made durable was never confirmed,
        // so it is delivered again after the restart.
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        loop {
            tokio::select! {
                ack = ack_rx.recv() => match ack {
                    Some(ack) => state.on_ack(ack)?,
                    None => break,
                },
                joined = runners.join_next() => if joined.is_none() { break },
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        grace = ?SHUTDOWN_GRACE,
                        "destinations did not finish within the grace period; stopping without them"
                    );
                    runners.abort_all();
                    break;
                }
            }
        }
        while let Ok(ack) = ack_rx.try_recv() {
            state.on_ack(ack)?;
        }
        // Secondaries stop after the batch in hand: the rest is safe in their spools and
        // replayed by the next run, so a stuck secondary cannot hold up the stop.
        for lane in state.lanes.iter() {
            if let Some(spool) = &lane.spool {
                spool.stop();
            }
        }
        let deadline = Instant::now() + SECONDARY_STOP_GRACE;
        loop {
            tokio::select! {
                ack = ack_rx.recv() => match ack {
                    Some(ack) => state.on_ack(ack)?,
                    None => break,
                },
                joined = secondaries.join_next() => if joined.is_none() { break },
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::info!("stopping secondaries in the middle of a write; their spools keep the batches for the next run");
                    secondaries.abort_all();
                    break;
                }
            }
        }
        while let Ok(ack) = ack_rx.try_recv() {
            state.on_ack(ack)?;
        }
        Ok(())
    }
}

/// Mutable state of a running pipeline.
struct Flow<'a> {
    tracker: &'a mut AckTracker,
    lanes: &'a mut Vec<Lane>,
    names: &'a [String],
    handles: &'a PipelineHandles,
    secondary_limit: u64,
    metrics: &'a Metrics,
    /// Checkpoints dispatched and not yet confirmed, with their commit times.
    checkpoints: VecDeque<(Lsn, Option<DateTime<Utc>>)>,
}

impl Flow<'_> {
    async fn dispatch(&mut self, mut batch: ChangeBatch) -> Result<(), PipelineError> {
        let bytes = batch.bytes;
        let seq = batch.seq;
        batch.span = tracing::info_span!(
            "batch",
            seq,
            rows = batch.rows,
            bytes,
            transactions = batch.transactions,
            lsn = batch.checkpoint.map(|l| l.to_string()).unwrap_or_default(),
        );
        self.metrics.batch(batch.rows, bytes);
        for (table, op, n) in &batch.op_counts {
            self.metrics.rows(table, op.as_str(), *n);
        }
        if let Some(cp) = batch.checkpoint {
            self.checkpoints.push_back((cp, batch.checkpoint_time));
        }
        let batch = Arc::new(batch);
        for lane in self.lanes.iter_mut() {
            // Required destinations and secondaries' spoolers apply back-pressure: wait for
            // queue room (a spooler waits only for the local disk, never for its secondary).
            if let Some(tx) = &lane.tx
                && tx.send(batch.clone()).await.is_err()
            {
                // The runner or spooler ended; its event explains why and is handled when
                // it is received.
                lane.tx = None;
            }
        }
        Ok(())
    }

    /// Detaches secondary `index`: it stops receiving batches, its spool is deleted and
    /// it no longer gates the slot.
    fn detach(&mut self, index: usize, reason: String) {
        let name = &self.names[index];
        let Some(lane) = self.lanes.get_mut(index) else {
            return;
        };
        let Some(spool) = lane.spool.take() else {
            // Already detached.
            return;
        };
        lane.tx = None;
        if let Some(abort) = lane.abort.take() {
            abort.abort();
        }
        if let Err(e) = spool.remove() {
            tracing::warn!(destination = %name, error = %e, "could not delete the spool of a detached secondary");
        }
        tracing::error!(destination = %name, "{reason}");
        {
            let mut p = lock(&self.handles.progress);
            if let Some(d) = p.destinations.get_mut(index) {
                d.detached = Some(reason);
            }
        }
        if let Some(confirmed) = self.tracker.ungate(index) {
            self.confirm(confirmed);
        }
    }

    /// Moves the slot to `confirmed`: every required destination made it durable and
    /// every gating secondary holds it.
    fn confirm(&mut self, confirmed: Lsn) {
        let mut time = None;
        while let Some((lsn, t)) = self.checkpoints.front().copied() {
            if lsn > confirmed {
                break;
            }
            time = t.or(time);
            self.checkpoints.pop_front();
        }
        self.handles.feedback.update_flushed_lsn(confirmed.0);
        self.handles.feedback.update_applied_lsn(confirmed.0);
        self.handles.confirmed.store(confirmed.0, Ordering::Release);
        self.metrics.set_confirmed_lsn(confirmed.0);
        let time = time.unwrap_or_else(Utc::now);
        let mut p = lock(&self.handles.progress);
        p.checkpoint = Some((confirmed, time));
        if p.oldest_pending.is_some_and(|t| t <= time) {
            p.oldest_pending = None;
        }
        tracing::debug!(lsn = %confirmed, "checkpoint");
    }

    fn on_ack(&mut self, ack: AckEvent) -> Result<(), PipelineError> {
        match ack {
            AckEvent::Durable {
                dest,
                lsn,
                bytes,
                transactions,
                counts,
            } => {
                let advanced = self.tracker.durable(dest, lsn);
                self.metrics
                    .set_destination_lsn(&self.names[dest], self.tracker.destination(dest).0);
                let mut p = lock(&self.handles.progress);
                if let Some(d) = p.destinations.get_mut(dest) {
                    d.lsn = Some(self.tracker.destination(dest));
                    d.last_error = None;
                    d.failed_attempts = 0;
                }
                // Counters follow the destinations that drive the slot, so they count
                // what was made durable there once.
                if self.tracker.is_required(dest) && is_first_required(self.tracker, dest) {
                    // A truncate is counted apart, not as a row.
                    p.counters.rows += counts
                        .iter()
                        .filter(|(_, op, _)| *op != Op::Truncate)
                        .map(|(_, _, n)| n)
                        .sum::<u64>();
                    p.counters.transactions += transactions;
                    p.counters.bytes += bytes;
                    self.metrics.transactions(transactions);
                    p.counters.batches += 1;
                    for (_, op, n) in counts {
                        match op {
                            // Snapshot rows arrive as new rows to the destinations.
                            Op::Insert | Op::Read => p.counters.inserts += n,
                            Op::Update => p.counters.updates += n,
                            Op::Delete => p.counters.deletes += n,
                            Op::Truncate => p.counters.truncates += n,
                        }
                    }
                }
                drop(p);
                if let Some(confirmed) = advanced {
                    // Only now — every required destination durable — may the slot move.
                    self.confirm(confirmed);
                }
            }
            AckEvent::Failed {
                dest,
                attempt,
                error,
            } => {
                tracing::warn!(destination = %self.names[dest], attempt, %error, "destination write failed; retrying");
                let mut p = lock(&self.handles.progress);
                if let Some(d) = p.destinations.get_mut(dest) {
                    d.last_error = Some(error.to_string());
                    d.last_error_time = Some(Utc::now());
                    d.failed_attempts = attempt;
                }
            }
            AckEvent::GaveUp {
                dest,
                attempts,
                error,
            } => {
                {
                    let mut p = lock(&self.handles.progress);
                    if let Some(d) = p.destinations.get_mut(dest) {
                        d.last_error = Some(error.to_string());
                        d.last_error_time = Some(Utc::now());
                        d.failed_attempts = attempts;
                    }
                }
                if self.tracker.is_required(dest) {
                    return Err(PipelineError::GaveUp {
                        destination: self.names[dest].clone(),
                        attempts,
                        error,
                        held_at: self.tracker.confirmed(),
                    });
                }
                let reason = format!(
                    "gave up after {attempts} attempt(s): {error}; it stopped at LSN {} while the primary continues; its spool was deleted, re-sync it (backfill) from there",
                    self.tracker.destination(dest)
                );
                self.detach(dest, reason);
            }
            AckEvent::SpoolFailed { dest, error } => {
                let reason = format!(
                    "its spool failed: {error}; it stopped at LSN {} while the primary continues; its spool was deleted, re-sync it (backfill) from there",
                    self.tracker.destination(dest)
                );
                self.detach(dest, reason);
            }
            AckEvent::Spooled { dest, lsn } => {
                if let Some(confirmed) = self.tracker.spooled(dest, lsn) {
                    self.confirm(confirmed);
                }
            }
            AckEvent::Overflow { dest, seq } => {
                let limit = self.secondary_limit;
                let reason = format!(
                    "fell behind the primary by more than its buffer ({limit} bytes of unread spool) at batch {seq}; it stopped receiving changes after LSN {}, its spool was deleted, and it must be re-synced (backfill) from there",
                    self.tracker.destination(dest)
                );
                self.detach(dest, reason);
            }
        }
        Ok(())
    }
}

fn is_first_required(tracker: &AckTracker, dest: usize) -> bool {
    (0..dest).all(|i| !tracker.is_required(i))
}

/// A destination that drives the slot needs no spool; one left from a run where it was a
/// secondary is deleted (nothing would ever read it), saying what it still held.
fn discard_stale_spool(root: &std::path::Path, name: &str) {
    let dir = root.join(name);
    if !dir.exists() {
        return;
    }
    match SecondarySpool::open(&dir, SEGMENT_BYTES) {
        Ok((spool, reader)) => {
            let unread = spool.unread_bytes();
            if unread > 0 {
                tracing::warn!(destination = %name, unread_bytes = unread, from = %reader.durable_lsn().unwrap_or_default(), to = %spool.end_lsn(), "deleting the spool left from when this destination was a secondary; the changes it had not made durable are missing there, re-sync it (backfill) from that LSN");
            }
            if let Err(e) = spool.remove() {
                tracing::warn!(destination = %name, error = %e, "could not delete a stale spool");
            }
        }
        Err(e) => {
            tracing::warn!(destination = %name, error = %e, "could not open a stale spool to delete it")
        }
    }
}

/// Appends batches to a secondary's spool in order; each append (fsynced) is reported so
/// the slot may pass it. Past `limit` bytes of unread spool, deletes the spool and stops.
async fn run_spooler(
    index: usize,
    mut spool: SecondarySpool,
    mut rx: mpsc::Receiver<Arc<ChangeBatch>>,
    acks: mpsc::UnboundedSender<AckEvent>,
    limit: u64,
) {
    let dir = spool.dir().to_owned();
    while let Some(batch) = rx.recv().await {
        let (seq, checkpoint) = (batch.seq, batch.checkpoint);
        let appended = tokio::task::spawn_blocking(move || {
            let r = spool.append(&batch);
            (spool, r)
        })
        .await;
        let (s, result) = match appended {
            Ok(done) => done,
            Err(e) => {
                // The writer went with the task; nothing more can be appended.
                let error = SpoolError::Task {
                    dir,
                    reason: format!("appending batch {seq}: {e}"),
                };
                let _ = acks.send(AckEvent::SpoolFailed { dest: index, error });
                return;
            }
        };
        spool = s;
        match result {
            Err(error) => {
                let _ = acks.send(AckEvent::SpoolFailed { dest: index, error });
                return;
            }
            Ok(_) if spool.unread_bytes() > limit => {
                let _ = acks.send(AckEvent::Overflow { dest: index, seq });
                return;
            }
            Ok(_) => {
                if let Some(lsn) = checkpoint {
                    let _ = acks.send(AckEvent::Spooled { dest: index, lsn });
                }
            }
        }
    }
    // The flow stops: what the secondary has not read stays for the next run.
    spool.stop();
}

/// Writes batches to one destination in order, with retries, reporting durability.
async fn run_destination(
    index: usize,
    mut slot: DestinationSlot,
    mut feed: Feed,
    acks: mpsc::UnboundedSender<AckEvent>,
    parallelism: Option<Arc<Semaphore>>,
    metrics: Metrics,
) {
    // Transaction end (and its stats) accepted but not yet flushed.
    let mut unflushed: Option<Pending> = None;
    while let Some((batch, spooled)) = feed.next(index, &acks).await {
        let span = tracing::info_span!(
            parent: &batch.span,
            "destination.write",
            destination = %slot.name,
            batch = batch.seq,
            rows = batch.rows,
            bytes = batch.bytes,
        );
        let written = attempt(
            index,
            &mut slot,
            &acks,
            Attempt::Write(&batch),
            &metrics,
            parallelism.as_deref(),
        )
        .instrument(span)
        .await;
        let ack = match written {
            Ok(Some(ack)) => ack,
            Ok(None) => WriteAck::Durable,
            Err(()) => return,
        };
        let pending = unflushed.get_or_insert_with(Pending::default);
        // Any accepted (not yet durable) write since the last flush needs one, whatever
        // the later writes said.
        pending.accepted |= ack == WriteAck::Accepted;
        pending.bytes += batch.bytes;
        pending.transactions += batch.transactions;
        for (t, op, n) in &batch.op_counts {
            pending.counts.push((t.clone(), *op, *n));
        }
        if let Some(cp) = batch.checkpoint {
            pending.lsn = Some(cp);
        }
        if spooled.is_some() {
            pending.spooled = spooled;
        }
        // Flush only at a transaction end: a batch holding part of a transaction can
        // confirm nothing, so its durability would buy nothing.
        if batch.checkpoint.is_none() {
            continue;
        }
        // Group commit: while more batches are queued, write them first and make them
        // durable with one flush (up to GROUP_COMMIT_BATCHES), as a busy destination
        // would otherwise spend its time flushing; an idle one flushes at once, and
        // writes that were durable by themselves are acknowledged at once.
        pending.batches += 1;
        if pending.accepted && pending.batches < GROUP_COMMIT_BATCHES && feed.has_next() {
            continue;
        }
        if unflushed.as_ref().is_some_and(|p| p.accepted) {
            let span = tracing::info_span!(parent: &batch.span, "destination.flush", destination = %slot.name);
            let flushed = attempt(
                index,
                &mut slot,
                &acks,
                Attempt::Flush,
                &metrics,
                parallelism.as_deref(),
            )
            .instrument(span)
            .await;
            if flushed.is_err() {
                return;
            }
        }
        if let Some(p) = unflushed.take()
            && let Some(lsn) = p.lsn
        {
            if let (Feed::Spool(reader), Some(position)) = (&mut feed, p.spooled)
                && let Err(e) = reader.commit(position, lsn).await
            {
                // The batches are durable at the destination; a stale cursor only means
                // they are delivered again after a restart.
                tracing::warn!(destination = %slot.name, error = %e, "could not record the secondary's position in its spool");
            }
            let _ = acks.send(AckEvent::Durable {
                dest: index,
                lsn,
                bytes: p.bytes,
                transactions: p.transactions,
                counts: p.counts,
            });
        }
    }
}

#[derive(Debug, Default)]
struct Pending {
    lsn: Option<Lsn>,
    /// A write since the last flush was only accepted.
    accepted: bool,
    /// Spool position after the last batch (secondaries).
    spooled: Option<u64>,
    bytes: u64,
    transactions: u64,
    counts: Vec<(String, Op, u64)>,
    /// Batches ending a transaction written since the last flush.
    batches: usize,
}

/// Most batches one flush makes durable (group commit while batches queue up).
const GROUP_COMMIT_BATCHES: usize = 8;

/// One destination operation.
#[derive(Clone, Copy)]
enum Attempt<'a> {
    Write(&'a ChangeBatch),
    Flush,
}

/// Runs the operation until it succeeds (`Some(ack)` for a write, `None` for a flush) or
/// the retry policy gives up (then reports `GaveUp` and returns `Err`).
async fn attempt(
    index: usize,
    slot: &mut DestinationSlot,
    acks: &mpsc::UnboundedSender<AckEvent>,
    what: Attempt<'_>,
    metrics: &Metrics,
    parallelism: Option<&Semaphore>,
) -> Result<Option<WriteAck>, ()> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        // The permit covers one attempt: a destination backing off between retries does
        // not hold up the others. The semaphore is never closed; if it were, go on
        // without the limit.
        let permit = match parallelism {
            Some(p) => p.acquire().await.ok(),
            None => None,
        };
        let started = std::time::Instant::now();
        let result = match what {
            Attempt::Write(batch) => {
                let r = if batch.has_encoded() && slot.sink.payload_encoding().is_none() {
                    Err(DestinationError::permanent(
                        "internal error: rows encoded ahead reached a destination that needs the rows",
                    ))
                } else {
                    slot.sink.write(batch).await.map(Some)
                };
                metrics.destination_write(&slot.name, batch.bytes, started.elapsed(), r.is_ok());
                r
            }
            Attempt::Flush => {
                let r = slot.sink.flush().await.map(|()| None);
                metrics.destination_flush(&slot.name, started.elapsed());
                r
            }
        };
        drop(permit);
        let error = match result {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        metrics.error("destination", error.class.as_str());
        match slot.retry.decide(attempt, &error) {
            RetryDecision::RetryAfter(wait) => {
                metrics.retry(
                    &slot.name,
                    error.class == crate::destination::ErrorClass::Transient,
                );
                let _ = acks.send(AckEvent::Failed {
                    dest: index,
                    attempt,
                    error,
                });
                tokio::time::sleep(wait).await;
            }
            RetryDecision::GiveUp => {
                let _ = acks.send(AckEvent::GaveUp {
                    dest: index,
                    attempts: attempt,
                    error,
                });
                return Err(());
            }
        }
    }
}

/// How many of `rows` fit in the batch being assembled before it reaches `batchSize` or
/// `batchMaxBytes` (at least one, as a single streamed row is always taken).
fn batch_room(current: Option<&ChangeBatch>, config: &PipelineConfig, rows: &DecodedRows) -> u64 {
    let (held_rows, held_bytes) = current.map_or((0, 0), |b| (b.rows, b.bytes));
    let by_count = config.batch_size.saturating_sub(held_rows);
    let per_row = (rows.bytes / rows.len().max(1)).max(1);
    let by_bytes = config
        .batch_max_bytes
        .saturating_sub(held_bytes)
        .div_ceil(per_row);
    by_count.min(by_bytes).max(1)
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
