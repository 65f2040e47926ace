//! One run of a flow: preflight, stream, pipeline and status reporter wired together, and
//! an orderly shutdown (flush → confirm → final standby status → final status file). When
//! a required destination gives up, the flow's `failureMode` decides the slot's fate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pg_walstream::CancellationToken;
use tokio::sync::mpsc;
use wallaby_codec::TableSchema;
use wallaby_crds::Flow;
use wallaby_crds::destination::DestinationSpec;
use wallaby_crds::flow::{AckPolicy, FailureMode, SnapshotSpec};

use crate::standalone::Resolved;
use crate::status::{StatusFile, StatusReporter, StatusSink};
use wallaby_ddl::{
    capture::CaptureSpec,
    desk::{Desk, KubeDesk, LogDesk},
    gate::{DdlStage, PlanTarget, Scope},
    history::{DdlLog, HistoryTables, SchemaHistory},
};
use wallaby_destinations::SecretData;
use wallaby_pipeline::ack::AckMode;
use wallaby_pipeline::batch::SchemaSource;
use wallaby_pipeline::change::Relation;
use wallaby_pipeline::lsn::Lsn;
use wallaby_pipeline::metrics::Metrics;
use wallaby_pipeline::retry::RetryPolicy;
use wallaby_pipeline::retry::effective_retry;
use wallaby_pipeline::runner::{
    DestinationSlot, Pipeline, PipelineConfig, PipelineError, PipelineHandles, Progress, lock,
};
use wallaby_source::reader::{ReaderOptions, ReplicationReader};
use wallaby_source::setup::TableName;
use wallaby_source::snapshot::store::SnapshotStore;
use wallaby_source::snapshot::{self, incremental};
use wallaby_source::snapshot::{
    ExportedSnapshot, HeldSnapshot, SnapshotOutcome, SnapshotProgress, SnapshotRequest,
    SnapshotSink, lock_progress,
};
use wallaby_source::spill::SpillDir;
use wallaby_source::toast::ToastStage;
use wallaby_source::types::TypeResolver;
use wallaby_source::{PgConnection, SourceState, setup, state};

/// Events buffered between the reader and the pipeline (bounds memory with back-pressure).
const EVENT_BUFFER: usize = 4096;
/// Longest a stop waits for the pipeline after the reader stopped.
const STOP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Where the worker keeps local state.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Status file path.
    pub status_file: PathBuf,
    /// Directory for private files (the CA bundle).
    pub state_dir: PathBuf,
    /// Where streamed (in-progress) transactions are spilled until they commit; `None`:
    /// `<system temp>/wallaby-spill/<slot>`.
    pub spill_dir: Option<PathBuf>,
}

/// Where a run reports and when it stops by itself, beyond [`RunOptions`].
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Where status goes; `None`: the status file of [`RunOptions`].
    pub status: Option<Arc<dyn StatusSink>>,
    /// Stop cleanly once the slot has confirmed the server's WAL position taken at start
    /// (Job / CronJob runs): everything written before the run began is delivered.
    pub drain: bool,
    /// Start streaming here instead of at the slot's `confirmed_flush_lsn`. Must not be
    /// below it: PostgreSQL cannot rewind a logical slot. Transactions committed between
    /// the two are skipped.
    pub start_lsn: Option<Lsn>,
    /// In a cluster: where DDLApprovals are created (else the DDL log is the desk).
    pub kube: Option<KubeTarget>,
    /// Standalone: the manifest, named in the commands the worker suggests.
    pub manifest: Option<PathBuf>,
}

/// The Flow in the Kubernetes API, for DDLApprovals and Events.
#[derive(Clone)]
pub struct KubeTarget {
    /// Client.
    pub client: kube::Client,
    /// Namespace of the Flow.
    pub namespace: String,
    /// UID of the Flow (owner of its DDLApprovals).
    pub flow_uid: String,
}

impl std::fmt::Debug for KubeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTarget")
            .field("namespace", &self.namespace)
            .field("flow_uid", &self.flow_uid)
            .finish_non_exhaustive()
    }
}

