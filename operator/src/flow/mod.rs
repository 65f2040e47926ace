//! The Flow controller: runs the reconcile stages in order — dereference → validate →
//! build → apply → status — behind the `wallaby.dev/cleanup` finalizer, publishes events on
//! condition transitions and errors, and retries failures with a per-object backoff.

pub mod apply;
pub mod build;
pub mod cleanup;
pub mod dereference;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, Event as FinalizerEvent};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use wallaby_crds::{Destination, Flow};

use crate::FINALIZER;
use crate::backoff::Backoff;
use crate::conditions::{Outcome, WorkloadState, kind, reason};
use crate::metrics::Metrics;
use crate::refs;
use build::WorkerDefaults;
use status::OperatorStatus;

/// Shared by every reconciliation.
#[derive(Clone)]
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Workload defaults from the command line.
    pub defaults: WorkerDefaults,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Per-object retry delays.
    pub backoff: Arc<Backoff>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

/// A failed stage of a Flow reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Reading referenced objects.
    #[error(transparent)]
    Dereference(#[from] dereference::DereferenceError),
    /// Building children.
    #[error(transparent)]
    Build(#[from] build::BuildError),
    /// Applying or deleting children.
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
    /// Writing status.
    #[error(transparent)]
    Status(#[from] status::StatusError),
    /// Dropping the slot and publication on deletion.
    #[error(transparent)]
    Cleanup(#[from] cleanup::CleanupError),
}

/// A failed Flow reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stage, or adding/removing the finalizer, failed.
    #[error("{}", describe(.0))]
    Finalizer(#[source] Box<finalizer::Error<StageError>>),
    /// The object has no namespace (Flows are namespaced; this is an API server bug).
    #[error("Flow {0:?} has no namespace")]
    Unnamespaced(String),
}

/// A stage's own message (it names the object and the fix); kube's wording otherwise.
fn describe(e: &finalizer::Error<StageError>) -> String {
    match e {
        finalizer::Error::ApplyFailed(s) | finalizer::Error::CleanupFailed(s) => s.to_string(),
        other => other.to_string(),
    }
}

impl Error {
    /// Whether adding or removing the finalizer lost a race with another writer (the
    /// cached object was older than the server's): retried at once, not a failure.
    pub fn is_conflict(&self) -> bool {
        let Self::Finalizer(e) = self else {
            return false;
        };
        match e.as_ref() {
            finalizer::Error::AddFinalizer(kube::Error::Api(s))
            | finalizer::Error::RemoveFinalizer(kube::Error::Api(s)) => {
                s.code == 409 || s.code == 422
            }
            _ => false,
        }
    }

    /// Whether this is a wait (cleanup waiting for the worker to stop), not a failure.
    pub fn is_waiting(&self) -> bool {
        matches!(
            self,
            Self::Finalizer(e) if matches!(
                e.as_ref(),
                finalizer::Error::CleanupFailed(StageError::Cleanup(
                    cleanup::CleanupError::WorkerStopping { .. }
                ))
            )
        )
    }

    /// The failed stage, when a stage (not the finalizer bookkeeping) failed.
    pub fn stage(&self) -> Option<&StageError> {
        match self {
            Self::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(s) | finalizer::Error::CleanupFailed(s) => Some(s),
                _ => None,
            },
            Self::Unnamespaced(_) => None,
        }
    }

    /// Label for metrics and events.
    pub fn label(&self) -> &'static str {
        match (self, self.stage()) {
            (Self::Unnamespaced(_), _) => "unnamespaced",
            (_, Some(StageError::Dereference(_))) => "dereference",
            (_, Some(StageError::Build(_))) => "build",
            (_, Some(StageError::Apply(_))) => "apply",
            (_, Some(StageError::Status(_))) => "status",
            (_, Some(StageError::Cleanup(_))) => "cleanup",
            (Self::Finalizer(_), None) => "finalizer",
        }
    }
}

fn key(flow: &Flow) -> String {
    format!(
        "Flow/{}/{}",
        flow.namespace().unwrap_or_default(),
        flow.name_any()
    )
}

/// Reconciles one Flow.
pub async fn reconcile(flow: Arc<Flow>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = flow
        .namespace()
        .ok_or_else(|| Error::Unnamespaced(flow.name_any()))?;
    let api: Api<Flow> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer::finalizer(&api, FINALIZER, flow.clone(), |event| async {
        match event {
            FinalizerEvent::Apply(f) => apply_flow(f, &ctx).await,
            FinalizerEvent::Cleanup(f) => cleanup_flow(f, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconciled("flow", started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => ctx.backoff.succeeded(&key(&flow)),
        Err(e) if e.is_conflict() => {
            tracing::debug!(flow = %key(&flow), error = %e, "finalizer update raced with a newer version; retrying")
        }
        Err(e) if e.is_waiting() => {
            publish(
                &ctx,
                &flow,
                EventType::Normal,
                "WaitingForWorker",
                "Cleanup",
                e.to_string(),
            )
            .await
        }
        Err(e) => {
            publish(
                &ctx,
                &flow,
                EventType::Warning,
                "ReconcileFailed",
                e.label(),
                e.to_string(),
            )
            .await
        }
    }
    result
}

/// Retry policy: per-object exponential backoff, failures counted by label.
pub fn error_policy(flow: Arc<Flow>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_conflict() {
        return Action::requeue(Duration::from_secs(1));
    }
    if error.is_waiting() {
        // Worker pods terminate within their grace period; poll at a steady pace.
        return Action::requeue(Duration::from_secs(5));
    }
    ctx.metrics.failed("flow", error.label());
    let delay = ctx.backoff.failed(&key(&flow));
    tracing::warn!(flow = %key(&flow), error = %error, retry_in = ?delay, "reconciling Flow failed");
    Action::requeue(delay)
}

async fn publish(
    ctx: &Context,
    flow: &Flow,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        // Events cap notes at 1 kB.
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &flow.object_ref(&())).await {
        tracing::warn!(flow = %key(flow), error = %e, "publishing an event failed");
    }
}

/// Publishes an event when `Ready` changes status or reason.
async fn transition_event(ctx: &Context, flow: &Flow, next: &OperatorStatus) {
    let previous = flow
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == kind::READY));
    let Some(ready) = next.conditions.iter().find(|c| c.type_ == kind::READY) else {
        return;
    };
    if previous.is_some_and(|p| p.status == ready.status && p.reason == ready.reason) {
        return;
    }
    let warning = ready.status == "False"
        && ![reason::SUSPENDED, reason::WORKLOAD_PROGRESSING].contains(&ready.reason.as_str());
    let type_ = if warning {
        EventType::Warning
    } else {
        EventType::Normal
    };
    publish(
        ctx,
        flow,
        type_,
        &ready.reason,
        "Reconcile",
        ready.message.clone(),
    )
    .await;
}

async fn write_status(ctx: &Context, flow: &Flow, next: &OperatorStatus) -> Result<(), StageError> {
    transition_event(ctx, flow, next).await;
    status::write(&ctx.client, flow, next).await?;
    Ok(())
}

async fn apply_flow(flow: Arc<Flow>, ctx: &Context) -> Result<Action, StageError> {
    let namespace = flow.namespace().unwrap_or_default();
    let name = flow.name_any();
    let uid = flow.uid().unwrap_or_default();
    let inputs = dereference::read(&ctx.client, &namespace, &flow).await?;

    let findings = validate::flow(&flow, &inputs);
    if let Some((why, message)) = validate::summary(&findings) {
        // Invalid objects wait for a change (the Flow, a Destination or a Secret: all
        // watched); the last good workload keeps running so the slot keeps being read.
        let outcome = Outcome::Invalid {
            reason: why,
            message,
        };
        let next = status::compute(&flow, &outcome, None, false, Timestamp::now());
        write_status(ctx, &flow, &next).await?;
        return Ok(Action::await_change());
    }

    let start_lsn = status::replay_to_pass(&flow);
    let children = build::children(&flow, &inputs, &ctx.defaults, start_lsn.as_deref())?;
    let deleted = apply::remove_orphans(
        &ctx.client,
        &namespace,
        &name,
        &uid,
        Some(children.workload.kind()),
        children.rbac.is_some(),
    )
    .await?;
    if !deleted.is_empty() {
        publish(
            ctx,
            &flow,
            EventType::Normal,
            "ChildrenRemoved",
            "Reconcile",
            format!(
                "deleted {} left over from a previous mode or setting",
                deleted.join(", ")
            ),
        )
        .await;
    }
    let applied = match apply::children(
        &ctx.client,
        &namespace,
        &name,
        &uid,
        flow.spec.suspend,
        &children,
    )
    .await
    {
        Ok(a) => a,
        Err(e) => {
            let next = status::compute(
                &flow,
                &Outcome::ApplyFailed(e.to_string()),
                None,
                false,
                Timestamp::now(),
            );
            if let Err(status_error) = write_status(ctx, &flow, &next).await {
                tracing::warn!(flow = %key(&flow), error = %status_error, "recording the apply failure in status failed");
            }
            return Err(e.into());
        }
    };
    let now = Timestamp::now();
    let replay = status::next_replay(&flow, start_lsn.as_deref(), &applied.state, now);
    if let (Some(lsn), Some(r)) = (&start_lsn, &replay)
        && r.applied_time.is_some()
    {
        publish(
            ctx,
            &flow,
            EventType::Normal,
            "ReplayApplied",
            "Replay",
            format!(
                "the worker started with --start-lsn {lsn}; later restarts resume from the slot"
            ),
        )
        .await;
    }
    let outcome = Outcome::Workload {
        kind: applied.kind.as_str(),
        name: applied.name.clone(),
        state: applied.state.clone(),
    };
    let next = status::compute(&flow, &outcome, replay, true, now);
    write_status(ctx, &flow, &next).await?;
    Ok(match applied.state {
        // Child watches wake us on progress; the requeue is a safety net.
        WorkloadState::Progressing(_) => Action::requeue(Duration::from_secs(15)),
        _ => Action::requeue(Duration::from_secs(300)),
    })
}

async fn cleanup_flow(flow: Arc<Flow>, ctx: &Context) -> Result<Action, StageError> {
    let pg = &flow.spec.source.postgres;
    let outcome = cleanup::run(&ctx.client, &flow).await?;
    let (reason, note) = match outcome {
        cleanup::CleanupOutcome::Retained => (
            "SlotRetained",
            format!(
                "cleanupPolicy is retain: replication slot {:?} and publication {:?} were kept; drop them when no longer needed (SELECT pg_drop_replication_slot('{}'); DROP PUBLICATION {})",
                pg.slot, pg.publication, pg.slot, pg.publication
            ),
        ),
        cleanup::CleanupOutcome::Dropped { slot, publication } => (
            "SlotDropped",
            format!(
                "cleanupPolicy is delete: replication slot {:?} {} and publication {:?} {}",
                pg.slot,
                if slot { "dropped" } else { "was already gone" },
                pg.publication,
                if publication {
                    "dropped"
                } else {
                    "was already gone"
                },
            ),
        ),
    };
    publish(ctx, &flow, EventType::Normal, reason, "Cleanup", note).await;
    Ok(Action::await_change())
}

/// Flows (from the controller's cache) to reconcile when a Destination changes.
pub fn flows_for_destination(
    flows: &[Arc<Flow>],
    destination: &Destination,
) -> Vec<ObjectRef<Flow>> {
    let ns = destination.namespace();
    let name = destination.name_any();
    flows
        .iter()
        .filter(|f| f.namespace() == ns && refs::uses_destination(f, &name))
        .map(|f| ObjectRef::from_obj(f.as_ref()))
        .collect()
}

/// Flows to reconcile when a Secret changes: those referencing it directly or through one
/// of their Destinations.
pub fn flows_for_secret(
    flows: &[Arc<Flow>],
    destinations: &[Arc<Destination>],
    secret: &Secret,
) -> Vec<ObjectRef<Flow>> {
    let ns = secret.namespace();
    let name = secret.name_any();
    flows
        .iter()
        .filter(|f| f.namespace() == ns)
        .filter(|f| {
            let own = destinations
                .iter()
                .filter(|d| d.namespace() == ns && refs::uses_destination(f, &d.name_any()))
                .map(|d| d.as_ref());
            refs::secret_names(f, own).contains(&name)
        })
        .map(|f| ObjectRef::from_obj(f.as_ref()))
        .collect()
}
