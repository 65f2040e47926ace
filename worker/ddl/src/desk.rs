//! Where decisions on captured statements are asked for and read: the DDL log in the
//! source's state schema (standalone: `wallaby-worker ddl approve|reject|apply`), or a
//! `DDLApproval` resource owned by the Flow (in a cluster: `kubectl patch`), mirrored into
//! the log so both modes keep the same record.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use wallaby_crds::ddl_approval::{
    ApprovalState, DDLApproval, DDLApprovalSpec, DDLApprovalStatus, Decision, DestinationPlan,
    DestinationResult,
};

use super::DdlError;
use super::history::{DdlEvent, DdlLog};
use wallaby_pipeline::lsn::Lsn;

/// Annotation a human sets on a DDLApproval to confirm a manual apply (`autoApply: false`).
pub const APPLIED_ANNOTATION: &str = "wallaby.dev/applied";

/// The decision on a statement as last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// The decision.
    pub decision: Decision,
    /// A manual apply was confirmed.
    pub apply_confirmed: bool,
}

/// Asks for and reads decisions.
#[async_trait]
pub trait Desk: Send + Sync + std::fmt::Debug {
    /// Opens the approval of `event` (idempotent) with its `plan` and initial `decision`.
    async fn open(
        &self,
        event: &DdlEvent,
        plan: &[DestinationPlan],
        decision: Decision,
    ) -> Result<(), DdlError>;
    /// Reads the decision.
    async fn read(&self, event: &DdlEvent) -> Result<Reading, DdlError>;
    /// Tells people the flow stopped (a Kubernetes Event); best effort.
    async fn announce(&self, event: &DdlEvent, reason: &str, note: &str);
    /// Records the outcome.
    async fn finish(
        &self,
        event: &DdlEvent,
        state: ApprovalState,
        results: &[DestinationResult],
        message: &str,
    ) -> Result<(), DdlError>;
    /// How a human decides, for logs and status messages.
    fn how_to_decide(&self, event: &DdlEvent) -> String;
    /// How a human confirms a manual apply.
    fn how_to_confirm(&self, event: &DdlEvent) -> String;
}

/// A decision as the DDL log stores it.
pub(super) fn decision_text(d: Decision) -> &'static str {
    match d {
        Decision::Pending => "Pending",
        Decision::Approved => "Approved",
        Decision::Rejected => "Rejected",
    }
}

fn decision_of(text: &str) -> Decision {
    match text {
        "Approved" => Decision::Approved,
        "Rejected" => Decision::Rejected,
        _ => Decision::Pending,
    }
}

/// Standalone: the DDL log is the desk.
#[derive(Debug, Clone)]
pub struct LogDesk {
    log: DdlLog,
    /// The manifest, for the commands shown to people.
    manifest: String,
}

impl LogDesk {
    /// Decisions read from `log`; `manifest` is shown in the suggested commands.
    pub fn new(log: DdlLog, manifest: String) -> Self {
        Self { log, manifest }
    }
}

#[async_trait]
impl Desk for LogDesk {
    async fn open(&self, _: &DdlEvent, _: &[DestinationPlan], _: Decision) -> Result<(), DdlError> {
        Ok(())
    }

    async fn read(&self, event: &DdlEvent) -> Result<Reading, DdlError> {
        let now =
            self.log.get(event.lsn).await?.ok_or_else(|| {
                DdlError::NotFound(format!("the DDL at {} left the log", event.lsn))
            })?;
        Ok(Reading {
            decision: decision_of(&now.decision),
            apply_confirmed: now.apply_confirmed,
        })
    }

    async fn announce(&self, _: &DdlEvent, _: &str, _: &str) {}

    async fn finish(
        &self,
        _: &DdlEvent,
        _: ApprovalState,
        _: &[DestinationResult],
        _: &str,
    ) -> Result<(), DdlError> {
        Ok(())
    }

    fn how_to_decide(&self, event: &DdlEvent) -> String {
        format!(
            "wallaby-worker ddl approve -f {m} {id} (or: ddl reject -f {m} {id})",
            m = self.manifest,
            id = event.id
        )
    }

    fn how_to_confirm(&self, event: &DdlEvent) -> String {
        format!("wallaby-worker ddl apply -f {} {}", self.manifest, event.id)
    }
}

