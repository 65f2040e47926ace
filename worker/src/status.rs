//! Status in the shape of `Flow.status`, built at every `statusInterval` from pipeline
//! progress and the slot, summarized in the log and published to a [`StatusSink`]: a local
//! JSON file (standalone) or the Flow's status subresource (in-cluster, `crate::cluster`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::Utc;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use tokio_postgres::Client;
use wallaby_crds::flow::{Checkpoint, DestinationProgress, FlowPhase, FlowStatus, Lag, SlotStatus};

use wallaby_pipeline::lsn::Lsn;
use wallaby_pipeline::runner::Progress;

/// Condition types the worker owns on `Flow.status` in a cluster (the operator owns
/// `Ready` and `Progressing`, `phase`, `observedGeneration` and `workload`).
pub const WORKER_CONDITIONS: [&str; 3] = ["SlotHealthy", "Degraded", "DDLGated"];

/// A status could not be published.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The status file could not be written.
    #[error("writing the status file {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The API server refused or could not be reached.
    #[error("applying the status of Flow {flow}: {message}")]
    Api { flow: String, message: String },
}

/// Where status goes. Publishing is best effort: the run logs a failure and goes on.
#[async_trait]
pub trait StatusSink: Send + Sync + std::fmt::Debug {
    /// Publishes one status.
    async fn publish(&self, status: &FlowStatus) -> Result<(), StatusError>;
}

/// The standalone sink: the whole status, as JSON, replaced atomically (by rename).
#[derive(Debug, Clone)]
pub struct StatusFile(pub PathBuf);

#[async_trait]
impl StatusSink for StatusFile {
    async fn publish(&self, status: &FlowStatus) -> Result<(), StatusError> {
        write_atomic(&self.0, status).map_err(|source| StatusError::File {
            path: self.0.display().to_string(),
            source,
        })
    }
}

/// The part of `status` the worker owns in a cluster: checkpoint, destinations, lag, slot,
/// snapshot, counters and the [`WORKER_CONDITIONS`]. Server-side apply removes any field
/// the manager stops sending, so the worker must never send the operator's fields.
pub fn worker_owned(status: &FlowStatus) -> FlowStatus {
    FlowStatus {
        observed_generation: None,
        phase: None,
        workload: None,
        replay: None,
        conditions: status
            .conditions
            .iter()
            .filter(|c| WORKER_CONDITIONS.contains(&c.type_.as_str()))
            .cloned()
            .collect(),
        ..status.clone()
    }
}

/// Builds and publishes the status.
#[derive(Debug)]
pub struct StatusReporter {
    sink: Arc<dyn StatusSink>,
    slot: String,
    destinations: Vec<String>,
    generation: Option<i64>,
    /// Conditions last published: a condition keeps its `lastTransitionTime` while its
    /// status stays the same.
    last_conditions: Mutex<Vec<Condition>>,
}

/// What the slot looks like on the server.
#[derive(Debug, Default)]
struct SlotView {
    current_wal: Option<Lsn>,
    slot: Option<SlotStatus>,
    /// `wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    wal_status: Option<String>,
    /// Whether the slot query ran (false: the database could not be asked).
    queried: bool,
}

