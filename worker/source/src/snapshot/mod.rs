//! Initial snapshot and backfill: existing rows of tables copied partition by partition, in
//! parallel, through the same batcher, encoders and destinations as the stream; a
//! partition is recorded finished only once every destination made it durable.
//!
//! ```text
//!  slot created with EXPORT_SNAPSHOT ──name──┐   (or pg_export_snapshot() held open)
//!                                            ▼
//!  plan (state store) ─▶ queue ─▶ copy worker 1..N: BEGIN REPEATABLE READ;
//!                                   SET TRANSACTION SNAPSHOT; COPY (SELECT … WHERE slice)
//!                                   (binary when every column type has a binary decoder)
//!                                            │ decoded in the copy worker (in parallel):
//!                                            │ pieces of ≤ PIECE_ROWS typed rows (op `read`)
//!                                            ▼
//!       forwarder: each piece = one synthetic transaction (end = sequence number),
//!                  its rows one `SourceEvent::Decoded` the batcher only groups
//!                                            ▼
//!       Pipeline (ackPolicy all) ─durable─▶ confirmed sequence ─▶ partition done (store)
//! ```
//!
//! Rows are stamped with the slot's consistent point as their LSN. Streaming starts only
//! after the copy, from the slot's position, so with the slot's exported snapshot nothing
//! is lost or doubled. A copy resumed after a crash, or of a table added later, runs while
//! streaming instead ([`incremental`]: watermarks).

pub mod copy;
pub mod incremental;
pub mod store;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use futures::FutureExt;
use pg_walstream::{
    CancellationToken, LogicalReplicationStream, ReplicationSlotOptions, ReplicationStreamConfig,
    RetryConfig, SharedLsnFeedback, StreamingMode,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_postgres::Client;
use tokio_stream::StreamExt;
use wallaby_codec::{Change, ReadEncoder, Row, TableSchema};
use wallaby_crds::flow::{SnapshotSpec, TableSnapshotProgress};

use crate::setup::TableName;
use crate::{PgConnection, SourceError};
use copy::{Slice, TableInfo};
use store::{PartitionRecord, SnapshotStore};
use wallaby_pipeline::ack::AckMode;
use wallaby_pipeline::batch::BatchError;
use wallaby_pipeline::batch::{ROW_OVERHEAD, SchemaSource, VALUE_OVERHEAD};
use wallaby_pipeline::change::{DecodedRows, EncodedRows, SourceEvent};
use wallaby_pipeline::destination::PayloadEncoding;
use wallaby_pipeline::lsn::Lsn;
use wallaby_pipeline::metrics::Metrics;
use wallaby_pipeline::runner::{
    DestinationSlot, Pipeline, PipelineConfig, PipelineError, PipelineHandles, Progress,
};

/// Rows per piece a copy worker hands over (one synthetic transaction each).
const PIECE_ROWS: usize = 4096;
/// Bytes of COPY text per piece, whichever comes first.
const PIECE_BYTES: usize = 4 << 20;
/// Most rows per piece when the copy workers encode (pieces are then `batchSize` rows).
const MAX_ENCODED_PIECE_ROWS: usize = 1 << 16;
/// Events buffered between the forwarder and the pipeline (three per piece: begin, its
/// decoded rows, commit), so decoded pieces waiting for the pipeline stay few.
const EVENT_BUFFER: usize = 6;
/// How often finished partitions are looked for while pieces are quiet.
const SETTLE_EVERY: Duration = Duration::from_millis(200);

/// Why a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A table to copy does not exist.
    #[error(
        "snapshot: table {0} does not exist: create it or remove it from snapshot.tables / source.postgres.tables"
    )]
    MissingTable(String),
    /// A catalog or state query failed.
    #[error("snapshot: {what}: {source}")]
    Query {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The state store is unusable.
    #[error("snapshot: {0}")]
    State(String),
    /// Copying a partition failed.
    #[error(
        "snapshot: copying {table} (partition {index}) failed: {message}; the partition is copied again on the next start"
    )]
    Copy {
        /// `schema.table`.
        table: String,
        /// Partition.
        index: u32,
        /// What went wrong.
        message: String,
    },
    /// The slot with an exported snapshot could not be created.
    #[error(
        "snapshot: creating replication slot {slot:?} with an exported snapshot failed: {message}; the role needs REPLICATION, or set snapshot.consistent: false"
    )]
    Export {
        /// Slot.
        slot: String,
        /// What went wrong.
        message: String,
    },
    /// Connecting failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The destinations failed.
    #[error("snapshot: {0}")]
    Pipeline(#[from] PipelineError),
    /// A copy or delivery task ended abnormally (panicked or was aborted).
    #[error(
        "snapshot: a {0} task ended abnormally: {1}; unfinished partitions are copied again on the next start"
    )]
    Task(&'static str, String),
    /// Destinations stopped confirming before every partition was durable.
    #[error(
        "snapshot: {0} partition(s) were copied but not confirmed durable by the destinations; they are copied again on the next start"
    )]
    Unconfirmed(usize),
}

