//! One run of a flow: preflight, stream, pipeline and status reporter wired together, and
//! an orderly shutdown (flush → confirm → final standby status → final status file).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pg_walstream::CancellationToken;
use tokio::sync::mpsc;

use crate::destination::file::FileDestination;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, Progress, lock};
use crate::source::reader::ReplicationReader;
use crate::source::{PgConnection, setup};
use crate::standalone::Resolved;
use crate::status::StatusReporter;

/// Events buffered between the reader and the pipeline (bounds memory with back-pressure).
const EVENT_BUFFER: usize = 4096;

/// Where the worker keeps local state.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Status file path.
    pub status_file: PathBuf,
    /// Directory for private files (the CA bundle).
    pub state_dir: PathBuf,
}

/// Runs until `cancel` fires (clean stop, `Ok`) or an error stops the flow, recording into
/// `metrics`.
pub async fn run(
    resolved: Resolved,
    options: RunOptions,
    cancel: CancellationToken,
    metrics: Metrics,
) -> anyhow::Result<()> {
    let flow = &resolved.flow;
    let flow_name = flow.metadata.name.clone().unwrap_or_default();
    let pg = &flow.spec.source.postgres;
    let batch_timeout = pg.batch_timeout.parse().map_err(anyhow::Error::msg)?;
    let status_interval = pg.status_interval.parse().map_err(anyhow::Error::msg)?;

    let ca_path = match &resolved.ssl_root_cert_pem {
        Some(pem) => Some(write_private(
            &options.state_dir.join("sslrootcert.pem"),
            pem,
        )?),
        None => None,
    };
    let conn = PgConnection::resolve(pg, resolved.source_secret.as_ref(), ca_path)?;
    tracing::info!(flow = %flow_name, source = %conn.describe(), slot = %pg.slot, publication = %pg.publication, "starting");

    // One SQL connection serves preflight, primary-key lookups and status queries.
    let catalog = Arc::new(conn.connect().await?);
    let slot = setup::prepare(&catalog, pg).await?;
    tracing::info!(slot = %pg.slot, resume_from = %slot.confirmed_flush_lsn, created = slot.created, "slot ready");
    // --- observability: the gauge starts at the position the stream resumes from ---
    if let Ok(lsn) = slot.confirmed_flush_lsn.parse::<crate::lsn::Lsn>() {
        metrics.set_confirmed_lsn(lsn.0);
    }

    let mut destinations = Vec::new();
    for (name, spec) in &resolved.destinations {
        let dest = FileDestination::open(spec)
            .map_err(|e| anyhow::anyhow!("Destination/{name}: cannot open {}: {e}", spec.path))?;
        destinations.push((name.clone(), dest));
    }

    let mut reader = ReplicationReader::start(
        &conn,
        &pg.slot,
        &pg.publication,
        status_interval,
        catalog.clone(),
    )
    .await?;
    let progress = Arc::new(Mutex::new(Progress::default()));
    let pipeline = Pipeline::new(
        destinations,
        pg.batch_size,
        batch_timeout,
        reader.feedback(),
        progress.clone(),
        metrics.clone(),
    );
    let reporter = Arc::new(StatusReporter::new(
        options.status_file.clone(),
        pg.slot.clone(),
        resolved
            .destinations
            .iter()
            .map(|(n, _)| n.clone())
            .collect(),
        flow.metadata.generation,
    ));

    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let pipeline_task = {
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
    let status_task = {
        let progress = progress.clone();
        let cancel = cancel.clone();
        let catalog = catalog.clone();
        let reporter = reporter.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(status_interval);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = cancel.cancelled() => return,
                }
                let snapshot = lock(&progress).clone();
                let status = reporter.report(&snapshot, Some(&catalog), true, None).await;
                // --- observability: lag and retained WAL as the status computed them ---
                metrics.observe_status(&status);
            }
        })
    };

    // The reader stops on cancellation or error; dropping `tx` lets the pipeline drain.
    let read_result = reader.run(tx, &cancel).await;
    let pipeline_result = pipeline_task.await?;
    // Only after the pipeline confirmed what it made durable does the final standby status
    // go out, so a clean stop leaves the slot at the last durable transaction.
    reader.stop().await;
    cancel.cancel();
    let _ = status_task.await;

    // --- observability: destination errors were counted where they happened ---
    if read_result.is_err() {
        metrics.error("source", "replication");
    }
    if let Err(crate::pipeline::PipelineError::Protocol(_)) = &pipeline_result {
        metrics.error("pipeline", "protocol");
    }
    let error = match (&read_result, &pipeline_result) {
        (Err(e), _) => Some(e.to_string()),
        (_, Err(e)) => Some(e.to_string()),
        _ => None,
    };
    let snapshot = lock(&progress).clone();
    reporter
        .report(&snapshot, Some(&catalog), false, error.as_deref())
        .await;
    read_result?;
    pipeline_result?;
    tracing::info!(flow = %flow_name, "stopped cleanly");
    Ok(())
}

fn write_private(path: &std::path::Path, body: &str) -> anyhow::Result<PathBuf> {
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