/// A run refused before it started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `--start-lsn` below the slot's confirmed position.
    #[error(
        "--start-lsn {requested} is before slot {slot}'s confirmed_flush_lsn {confirmed}: PostgreSQL cannot rewind a logical slot (it would silently start at {confirmed}), and the changes before it were already confirmed to the destinations; use an LSN at or after {confirmed}, or a new slot with a snapshot"
    )]
    StartLsnBehindSlot {
        requested: Lsn,
        slot: String,
        confirmed: Lsn,
    },
}

/// Opens the destinations of a resolved flow, with the credentials its Secrets gave.
pub fn open_resolved(resolved: &Resolved) -> anyhow::Result<Vec<DestinationSlot>> {
    open_destinations(
        &resolved.flow,
        &resolved.destinations,
        &resolved.destination_secrets,
    )
}

/// Opens `destinations` of `flow` through the destination registry. `secrets` holds what
/// each Destination's check resolved from its Secrets (by Destination name).
pub fn open_destinations(
    flow: &Flow,
    destinations: &[(String, DestinationSpec)],
    secrets: &BTreeMap<String, SecretData>,
) -> anyhow::Result<Vec<DestinationSlot>> {
    let none = SecretData::new();
    let mut slots = Vec::new();
    for (name, spec) in destinations {
        let data = secrets.get(name).unwrap_or(&none);
        let sink = wallaby_destinations::open(name, flow, spec, data)?;
        let retry = RetryPolicy::from_spec(effective_retry(spec), flow.spec.give_up_policy)
            .map_err(|e| anyhow::anyhow!("Destination/{name} spec.retry: {e}"))?;
        slots.push(DestinationSlot {
            name: name.clone(),
            sink,
            retry,
        });
    }
    Ok(slots)
}

/// Runs until `cancel` fires (clean stop, `Ok`) or an error stops the flow, recording into
/// `metrics`.
pub async fn run(
    resolved: Resolved,
    options: RunOptions,
    cancel: CancellationToken,
    metrics: Metrics,
) -> anyhow::Result<()> {
    let destinations = open_resolved(&resolved)?;
    run_with(resolved, destinations, options, cancel, metrics).await
}

/// The catalog type resolver with version numbers from the durable schema history; a new
/// shape met in the stream that no captured statement announced is reported as drift.
pub(crate) struct HistorySchemas {
    pub(crate) inner: CatalogSchemas,
    pub(crate) history: Arc<SchemaHistory>,
    pub(crate) progress: Arc<Mutex<Progress>>,
    pub(crate) metrics: Metrics,
    /// `captureDDL` is on (drift then means a shape the capture did not report).
    pub(crate) captured: bool,
}

#[async_trait]
impl SchemaSource for HistorySchemas {
    async fn table_schema(
        &mut self,
        relation: &Relation,
        version: u32,
    ) -> Result<TableSchema, String> {
        self.inner.table_schema(relation, version).await
    }

    async fn version(&mut self, relation: &Relation, lsn: Lsn, _next: u32) -> Result<u32, String> {
        wallaby_ddl::note_stream_shape(
            &self.history,
            relation,
            lsn,
            &self.progress,
            &self.metrics,
            self.captured,
        )
        .await
        .map_err(|e| e.to_string())
    }
}

/// Adapts the catalog type resolver to the batcher.
pub(crate) struct CatalogSchemas(pub(crate) TypeResolver);