/// The DDLApproval name of the statement at `lsn` on `flow`: DNS-safe and stable, so a
/// restarted worker finds the same resource.
pub fn approval_name(flow: &str, lsn: Lsn) -> String {
    let hi = lsn.0 >> 32;
    let lo = lsn.0 & 0xFFFF_FFFF;
    let suffix = format!("-ddl-{hi:x}-{lo:x}");
    // Names are at most 253 characters; keep room for the suffix.
    let keep = flow.len().min(253 - suffix.len());
    format!("{}{suffix}", &flow[..keep])
}

/// In a cluster: a DDLApproval per statement, owned by the Flow.
#[derive(Clone)]
pub struct KubeDesk {
    api: Api<DDLApproval>,
    namespace: String,
    flow: String,
    flow_uid: String,
    recorder: Recorder,
    log: DdlLog,
    /// The reading last written to the log (by LSN), so a held gate polling every second
    /// writes only when the decision changes.
    mirrored: Arc<Mutex<Option<(Lsn, Reading)>>>,
}

impl std::fmt::Debug for KubeDesk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDesk")
            .field("namespace", &self.namespace)
            .field("flow", &self.flow)
            .finish_non_exhaustive()
    }
}

impl KubeDesk {
    /// Approvals of Flow `namespace/flow` (uid `flow_uid`), mirrored into `log`.
    pub fn new(client: Client, namespace: &str, flow: &str, flow_uid: &str, log: DdlLog) -> Self {
        let reporter = Reporter {
            controller: "wallaby-worker".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            api: Api::namespaced(client.clone(), namespace),
            namespace: namespace.to_owned(),
            flow: flow.to_owned(),
            flow_uid: flow_uid.to_owned(),
            recorder: Recorder::new(client, reporter),
            log,
            mirrored: Arc::default(),
        }
    }

    fn api_error(&self, what: &str, name: &str, e: kube::Error) -> DdlError {
        DdlError::Api(format!("{what} DDLApproval {}/{name}: {e}", self.namespace))
    }

    async fn create(
        &self,
        event: &DdlEvent,
        plan: &[DestinationPlan],
        decision: Decision,
    ) -> Result<(), DdlError> {
        let name = approval_name(&self.flow, event.lsn);
        let approval = DDLApproval {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(
                    [
                        ("wallaby.dev/flow".to_owned(), self.flow.clone()),
                        (
                            "app.kubernetes.io/managed-by".to_owned(),
                            "wallaby-worker".to_owned(),
                        ),
                    ]
                    .into(),
                ),
                owner_references: Some(vec![OwnerReference {
                    api_version: wallaby_crds::API_VERSION.into(),
                    kind: "Flow".into(),
                    name: self.flow.clone(),
                    uid: self.flow_uid.clone(),
                    controller: Some(false),
                    block_owner_deletion: Some(false),
                }]),
                ..ObjectMeta::default()
            },
            spec: DDLApprovalSpec {
                flow: self.flow.clone(),
                lsn: event.lsn.to_string(),
                statement: truncate(&event.statement, 65536),
                tables: event.tables.iter().take(256).cloned().collect(),
                plan: plan.iter().take(16).cloned().collect(),
                decision,
            },
            status: None,
        };
        match self.api.create(&PostParams::default(), &approval).await {
            Ok(_) => {
                tracing::info!(approval = %name, lsn = %event.lsn, "created DDLApproval");
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(self.api_error("creating", &name, e)),
        }
        let state = match decision {
            Decision::Pending => ApprovalState::Pending,
            Decision::Approved => ApprovalState::Approved,
            Decision::Rejected => ApprovalState::Rejected,
        };
        self.patch_status(
            &name,
            DDLApprovalStatus {
                state: Some(state),
                message: Some(match decision {
                    Decision::Pending => {
                        "waiting for a decision (set spec.decision to Approved or Rejected)".into()
                    }
                    _ => "decided automatically (ddl.autoApprove)".into(),
                }),
                decision_time: (decision != Decision::Pending).then(now),
                ..DDLApprovalStatus::default()
            },
            // A replayed statement keeps the status it reached.
            true,
        )
        .await
    }

    /// Writes `reading` into the DDL log unless it is what was last written for `lsn`.
    async fn mirror(&self, lsn: Lsn, reading: Reading) -> Result<(), DdlError> {
        let last = *self
            .mirrored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last == Some((lsn, reading)) {
            return Ok(());
        }
        self.log
            .mirror(
                lsn,
                decision_text(reading.decision),
                reading.apply_confirmed,
            )
            .await?;
        *self
            .mirrored
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((lsn, reading));
        Ok(())
    }

