//! The Destination controller: validates a Destination on its own (spec rules, Secrets it
//! references, whether this worker version delivers its type), and writes its `Ready`
//! condition and `usedBy` (the Flows that list it) with server-side apply on the status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use wallaby_crds::destination::DestinationStatus;
use wallaby_crds::{API_VERSION, Destination, Flow, validate as shared};

use crate::conditions::{self, DesiredCondition, Status, kind, reason};
use crate::flow::Context;
use crate::flow::dereference::secret_has;
use crate::flow::validate::{DELIVERED_TYPES, Finding};
use crate::{MANAGER, refs};

/// A failed Destination reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a referenced Secret failed.
    #[error(
        "reading Secret {namespace}/{name} referenced by Destination {destination} failed: {source}"
    )]
    ReadSecret {
        namespace: String,
        name: String,
        destination: String,
        #[source]
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error(
        "patching the status of Destination {destination} failed: {source}; check the operator's RBAC (patch on destinations/status)"
    )]
    Status {
        destination: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ReadSecret { .. } => "dereference",
            Self::Status { .. } => "status",
        }
    }
}

/// The fields the operator owns in `Destination.status`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorStatus {
    /// Generation validated.
    pub observed_generation: Option<i64>,
    /// `Ready`.
    pub conditions: Vec<Condition>,
    /// Flows that list this Destination, sorted.
    pub used_by: Vec<String>,
}

/// Problems of a Destination alone, given the Secrets that exist (by name).
pub fn validate(destination: &Destination, secrets: &BTreeMap<String, Secret>) -> Vec<Finding> {
    let name = destination.name_any();
    let namespace = destination.namespace().unwrap_or_default();
    let mut findings: Vec<Finding> = shared::destination(&name, &destination.spec)
        .into_iter()
        .map(|p| Finding {
            reason: reason::INVALID_SPEC,
            object: p.object,
            field: p.field,
            message: p.message,
        })
        .collect();
    if !DELIVERED_TYPES.contains(&destination.spec.kind) {
        findings.push(Finding {
            reason: reason::DESTINATION_TYPE_UNSUPPORTED,
            object: format!("Destination/{name}"),
            field: "spec.type".into(),
            message: format!(
                "type {} is not delivered by this worker version ({}); Flows that list it will not start",
                destination.spec.kind.as_str(),
                env!("CARGO_PKG_VERSION")
            ),
        });
    }
    for u in refs::of_destination(destination) {
        match secrets.get(&u.secret) {
            None => findings.push(Finding {
                reason: reason::SECRET_NOT_FOUND,
                object: u.object.clone(),
                field: u.field.clone(),
                message: format!(
                    "Secret {:?} does not exist in namespace {namespace}: create it or fix {}",
                    u.secret, u.field
                ),
            }),
            Some(s) => {
                if let Some(k) = &u.key
                    && !secret_has(s, k)
                {
                    findings.push(Finding {
                        reason: reason::SECRET_KEY_MISSING,
                        object: u.object.clone(),
                        field: u.field.clone(),
                        message: format!(
                            "Secret {:?} has no key {k:?}: add it or change {}.key",
                            u.secret, u.field
                        ),
                    });
                }
            }
        }
    }
    findings
}

/// Status for a Destination given its findings and users.
pub fn compute(
    destination: &Destination,
    findings: &[Finding],
    used_by: Vec<String>,
    now: Timestamp,
) -> OperatorStatus {
    let desired = match crate::flow::validate::summary(findings) {
        Some((why, message)) => DesiredCondition {
            type_: kind::READY,
            status: Status::False,
            reason: why,
            message,
        },
        None => DesiredCondition {
            type_: kind::READY,
            status: Status::True,
            reason: reason::VALID,
            message: format!(
                "type {} is valid and its Secrets exist",
                destination.spec.kind.as_str()
            ),
        },
    };
    let current = destination.status.clone().unwrap_or_default();
    let generation = destination.metadata.generation;
    OperatorStatus {
        observed_generation: generation,
        conditions: conditions::merge(&current.conditions, &[desired], generation, now),
        used_by,
    }
}

fn changed(current: Option<&DestinationStatus>, next: &OperatorStatus) -> bool {
    let empty = DestinationStatus::default();
    let current = current.unwrap_or(&empty);
    current.observed_generation != next.observed_generation
        || current.used_by != next.used_by
        || !conditions::same_ignoring_time(&current.conditions, &next.conditions)
}

