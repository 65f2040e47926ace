//! Conditions the operator owns on a Flow (`Ready`, `Progressing`), their reasons as
//! constants, the workload states they are computed from, and the display `phase` derived
//! from every condition (including the worker's `Degraded`, `SlotHealthy`, `DDLGated`).
//! Everything here is pure, so it is unit-tested without a cluster.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use wallaby_crds::flow::FlowPhase;

/// Condition types.
pub mod kind {
    /// The flow's workload runs (or completed) as the spec asks; written by the operator.
    pub const READY: &str = "Ready";
    /// The workload is being created, rolled out or is running a bounded job; operator.
    pub const PROGRESSING: &str = "Progressing";
    /// The worker delivers with errors (retrying); written by the worker.
    pub const DEGRADED: &str = "Degraded";
    /// The replication slot exists and is healthy; written by the worker.
    pub const SLOT_HEALTHY: &str = "SlotHealthy";
    /// The worker stopped before a DDL statement awaiting approval; written by the worker.
    pub const DDL_GATED: &str = "DDLGated";
}

/// Reasons of the operator's conditions (PascalCase, as Kubernetes reasons are).
pub mod reason {
    /// The workload is available (Deployment), running (Job) or scheduled (CronJob).
    pub const WORKLOAD_AVAILABLE: &str = "WorkloadAvailable";
    /// The workload is being created or rolled out, or a replaced Job is being deleted.
    pub const WORKLOAD_PROGRESSING: &str = "WorkloadProgressing";
    /// A bounded run (backfill Job or scheduled run) is in progress.
    pub const WORKLOAD_RUNNING: &str = "WorkloadRunning";
    /// The CronJob waits for its next run.
    pub const WORKLOAD_IDLE: &str = "WorkloadIdle";
    /// The backfill Job finished successfully.
    pub const COMPLETED: &str = "Completed";
    /// The Job (or the Deployment's rollout) failed.
    pub const WORKLOAD_FAILED: &str = "WorkloadFailed";
    /// `spec.suspend: true`: no worker runs, the slot is kept.
    pub const SUSPENDED: &str = "Suspended";
    /// The spec is invalid in a way the CRD schema cannot catch.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A Destination named in `spec.destinations` does not exist.
    pub const DESTINATION_NOT_FOUND: &str = "DestinationNotFound";
    /// A referenced Secret does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// A referenced Secret lacks a key the reference needs.
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    /// A Destination's type is not delivered by this worker version.
    pub const DESTINATION_TYPE_UNSUPPORTED: &str = "DestinationTypeUnsupported";
    /// Writing a child object failed; the operator retries with backoff.
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// Destination: the spec and its Secrets are valid.
    pub const VALID: &str = "Valid";
}

/// Condition status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// `True`.
    True,
    /// `False`.
    False,
}

impl Status {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
        }
    }
}

/// A condition before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredCondition {
    /// `Ready`, `Progressing`, ...
    pub type_: &'static str,
    /// True / False.
    pub status: Status,
    /// One of [`reason`].
    pub reason: &'static str,
    /// Human-readable detail.
    pub message: String,
}

/// What the workload is doing, as read from the child object the operator applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadState {
    /// Scaled to zero / suspended because of `spec.suspend`.
    Suspended,
    /// Being created or rolled out.
    Progressing(String),
    /// Deployment available with the current template.
    Available,
    /// A Job (backfill or scheduled run) is running.
    Running,
    /// A CronJob waits for its next run.
    Idle,
    /// A backfill Job succeeded.
    Completed,
    /// A Job failed or a rollout exceeded its deadline.
    Failed(String),
}

/// The result of one reconciliation, which the conditions are computed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Validation found problems: `reason` is the most important one's, `message` all of them.
    Invalid {
        /// One of the validation reasons of [`reason`].
        reason: &'static str,
        /// Every problem with its fix.
        message: String,
    },
    /// Writing the children failed.
    ApplyFailed(String),
    /// The children were applied; the workload (`kind`, `name`) is in `state`.
    Workload {
        /// `Deployment`, `Job` or `CronJob`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// What it is doing.
        state: WorkloadState,
    },
}