impl StatusReporter {
    /// A reporter for `slot` and the named destinations, publishing to `sink`.
    pub fn new(
        sink: Arc<dyn StatusSink>,
        slot: String,
        destinations: Vec<String>,
        generation: Option<i64>,
    ) -> Self {
        Self {
            sink,
            slot,
            destinations,
            generation,
            last_conditions: Mutex::new(Vec::new()),
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
        let mut status = self.build(progress, &view, running, error);
        self.keep_transition_times(&mut status.conditions);
        if let Err(e) = self.sink.publish(&status).await {
            tracing::warn!(error = %e, "publishing status");
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
                        pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint,
                        s.wal_status
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
                    wal_status: r.get(4),
                    queried: true,
                }
            }
            None => SlotView {
                queried: true,
                ..SlotView::default()
            },
        })
    }

    /// Carries `lastTransitionTime` over from the last report for conditions whose status
    /// did not change.
    fn keep_transition_times(&self, conditions: &mut [Condition]) {
        let mut last = self
            .last_conditions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in conditions.iter_mut() {
            if let Some(prev) = last
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == c.status)
            {
                c.last_transition_time = prev.last_transition_time.clone();
            }
        }
        *last = conditions.to_vec();
    }

    /// `SlotHealthy`: the slot exists, keeps the WAL it needs, and has a walsender while
    /// the flow runs.
    fn slot_condition(
        &self,
        view: &SlotView,
        running: bool,
    ) -> (&'static str, &'static str, String) {
        let slot = &self.slot;
        match (&view.slot, view.wal_status.as_deref()) {
            _ if !view.queried => (
                "Unknown",
                "SlotUnreadable",
                format!("could not read slot {slot} from pg_replication_slots"),
            ),
            (None, _) => (
                "False",
                "SlotMissing",
                format!(
                    "replication slot {slot} does not exist: set createSlot: true or create it"
                ),
            ),
            (Some(_), Some("lost")) => (
                "False",
                "WalLost",
                format!(
                    "slot {slot} lost WAL it needed (max_slot_wal_keep_size): changes are missing; drop the slot and re-snapshot"
                ),
            ),
            (Some(s), Some("unreserved")) => (
                "False",
                "WalAtRisk",
                format!(
                    "slot {slot} retains {} bytes of WAL past max_slot_wal_keep_size and will lose WAL at the next checkpoint",
                    s.retained_wal_bytes
                ),
            ),
            (Some(s), _) if running && !s.active => (
                "False",
                "SlotInactive",
                format!("no walsender is attached to slot {slot}"),
            ),
            (Some(s), _) => (
                "True",
                if s.active {
                    "SlotActive"
                } else {
                    "SlotRetained"
                },
                format!("slot {slot} retains {} bytes of WAL", s.retained_wal_bytes),
            ),
        }
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
            (true, None) if p.ddl_gate.is_some() => (
                FlowPhase::Gated,
                "True",
                "Gated",
                "holding the stream before a DDL statement: see DDLGated".to_owned(),
            ),
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
        let phase = if running && error.is_none() && p.ddl_gate.is_some() {
            FlowPhase::Gated
        } else if running && error.is_none() && !troubled.is_empty() {
            FlowPhase::Degraded
        } else {
            phase
        };
        let (slot_status, slot_reason, slot_message) = self.slot_condition(view, running);
        FlowStatus {
            observed_generation: self.generation,
            phase: Some(phase),
            conditions: vec![
                condition("Ready", ready, reason, message),
                degraded,
                condition("SlotHealthy", slot_status, slot_reason, slot_message),
                match &p.ddl_gate {
                    Some(gate) => condition("DDLGated", "True", &gate.reason, gate.message.clone()),
                    None => condition(
                        "DDLGated",
                        "False",
                        "NotGated",
                        "no schema change is waiting for approval".into(),
                    ),
                },
            ],
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
            snapshot: p.snapshot.clone(),
            workload: None,
            replay: None,
            counters: Some(p.counters.clone()),
            last_schema_change: p.last_schema_change.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Collect(Mutex<Vec<FlowStatus>>);

    #[async_trait]
    impl StatusSink for Collect {
        async fn publish(&self, status: &FlowStatus) -> Result<(), StatusError> {
            self.0.lock().unwrap().push(status.clone());
            Ok(())
        }
    }

    fn condition<'a>(s: &'a FlowStatus, kind: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == kind).unwrap()
    }

    #[tokio::test]
    async fn conditions_keep_their_transition_time_until_their_status_changes() {
        let sink = Arc::new(Collect::default());
        let reporter = StatusReporter::new(sink.clone(), "s".into(), vec!["d".into()], Some(2));
        let p = Progress::default();
        let first = reporter.report(&p, None, true, None).await;
        let second = reporter.report(&p, None, true, None).await;
        assert_eq!(
            condition(&first, "Ready").last_transition_time,
            condition(&second, "Ready").last_transition_time,
            "unchanged Ready keeps its time"
        );
        let failed = reporter.report(&p, None, false, Some("boom")).await;
        assert_eq!(condition(&failed, "Ready").status, "False");
        assert!(
            condition(&failed, "Ready").last_transition_time.0
                >= condition(&first, "Ready").last_transition_time.0
        );
        assert_eq!(sink.0.lock().unwrap().len(), 3, "every report is published");
    }

    #[tokio::test]
    async fn the_worker_reports_its_three_conditions_and_an_unreadable_slot_as_unknown() {
        let sink = Arc::new(Collect::default());
        let reporter = StatusReporter::new(sink, "s".into(), vec![], None);
        let status = reporter
            .report(&Progress::default(), None, true, None)
            .await;
        let owned = worker_owned(&status);
        let types: Vec<&str> = owned.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Degraded", "SlotHealthy", "DDLGated"]);
        assert_eq!(condition(&owned, "SlotHealthy").status, "Unknown");
        assert_eq!(condition(&owned, "DDLGated").status, "False");
        assert!(owned.phase.is_none() && owned.observed_generation.is_none());
        // The file keeps everything: standalone has no operator.
        assert!(status.phase.is_some());
        assert!(status.conditions.iter().any(|c| c.type_ == "Ready"));
    }

    #[tokio::test]
    async fn a_held_gate_shows_as_ddl_gated_with_the_approval_and_phase_gated() {
        let sink = Arc::new(Collect::default());
        let reporter = StatusReporter::new(sink, "s".into(), vec![], None);
        let p = Progress {
            ddl_gate: Some(wallaby_pipeline::runner::GateView {
                approval: Some("orders-ddl-0-16b6c50".into()),
                lsn: Lsn(0x16B_6C50),
                reason: "AwaitingApproval".into(),
                message: "ALTER TABLE on public.orders at 0/16B6C50 waits: kubectl patch …".into(),
            }),
            last_schema_change: Some(wallaby_crds::flow::SchemaChange {
                table: "public.orders".into(),
                version: 2,
                lsn: "0/16B6C50".into(),
                source: "ddl".into(),
                summary: "+email text".into(),
            }),
            ..Progress::default()
        };
        let status = reporter.report(&p, None, true, None).await;
        let gated = condition(&status, "DDLGated");
        assert_eq!(
            (gated.status.as_str(), gated.reason.as_str()),
            ("True", "AwaitingApproval")
        );
        assert!(gated.message.contains("kubectl patch"));
        assert_eq!(status.phase, Some(FlowPhase::Gated));
        assert_eq!(status.last_schema_change.as_ref().unwrap().version, 2);
        // In a cluster the worker sends its part, schema change included.
        let owned = worker_owned(&status);
        assert_eq!(condition(&owned, "DDLGated").status, "True");
        assert!(owned.last_schema_change.is_some());
    }

    #[test]
    fn slot_health_follows_wal_status_and_activity() {
        let reporter = StatusReporter::new(
            Arc::new(StatusFile(PathBuf::from("/nonexistent"))),
            "s".into(),
            vec![],
            None,
        );
        let slot = |active| SlotStatus {
            name: "s".into(),
            active,
            retained_wal_bytes: 42,
            confirmed_flush_lsn: None,
        };
        let view = |s: Option<SlotStatus>, wal: Option<&str>| SlotView {
            current_wal: None,
            slot: s,
            wal_status: wal.map(str::to_owned),
            queried: true,
        };
        let cases = [
            (
                view(Some(slot(true)), Some("reserved")),
                true,
                "True",
                "SlotActive",
            ),
            (
                view(Some(slot(false)), Some("reserved")),
                false,
                "True",
                "SlotRetained",
            ),
            (
                view(Some(slot(false)), Some("reserved")),
                true,
                "False",
                "SlotInactive",
            ),
            (
                view(Some(slot(true)), Some("unreserved")),
                true,
                "False",
                "WalAtRisk",
            ),
            (
                view(Some(slot(true)), Some("lost")),
                true,
                "False",
                "WalLost",
            ),
            (view(None, None), true, "False", "SlotMissing"),
        ];
        for (v, running, status, reason) in cases {
            let (s, r, _) = reporter.slot_condition(&v, running);
            assert_eq!((s, r), (status, reason), "{v:?} running={running}");
        }
    }
}