impl From<wallaby_pg::PgError> for SnapshotError {
    fn from(e: wallaby_pg::PgError) -> Self {
        Self::Source(e.into())
    }
}

/// Snapshot progress shared with status reports, one entry per table.
pub type SnapshotProgress = Arc<Mutex<Vec<TableSnapshotProgress>>>;

/// Locks the progress, ignoring poisoning (a panicked holder left valid counters).
pub fn lock_progress(
    p: &SnapshotProgress,
) -> std::sync::MutexGuard<'_, Vec<TableSnapshotProgress>> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Marks every table not yet done as `Failed` (the copy stopped on an error).
pub fn mark_failed(p: &SnapshotProgress) {
    for t in lock_progress(p).iter_mut().filter(|t| t.state != "Done") {
        t.state = "Failed".into();
    }
}

/// A slot created with `EXPORT_SNAPSHOT`: its snapshot lives as long as this value (the
/// replication connection stays idle and open).
pub struct ExportedSnapshot {
    _stream: LogicalReplicationStream,
    /// Snapshot name for `SET TRANSACTION SNAPSHOT`.
    pub name: String,
}

impl std::fmt::Debug for ExportedSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportedSnapshot")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ExportedSnapshot {
    /// Creates `slot` over the replication protocol with `EXPORT_SNAPSHOT`.
    pub async fn create_slot(
        conn: &PgConnection,
        slot: &str,
        publication: &str,
    ) -> Result<Self, SnapshotError> {
        let fail = |message: String| SnapshotError::Export {
            slot: slot.to_owned(),
            message,
        };
        let config = ReplicationStreamConfig::new(
            slot.to_owned(),
            publication.to_owned(),
            1,
            StreamingMode::Off,
            Duration::from_secs(10),
            Duration::from_secs(30),
            Duration::from_secs(30),
            RetryConfig {
                max_attempts: 1,
                ..RetryConfig::default()
            },
        )
        .with_slot_options(ReplicationSlotOptions {
            snapshot: Some("export".into()),
            ..ReplicationSlotOptions::default()
        });
        let mut stream = LogicalReplicationStream::new(&conn.replication_conninfo(), config)
            .await
            .map_err(|e| fail(e.to_string()))?;
        stream
            .ensure_replication_slot()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let name = stream
            .exported_snapshot_name()
            .map(str::to_owned)
            .ok_or_else(|| fail("the slot already existed, so no snapshot was exported".into()))?;
        tracing::info!(slot, snapshot = %name, "created replication slot with an exported snapshot");
        Ok(Self {
            _stream: stream,
            name,
        })
    }
}

/// A snapshot taken with `pg_export_snapshot()` in an open `REPEATABLE READ` transaction:
/// every copy worker reads the same point in time while this value lives.
#[derive(Debug)]
pub struct HeldSnapshot {
    _client: Client,
    /// Snapshot name for `SET TRANSACTION SNAPSHOT`.
    pub name: String,
}

impl HeldSnapshot {
    /// Opens a connection and exports its transaction's snapshot.
    pub async fn export(conn: &PgConnection) -> Result<Self, SnapshotError> {
        let client = conn.connect().await?;
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(|source| SnapshotError::Query {
                what: "opening the snapshot transaction".into(),
                source,
            })?;
        let name: String = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(|source| SnapshotError::Query {
                what: "pg_export_snapshot()".into(),
                source,
            })?
            .get(0);
        Ok(Self {
            _client: client,
            name,
        })
    }
}

