//! `wallaby-worker backfill`: copies a flow's tables (or the ones named with `--tables`)
//! into its destinations inside one exported snapshot, and exits — the standalone command
//! and the Job of `mode: backfill`. The slot is not touched; progress goes to the status
//! sink and to stderr (a bar on a terminal, plain lines otherwise).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use pg_walstream::CancellationToken;
use wallaby_crds::flow::{SnapshotSpec, TableSnapshotProgress};

use crate::progress::{bar, line};
use crate::run::{
    CatalogSchemas, RunOptions, current_wal_lsn, open_resolved, pipeline_config, source_connection,
};
use crate::standalone::Resolved;
use crate::status::{StatusFile, StatusReporter, StatusSink};
use wallaby_pipeline::ack::AckMode;
use wallaby_pipeline::metrics::Metrics;
use wallaby_pipeline::runner::Progress;
use wallaby_source::snapshot::store::SnapshotStore;
use wallaby_source::snapshot::{
    self, HeldSnapshot, SnapshotOutcome, SnapshotProgress, SnapshotRequest, SnapshotSink,
    lock_progress,
};
use wallaby_source::state;
use wallaby_source::types::TypeResolver;

/// How often progress is printed and reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What a backfill run copies and where it reports.
#[derive(Debug, Clone, Default)]
pub struct BackfillControl {
    /// `schema.table` names; empty: `snapshot.tables`, else `source.postgres.tables`, else
    /// every table of the publication.
    pub tables: Vec<String>,
    /// Where status goes; `None`: the status file of [`RunOptions`].
    pub status: Option<Arc<dyn StatusSink>>,
    /// Print progress to stderr.
    pub print_progress: bool,
}

/// The flow's `snapshot` options, or their defaults.
fn snapshot_spec(resolved: &Resolved) -> anyhow::Result<SnapshotSpec> {
    match &resolved.flow.spec.snapshot {
        Some(s) => Ok(s.clone()),
        None => serde_json::from_value(serde_json::json!({}))
            .map_err(|e| anyhow::anyhow!("default snapshot options: {e}")),
    }
}

/// Copies the tables and returns how it ended (`Stopped` after a cancellation: run it
/// again to copy the unfinished partitions).
pub async fn backfill(
    resolved: Resolved,
    options: RunOptions,
    control: BackfillControl,
    cancel: CancellationToken,
    metrics: Metrics,
) -> anyhow::Result<SnapshotOutcome> {
    let flow = &resolved.flow;
    let pg = &flow.spec.source.postgres;
    let spec = snapshot_spec(&resolved)?;
    let flow_id = state::flow_id(flow);
    let conn = source_connection(
        &resolved,
        &options.state_dir,
        format!("wallaby-worker/{flow_id}/backfill"),
    )?;
    let catalog = Arc::new(conn.connect().await?);
    let store = SnapshotStore::open(&spec, catalog.clone()).await?;
    // A backfill is a new copy unless the last one was interrupted.
    let key = format!("{flow_id}#backfill");
    let records = store.load(&key).await?;
    if records.iter().all(|r| r.done) {
        store.reset(&key).await?;
    } else {
        tracing::info!(
            unfinished = records.iter().filter(|r| !r.done).count(),
            "backfill: resuming the unfinished partitions of the last run"
        );
    }
    let listed = [&control.tables, &spec.tables, &pg.tables]
        .into_iter()
        .find(|l| !l.is_empty())
        .cloned()
        .unwrap_or_default();
    let tables =
        snapshot::tables_to_copy(&catalog, &listed, &pg.publication, &spec.state_schema).await?;
    if tables.is_empty() {
        anyhow::bail!(
            "backfill: no tables to copy: give --tables, snapshot.tables or source.postgres.tables (publication {:?} has none)",
            pg.publication
        );
    }
    let lsn = current_wal_lsn(&catalog, "backfill").await?;
    let mut request = SnapshotRequest::from_spec(&spec, tables, lsn, key);
    let held = if spec.consistent {
        let held = HeldSnapshot::export(&conn).await?;
        request.snapshot = Some(held.name.clone());
        Some(held)
    } else {
        None
    };
    let config = pipeline_config(flow, &options.state_dir, AckMode::All, false)?;
    let sink = SnapshotSink {
        destinations: open_resolved(&resolved)?,
        config,
        schemas: Box::new(CatalogSchemas(TypeResolver::new(
            catalog.clone(),
            pg.resolve_types,
        ))),
        metrics,
    };
    let names = resolved.destinations.iter().map(|d| d.0.clone()).collect();
    let status_sink = control
        .status
        .clone()
        .unwrap_or_else(|| Arc::new(StatusFile(options.status_file.clone())));
    let reporter = Arc::new(StatusReporter::new(
        status_sink,
        pg.slot.clone(),
        names,
        flow.metadata.generation,
    ));
    let progress = SnapshotProgress::default();
    let printer = Arc::new(std::sync::Mutex::new(ProgressPrinter::new(
        control.print_progress,
    )));
    let stop_reporting = cancel.child_token();
    let reporting = {
        let (reporter, progress, printer, stop) = (
            reporter.clone(),
            progress.clone(),
            printer.clone(),
            stop_reporting.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let tables = lock_progress(&progress).clone();
                printer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .print(&tables);
                let p = Progress {
                    snapshot: tables,
                    ..Progress::default()
                };
                reporter.report(&p, None, true, None).await;
            }
        })
    };
    let outcome = snapshot::run(&conn, &catalog, request, &store, sink, &progress, &cancel).await;
    drop(held);
    if outcome.is_err() {
        snapshot::mark_failed(&progress);
    }
    stop_reporting.cancel();
    let _ = reporting.await;
    let tables = lock_progress(&progress).clone();
    {
        let mut printer = printer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        printer.print(&tables);
        printer.finish();
    }
    let error = outcome.as_ref().err().map(ToString::to_string);
    let p = Progress {
        snapshot: tables,
        ..Progress::default()
    };
    reporter.report(&p, None, false, error.as_deref()).await;
    Ok(outcome?)
}

/// Prints snapshot progress: one redrawn bar on a terminal, a line per table otherwise.
#[derive(Debug)]
pub struct ProgressPrinter {
    enabled: bool,
    terminal: bool,
    drawn: bool,
}

impl ProgressPrinter {
    /// A printer for stderr (`enabled: false` prints nothing).
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            terminal: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    /// Prints the current progress.
    pub fn print(&mut self, tables: &[TableSnapshotProgress]) {
        if !self.enabled || tables.is_empty() {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r\x1b[2K{}", bar(tables));
            let _ = err.flush();
            self.drawn = true;
        } else {
            for t in tables {
                let _ = writeln!(err, "{}", line(t));
            }
        }
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.enabled && self.drawn {
            let _ = writeln!(std::io::stderr());
        }
    }
}
