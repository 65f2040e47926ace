//! Status in the shape of `Flow.status`, written to a local JSON file (atomically, by
//! rename) at every `statusInterval` and summarized in the log.

use std::path::{Path, PathBuf};

use chrono::Utc;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use tokio_postgres::Client;
use wallaby_crds::flow::{Checkpoint, DestinationProgress, FlowPhase, FlowStatus, Lag, SlotStatus};

use crate::lsn::Lsn;
use crate::pipeline::Progress;

/// Writes the status file.
#[derive(Debug)]
pub struct StatusReporter {
    path: PathBuf,
    slot: String,
    destinations: Vec<String>,
    generation: Option<i64>,
}

/// What the slot looks like on the server.
#[derive(Debug, Default)]
struct SlotView {
    current_wal: Option<Lsn>,
    slot: Option<SlotStatus>,
}

impl StatusReporter {
    /// A reporter for `slot` and the named destinations.
    pub fn new(
        path: PathBuf,
        slot: String,
        destinations: Vec<String>,
        generation: Option<i64>,
    ) -> Self {
        Self {
            path,
            slot,
            destinations,
            generation,
        }
    }

    /// Builds the status from pipeline progress and the slot, writes it, logs a summary,
    /// and returns it (metrics take lag and retained WAL from it).
    pub async fn report(
        &self,
        progress: &Progress,
        catalog: Option<&Client>,
        running: bool,
        error: Option<&str>,
    ) -> FlowStatus {
        let view = match catalog {
            Some(c) => self.slot_view(c).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading slot status");
                SlotView::default()
            }),
            None => SlotView::default(),
        };
        let status = self.build(progress, &view, running, error);
        if let Err(e) = write_atomic(&self.path, &status) {
            tracing::warn!(path = %self.path.display(), error = %e, "writing the status file");
        }
        tracing::info!(
            checkpoint = status
                .checkpoint
                .as_ref()
                .map(|c| c.lsn.as_str())
                .unwrap_or("-"),
            lag_bytes = status.lag.as_ref().map(|l| l.bytes).unwrap_or(0),
            lag_seconds = status.lag.as_ref().map(|l| l.seconds).unwrap_or(0.0),
            rows = status.counters.as_ref().map(|c| c.rows).unwrap_or(0),
            transactions = progress.counters.transactions,
            retained_wal_bytes = status
                .slot
                .as_ref()
                .map(|s| s.retained_wal_bytes)
                .unwrap_or(0),
            "status"
        );
        status
    }

    async fn slot_view(&self, catalog: &Client) -> Result<SlotView, tokio_postgres::Error> {
        let row = catalog
            .query_opt(
                "SELECT pg_current_wal_lsn()::text, s.active, s.confirmed_flush_lsn::text,
                        pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint
                 FROM pg_replication_slots s WHERE s.slot_name = $1",
                &[&self.slot],
            )
            .await?;
        Ok(match row {
            Some(r) => {
                let current: Option<String> = r.get(0);
                let retained: Option<i64> = r.get(3);
                SlotView {
                    current_wal: current.and_then(|c| c.parse().ok()),
                    slot: Some(SlotStatus {
                        name: self.slot.clone(),
                        active: r.get(1),
                        retained_wal_bytes: retained.unwrap_or(0).max(0) as u64,
                        confirmed_flush_lsn: r.get(2),
                    }),
                }
            }
            None => SlotView::default(),
        })
    }

    fn build(
        &self,
        p: &Progress,
        view: &SlotView,
        running: bool,
        error: Option<&str>,
    ) -> FlowStatus {
        let now = Utc::now();
        let checkpoint_lsn = p.checkpoint.map(|(l, _)| l).or_else(|| {
            view.slot
                .as_ref()
                .and_then(|s| s.confirmed_flush_lsn.as_deref())
                .and_then(|l| l.parse().ok())
        });
        // The slot may be ahead of the last delivered transaction (an idle slot confirms
        // the server's position): the lag is what remains to be read, from whichever is
        // further.
        let slot_lsn: Option<Lsn> = view
            .slot
            .as_ref()
            .and_then(|s| s.confirmed_flush_lsn.as_deref())
            .and_then(|l| l.parse().ok());
        let lag_from = match (checkpoint_lsn, slot_lsn) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let lag = match (view.current_wal, lag_from) {
            (Some(current), Some(cp)) => Some(Lag {
                bytes: current.0.saturating_sub(cp.0),
                seconds: p
                    .oldest_pending
                    .map(|t| (now - t).num_milliseconds().max(0) as f64 / 1000.0)
                    .unwrap_or(0.0),
            }),
            _ => None,
        };
        let (phase, ready, reason, message) = match (running, error) {
            (_, Some(e)) => (FlowPhase::Failed, "False", "WorkerFailed", e.to_owned()),
            (true, None) => (
                FlowPhase::Running,
                "True",
                "Streaming",
                "streaming changes".to_owned(),
            ),
            (false, None) => (
                FlowPhase::Pending,
                "False",
                "WorkerStopped",
                "worker stopped; it resumes from the checkpoint on restart".to_owned(),
            ),
        };
        let condition = |type_: &str, status: &str, reason: &str, message: String| Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
            observed_generation: self.generation,
        };
        // Degraded: a destination is retrying or was detached, while the flow still runs.
        let troubled: Vec<String> = p
            .destinations
            .iter()
            .filter_map(|d| match (&d.detached, &d.last_error) {
                (Some(why), _) => Some(format!("{}: detached: {why}", d.name)),
                (None, Some(e)) => Some(format!(
                    "{}: {} failed attempt(s), last: {e}",
                    d.name, d.failed_attempts
                )),
                _ => None,
            })
            .collect();
        let degraded = if troubled.is_empty() {
            condition(
                "Degraded",
                "False",
                "AllDestinationsHealthy",
                "every destination is keeping up".into(),
            )
        } else {
            condition("Degraded", "True", "DestinationErrors", troubled.join("; "))
        };
        let phase = if running && error.is_none() && !troubled.is_empty() {
            FlowPhase::Degraded
        } else {
            phase
        };
        FlowStatus {
            observed_generation: self.generation,
            phase: Some(phase),
            conditions: vec![condition("Ready", ready, reason, message), degraded],
            checkpoint: checkpoint_lsn.map(|l| Checkpoint {
                lsn: l.to_string(),
                time: p.checkpoint.map(|(_, t)| t.to_rfc3339()),
            }),
            destinations: self
                .destinations
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let d = p.destinations.get(i);
                    DestinationProgress {
                        name: name.clone(),
                        lsn: d
                            .and_then(|d| d.lsn)
                            .or(checkpoint_lsn)
                            .map(|l| l.to_string()),
                        last_error: d
                            .and_then(|d| d.detached.clone().or_else(|| d.last_error.clone())),
                        last_error_time: d.and_then(|d| d.last_error_time).map(|t| t.to_rfc3339()),
                    }
                })
                .collect(),
            lag,
            slot: view.slot.clone(),
            snapshot: Vec::new(),
            workload: None,
            counters: Some(p.counters.clone()),
        }
    }
}

fn write_atomic(path: &Path, status: &FlowStatus) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}
