//! Stage 2, validate (pure): what the CRD schema cannot check because it spans objects or
//! depends on this worker version — missing Destinations and Secrets, missing Secret keys,
//! destination types the worker does not deliver, and the cross-field rules shared with the
//! standalone worker (`wallaby_crds::validate`). Each finding names the object and the fix.

use wallaby_crds::destination::DestinationType;
use wallaby_crds::flow::FlowMode;
use wallaby_crds::{Flow, validate as shared};

use super::dereference::{Inputs, secret_has};
use crate::conditions::reason;
use crate::refs;

/// Destination types this worker version delivers.
pub const DELIVERED_TYPES: &[DestinationType] = &[
    DestinationType::File,
    DestinationType::Kafka,
    DestinationType::Bufstream,
    DestinationType::S3,
    DestinationType::Http,
    DestinationType::Grpc,
];

/// One validation problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// One of the validation reasons in [`reason`].
    pub reason: &'static str,
    /// `Flow/demo`, `Destination/files`, `Secret/pg`.
    pub object: String,
    /// Offending field.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.object, self.field, self.message)
    }
}

/// Priority of a reason when several findings compete for the `Ready` reason: what blocks
/// everything else (a missing object) comes first.
fn rank(reason: &str) -> u8 {
    match reason {
        reason::DESTINATION_NOT_FOUND => 0,
        reason::SECRET_NOT_FOUND => 1,
        reason::SECRET_KEY_MISSING => 2,
        reason::DESTINATION_TYPE_UNSUPPORTED => 3,
        _ => 4,
    }
}

/// Every problem of a Flow and the objects it references, most blocking first.
pub fn flow(flow: &Flow, inputs: &Inputs) -> Vec<Finding> {
    let name = flow.metadata.name.as_deref().unwrap_or_default();
    let namespace = flow.metadata.namespace.as_deref().unwrap_or_default();
    let mut findings: Vec<Finding> = shared::flow(flow, |d| inputs.destinations.get(d))
        .into_iter()
        .map(|p| Finding {
            reason: if p.field.starts_with("spec.destinations[") && p.field.ends_with(".name") {
                reason::DESTINATION_NOT_FOUND
            } else {
                reason::INVALID_SPEC
            },
            object: p.object,
            field: p.field,
            message: p.message,
        })
        .collect();

    if flow.spec.replay.is_some() && flow.spec.mode == FlowMode::Backfill {
        findings.push(Finding {
            reason: reason::INVALID_SPEC,
            object: format!("Flow/{name}"),
            field: "spec.replay".into(),
            message: "replay restarts streaming from an LSN and has no effect on a backfill: use mode stream or scheduled, or remove spec.replay".into(),
        });
    }

    for (dname, destination) in &inputs.destinations {
        findings.extend(
            shared::destination(dname, &destination.spec)
                .into_iter()
                .map(|p| Finding {
                    reason: reason::INVALID_SPEC,
                    object: p.object,
                    field: p.field,
                    message: p.message,
                }),
        );
        if let Some(f) = unsupported_type(dname, destination.spec.kind) {
            findings.push(f);
        }
    }

    let uses = refs::of_flow(flow)
        .into_iter()
        .chain(inputs.destinations.values().flat_map(refs::of_destination));
    for u in uses {
        match inputs.secrets.get(&u.secret) {
            None => findings.push(Finding {
                reason: reason::SECRET_NOT_FOUND,
                object: u.object.clone(),
                field: u.field.clone(),
                message: format!(
                    "Secret {:?} does not exist in namespace {namespace}: create it (kubectl create secret generic {} --from-literal=…) or fix {}",
                    u.secret, u.secret, u.field
                ),
            }),
            Some(secret) => {
                if let Some(key) = &u.key
                    && !secret_has(secret, key)
                {
                    findings.push(Finding {
                        reason: reason::SECRET_KEY_MISSING,
                        object: u.object.clone(),
                        field: u.field.clone(),
                        message: format!(
                            "Secret {:?} has no key {key:?}: add it to the Secret or change {}.key",
                            u.secret, u.field
                        ),
                    });
                }
            }
        }
    }

    // The connection needs a host: from `dsn` (spec or Secret) or the Secret's `host`.
    let pg = &flow.spec.source.postgres;
    if pg.dsn.is_none()
        && let Some(r) = &pg.secret_ref
        && let Some(secret) = inputs.secrets.get(&r.name)
        && !secret_has(secret, "dsn")
        && !secret_has(secret, "host")
    {
        findings.push(Finding {
            reason: reason::SECRET_KEY_MISSING,
            object: format!("Flow/{name}"),
            field: "spec.source.postgres.secretRef".into(),
            message: format!(
                "Secret {:?} has neither key `dsn` nor `host`, and spec.source.postgres.dsn is unset: add `dsn` (postgres://user:password@host:5432/db) or `host`/`user`/`password`/`dbname` to the Secret",
                r.name
            ),
        });
    }

    findings.sort_by_key(|f| rank(f.reason));
    findings
}

fn unsupported_type(name: &str, kind: DestinationType) -> Option<Finding> {
    if DELIVERED_TYPES.contains(&kind) {
        return None;
    }
    let delivered: Vec<&str> = DELIVERED_TYPES.iter().map(|t| t.as_str()).collect();
    Some(Finding {
        reason: reason::DESTINATION_TYPE_UNSUPPORTED,
        object: format!("Destination/{name}"),
        field: "spec.type".into(),
        message: format!(
            "type {} is not delivered by this worker version ({}); delivered types: {}. Use a supported Destination or remove it from the Flow's spec.destinations",
            kind.as_str(),
            env!("CARGO_PKG_VERSION"),
            delivered.join(", ")
        ),
    })
}

/// `Ready` reason and message for a non-empty list of findings.
pub fn summary(findings: &[Finding]) -> Option<(&'static str, String)> {
    let first = findings.first()?;
    let message = findings
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    Some((first.reason, message))
}