#[async_trait]
impl SchemaSource for CatalogSchemas {
    async fn table_schema(
        &mut self,
        relation: &Relation,
        version: u32,
    ) -> Result<TableSchema, String> {
        self.0
            .table_schema(relation, version)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Runs the flow with the given destinations (in `spec.destinations` order).
pub async fn run_with(
    resolved: Resolved,
    destinations: Vec<DestinationSlot>,
    options: RunOptions,
    cancel: CancellationToken,
    metrics: Metrics,
) -> anyhow::Result<()> {
    run_controlled(
        resolved,
        destinations,
        options,
        RunControl::default(),
        cancel,
        metrics,
    )
    .await
}

/// Runs the flow with the given destinations, reporting and stopping as `control` says.
pub async fn run_controlled(
    resolved: Resolved,
    destinations: Vec<DestinationSlot>,
    options: RunOptions,
    control: RunControl,
    cancel: CancellationToken,
    metrics: Metrics,
) -> anyhow::Result<()> {
    let flow = &resolved.flow;
    let flow_name = flow.metadata.name.clone().unwrap_or_default();
    let pg = &flow.spec.source.postgres;
    let status_interval = pg.status_interval.parse().map_err(anyhow::Error::msg)?;

    let flow_id = state::flow_id(flow);
    let conn = source_connection(
        &resolved,
        &options.state_dir,
        format!("wallaby-worker/{flow_id}"),
    )?;
    tracing::info!(flow = %flow_name, flow_id = %flow_id, source = %conn.describe(), slot = %pg.slot, publication = %pg.publication, "starting");

    // One SQL connection serves preflight, key and type lookups and status queries.
    let catalog = Arc::new(conn.connect().await?);
    let snapshot_spec = flow
        .spec
        .snapshot
        .clone()
        .filter(|s| s.initial && control.start_lsn.is_none());
    setup::prepare_publication(&catalog, pg).await?;
    // DDL governance: the policy, the durable schema history and the capture triggers, set
    // up before the slot is created, so the worker's own DDL is not in its stream.
    let ddl_policy = flow.spec.ddl.effective(wallaby_ddl::env_defaults()?);
    let history = if pg.ensure_state || pg.capture_ddl {
        let tables = HistoryTables::in_schema(&pg.state_schema);
        tables.ensure(&catalog).await?;
        Some(Arc::new(SchemaHistory::new(
            catalog.clone(),
            tables,
            flow_id.clone(),
        )))
    } else {
        None
    };
    if pg.capture_ddl {
        let capture = CaptureSpec::of(pg);
        capture.ensure(&catalog).await?;
        // The shapes the stream starts from, read before the slot exists (at LSN 0: before
        // anything streamed), so a captured statement has a "before" even on a table with
        // no change streamed yet.
        if let Some(history) = &history {
            wallaby_ddl::history::seed_from_catalog(
                &catalog,
                history,
                &capture,
                &pg.publication,
                Lsn(0),
            )
            .await?;
        }
    } else if ddl_policy.records_approval() {
        tracing::warn!(
            "ddl.gate / ddl.autoApply are set but source.postgres.captureDDL is off: no statement is captured, so none is gated; schema drift is still detected from the stream and reported"
        );
    }
    // A new slot for an initial snapshot is created over the replication protocol so that
    // it exports the snapshot its consistent point belongs to; the copy reads inside it.
    let exported = match &snapshot_spec {
        Some(s)
            if s.consistent
                && pg.create_slot
                && !setup::slot_exists(&catalog, &pg.slot).await? =>
        {
            Some(ExportedSnapshot::create_slot(&conn, &pg.slot, &pg.publication).await?)
        }
        _ => None,
    };
    let mut slot = setup::ensure_slot(&catalog, pg).await?;
    slot.created |= exported.is_some();
    tracing::info!(slot = %pg.slot, resume_from = %slot.confirmed_flush_lsn, created = slot.created, "slot ready");
    let confirmed_flush: Lsn = slot
        .confirmed_flush_lsn
        .parse()
        .map_err(|e| anyhow::anyhow!("slot {}: bad confirmed_flush_lsn: {e}", pg.slot))?;
    let start = match control.start_lsn {
        Some(requested) if requested < confirmed_flush => {
            return Err(StartError::StartLsnBehindSlot {
                requested,
                slot: pg.slot.clone(),
                confirmed: confirmed_flush,
            }
            .into());
        }
        Some(requested) => {
            if requested > confirmed_flush {
                tracing::warn!(slot = %pg.slot, from = %requested, confirmed_flush = %confirmed_flush, "--start-lsn: transactions committed before it are skipped");
            }
            requested
        }
        None => confirmed_flush,
    };
    let source_state = Arc::new(SourceState::start(&catalog, pg, &flow_id).await?);
    // Taken after this run's own writes (the state table) so a drain covers them too.
    let drain_target = if control.drain {
        Some(current_wal_lsn(&catalog, "--drain").await?)
    } else {
        None
    };
    metrics.set_confirmed_lsn(start.0);

    let ack = match flow.spec.ack_policy {
        AckPolicy::All => AckMode::All,
        AckPolicy::Primary => {
            let primary = flow.spec.primary_destination.as_deref().unwrap_or_default();
            let index = destinations
                .iter()
                .position(|d| d.name == primary)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "primaryDestination {primary:?} is not one of the flow's destinations"
                    )
                })?;
            AckMode::Primary(index)
        }
    };
    let config = pipeline_config(flow, &options.state_dir, ack, pg.emit_empty)?;
    let names: Vec<String> = destinations.iter().map(|d| d.name.clone()).collect();
    let sink = control
        .status
        .clone()
        .unwrap_or_else(|| Arc::new(StatusFile(options.status_file.clone())));
    let reporter = Arc::new(StatusReporter::new(
        sink,
        pg.slot.clone(),
        names.clone(),
        flow.metadata.generation,
    ));
    let snapshot_progress = SnapshotProgress::default();
    let mut while_streaming = None;
    if let Some(spec) = &snapshot_spec {
        let phase = InitialSnapshot {
            resolved: &resolved,
            conn: &conn,
            catalog: &catalog,
            spec,
            key: flow_id.clone(),
            lsn: confirmed_flush,
            slot_created: slot.created,
            exported,
            config: config.clone(),
            metrics: &metrics,
            reporter: &reporter,
            status_interval,
            progress: &snapshot_progress,
        };
        let outcome = match phase.run(&cancel).await {
            Ok(SnapshotPhase::Copied(outcome)) => outcome,
            Ok(SnapshotPhase::WhileStreaming(jobs)) => {
                while_streaming = Some(jobs);
                SnapshotOutcome::Complete { rows: 0 }
            }
            Err(e) => {
                // The slot stays where the snapshot began; the next start copies the
                // unfinished partitions.
                snapshot::mark_failed(&snapshot_progress);
                let progress = Progress {
                    snapshot: lock_progress(&snapshot_progress).clone(),
                    ..Progress::default()
                };
                let message = format!("{e:#}");
                reporter
                    .report(&progress, Some(&catalog), false, Some(&message))
                    .await;
                if let Err(e) = source_state.record_stopped(&catalog, "failed").await {
                    tracing::warn!(error = %e, "could not record the stop in the source-state table");
                }
                return Err(e);
            }
        };
        if outcome == SnapshotOutcome::Stopped {
            let progress = Progress {
                snapshot: lock_progress(&snapshot_progress).clone(),
                ..Progress::default()
            };
            reporter
                .report(&progress, Some(&catalog), false, None)
                .await;
            tracing::info!(flow = %flow_name, "stopped during the snapshot");
            return Ok(());
        }
    }

    // Spill files of an earlier run are useless (the slot did not move past their
    // transactions; the server sends them again), so the directory starts empty.
    let spill_dir = options
        .spill_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("wallaby-spill").join(&pg.slot));
    let spill = SpillDir::prepare(&spill_dir)?;
    let toast = ToastStage::new(pg.toast_fetch, pg.toast_cache_size, catalog.clone());
    let mut reader = ReplicationReader::start_from(
        &conn,
        &pg.slot,
        &pg.publication,
        catalog.clone(),
        ReaderOptions {
            status_interval,
            spill,
            toast,
        },
        control.start_lsn,
    )
    .await?;
    let confirmed = Arc::new(AtomicU64::new(start.0));
    let handles = PipelineHandles {
        progress: Arc::new(Mutex::new(Progress::default())),
        feedback: reader.feedback(),
        confirmed: confirmed.clone(),
    };
    let progress = handles.progress.clone();
    lock(&progress).snapshot = lock_progress(&snapshot_progress).clone();
    let catalog_schemas = CatalogSchemas(TypeResolver::new(catalog.clone(), pg.resolve_types));
    let schemas: Box<dyn SchemaSource> = match &history {
        Some(history) => Box::new(HistorySchemas {
            inner: catalog_schemas,
            history: history.clone(),
            progress: progress.clone(),
            metrics: metrics.clone(),
            captured: pg.capture_ddl,
        }),
        None => Box::new(catalog_schemas),
    };
    let pipeline = Pipeline::new(
        config,
        destinations,
        handles,
        start,
        schemas,
        metrics.clone(),
    );

    let (pipeline_tx, rx) = mpsc::channel(EVENT_BUFFER);
    let mut pipeline_task = {
        // A failed destination must stop the reader at once, not at the next change.
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let result = pipeline.run(rx).await;
            if result.is_err() {
                cancel.cancel();
            }
            result
        })
    };
    // Partitions to copy while streaming go through the watermark gate between the reader
    // and the pipeline.
    let (tx, copier_task) = match while_streaming {
        Some(WhileStreaming { jobs, store, key }) => {
            let (reader_tx, reader_rx) = mpsc::channel(EVENT_BUFFER);
            let (chunk_tx, chunk_rx) = mpsc::channel(1);
            let nonce = format!("{:016x}", rand::random::<u64>());
            tokio::spawn(incremental::gate(
                reader_rx,
                pipeline_tx,
                chunk_rx,
                nonce.clone(),
            ));
            let copier = incremental::copy_while_streaming(
                conn.clone(),
                jobs,
                store,
                key,
                chunk_tx,
                confirmed.clone(),
                snapshot_progress.clone(),
                nonce,
                cancel.clone(),
            );
            let cancel = cancel.clone();
            let failed = snapshot_progress.clone();
            let task = tokio::spawn(async move {
                let result = copier.await;
                if let Err(e) = &result {
                    snapshot::mark_failed(&failed);
                    tracing::error!(error = %e, "snapshot while streaming failed; stopping the flow");
                    cancel.cancel();
                }
                result
            });
            (reader_tx, Some(task))
        }
        None => (pipeline_tx, None),
    };
    // Captured DDL is met by the gate, first after the reader: it holds the stream before a
    // statement the policy stops for.
    let (tx, ddl_task) = match (&history, pg.capture_ddl) {
        (Some(history), true) => {
            let log = DdlLog::new(catalog.clone(), history.tables().clone(), flow_id.clone());
            let desk: Arc<dyn Desk> = match &control.kube {
                Some(k) => Arc::new(KubeDesk::new(
                    k.client.clone(),
                    &k.namespace,
                    &flow_name,
                    &k.flow_uid,
                    log.clone(),
                )),
                None => Arc::new(LogDesk::new(
                    log.clone(),
                    control
                        .manifest
                        .as_ref()
                        .map_or_else(|| "<flow.yaml>".to_owned(), |m| m.display().to_string()),
                )),
            };
            let stage = DdlStage {
                flow: flow_name.clone(),
                prefix: pg.ddl_message_prefix.clone(),
                policy: ddl_policy,
                park_on_reject: control.kube.is_some(),
                scope: Scope {
                    tables: pg
                        .tables
                        .iter()
                        .map(|t| TableName::parse(t).to_string())
                        .collect(),
                    schemas: pg.schemas.iter().cloned().collect(),
                    publication: pg.publication.clone(),
                },
                targets: resolved
                    .destinations
                    .iter()
                    .map(|(name, spec)| PlanTarget {
                        name: name.clone(),
                        kind: spec.kind,
                        format: spec.format.unwrap_or(flow.spec.wire_format),
                    })
                    .collect(),
                history: history.clone(),
                log,
                desk,
                catalog: catalog.clone(),
                progress: progress.clone(),
                confirmed: confirmed.clone(),
                poll: status_interval.min(std::time::Duration::from_secs(1)),
                metrics: metrics.clone(),
            };
            let (stage_tx, stage_rx) = mpsc::channel(EVENT_BUFFER);
            let cancel = cancel.clone();
            let task = tokio::spawn(async move {
                let result = stage.run(stage_rx, tx, cancel.clone()).await;
                if let Err(e) = &result {
                    tracing::error!(error = %e, "stopping the flow");
                    cancel.cancel();
                }
                result
            });
            (stage_tx, Some(task))
        }
        _ => (tx, None),
    };
    let status_task = {
        let snapshot_progress = snapshot_progress.clone();
        let progress = progress.clone();
        let cancel = cancel.clone();
        let catalog = catalog.clone();
        let reporter = reporter.clone();
        let source_state = source_state.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(status_interval);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = cancel.cancelled() => return,
                }
                let mut snapshot = lock(&progress).clone();
                snapshot.snapshot = lock_progress(&snapshot_progress).clone();
                let status = reporter.report(&snapshot, Some(&catalog), true, None).await;
                metrics.observe_status(&status);
                record_checkpoint(&source_state, &catalog, &snapshot).await;
            }
        })
    };

    let drain_task = drain_target.map(|target| {
        let catalog = catalog.clone();
        let cancel = cancel.clone();
        let slot = pg.slot.clone();
        // The reader confirms at most once per status interval; polling faster only
        // shortens the wait after that confirmation.
        let poll = status_interval.min(std::time::Duration::from_secs(1));
        tokio::spawn(async move { drain_until(&catalog, &slot, target, poll, &cancel).await })
    });

    // The reader stops on cancellation or error; dropping `tx` lets the pipeline drain.
    let read_result = reader.run(tx, &cancel, confirmed, status_interval).await;
    // The pipeline drains what was read within its grace period; a destination stuck with
    // the channel full cannot hold the stop forever (nothing unconfirmed is lost: the
    // slot did not move past it).
    let pipeline_result = match tokio::time::timeout(STOP_DEADLINE, &mut pipeline_task).await {
        Ok(joined) => joined?,
        Err(_) => {
            pipeline_task.abort();
            Err(PipelineError::Stuck(STOP_DEADLINE))
        }
    };
    // Only after the pipeline confirmed what it made durable does the final standby status
    // go out, so a clean stop leaves the slot at the last durable transaction.
    reader.stop().await;
    cancel.cancel();
    let ddl_result = match ddl_task {
        Some(task) => match task.await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the DDL gate failed: {e}")),
        },
        None => Ok(()),
    };
    let copier_result = match copier_task {
        Some(task) => match task.await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(e) => Err(format!("the snapshot task failed: {e}")),
        },
        None => Ok(()),
    };
    let _ = status_task.await;
    if let Some(task) = drain_task {
        let _ = task.await;
    }

    if read_result.is_err() {
        metrics.error("source", "replication");
    }
    match &pipeline_result {
        Err(PipelineError::Protocol(_)) => metrics.error("pipeline", "protocol"),
        Err(PipelineError::Batch(_)) => metrics.error("pipeline", "decode"),
        Err(PipelineError::GaveUp { .. }) => metrics.error("destination", "gave_up"),
        Err(PipelineError::Spool { .. }) => metrics.error("destination", "spool"),
        Err(PipelineError::Stuck(_)) => metrics.error("pipeline", "stuck"),
        Ok(()) => {}
    }
    let copier_result = ddl_result.and(copier_result);
    let mut error = match (&read_result, &pipeline_result, &copier_result) {
        (Err(e), _, _) => Some(e.to_string()),
        (_, Err(e), _) => Some(e.to_string()),
        (_, _, Err(e)) => Some(e.clone()),
        _ => None,
    };
    if let Err(PipelineError::GaveUp { .. }) = &pipeline_result {
        let fate = match flow.spec.failure_mode {
            FailureMode::HoldSlot => format!(
                "failureMode holdSlot: slot {} kept (PostgreSQL retains WAL from its position until the flow resumes)",
                pg.slot
            ),
            FailureMode::DropSlot => match setup::drop_slot(&catalog, &pg.slot).await {
                Ok(()) => format!(
                    "failureMode dropSlot: slot {} dropped, WAL released; changes after the checkpoint are not recoverable from this slot, re-snapshot the destinations",
                    pg.slot
                ),
                Err(e) => format!(
                    "failureMode dropSlot: dropping slot {} failed: {e}",
                    pg.slot
                ),
            },
        };
        tracing::error!("{fate}");
        error = error.map(|e| format!("{e}; {fate}"));
    }
    let mut snapshot = lock(&progress).clone();
    snapshot.snapshot = lock_progress(&snapshot_progress).clone();
    reporter
        .report(&snapshot, Some(&catalog), false, error.as_deref())
        .await;
    record_checkpoint(&source_state, &catalog, &snapshot).await;
    let stopped = if error.is_some() { "failed" } else { "stopped" };
    if let Err(e) = source_state.record_stopped(&catalog, stopped).await {
        tracing::warn!(error = %e, "could not record the stop in the source-state table");
    }
    read_result?;
    if let Err(e) = pipeline_result {
        anyhow::bail!(error.unwrap_or_else(|| e.to_string()));
    }
    if let Err(e) = copier_result {
        anyhow::bail!(e);
    }
    tracing::info!(flow = %flow_name, "stopped cleanly");
    Ok(())
}