/// `Ready` and `Progressing` for an outcome.
pub fn desired(outcome: &Outcome) -> [DesiredCondition; 2] {
    let pair = |ready: Status, progressing: Status, reason: &'static str, message: String| {
        [
            DesiredCondition {
                type_: kind::READY,
                status: ready,
                reason,
                message: message.clone(),
            },
            DesiredCondition {
                type_: kind::PROGRESSING,
                status: progressing,
                reason,
                message,
            },
        ]
    };
    match outcome {
        Outcome::Invalid { reason, message } => {
            pair(Status::False, Status::False, reason, message.clone())
        }
        Outcome::ApplyFailed(message) => pair(
            Status::False,
            Status::True,
            reason::APPLY_FAILED,
            format!("{message}; retrying with backoff"),
        ),
        Outcome::Workload { kind, name, state } => {
            let what = format!("{kind} {name}");
            match state {
                WorkloadState::Suspended => pair(
                    Status::False,
                    Status::False,
                    reason::SUSPENDED,
                    format!(
                        "spec.suspend is true: {what} runs no worker; the replication slot is kept"
                    ),
                ),
                WorkloadState::Progressing(detail) => pair(
                    Status::False,
                    Status::True,
                    reason::WORKLOAD_PROGRESSING,
                    format!("{what}: {detail}"),
                ),
                WorkloadState::Available => pair(
                    Status::True,
                    Status::False,
                    reason::WORKLOAD_AVAILABLE,
                    format!("{what} is available"),
                ),
                WorkloadState::Running => pair(
                    Status::True,
                    Status::True,
                    reason::WORKLOAD_RUNNING,
                    format!("{what} is running"),
                ),
                WorkloadState::Idle => pair(
                    Status::True,
                    Status::False,
                    reason::WORKLOAD_IDLE,
                    format!("{what} waits for its next scheduled run"),
                ),
                WorkloadState::Completed => pair(
                    Status::True,
                    Status::False,
                    reason::COMPLETED,
                    format!("{what} completed"),
                ),
                WorkloadState::Failed(detail) => pair(
                    Status::False,
                    Status::False,
                    reason::WORKLOAD_FAILED,
                    format!("{what} failed: {detail}; see `kubectl logs` of its pods"),
                ),
            }
        }
    }
}

/// Merges desired conditions into the existing list: `lastTransitionTime` moves only when
/// the status flips, conditions of other types (the worker's) are left out — server-side
/// apply keeps them because they belong to another field manager.
pub fn merge(
    existing: &[Condition],
    desired: &[DesiredCondition],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let previous = existing.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == d.status.as_str() => p.last_transition_time.clone(),
                _ => Time(now),
            };
            Condition {
                type_: d.type_.to_owned(),
                status: d.status.as_str().to_owned(),
                reason: d.reason.to_owned(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// True when `a` and `b` say the same apart from timestamps.
pub fn same_ignoring_time(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().all(|x| {
            b.iter().any(|y| {
                x.type_ == y.type_
                    && x.status == y.status
                    && x.reason == y.reason
                    && x.message == y.message
                    && x.observed_generation == y.observed_generation
            })
        })
}

fn status_of<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn is(conditions: &[Condition], type_: &str, status: Status) -> bool {
    status_of(conditions, type_).is_some_and(|c| c.status == status.as_str())
}

/// The display phase, derived from every condition on the Flow (ours and the worker's).
/// Order matters: a suspended flow is `Suspended` even if the worker last said `Degraded`.
pub fn phase(conditions: &[Condition]) -> FlowPhase {
    let ready = status_of(conditions, kind::READY);
    let ready_reason = ready.map(|c| c.reason.as_str()).unwrap_or_default();
    if ready_reason == reason::SUSPENDED {
        return FlowPhase::Suspended;
    }
    let failed_reasons = [
        reason::INVALID_SPEC,
        reason::DESTINATION_NOT_FOUND,
        reason::SECRET_NOT_FOUND,
        reason::SECRET_KEY_MISSING,
        reason::DESTINATION_TYPE_UNSUPPORTED,
        reason::WORKLOAD_FAILED,
    ];
    if is(conditions, kind::READY, Status::False) && failed_reasons.contains(&ready_reason) {
        return FlowPhase::Failed;
    }
    if is(conditions, kind::DDL_GATED, Status::True) {
        return FlowPhase::Gated;
    }
    if ready_reason == reason::COMPLETED {
        return FlowPhase::Completed;
    }
    if is(conditions, kind::READY, Status::True) {
        if is(conditions, kind::DEGRADED, Status::True)
            || is(conditions, kind::SLOT_HEALTHY, Status::False)
        {
            return FlowPhase::Degraded;
        }
        return FlowPhase::Running;
    }
    FlowPhase::Pending
}

/// State of a stream Deployment the operator applied.
pub fn observe_deployment(d: &Deployment, suspended: bool) -> WorkloadState {
    if suspended {
        return WorkloadState::Suspended;
    }
    let generation = d.metadata.generation.unwrap_or_default();
    let Some(status) = &d.status else {
        return WorkloadState::Progressing("waiting for the Deployment controller".into());
    };
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing" && c.status == "False")
        && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    {
        return WorkloadState::Failed(
            c.message
                .clone()
                .unwrap_or_else(|| "the rollout exceeded its progress deadline".into()),
        );
    }
    let observed = status.observed_generation.unwrap_or_default();
    let updated = status.updated_replicas.unwrap_or_default();
    let available = status.available_replicas.unwrap_or_default();
    if observed < generation {
        return WorkloadState::Progressing(
            "the Deployment controller has not seen the new spec yet".into(),
        );
    }
    if updated >= 1 && available >= 1 && status.replicas.unwrap_or_default() <= 1 {
        return WorkloadState::Available;
    }
    WorkloadState::Progressing(format!(
        "rolling out: {updated} updated, {available} available of 1 replica"
    ))
}

/// State of a backfill Job (or one run of a scheduled flow).
pub fn observe_job(j: &Job, suspended: bool) -> WorkloadState {
    let status = j.status.as_ref();
    let condition = |t: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == t && c.status == "True"))
    };
    if condition("Complete").is_some() {
        return WorkloadState::Completed;
    }
    if let Some(c) = condition("Failed") {
        return WorkloadState::Failed(
            c.message
                .clone()
                .or_else(|| c.reason.clone())
                .unwrap_or_else(|| "the Job failed".into()),
        );
    }
    if suspended {
        return WorkloadState::Suspended;
    }
    if status.and_then(|s| s.active).unwrap_or_default() > 0 {
        return WorkloadState::Running;
    }
    WorkloadState::Progressing("waiting for the Job's pod to start".into())
}