/// Names of the Flows in `flows` (same namespace) that list `destination`.
pub fn used_by(flows: &[Arc<Flow>], destination: &Destination) -> Vec<String> {
    let ns = destination.namespace();
    let name = destination.name_any();
    let mut names: Vec<String> = flows
        .iter()
        .filter(|f| f.namespace() == ns && refs::uses_destination(f, &name))
        .map(|f| f.name_any())
        .collect();
    names.sort();
    names
}

/// Reconciles one Destination; `flows` is the Flow controller's cache.
pub async fn reconcile(
    destination: Arc<Destination>,
    ctx: Arc<Context>,
    flows: Vec<Arc<Flow>>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&destination, &ctx, &flows).await;
    ctx.metrics
        .reconciled("destination", started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.backoff.succeeded(&key(&destination));
    }
    result
}

async fn reconcile_inner(
    destination: &Destination,
    ctx: &Context,
    flows: &[Arc<Flow>],
) -> Result<Action, Error> {
    let namespace = destination.namespace().unwrap_or_default();
    let name = destination.name_any();
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut secrets = BTreeMap::new();
    for u in refs::of_destination(destination) {
        if secrets.contains_key(&u.secret) {
            continue;
        }
        let found = secrets_api
            .get_opt(&u.secret)
            .await
            .map_err(|source| Error::ReadSecret {
                namespace: namespace.clone(),
                name: u.secret.clone(),
                destination: name.clone(),
                source,
            })?;
        if let Some(s) = found {
            secrets.insert(u.secret.clone(), s);
        }
    }
    let findings = validate(destination, &secrets);
    let next = compute(
        destination,
        &findings,
        used_by(flows, destination),
        Timestamp::now(),
    );
    if !changed(destination.status.as_ref(), &next) {
        return Ok(Action::await_change());
    }
    let previous = destination
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == kind::READY));
    if let Some(ready) = next.conditions.first()
        && !previous.is_some_and(|p| p.status == ready.status && p.reason == ready.reason)
    {
        let event = Event {
            type_: if ready.status == "True" {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: ready.reason.clone(),
            note: Some(ready.message.chars().take(1000).collect()),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = ctx
            .recorder
            .publish(&event, &destination.object_ref(&()))
            .await
        {
            tracing::warn!(destination = %key(destination), error = %e, "publishing an event failed");
        }
    }
    let api: Api<Destination> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "Destination",
        "status": next,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Status {
        destination: format!("{namespace}/{name}"),
        source,
    })?;
    // Validity only changes with the object or its Secrets (both watched).
    Ok(Action::requeue(Duration::from_secs(600)))
}

fn key(d: &Destination) -> String {
    format!(
        "Destination/{}/{}",
        d.namespace().unwrap_or_default(),
        d.name_any()
    )
}

/// Retry policy of the Destination controller.
pub fn error_policy(destination: Arc<Destination>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed("destination", error.label());
    let delay = ctx.backoff.failed(&key(&destination));
    tracing::warn!(destination = %key(&destination), error = %error, retry_in = ?delay, "reconciling Destination failed");
    Action::requeue(delay)
}

/// Destinations to reconcile when a Flow changes: those it lists now and those whose
/// `usedBy` still names it (it stopped listing them, or it was deleted).
pub fn destinations_for_flow(
    destinations: &[Arc<Destination>],
    flow: &Flow,
) -> Vec<ObjectRef<Destination>> {
    let ns = flow.namespace();
    let name = flow.name_any();
    destinations
        .iter()
        .filter(|d| d.namespace() == ns)
        .filter(|d| {
            refs::uses_destination(flow, &d.name_any())
                || d.status.as_ref().is_some_and(|s| s.used_by.contains(&name))
        })
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}

/// Destinations to reconcile when a Secret changes.
pub fn destinations_for_secret(
    destinations: &[Arc<Destination>],
    secret: &Secret,
) -> Vec<ObjectRef<Destination>> {
    let ns = secret.namespace();
    let name = secret.name_any();
    destinations
        .iter()
        .filter(|d| d.namespace() == ns)
        .filter(|d| refs::of_destination(d).iter().any(|u| u.secret == name))
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}