/// What to copy and how.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    /// Tables, in order.
    pub tables: Vec<TableName>,
    /// Hash-partition column (tables without it are split by heap pages).
    pub partition_column: Option<String>,
    /// Partitions per table.
    pub partition_count: u32,
    /// Parallel copy workers.
    pub workers: u32,
    /// Rows per batch while copying (`snapshot.batchSize`).
    pub batch_size: u32,
    /// Snapshot every copy transaction imports; `None`: each reads the current data.
    pub snapshot: Option<String>,
    /// LSN stamped on the rows (the slot's consistent point).
    pub lsn: Lsn,
    /// Key of this plan in the state store.
    pub state_key: String,
}

impl SnapshotRequest {
    /// A request from the flow's `snapshot` options.
    pub fn from_spec(spec: &SnapshotSpec, tables: Vec<TableName>, lsn: Lsn, key: String) -> Self {
        Self {
            tables,
            partition_column: spec.partition_column.clone(),
            partition_count: spec.partition_count.max(1),
            workers: spec.workers.max(1),
            batch_size: spec.batch_size.max(1),
            snapshot: None,
            lsn,
            state_key: key,
        }
    }
}

/// Where copied rows go.
pub struct SnapshotSink {
    /// Destinations (opened for the snapshot).
    pub destinations: Vec<DestinationSlot>,
    /// Batching settings of the flow (the ack policy is forced to `all`).
    pub config: PipelineConfig,
    /// Type resolution.
    pub schemas: Box<dyn SchemaSource>,
    /// Metrics.
    pub metrics: Metrics,
}

impl std::fmt::Debug for SnapshotSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSink")
            .field("destinations", &self.destinations.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How a snapshot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOutcome {
    /// Every partition is durable in every destination.
    Complete {
        /// Rows copied by this run.
        rows: u64,
    },
    /// Stopped by cancellation; unfinished partitions are copied on the next start.
    Stopped,
}

/// The tables a snapshot copies: `listed`, else every table of the publication except
/// those of the worker's own state schema (`exclude_schema`).
pub async fn tables_to_copy(
    catalog: &Client,
    listed: &[String],
    publication: &str,
    exclude_schema: &str,
) -> Result<Vec<TableName>, SnapshotError> {
    if !listed.is_empty() {
        return Ok(listed.iter().map(|t| TableName::parse(t)).collect());
    }
    let rows = catalog
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables
             WHERE pubname = $1 AND schemaname <> $2 ORDER BY 1, 2",
            &[&publication, &exclude_schema],
        )
        .await
        .map_err(|source| SnapshotError::Query {
            what: format!("listing the tables of publication {publication}"),
            source,
        })?;
    Ok(rows
        .iter()
        .map(|r| TableName {
            schema: r.get(0),
            table: r.get(1),
        })
        .collect())
}

/// One partition to copy.
#[derive(Debug)]
pub struct Job {
    table: Arc<TableInfo>,
    index: u32,
    slice: Slice,
}

/// Rows a copy worker decoded and hands to the forwarder.
struct Piece {
    job: usize,
    rows: DecodedRows,
    last: bool,
}

/// A forwarded piece waiting for the destinations.
struct InFlight {
    seq: u64,
    job: usize,
    rows: u64,
    last: bool,
}

/// Copies the unfinished partitions of `request.tables` (planning tables new to the state
/// store) into `sink`, recording finished partitions in `store` and progress in
/// `progress`, until done or `cancel` fires.
pub async fn run(
    conn: &PgConnection,
    catalog: &Client,
    request: SnapshotRequest,
    store: &SnapshotStore,
    sink: SnapshotSink,
    progress: &SnapshotProgress,
    cancel: &CancellationToken,
) -> Result<SnapshotOutcome, SnapshotError> {
    let jobs = plan(catalog, &request, store, progress).await?;
    copy_jobs(conn, request, jobs, store, sink, progress, cancel).await
}