/// State of a scheduled flow's CronJob.
pub fn observe_cronjob(c: &CronJob, suspended: bool) -> WorkloadState {
    if suspended {
        return WorkloadState::Suspended;
    }
    let active = c
        .status
        .as_ref()
        .and_then(|s| s.active.as_ref())
        .is_some_and(|a| !a.is_empty());
    if active {
        WorkloadState::Running
    } else {
        WorkloadState::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(type_: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn phase_is_derived_from_every_condition() {
        use reason::*;
        let cases: Vec<(Vec<Condition>, FlowPhase)> = vec![
            (vec![], FlowPhase::Pending),
            (
                vec![cond("Ready", "True", WORKLOAD_AVAILABLE)],
                FlowPhase::Running,
            ),
            (
                vec![cond("Ready", "False", WORKLOAD_PROGRESSING)],
                FlowPhase::Pending,
            ),
            (
                vec![cond("Ready", "False", SUSPENDED)],
                FlowPhase::Suspended,
            ),
            (
                vec![
                    cond("Ready", "False", SUSPENDED),
                    cond("Degraded", "True", "DestinationFailing"),
                ],
                FlowPhase::Suspended,
            ),
            (
                vec![cond("Ready", "False", SECRET_NOT_FOUND)],
                FlowPhase::Failed,
            ),
            (
                vec![cond("Ready", "False", WORKLOAD_FAILED)],
                FlowPhase::Failed,
            ),
            (
                vec![
                    cond("Ready", "True", WORKLOAD_AVAILABLE),
                    cond("DDLGated", "True", "AwaitingApproval"),
                ],
                FlowPhase::Gated,
            ),
            (
                vec![
                    cond("Ready", "True", WORKLOAD_AVAILABLE),
                    cond("Degraded", "True", "DestinationFailing"),
                ],
                FlowPhase::Degraded,
            ),
            (
                vec![
                    cond("Ready", "True", WORKLOAD_AVAILABLE),
                    cond("SlotHealthy", "False", "SlotMissing"),
                ],
                FlowPhase::Degraded,
            ),
            (
                vec![
                    cond("Ready", "True", WORKLOAD_AVAILABLE),
                    cond("Degraded", "False", "Healthy"),
                    cond("SlotHealthy", "True", "Active"),
                ],
                FlowPhase::Running,
            ),
            (vec![cond("Ready", "True", COMPLETED)], FlowPhase::Completed),
            (
                vec![cond("Ready", "True", WORKLOAD_IDLE)],
                FlowPhase::Running,
            ),
            (
                vec![cond("Ready", "False", APPLY_FAILED)],
                FlowPhase::Pending,
            ),
        ];
        for (conditions, want) in cases {
            assert_eq!(phase(&conditions), want, "{conditions:?}");
        }
    }

    #[test]
    fn outcomes_map_to_ready_and_progressing() {
        let workload = |state| Outcome::Workload {
            kind: "Deployment",
            name: "wallaby-demo".into(),
            state,
        };
        let cases = [
            (
                workload(WorkloadState::Available),
                ("True", "False", reason::WORKLOAD_AVAILABLE),
            ),
            (
                workload(WorkloadState::Progressing("rolling out".into())),
                ("False", "True", reason::WORKLOAD_PROGRESSING),
            ),
            (
                workload(WorkloadState::Suspended),
                ("False", "False", reason::SUSPENDED),
            ),
            (
                workload(WorkloadState::Running),
                ("True", "True", reason::WORKLOAD_RUNNING),
            ),
            (
                workload(WorkloadState::Completed),
                ("True", "False", reason::COMPLETED),
            ),
            (
                workload(WorkloadState::Failed("BackoffLimitExceeded".into())),
                ("False", "False", reason::WORKLOAD_FAILED),
            ),
            (
                Outcome::Invalid {
                    reason: reason::SECRET_NOT_FOUND,
                    message: "Secret \"pg\" is missing".into(),
                },
                ("False", "False", reason::SECRET_NOT_FOUND),
            ),
            (
                Outcome::ApplyFailed("forbidden".into()),
                ("False", "True", reason::APPLY_FAILED),
            ),
        ];
        for (outcome, (ready, progressing, why)) in cases {
            let [r, p] = desired(&outcome);
            assert_eq!(
                (r.type_, r.status.as_str(), r.reason),
                ("Ready", ready, why),
                "{outcome:?}"
            );
            assert_eq!(
                (p.type_, p.status.as_str(), p.reason),
                ("Progressing", progressing, why),
                "{outcome:?}"
            );
        }
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let t0 = Timestamp::UNIX_EPOCH;
        let t1 = Timestamp::from_second(1_000).unwrap();
        let available = desired(&Outcome::Workload {
            kind: "Deployment",
            name: "wallaby-demo".into(),
            state: WorkloadState::Available,
        });
        let first = merge(&[], &available, Some(1), t0);
        assert!(first.iter().all(|c| c.last_transition_time.0 == t0));
        // Same statuses, later reconcile: times kept, so nothing but timestamps would change.
        let again = merge(&first, &available, Some(1), t1);
        assert_eq!(again, first);
        assert!(same_ignoring_time(&again, &first));
        // Ready flips to False: its time moves, Progressing's (False → True) too.
        let rolling = desired(&Outcome::Workload {
            kind: "Deployment",
            name: "wallaby-demo".into(),
            state: WorkloadState::Progressing("rolling out".into()),
        });
        let flipped = merge(&first, &rolling, Some(2), t1);
        assert!(flipped.iter().all(|c| c.last_transition_time.0 == t1));
        assert!(!same_ignoring_time(&flipped, &first));
    }

    #[test]
    fn deployment_states() {
        let mut d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "wallaby-demo", "generation": 2},
            "spec": {"selector": {}, "template": {}},
            "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}
        }))
        .unwrap();
        assert!(matches!(
            observe_deployment(&d, false),
            WorkloadState::Progressing(_)
        ));
        assert_eq!(observe_deployment(&d, true), WorkloadState::Suspended);
        d.status.as_mut().unwrap().observed_generation = Some(2);
        assert_eq!(observe_deployment(&d, false), WorkloadState::Available);
        // Old and new pod both present during a rollout: not yet available.
        d.status.as_mut().unwrap().replicas = Some(2);
        assert!(matches!(
            observe_deployment(&d, false),
            WorkloadState::Progressing(_)
        ));
    }

    #[test]
    fn job_states() {
        let job = |status: serde_json::Value| -> Job {
            serde_json::from_value(serde_json::json!({"metadata": {"name": "j"}, "status": status}))
                .unwrap()
        };
        assert!(matches!(
            observe_job(&job(serde_json::json!({})), false),
            WorkloadState::Progressing(_)
        ));
        assert_eq!(
            observe_job(&job(serde_json::json!({"active": 1})), false),
            WorkloadState::Running
        );
        assert_eq!(
            observe_job(
                &job(serde_json::json!({"conditions": [{"type": "Complete", "status": "True"}]})),
                false
            ),
            WorkloadState::Completed
        );
        assert_eq!(
            observe_job(
                &job(
                    serde_json::json!({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
                ),
                false
            ),
            WorkloadState::Failed("BackoffLimitExceeded".into())
        );
        assert_eq!(
            observe_job(&job(serde_json::json!({})), true),
            WorkloadState::Suspended
        );
    }
}