/// What the snapshot phase leaves to the stream.
enum SnapshotPhase {
    /// Copied before streaming (or nothing to copy).
    Copied(SnapshotOutcome),
    /// Partitions to copy while streaming, through the watermark gate.
    WhileStreaming(WhileStreaming),
}

/// Partitions copied while the stream runs.
struct WhileStreaming {
    jobs: Vec<snapshot::Job>,
    store: SnapshotStore,
    key: String,
}

/// The initial snapshot of a stream run, before the reader starts.
struct InitialSnapshot<'a> {
    resolved: &'a Resolved,
    conn: &'a PgConnection,
    catalog: &'a Arc<tokio_postgres::Client>,
    spec: &'a SnapshotSpec,
    key: String,
    /// The slot's consistent point (stamped on the rows).
    lsn: Lsn,
    slot_created: bool,
    exported: Option<ExportedSnapshot>,
    config: PipelineConfig,
    metrics: &'a Metrics,
    reporter: &'a Arc<StatusReporter>,
    status_interval: std::time::Duration,
    progress: &'a SnapshotProgress,
}

impl InitialSnapshot<'_> {
    /// Copies everything into a new slot's exported snapshot, reporting progress every
    /// status interval; with an existing slot, leaves what the state store says is
    /// unfinished (a table new to the plan, an interrupted copy) to the stream.
    async fn run(self, cancel: &CancellationToken) -> anyhow::Result<SnapshotPhase> {
        let store = SnapshotStore::open(self.spec, self.catalog.clone()).await?;
        if self.slot_created {
            store.reset(&self.key).await?;
        } else if !store.is_durable() {
            tracing::info!(
                "snapshot: the slot already existed and stateBackend is none: nothing to copy"
            );
            return Ok(SnapshotPhase::Copied(SnapshotOutcome::Complete { rows: 0 }));
        }
        let pg = &self.resolved.flow.spec.source.postgres;
        let tables = snapshot::tables_to_copy(
            self.catalog,
            &self.spec.tables,
            &pg.publication,
            &self.spec.state_schema,
        )
        .await?;
        let mut request = SnapshotRequest::from_spec(self.spec, tables, self.lsn, self.key);
        if !self.slot_created {
            let jobs = snapshot::plan(self.catalog, &request, &store, self.progress).await?;
            if jobs.is_empty() {
                return Ok(SnapshotPhase::Copied(SnapshotOutcome::Complete { rows: 0 }));
            }
            tracing::info!(
                partitions = jobs.len(),
                "snapshot: copying while streaming (watermarks)"
            );
            return Ok(SnapshotPhase::WhileStreaming(WhileStreaming {
                jobs,
                store,
                key: request.state_key,
            }));
        }
        // A slot created by `pg_create_logical_replication_slot` (a concurrent start took
        // the name first) exported nothing: the workers still share one point in time
        // after the slot's position, and the stream replays the changes in between.
        let held = match &self.exported {
            Some(e) => {
                request.snapshot = Some(e.name.clone());
                None
            }
            None if self.spec.consistent => {
                let held = HeldSnapshot::export(self.conn).await?;
                request.snapshot = Some(held.name.clone());
                Some(held)
            }
            None => None,
        };
        let sink = SnapshotSink {
            destinations: open_resolved(self.resolved)?,
            config: self.config,
            schemas: Box::new(CatalogSchemas(TypeResolver::new(
                self.catalog.clone(),
                pg.resolve_types,
            ))),
            metrics: self.metrics.clone(),
        };
        let reporting = {
            let reporter = self.reporter.clone();
            let catalog = self.catalog.clone();
            let progress = self.progress.clone();
            let interval = self.status_interval;
            let stop = cancel.child_token();
            let guard = stop.clone().drop_guard();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return,
                    }
                    let snapshot = Progress {
                        snapshot: lock_progress(&progress).clone(),
                        ..Progress::default()
                    };
                    // The log is the standalone run's progress output: one line per table.
                    for t in &snapshot.snapshot {
                        tracing::info!("{}", crate::progress::line(t));
                    }
                    reporter.report(&snapshot, Some(&catalog), true, None).await;
                }
            });
            guard
        };
        let outcome = snapshot::run(
            self.conn,
            self.catalog,
            request,
            &store,
            sink,
            self.progress,
            cancel,
        )
        .await;
        drop(reporting);
        // Each table's final state, however short the copy was against the interval.
        for t in lock_progress(self.progress).iter() {
            tracing::info!("{}", crate::progress::line(t));
        }
        drop(held);
        drop(self.exported);
        Ok(SnapshotPhase::Copied(outcome?))
    }
}

