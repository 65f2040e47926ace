//! Stage 5, status: computes the operator's part of `Flow.status` (observedGeneration,
//! phase, workload, replay, `Ready`/`Progressing`) and writes it with server-side apply on
//! the status subresource, skipping the write when only timestamps would change. The
//! worker's fields and conditions belong to its own field manager and are never sent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde::Serialize;
use wallaby_crds::flow::{FlowPhase, FlowStatus, ReplayStatus, WorkloadRef};
use wallaby_crds::{API_VERSION, Flow};

use crate::MANAGER;
use crate::conditions::{self, Outcome, WorkloadState};

/// Writing the status failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The status patch was refused.
    #[error(
        "patching the status of Flow {flow} failed: {source}; check the operator's RBAC (patch on flows/status)"
    )]
    Patch {
        flow: String,
        #[source]
        source: kube::Error,
    },
}

/// The fields the operator owns in `Flow.status`, as sent in the apply patch.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorStatus {
    /// Only advanced when the reconciliation succeeded; otherwise the previous value is
    /// re-sent (server-side apply would remove a field its manager stops sending).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Display phase.
    pub phase: FlowPhase,
    /// `Ready` and `Progressing`.
    pub conditions: Vec<Condition>,
    /// The workload, once applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
    /// Replay bookkeeping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayStatus>,
}

/// The LSN to pass as `--start-lsn`: while `spec.replay.startLSN` has not been applied yet.
pub fn replay_to_pass(flow: &Flow) -> Option<String> {
    let wanted = &flow.spec.replay.as_ref()?.start_lsn;
    let applied = flow
        .status
        .as_ref()
        .and_then(|s| s.replay.as_ref())
        .filter(|r| &r.start_lsn == wanted)
        .and_then(|r| r.applied_time.as_ref());
    applied.is_none().then(|| wanted.clone())
}

/// The replay bookkeeping after this reconciliation: requested when the argument is first
/// handed to the worker, applied once the workload runs with it.
pub fn next_replay(
    flow: &Flow,
    passed: Option<&str>,
    state: &WorkloadState,
    now: Timestamp,
) -> Option<ReplayStatus> {
    let previous = flow.status.as_ref().and_then(|s| s.replay.clone());
    let Some(lsn) = passed else {
        return previous;
    };
    let mut replay = match previous {
        Some(p) if p.start_lsn == lsn => p,
        _ => ReplayStatus {
            start_lsn: lsn.to_owned(),
            requested_time: Some(now.to_string()),
            applied_time: None,
        },
    };
    if replay.applied_time.is_none()
        && matches!(
            state,
            WorkloadState::Available | WorkloadState::Running | WorkloadState::Completed
        )
    {
        replay.applied_time = Some(now.to_string());
    }
    Some(replay)
}

/// Computes the operator's status for an outcome. `success` advances `observedGeneration`.
pub fn compute(
    flow: &Flow,
    outcome: &Outcome,
    replay: Option<ReplayStatus>,
    success: bool,
    now: Timestamp,
) -> OperatorStatus {
    let current = flow.status.clone().unwrap_or_default();
    let generation = flow.metadata.generation;
    let ours = conditions::merge(
        &current.conditions,
        &conditions::desired(outcome),
        generation,
        now,
    );
    let mut all: Vec<Condition> = current
        .conditions
        .iter()
        .filter(|c| !ours.iter().any(|o| o.type_ == c.type_))
        .cloned()
        .collect();
    all.extend(ours.iter().cloned());
    let workload = match outcome {
        Outcome::Workload { kind, name, .. } => Some(WorkloadRef {
            kind: (*kind).to_owned(),
            name: name.clone(),
        }),
        _ => current.workload.clone(),
    };
    OperatorStatus {
        observed_generation: if success {
            generation
        } else {
            current.observed_generation
        },
        phase: conditions::phase(&all),
        conditions: ours,
        workload,
        replay: replay.or(current.replay),
    }
}

/// Whether writing `next` would change anything but timestamps.
pub fn changed(current: Option<&FlowStatus>, next: &OperatorStatus) -> bool {
    let empty = FlowStatus::default();
    let current = current.unwrap_or(&empty);
    let ours: Vec<Condition> = current
        .conditions
        .iter()
        .filter(|c| next.conditions.iter().any(|n| n.type_ == c.type_))
        .cloned()
        .collect();
    current.observed_generation != next.observed_generation
        || current.phase != Some(next.phase)
        || current.workload != next.workload
        || current.replay != next.replay
        || !conditions::same_ignoring_time(&ours, &next.conditions)
}

/// Applies `next` to the status subresource unless nothing but timestamps would change.
/// Returns whether a patch was sent.
pub async fn write(
    client: &Client,
    flow: &Flow,
    next: &OperatorStatus,
) -> Result<bool, StatusError> {
    if !changed(flow.status.as_ref(), next) {
        return Ok(false);
    }
    let name = flow.metadata.name.clone().unwrap_or_default();
    let namespace = flow.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Flow> = Api::namespaced(client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "Flow",
        "status": next,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| StatusError::Patch {
        flow: format!("{namespace}/{name}"),
        source,
    })?;
    Ok(true)
}
