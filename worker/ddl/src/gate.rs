//! The DDL gate: a stage between the replication reader and the pipeline that meets each
//! captured statement, records it and its schema versions, and — when the flow's policy
//! says so — holds the stream just before it until a decision (and, with `autoApply:
//! false`, an apply confirmation) arrives. The pure decision rule is [`next`].

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wallaby_crds::common::WireFormat;
use wallaby_crds::ddl_approval::{ApprovalState, Decision, DestinationPlan, DestinationResult};
use wallaby_crds::destination::DestinationType;
use wallaby_crds::flow::{EffectiveDdlPolicy, SchemaChange};

use super::DdlError;
use super::capture::CapturedDdl;
use super::desk::{Desk, Reading, approval_name, decision_text};
use super::history::{DdlEvent, DdlLog, NewDdlEvent, SchemaHistory, ShapeColumn, diff, summary};
use super::plan::{TableChange, destination_plan, materializes_tables};
use wallaby_pipeline::change::{Relation, SourceEvent};
use wallaby_pipeline::lsn::Lsn;
use wallaby_pipeline::metrics::Metrics;
use wallaby_pipeline::runner::{GateView, Progress};

/// What the gate does next with a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Hold the stream: a human decision is needed.
    AwaitDecision,
    /// Hold the stream: approved, waiting for someone to confirm the manual apply.
    AwaitApply,
    /// Apply to the destinations, then let the statement through.
    Apply,
    /// Rejected: the flow stops before the statement; the slot is held.
    Stop,
    /// Already applied (met again after a restart): let it through.
    Pass,
}

/// The decision rule, from the policy and what is recorded of the statement.
pub fn next(policy: EffectiveDdlPolicy, state: ApprovalState, reading: Reading) -> Next {
    match state {
        ApprovalState::Applied => return Next::Pass,
        ApprovalState::Rejected if reading.decision == Decision::Rejected => return Next::Stop,
        _ => {}
    }
    let decision = match reading.decision {
        Decision::Pending if policy.gate && !policy.auto_approve => return Next::AwaitDecision,
        Decision::Pending => Decision::Approved,
        d => d,
    };
    match decision {
        Decision::Rejected => Next::Stop,
        _ if !policy.auto_apply && !reading.apply_confirmed => Next::AwaitApply,
        _ => Next::Apply,
    }
}

/// The decision a statement is recorded with.
pub fn initial_decision(policy: EffectiveDdlPolicy) -> Decision {
    if policy.gate && !policy.auto_approve {
        Decision::Pending
    } else {
        Decision::Approved
    }
}

/// A destination as the plan sees it.
#[derive(Debug, Clone)]
pub struct PlanTarget {
    /// Name.
    pub name: String,
    /// Type.
    pub kind: DestinationType,
    /// Wire format.
    pub format: WireFormat,
}

/// Which tables belong to the flow.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// `source.postgres.tables` (`schema.table`).
    pub tables: BTreeSet<String>,
    /// `source.postgres.schemas`.
    pub schemas: BTreeSet<String>,
    /// The publication, asked when neither list names the table.
    pub publication: String,
}

/// Everything the stage needs.
#[derive(Debug)]
pub struct DdlStage {
    /// Flow name (approval names).
    pub flow: String,
    /// Message prefix of the capture.
    pub prefix: String,
    /// Decided policy.
    pub policy: EffectiveDdlPolicy,
    /// Keep a rejected flow parked (in a cluster: no crash loop) instead of failing it.
    pub park_on_reject: bool,
    /// The flow's tables.
    pub scope: Scope,
    /// Destinations.
    pub targets: Vec<PlanTarget>,
    /// Schema history.
    pub history: Arc<SchemaHistory>,
    /// DDL log.
    pub log: DdlLog,
    /// Decisions.
    pub desk: Arc<dyn Desk>,
    /// Catalog connection (publication membership).
    pub catalog: Arc<tokio_postgres::Client>,
    /// Status view shared with the reporter.
    pub progress: Arc<Mutex<Progress>>,
    /// Position the pipeline confirmed.
    pub confirmed: Arc<AtomicU64>,
    /// How often a held gate looks for a decision.
    pub poll: Duration,
    /// Metrics.
    pub metrics: Metrics,
}