/// The server's WAL write position; `purpose` prefixes the errors (`--drain`, `backfill`).
pub(crate) async fn current_wal_lsn(
    catalog: &tokio_postgres::Client,
    purpose: &str,
) -> anyhow::Result<Lsn> {
    let text: String = catalog
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| anyhow::anyhow!("{purpose}: reading pg_current_wal_lsn(): {e}"))?
        .get(0);
    text.parse()
        .map_err(|e| anyhow::anyhow!("{purpose}: pg_current_wal_lsn(): {e}"))
}

/// The source connection of a flow: its CA bundle (if any) written privately under
/// `state_dir`, the resolved DSN and `application_name`.
pub(crate) fn source_connection(
    resolved: &Resolved,
    state_dir: &std::path::Path,
    application_name: String,
) -> anyhow::Result<PgConnection> {
    let ca_path = match &resolved.ssl_root_cert_pem {
        Some(pem) => Some(write_private(&state_dir.join("sslrootcert.pem"), pem)?),
        None => None,
    };
    let pg = &resolved.flow.spec.source.postgres;
    Ok(
        PgConnection::resolve(pg, resolved.source_secret.as_ref(), ca_path)?
            .with_application_name(application_name),
    )
}

/// The pipeline settings of a flow (batching, memory budget, fan-out, spool).
pub(crate) fn pipeline_config(
    flow: &Flow,
    state_dir: &std::path::Path,
    ack: AckMode,
    emit_empty: bool,
) -> anyhow::Result<PipelineConfig> {
    let pg = &flow.spec.source.postgres;
    Ok(PipelineConfig {
        batch_size: pg.batch_size.into(),
        batch_max_bytes: pg.batch_max_bytes,
        batch_timeout: pg.batch_timeout.parse().map_err(anyhow::Error::msg)?,
        memory_budget: pg.memory_budget_bytes,
        parallelism: flow.spec.parallelism,
        ack,
        secondary_buffer_bytes: flow.spec.secondary_buffer_bytes,
        spool_dir: state_dir.join("spool"),
        emit_empty,
    })
}