/// The unfinished partitions of `request.tables`, planning (and recording) the tables new to
/// the state store; sets `progress` to the plan.
pub async fn plan(
    catalog: &Client,
    request: &SnapshotRequest,
    store: &SnapshotStore,
    progress: &SnapshotProgress,
) -> Result<Vec<Job>, SnapshotError> {
    let key = request.state_key.clone();
    let mut records = store.load(&key).await?;
    let mut infos: HashMap<String, Arc<TableInfo>> = HashMap::new();
    for name in &request.tables {
        let info = Arc::new(copy::describe(catalog, name).await?);
        let table = name.to_string();
        if !records.iter().any(|r| r.table == table) {
            // A column the table lacks cannot hash it: such tables split by pages.
            let column = request
                .partition_column
                .as_deref()
                .filter(|c| info.relation.columns.iter().any(|col| col.name == *c));
            let planned: Vec<PartitionRecord> = copy::plan(&info, column, request.partition_count)
                .into_iter()
                .enumerate()
                .map(|(i, slice)| PartitionRecord {
                    table: table.clone(),
                    index: i as u32,
                    slice,
                    done: false,
                    rows: 0,
                })
                .collect();
            store.add(&key, &planned).await?;
            records.extend(planned);
        }
        infos.insert(table, info);
    }
    records.retain(|r| infos.contains_key(&r.table));
    *lock_progress(progress) = request
        .tables
        .iter()
        .map(|t| {
            let table = t.to_string();
            let mine: Vec<&PartitionRecord> = records.iter().filter(|r| r.table == table).collect();
            let done = mine.iter().filter(|r| r.done).count() as u32;
            TableSnapshotProgress {
                state: if done as usize == mine.len() {
                    "Done"
                } else {
                    "Pending"
                }
                .into(),
                rows_copied: mine.iter().map(|r| r.rows).sum(),
                partitions_done: done,
                partitions_total: mine.len() as u32,
                table,
            }
        })
        .collect();
    let jobs: Vec<Job> = records
        .iter()
        .filter(|r| !r.done)
        .filter_map(|r| {
            infos.get(&r.table).map(|t| Job {
                table: t.clone(),
                index: r.index,
                slice: r.slice.clone(),
            })
        })
        .collect();
    Ok(jobs)
}