fn lock(p: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

enum Outcome {
    Through,
    Elsewhere,
    Cancelled,
}

impl DdlStage {
    /// Forwards `input` to `output`, meeting each captured statement on the way. Ends when
    /// the input ends or `cancel` fires (`Ok`), or with the rejection of a statement.
    pub async fn run(
        self,
        mut input: mpsc::Receiver<SourceEvent>,
        output: mpsc::Sender<SourceEvent>,
        cancel: CancellationToken,
    ) -> Result<(), DdlError> {
        // End of the last transaction handed on: everything before a statement is
        // confirmed once the pipeline confirmed this.
        let mut last_end = Lsn(0);
        // Relations whose shape is in the history (by id, the description last seen), so
        // versions are recorded in stream order, before a later statement's.
        let mut known: HashMap<u32, Arc<Relation>> = HashMap::new();
        while let Some(event) = input.recv().await {
            match &event {
                SourceEvent::Commit { end_lsn, .. } => last_end = *end_lsn,
                SourceEvent::Row(change)
                    if known
                        .get(&change.relation.id)
                        .is_none_or(|r| !Arc::ptr_eq(r, &change.relation)) =>
                {
                    super::note_stream_shape(
                        &self.history,
                        &change.relation,
                        change.lsn,
                        &self.progress,
                        &self.metrics,
                        true,
                    )
                    .await?;
                    known.insert(change.relation.id, change.relation.clone());
                }
                SourceEvent::Message {
                    transactional: true,
                    lsn,
                    prefix,
                    content,
                } if *prefix == self.prefix => {
                    match self.meet(*lsn, content, last_end, &cancel).await? {
                        Outcome::Through => {}
                        // Statements on no table of this flow (its own state tables, an
                        // index, another application's tables) are not its business.
                        Outcome::Elsewhere => continue,
                        Outcome::Cancelled => return Ok(()),
                    }
                }
                _ => {}
            }
            if output.send(event).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn in_scope(&self, table: &str) -> Result<bool, DdlError> {
        if self.scope.tables.contains(table) {
            return Ok(true);
        }
        if let Some((schema, _)) = table.split_once('.')
            && self.scope.schemas.contains(schema)
        {
            return Ok(true);
        }
        if !self.history.versions(table).await?.is_empty() {
            return Ok(true);
        }
        let Some((schema, name)) = table.split_once('.') else {
            return Ok(false);
        };
        let row = self
            .catalog
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
                &[&self.scope.publication, &schema, &name],
            )
            .await
            .map_err(|e| DdlError::sql("looking up the publication's tables", e))?;
        Ok(row.get(0))
    }

    /// Records a statement's tables in the schema history and returns their changes.
    async fn changes(
        &self,
        ddl: &CapturedDdl,
        tables: &[String],
        lsn: Lsn,
    ) -> Result<Vec<TableChange>, DdlError> {
        let mut out = Vec::new();
        for table in tables {
            let versions = self.history.versions(table).await?;
            let previous = versions.iter().rfind(|v| v.lsn < lsn).cloned();
            if ddl.drops(table) {
                out.push(TableChange {
                    table: table.clone(),
                    from_version: previous.as_ref().map(|p| p.version),
                    to_version: None,
                    changes: Vec::new(),
                    columns: Vec::new(),
                    dropped: true,
                });
                continue;
            }
            let Some(captured) = ddl.columns_of(table) else {
                continue;
            };
            let columns: Vec<ShapeColumn> = captured.iter().map(ShapeColumn::from).collect();
            let resolved = self
                .history
                .resolve(table, &columns, lsn, "ddl", Some(&ddl.statement))
                .await?;
            let changes = previous
                .as_ref()
                .map(|p| diff(&p.columns, &columns))
                .unwrap_or_default();
            if resolved.new.is_some() {
                self.metrics.schema_change("ddl");
                let text = summary(&changes);
                tracing::info!(table = %table, version = resolved.version, lsn = %lsn, changes = %text, "schema change captured");
                lock(&self.progress).last_schema_change = Some(SchemaChange {
                    table: table.clone(),
                    version: resolved.version,
                    lsn: lsn.to_string(),
                    source: "ddl".into(),
                    summary: text,
                });
            }
            out.push(TableChange {
                table: table.clone(),
                from_version: previous.as_ref().map(|p| p.version),
                to_version: Some(resolved.version),
                changes,
                columns,
                dropped: false,
            });
        }
        Ok(out)
    }

    /// What applying means per destination: encoded outputs take the new schema version
    /// with the next change (the history already holds it); table destinations are not
    /// part of this worker yet, so their SQL stays a recorded plan.
    fn apply(&self, changes: &[TableChange]) -> Vec<DestinationResult> {
        self.targets
            .iter()
            .map(|t| {
                if materializes_tables(t.kind) {
                    DestinationResult {
                        name: t.name.clone(),
                        state: "Skipped".into(),
                        message: Some(format!(
                            "{} destinations do not run in this worker; the plan's SQL is recorded for them",
                            t.kind.as_str()
                        )),
                    }
                } else {
                    let versions = changes
                        .iter()
                        .map(|c| match c.to_version {
                            Some(v) => format!("{} v{v}", c.table),
                            None => format!("{} dropped", c.table),
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    DestinationResult {
                        name: t.name.clone(),
                        state: "Applied".into(),
                        message: Some(format!(
                            "records carry the new schema from the statement on ({versions})"
                        )),
                    }
                }
            })
            .collect()
    }

    async fn wait_confirmed(&self, target: Lsn, cancel: &CancellationToken) -> bool {
        let mut logged = false;
        loop {
            if Lsn(self.confirmed.load(Ordering::Acquire)) >= target {
                return true;
            }
            if !logged {
                tracing::info!(up_to = %target, "ddl gate: delivering everything before the statement first");
                logged = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = cancel.cancelled() => return false,
            }
        }
    }

    async fn meet(
        &self,
        lsn: Lsn,
        content: &[u8],
        last_end: Lsn,
        cancel: &CancellationToken,
    ) -> Result<Outcome, DdlError> {
        let ddl = match CapturedDdl::parse(content) {
            Ok(ddl) => ddl,
            Err(e) => {
                tracing::warn!(lsn = %lsn, prefix = %self.prefix, error = %e, "a message with the DDL prefix is not a capture payload; passing it on");
                return Ok(Outcome::Through);
            }
        };
        let mut tables = Vec::new();
        for t in ddl.tables() {
            if self.in_scope(&t).await? {
                tables.push(t);
            }
        }
        if tables.is_empty() {
            tracing::debug!(lsn = %lsn, tag = %ddl.tag, tables = ?ddl.tables(), "DDL outside the flow's tables");
            return Ok(Outcome::Elsewhere);
        }
        let changes = self.changes(&ddl, &tables, lsn).await?;
        let plan: Vec<DestinationPlan> = self
            .targets
            .iter()
            .map(|t| destination_plan(&t.name, t.kind, t.format, &lsn.to_string(), &changes))
            .collect();
        let plan_json =
            serde_json::to_value(&plan).map_err(|e| DdlError::Corrupt(e.to_string()))?;
        let approval = self
            .policy
            .records_approval()
            .then(|| approval_name(&self.flow, lsn));
        let decision = initial_decision(self.policy);
        let event = self
            .log
            .record(NewDdlEvent {
                lsn,
                approval: approval.as_deref(),
                tag: &ddl.tag,
                statement: &ddl.statement,
                tables: &tables,
                plan: &plan_json,
                gated: self.policy.stops(),
                decision: decision_text(decision),
                state: decision_text(decision),
            })
            .await?;
        if !self.policy.records_approval() {
            if event.state != "Applied" {
                let results = self.apply(&changes);
                self.log
                    .finish(
                        lsn,
                        "Applied",
                        &results_json(&results),
                        Some("applied (ddl.gate off)"),
                    )
                    .await?;
            }
            tracing::info!(lsn = %lsn, tag = %ddl.tag, tables = ?tables, "DDL applied (ddl.gate off)");
            return Ok(Outcome::Through);
        }
        self.desk.open(&event, &plan, decision).await?;
        self.hold(&event, &changes, last_end, cancel).await
    }

    async fn hold(
        &self,
        event: &DdlEvent,
        changes: &[TableChange],
        last_end: Lsn,
        cancel: &CancellationToken,
    ) -> Result<Outcome, DdlError> {
        let mut announced: Option<Next> = None;
        let mut state = approval_state(&event.state);
        loop {
            let reading = self.desk.read(event).await?;
            let step = next(self.policy, state, reading);
            match step {
                Next::Pass => {
                    self.clear_gate();
                    return Ok(Outcome::Through);
                }
                Next::Apply => {
                    let results = self.apply(changes);
                    let message = format!("applied; the flow resumed at {}", event.lsn);
                    self.log
                        .finish(
                            event.lsn,
                            "Applied",
                            &results_json(&results),
                            Some(&message),
                        )
                        .await?;
                    self.desk
                        .finish(event, ApprovalState::Applied, &results, &message)
                        .await?;
                    if announced.is_some() {
                        tracing::info!(lsn = %event.lsn, approval = ?event.approval, "ddl gate: approved and applied; resuming");
                    }
                    self.clear_gate();
                    return Ok(Outcome::Through);
                }
                Next::Stop if state != ApprovalState::Rejected || announced.is_none() => {
                    let message = format!(
                        "rejected: the flow is stopped before {} ({}); the slot is held there",
                        event.lsn, event.tag
                    );
                    self.log
                        .finish(
                            event.lsn,
                            "Rejected",
                            &serde_json::json!([]),
                            Some(&message),
                        )
                        .await?;
                    self.desk
                        .finish(event, ApprovalState::Rejected, &[], &message)
                        .await?;
                    state = ApprovalState::Rejected;
                    tracing::error!(lsn = %event.lsn, approval = ?event.approval, "ddl gate: {message}");
                    self.set_gate(event, "Rejected", format!(
                        "{} at {} was rejected{}; the flow is stopped and slot position held before it. To go on: replay past it (spec.replay.startLSN after this transaction) or delete the approval to be asked again",
                        event.tag,
                        event.lsn,
                        event.approval.as_deref().map(|a| format!(" (DDLApproval {a})")).unwrap_or_default()
                    ));
                    self.desk.announce(event, "DDLRejected", &message).await;
                    announced = Some(Next::Stop);
                    if !self.park_on_reject {
                        return Err(DdlError::Rejected {
                            lsn: event.lsn,
                            statement: event.statement.clone(),
                            how: "replay past it (--start-lsn after this transaction) or record a new decision".into(),
                        });
                    }
                }
                Next::Stop => {}
                Next::AwaitDecision | Next::AwaitApply => {
                    if state == ApprovalState::Rejected {
                        // Asked again (the approval was deleted).
                        state = ApprovalState::Pending;
                    }
                    if announced != Some(step) {
                        if announced.is_none() && !self.wait_confirmed(last_end, cancel).await {
                            return Ok(Outcome::Cancelled);
                        }
                        let (reason, how) = if step == Next::AwaitDecision {
                            ("AwaitingApproval", self.desk.how_to_decide(event))
                        } else {
                            ("AwaitingApply", self.desk.how_to_confirm(event))
                        };
                        let message = format!(
                            "{} on {} at {} waits: {how}",
                            event.tag,
                            event.tables.join(", "),
                            event.lsn
                        );
                        self.set_gate(event, reason, message.clone());
                        if step == Next::AwaitApply {
                            // Decided; the approval shows it while the apply is confirmed.
                            self.desk
                                .finish(event, ApprovalState::Approved, &[], &message)
                                .await?;
                        }
                        self.metrics.ddl_gated();
                        let span = tracing::info_span!("ddl.gated", lsn = %event.lsn, approval = ?event.approval);
                        span.in_scope(|| {
                            tracing::warn!(
                                name: "ddl.gated",
                                lsn = %event.lsn,
                                tables = ?event.tables,
                                statement = %event.statement,
                                approval = ?event.approval,
                                "ddl gate: {message}"
                            );
                        });
                        self.desk.announce(event, "DDLGated", &message).await;
                        announced = Some(step);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                _ = cancel.cancelled() => return Ok(Outcome::Cancelled),
            }
        }
    }

    fn set_gate(&self, event: &DdlEvent, reason: &str, message: String) {
        lock(&self.progress).ddl_gate = Some(GateView {
            approval: event.approval.clone(),
            lsn: event.lsn,
            reason: reason.to_owned(),
            message,
        });
    }

    fn clear_gate(&self) {
        lock(&self.progress).ddl_gate = None;
    }
}

fn approval_state(s: &str) -> ApprovalState {
    match s {
        "Approved" => ApprovalState::Approved,
        "Applied" => ApprovalState::Applied,
        "Rejected" => ApprovalState::Rejected,
        "Failed" => ApprovalState::Failed,
        _ => ApprovalState::Pending,
    }
}

fn results_json(results: &[DestinationResult]) -> serde_json::Value {
    serde_json::to_value(results).unwrap_or_else(|_| serde_json::json!([]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(gate: bool, auto_approve: bool, auto_apply: bool) -> EffectiveDdlPolicy {
        EffectiveDdlPolicy {
            gate,
            auto_approve,
            auto_apply,
        }
    }

    fn read(decision: Decision, apply_confirmed: bool) -> Reading {
        Reading {
            decision,
            apply_confirmed,
        }
    }

    #[test]
    fn the_default_policy_applies_without_stopping() {
        let p = EffectiveDdlPolicy::default();
        assert!(!p.stops() && !p.records_approval());
        assert_eq!(initial_decision(p), Decision::Approved);
        assert_eq!(
            next(p, ApprovalState::Approved, read(Decision::Approved, false)),
            Next::Apply
        );
    }

    #[test]
    fn a_gate_waits_for_a_human_then_applies_or_stops() {
        let p = policy(true, false, true);
        assert!(p.stops() && p.records_approval());
        assert_eq!(initial_decision(p), Decision::Pending);
        let pending = ApprovalState::Pending;
        assert_eq!(
            next(p, pending, read(Decision::Pending, false)),
            Next::AwaitDecision
        );
        assert_eq!(
            next(p, pending, read(Decision::Approved, false)),
            Next::Apply
        );
        assert_eq!(
            next(p, pending, read(Decision::Rejected, false)),
            Next::Stop
        );
        // A rejection stays a stop, also after a restart.
        assert_eq!(
            next(p, ApprovalState::Rejected, read(Decision::Rejected, false)),
            Next::Stop
        );
        // Deleted and asked again: pending again.
        assert_eq!(
            next(p, ApprovalState::Rejected, read(Decision::Pending, false)),
            Next::AwaitDecision
        );
    }

    #[test]
    fn manual_apply_waits_for_the_confirmation() {
        let p = policy(true, false, false);
        let pending = ApprovalState::Pending;
        assert_eq!(
            next(p, pending, read(Decision::Approved, false)),
            Next::AwaitApply
        );
        assert_eq!(
            next(p, pending, read(Decision::Approved, true)),
            Next::Apply
        );
        // Without a gate the decision is automatic, the confirmation is not.
        let p = policy(false, true, false);
        assert!(p.stops());
        assert_eq!(initial_decision(p), Decision::Approved);
        assert_eq!(
            next(p, pending, read(Decision::Approved, false)),
            Next::AwaitApply
        );
    }

    #[test]
    fn auto_approve_records_without_stopping() {
        let p = policy(true, true, true);
        assert!(!p.stops() && p.records_approval());
        assert_eq!(initial_decision(p), Decision::Approved);
        assert_eq!(
            next(p, ApprovalState::Approved, read(Decision::Approved, false)),
            Next::Apply
        );
    }

    #[test]
    fn an_applied_statement_passes_after_a_restart() {
        for p in [policy(true, false, false), policy(true, false, true)] {
            assert_eq!(
                next(p, ApprovalState::Applied, read(Decision::Approved, false)),
                Next::Pass
            );
        }
    }
}