/// Cancels the run once the slot's `confirmed_flush_lsn` (what PostgreSQL was told is
/// durable) reaches `target`.
async fn drain_until(
    catalog: &tokio_postgres::Client,
    slot: &str,
    target: Lsn,
    poll: std::time::Duration,
    cancel: &CancellationToken,
) {
    tracing::info!(slot, target = %target, "--drain: stopping once the slot confirmed the server's position at start");
    loop {
        let confirmed = catalog
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await;
        match confirmed {
            Ok(Some(row)) => {
                let lsn: Option<String> = row.get(0);
                if let Some(lsn) = lsn.and_then(|l| l.parse::<Lsn>().ok())
                    && lsn >= target
                {
                    tracing::info!(slot, confirmed = %lsn, target = %target, "--drain: caught up, stopping");
                    cancel.cancel();
                    return;
                }
            }
            Ok(None) => tracing::warn!(slot, "--drain: the slot disappeared"),
            Err(e) => tracing::warn!(slot, error = %e, "--drain: reading the slot"),
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// The state table is for auditing (the slot holds the resume position), so a failed
/// write is logged and the flow goes on.
async fn record_checkpoint(
    state: &SourceState,
    catalog: &tokio_postgres::Client,
    progress: &Progress,
) {
    if let Some((lsn, _)) = progress.checkpoint
        && let Err(e) = state.record_checkpoint(catalog, lsn).await
    {
        tracing::warn!(error = %e, "could not record the checkpoint in the source-state table");
    }
}

pub(crate) fn write_private(path: &std::path::Path, body: &str) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(body.as_bytes())?;
    Ok(path.to_owned())
}