/// Copies `jobs` inside `request.snapshot` before the stream starts.
async fn copy_jobs(
    conn: &PgConnection,
    request: SnapshotRequest,
    jobs: Vec<Job>,
    store: &SnapshotStore,
    sink: SnapshotSink,
    progress: &SnapshotProgress,
    cancel: &CancellationToken,
) -> Result<SnapshotOutcome, SnapshotError> {
    let key = request.state_key.clone();
    if jobs.is_empty() {
        tracing::info!("snapshot: every partition is already done");
        return Ok(SnapshotOutcome::Complete { rows: 0 });
    }
    // The copy workers' logins go on while schemas are resolved and the pipeline is set up.
    let workers = (request.workers as usize).min(jobs.len()).max(1);
    let logins: Vec<_> = (0..workers)
        .map(|_| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.connect().await })
        })
        .collect();
    let output = Output::of(&sink.destinations, u64::from(request.batch_size));
    tracing::info!(
        partitions = jobs.len(),
        tables = request.tables.len(),
        workers = request.workers,
        snapshot = request.snapshot.as_deref().unwrap_or("-"),
        encoded_by_copy_workers = matches!(output, Output::Encoded { .. }),
        "snapshot: copying"
    );

    // Copy workers decode rows themselves (in parallel), so each table's schema is
    // resolved once here, as the pipeline would for the first row (version 1).
    let mut sink = sink;
    let mut resolved: HashMap<u32, Arc<TableSchema>> = HashMap::new();
    let mut schemas = Vec::with_capacity(jobs.len());
    for job in &jobs {
        let relation = &job.table.relation;
        let schema = match resolved.get(&relation.id) {
            Some(schema) => schema.clone(),
            None => {
                let schema = sink
                    .schemas
                    .table_schema(relation, 1)
                    .await
                    .map_err(|message| {
                        SnapshotError::Pipeline(PipelineError::Batch(BatchError::Schema {
                            table: job.table.name.to_string(),
                            message,
                        }))
                    })?;
                let schema = Arc::new(schema);
                resolved.insert(relation.id, schema.clone());
                schema
            }
        };
        schemas.push(schema);
    }

    let confirmed = Arc::new(AtomicU64::new(0));
    let handles = PipelineHandles {
        progress: Arc::new(Mutex::new(Progress::default())),
        feedback: SharedLsnFeedback::new_shared(),
        confirmed: confirmed.clone(),
    };
    let mut config = sink.config;
    config.ack = AckMode::All;
    config.batch_size = u64::from(request.batch_size);
    let pipeline = Pipeline::new(
        config,
        sink.destinations,
        handles,
        Lsn(0),
        sink.schemas,
        sink.metrics,
    );
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let pipeline_task = tokio::spawn(pipeline.run(rx));

    let jobs = Arc::new(jobs);
    let work = Arc::new(Work {
        jobs: jobs.clone(),
        schemas,
        queue: Mutex::new((0..jobs.len()).collect()),
        output,
    });
    let stop = cancel.child_token();
    let (piece_tx, mut piece_rx) = mpsc::channel::<Piece>(workers * 2);
    let mut copiers = JoinSet::new();
    for login in logins {
        copiers.spawn(copy_worker(
            login,
            work.clone(),
            request.snapshot.clone(),
            request.lsn,
            piece_tx.clone(),
            stop.clone(),
        ));
    }
    drop(piece_tx);

    let mut settler = Settler {
        store,
        key: &key,
        jobs: &jobs,
        progress,
        job_rows: vec![0; jobs.len()],
        in_flight: VecDeque::new(),
        copied: 0,
    };
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(SETTLE_EVERY);
    let mut tx = Some(tx);
    let mut stopped = false;
    loop {
        tokio::select! {
            piece = piece_rx.recv() => match piece {
                Some(piece) => {
                    settler.copying(piece.job);
                    if !piece.rows.is_empty() {
                        seq += 1;
                        let rows = piece.rows.len();
                        let Some(sender) = tx.as_ref() else { break };
                        if forward(sender, piece.rows, request.lsn, Lsn(seq)).await.is_err() {
                            // The pipeline stopped: its error is reported below.
                            stop.cancel();
                            break;
                        }
                        settler.in_flight.push_back(InFlight { seq, job: piece.job, rows, last: piece.last });
                    } else {
                        settler.in_flight.push_back(InFlight { seq, job: piece.job, rows: 0, last: piece.last });
                    }
                }
                None => break,
            },
            _ = tick.tick() => {}
            _ = cancel.cancelled() => {
                stopped = true;
                break;
            }
        }
        settler.settle(confirmed.load(Ordering::Acquire)).await?;
    }
    stop.cancel();
    // Copy workers waiting to hand on a piece get an error and stop: pieces not forwarded
    // are copied again with their partition.
    drop(piece_rx);
    // The pipeline delivers what was forwarded, then ends.
    tx.take();
    let pipeline_result = pipeline_task
        .await
        .map_err(|e| SnapshotError::Task("delivery", e.to_string()))?;
    let mut copy_error = None;
    while let Some(joined) = copiers.join_next().await {
        match joined {
            Ok(Err(e)) if copy_error.is_none() => copy_error = Some(e),
            Err(e) if copy_error.is_none() => {
                copy_error = Some(SnapshotError::Task("copy", e.to_string()))
            }
            _ => {}
        }
    }
    settler.settle(confirmed.load(Ordering::Acquire)).await?;
    pipeline_result?;
    if let Some(e) = copy_error {
        return Err(e);
    }
    if stopped || cancel.is_cancelled() {
        tracing::info!(
            rows = settler.copied,
            "snapshot: stopped; unfinished partitions are copied on the next start"
        );
        return Ok(SnapshotOutcome::Stopped);
    }
    let unfinished = settler.job_rows.len() - settler.finished();
    if unfinished > 0 {
        return Err(SnapshotError::Unconfirmed(unfinished));
    }
    tracing::info!(rows = settler.copied, "snapshot: complete");
    Ok(SnapshotOutcome::Complete {
        rows: settler.copied,
    })
}

/// Sends one piece as a transaction: Begin, its rows, Commit ending at `end`.
async fn forward(
    tx: &mpsc::Sender<SourceEvent>,
    rows: DecodedRows,
    lsn: Lsn,
    end: Lsn,
) -> Result<(), mpsc::error::SendError<SourceEvent>> {
    let now = Utc::now();
    tx.send(SourceEvent::Begin {
        xid: 0,
        commit_lsn: lsn,
        commit_time: now,
    })
    .await?;
    tx.send(SourceEvent::Decoded(rows)).await?;
    tx.send(SourceEvent::Commit {
        commit_lsn: lsn,
        end_lsn: end,
        commit_time: now,
    })
    .await
}

/// Turns confirmed pieces into finished partitions.
struct Settler<'a> {
    store: &'a SnapshotStore,
    key: &'a str,
    jobs: &'a [Job],
    progress: &'a SnapshotProgress,
    /// Rows confirmed per job; `u64::MAX` marks a finished one.
    job_rows: Vec<u64>,
    in_flight: VecDeque<InFlight>,
    copied: u64,
}