    async fn patch_status(
        &self,
        name: &str,
        status: DDLApprovalStatus,
        only_if_empty: bool,
    ) -> Result<(), DdlError> {
        if only_if_empty {
            let current = self
                .api
                .get_status(name)
                .await
                .map_err(|e| self.api_error("reading", name, e))?;
            if current.status.is_some_and(|s| s.state.is_some()) {
                return Ok(());
            }
        }
        let body = serde_json::json!({ "status": status });
        self.api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .map(|_| ())
            .map_err(|e| self.api_error("updating the status of", name, e))
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[async_trait]
impl Desk for KubeDesk {
    async fn open(
        &self,
        event: &DdlEvent,
        plan: &[DestinationPlan],
        decision: Decision,
    ) -> Result<(), DdlError> {
        self.create(event, plan, decision).await
    }

    async fn read(&self, event: &DdlEvent) -> Result<Reading, DdlError> {
        let name = approval_name(&self.flow, event.lsn);
        let approval = match self.api.get_opt(&name).await {
            Ok(Some(a)) => a,
            Ok(None) => {
                // Deleted by someone (to be asked again): a fresh, pending approval.
                tracing::info!(approval = %name, "DDLApproval was deleted; asking again");
                let plan: Vec<DestinationPlan> = serde_json::from_value(event.plan.clone())
                    .map_err(|e| {
                        DdlError::Corrupt(format!("the plan of the DDL at {}: {e}", event.lsn))
                    })?;
                self.create(event, &plan, Decision::Pending).await?;
                let reading = Reading {
                    decision: Decision::Pending,
                    apply_confirmed: false,
                };
                self.mirror(event.lsn, reading).await?;
                return Ok(reading);
            }
            Err(e) => return Err(self.api_error("reading", &name, e)),
        };
        let apply_confirmed = approval
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(APPLIED_ANNOTATION))
            .is_some_and(|v| v == "true");
        let reading = Reading {
            decision: approval.spec.decision,
            apply_confirmed,
        };
        self.mirror(event.lsn, reading).await?;
        Ok(reading)
    }

    async fn announce(&self, event: &DdlEvent, reason: &str, note: &str) {
        let reference = ObjectReference {
            api_version: Some(wallaby_crds::API_VERSION.into()),
            kind: Some("Flow".into()),
            name: Some(self.flow.clone()),
            namespace: Some(self.namespace.clone()),
            uid: Some(self.flow_uid.clone()),
            ..ObjectReference::default()
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(truncate(note, 1000)),
            action: "GateDDL".into(),
            secondary: Some(ObjectReference {
                api_version: Some(wallaby_crds::API_VERSION.into()),
                kind: Some("DDLApproval".into()),
                name: Some(approval_name(&self.flow, event.lsn)),
                namespace: Some(self.namespace.clone()),
                ..ObjectReference::default()
            }),
        };
        if let Err(e) = self.recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %e, "could not publish the Kubernetes Event for the DDL gate");
        }
    }

    async fn finish(
        &self,
        event: &DdlEvent,
        state: ApprovalState,
        results: &[DestinationResult],
        message: &str,
    ) -> Result<(), DdlError> {
        let name = approval_name(&self.flow, event.lsn);
        let applied = state == ApprovalState::Applied;
        self.patch_status(
            &name,
            DDLApprovalStatus {
                state: Some(state),
                destinations: results.to_vec(),
                decision_time: Some(now()),
                applied_time: applied.then(now),
                message: Some(message.to_owned()),
                conditions: Vec::new(),
            },
            false,
        )
        .await
    }

    fn how_to_decide(&self, event: &DdlEvent) -> String {
        format!(
            "kubectl -n {} patch ddlapproval {} --type merge -p '{{\"spec\":{{\"decision\":\"Approved\"}}}}' (or \"Rejected\")",
            self.namespace,
            approval_name(&self.flow, event.lsn)
        )
    }

    fn how_to_confirm(&self, event: &DdlEvent) -> String {
        format!(
            "kubectl -n {} annotate ddlapproval {} {APPLIED_ANNOTATION}=true",
            self.namespace,
            approval_name(&self.flow, event.lsn)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approval_names_are_stable_and_dns_safe() {
        let lsn: Lsn = "1/16B6C50".parse().unwrap();
        assert_eq!(approval_name("orders", lsn), "orders-ddl-1-16b6c50");
        let long = "a".repeat(253);
        let name = approval_name(&long, lsn);
        assert_eq!(name.len(), 253);
        assert!(name.ends_with("-ddl-1-16b6c50"));
    }
}