impl Settler<'_> {
    fn copying(&self, job: usize) {
        let table = self.jobs[job].table.name.to_string();
        let mut p = lock_progress(self.progress);
        if let Some(t) = p.iter_mut().find(|t| t.table == table)
            && t.state == "Pending"
        {
            t.state = "Copying".into();
        }
    }

    fn finished(&self) -> usize {
        self.job_rows.iter().filter(|r| **r == u64::MAX).count()
    }

    async fn settle(&mut self, confirmed: u64) -> Result<(), SnapshotError> {
        while let Some(front) = self.in_flight.front() {
            if front.seq > confirmed {
                break;
            }
            let InFlight {
                job, rows, last, ..
            } = *front;
            self.in_flight.pop_front();
            self.job_rows[job] += rows;
            self.copied += rows;
            let j = &self.jobs[job];
            let table = j.table.name.to_string();
            if last {
                self.store
                    .done(self.key, &table, j.index, self.job_rows[job])
                    .await?;
                tracing::info!(table = %table, partition = j.index, rows = self.job_rows[job], "snapshot: partition done");
                self.job_rows[job] = u64::MAX;
            }
            let mut p = lock_progress(self.progress);
            if let Some(t) = p.iter_mut().find(|t| t.table == table) {
                t.rows_copied += rows;
                if last {
                    t.partitions_done += 1;
                    if t.partitions_done >= t.partitions_total {
                        t.state = "Done".into();
                    }
                }
            }
        }
        Ok(())
    }
}

/// What the copy workers share: the partitions, the schema of each, and the queue of those
/// not yet taken.
struct Work {
    jobs: Arc<Vec<Job>>,
    schemas: Vec<Arc<TableSchema>>,
    queue: Mutex<VecDeque<usize>>,
    output: Output,
}

/// Takes partitions from the queue and copies each in its own transaction.
async fn copy_worker(
    login: tokio::task::JoinHandle<Result<Client, wallaby_pg::PgError>>,
    work: Arc<Work>,
    snapshot: Option<String>,
    lsn: Lsn,
    out: mpsc::Sender<Piece>,
    stop: CancellationToken,
) -> Result<(), SnapshotError> {
    let client = login
        .await
        .map_err(|e| SnapshotError::Task("login", e.to_string()))??;
    loop {
        let next = work
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front();
        let Some(job) = next else { return Ok(()) };
        if stop.is_cancelled() {
            return Ok(());
        }
        let j = &work.jobs[job];
        let result = copy_partition(
            &client,
            j,
            &work.schemas[job],
            job,
            snapshot.as_deref(),
            lsn,
            &work.output,
            &out,
            &stop,
        )
        .await
        .map_err(|message| SnapshotError::Copy {
            table: j.table.name.to_string(),
            index: j.index,
            message,
        });
        if result.is_err() {
            // The other workers stop too: the flow fails and restarts from the state.
            stop.cancel();
        }
        result?;
    }
}

#[allow(clippy::too_many_arguments)]
async fn copy_partition(
    client: &Client,
    job: &Job,
    schema: &Arc<TableSchema>,
    index: usize,
    snapshot: Option<&str>,
    lsn: Lsn,
    output: &Output,
    out: &mpsc::Sender<Piece>,
    stop: &CancellationToken,
) -> Result<(), String> {
    let mut begin = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;".to_owned();
    if let Some(name) = snapshot {
        begin.push_str(&format!(
            " SET TRANSACTION SNAPSHOT '{}';",
            name.replace('\'', "''")
        ));
    }
    client
        .batch_execute(&begin)
        .await
        .map_err(|e| format!("opening the snapshot transaction: {e}"))?;
    let binary = copy::binary_copy(schema);
    let mut statement = copy::copy_statement(&job.table, &job.slice);
    if binary {
        statement.push_str(" (FORMAT binary)");
    }
    let stream = client
        .copy_out(&statement)
        .await
        .map_err(|e| format!("{statement}: {e}"))?;
    let mut stream = std::pin::pin!(stream);
    let mut piece = Assembler::new(job.table.relation.id, schema, lsn, output, binary)?;
    // Time spent waiting for the destinations to take pieces (they are the bottleneck
    // when it is a large part of the copy).
    let started = std::time::Instant::now();
    let mut waited = Duration::ZERO;
    let mut scratch = Vec::new();
    let mut tuples = copy::BinaryRows::default();
    loop {
        // The server sends a message per row: take what is ready without a wake-up per
        // row, and look at the stop signal only when waiting.
        let chunk = match stream.next().now_or_never() {
            Some(chunk) => chunk,
            None => tokio::select! {
                chunk = stream.next() => chunk,
                _ = stop.cancelled() => return Ok(()),
            },
        };
        let data: Bytes = match chunk {
            None => break,
            Some(Err(e)) => return Err(format!("reading COPY data: {e}")),
            Some(Ok(data)) => data,
        };
        if data.is_empty() {
            continue;
        }
        if binary {
            tuples.feed(&data, schema.columns.len(), &mut |fields, size| {
                piece.push_fields(fields, size)
            })?;
        } else {
            // The server sends one row per message; splitting on newlines also covers
            // several (field newlines are escaped in text COPY).
            for line in data
                .strip_suffix(b"\n")
                .unwrap_or(&data)
                .split(|b| *b == b'\n')
            {
                let row = copy::decode_line(line, schema, &mut scratch)?;
                piece.push_row(row, line.len());
            }
        }
        if piece.full() {
            let rows = piece.take()?;
            let waiting = std::time::Instant::now();
            if out
                .send(Piece {
                    job: index,
                    rows,
                    last: false,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
            waited += waiting.elapsed();
        }
    }
    if binary {
        tuples.finish()?;
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| format!("ending the snapshot transaction: {e}"))?;
    let rows = piece.take()?;
    tracing::debug!(
        table = %job.table.name,
        partition = job.index,
        copy_ms = started.elapsed().as_millis() as u64,
        waited_for_destinations_ms = waited.as_millis() as u64,
        "snapshot: partition read"
    );
    let _ = out
        .send(Piece {
            job: index,
            rows,
            last: true,
        })
        .await;
    Ok(())
}

/// How copy workers hand on the rows they read.
#[derive(Debug, Clone)]
enum Output {
    /// Typed rows; each destination encodes them.
    Rows,
    /// Payloads, one per distinct encoding of the destinations (every destination writes
    /// table groups as whole payloads): the encoding is done by the copy workers, in
    /// parallel, and straight from binary COPY fields (Arrow, Parquet, JSON).
    Encoded {
        encodings: Arc<Vec<PayloadEncoding>>,
        /// Rows per piece (`snapshot.batchSize`: one payload per batch, as in the stream).
        piece_rows: usize,
    },
}

impl Output {
    /// `Encoded` when every destination has a payload encoding, `Rows` otherwise.
    fn of(destinations: &[DestinationSlot], batch_size: u64) -> Self {
        let mut encodings: Vec<PayloadEncoding> = Vec::new();
        for slot in destinations {
            let Some(encoding) = slot.sink.payload_encoding() else {
                return Self::Rows;
            };
            if !encodings.contains(&encoding) {
                encodings.push(encoding);
            }
        }
        if encodings.is_empty() {
            return Self::Rows;
        }
        Self::Encoded {
            encodings: Arc::new(encodings),
            piece_rows: usize::try_from(batch_size)
                .unwrap_or(usize::MAX)
                .clamp(1, MAX_ENCODED_PIECE_ROWS),
        }
    }
}

/// The piece a copy worker is filling.
struct Assembler {
    relation_id: u32,
    schema: Arc<TableSchema>,
    lsn: Lsn,
    row_cost: u64,
    piece_rows: usize,
    /// Typed rows (kept when handed on as rows or encoded by row).
    rows: Vec<Change>,
    /// Payload encoders fed with binary COPY fields (none: the rows are handed on).
    from_fields: Vec<(PayloadEncoding, ReadEncoder)>,
    /// Encodings made from the typed rows (with the schema as each maps it).
    by_row: Vec<(PayloadEncoding, Arc<TableSchema>)>,
    count: usize,
    bytes: usize,
    cost: u64,
    /// When the piece's first row was read: the rows' commit time.
    time: i64,
}

impl Assembler {
    fn new(
        relation_id: u32,
        schema: &Arc<TableSchema>,
        lsn: Lsn,
        output: &Output,
        binary: bool,
    ) -> Result<Self, String> {
        let mut from_fields = Vec::new();
        let mut by_row = Vec::new();
        let piece_rows = match output {
            Output::Rows => PIECE_ROWS,
            Output::Encoded {
                encodings,
                piece_rows,
            } => {
                for encoding in encodings.iter() {
                    let mapped = encoding.schema(schema);
                    if binary && ReadEncoder::supports(encoding.format) {
                        let encoder =
                            ReadEncoder::new(encoding.format, mapped).map_err(|e| e.to_string())?;
                        from_fields.push((encoding.clone(), encoder));
                    } else {
                        by_row.push((encoding.clone(), mapped));
                    }
                }
                *piece_rows
            }
        };
        Ok(Self {
            relation_id,
            schema: schema.clone(),
            lsn,
            row_cost: ROW_OVERHEAD + VALUE_OVERHEAD * schema.columns.len() as u64,
            piece_rows,
            rows: Vec::new(),
            from_fields,
            by_row,
            count: 0,
            bytes: 0,
            cost: 0,
            time: 0,
        })
    }

    /// Whether pieces are handed on as payloads (`Output::Encoded` has an encoding).
    fn encoded(&self) -> bool {
        !self.from_fields.is_empty() || !self.by_row.is_empty()
    }

    /// Whether typed rows are made: handed on as rows, or encoded from them.
    fn keeps_rows(&self) -> bool {
        self.from_fields.is_empty() || !self.by_row.is_empty()
    }

    fn read(&self, row: Row) -> Change {
        Change::read(self.lsn.0, 0, row)
    }

    /// Adds a row from its binary COPY fields.
    fn push_fields(&mut self, fields: &[Option<&[u8]>], size: usize) -> Result<(), String> {
        if self.count == 0 {
            // A piece's rows are stamped with the time it started.
            self.time = Utc::now().timestamp_micros();
            for (_, encoder) in &mut self.from_fields {
                encoder
                    .begin(self.lsn.0, self.time)
                    .map_err(|e| e.to_string())?;
            }
        }
        for (_, encoder) in &mut self.from_fields {
            encoder.push_row(fields).map_err(|e| e.to_string())?;
        }
        if self.keeps_rows() {
            let row = copy::decode_fields(fields, &self.schema)?;
            let change = self.read(row);
            self.rows.push(change);
        }
        self.counted(size);
        Ok(())
    }

    /// Adds a typed row (read as text).
    fn push_row(&mut self, row: Row, size: usize) {
        if self.count == 0 {
            self.time = Utc::now().timestamp_micros();
        }
        let change = self.read(row);
        self.rows.push(change);
        self.counted(size);
    }

    fn counted(&mut self, size: usize) {
        self.count += 1;
        self.bytes += size;
        self.cost += self.row_cost + size as u64;
    }

    fn full(&self) -> bool {
        self.count >= self.piece_rows || self.bytes >= PIECE_BYTES
    }

    /// The piece so far (possibly empty); the assembler starts a new one.
    fn take(&mut self) -> Result<DecodedRows, String> {
        let count = std::mem::take(&mut self.count) as u64;
        self.bytes = 0;
        let cost = std::mem::take(&mut self.cost);
        let mut changes = std::mem::take(&mut self.rows);
        if !self.encoded() || count == 0 {
            if !self.encoded() {
                self.rows = Vec::with_capacity(PIECE_ROWS);
            }
            return Ok(DecodedRows {
                relation_id: self.relation_id,
                schema: self.schema.clone(),
                changes,
                bytes: cost,
                encoded: None,
            });
        }
        let mut payloads = Vec::with_capacity(self.from_fields.len() + self.by_row.len());
        for (encoding, encoder) in &mut self.from_fields {
            let payload = encoder.finish().map_err(|e| e.to_string())?;
            payloads.push((encoding.clone(), Bytes::from(payload)));
        }
        if !self.by_row.is_empty() {
            for change in &mut changes {
                change.commit_time_micros = self.time;
            }
            for (encoding, mapped) in &self.by_row {
                let payload = wallaby_codec::encode(encoding.format, mapped, &changes)
                    .map_err(|e| e.to_string())?;
                payloads.push((encoding.clone(), Bytes::from(payload)));
            }
        }
        // The rows are dropped here, by the thread that made them.
        drop(changes);
        let held: u64 = payloads.iter().map(|(_, p)| p.len() as u64).sum();
        Ok(DecodedRows {
            relation_id: self.relation_id,
            schema: self.schema.clone(),
            changes: Vec::new(),
            bytes: held,
            encoded: Some(Arc::new(EncodedRows {
                rows: count,
                lsn: self.lsn.0,
                payloads,
            })),
        })
    }
}
