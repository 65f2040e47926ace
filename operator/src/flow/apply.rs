//! Stage 4, apply: writes the built children with server-side apply (field manager
//! `wallaby-operator`, forced, so a GitOps tool's or a person's edits to fields the
//! operator owns are reverted), replaces a Job whose configuration changed (its pod template
//! is immutable), and deletes children a previous mode or setting left behind.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::build::{Children, Workload, WorkloadKind, child_name, controlled_by};
use crate::conditions::{self, WorkloadState};
use crate::{CONFIG_HASH_ANNOTATION, MANAGER};

/// A write the API server refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Server-side apply of a child failed.
    #[error(
        "applying {kind} {namespace}/{name} failed: {source}; check the operator's RBAC and that no admission policy rejects it"
    )]
    Apply {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Reading or deleting a child failed.
    #[error("{action} {kind} {namespace}/{name} failed: {source}")]
    Child {
        action: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// A child's name is taken by an object the Flow does not control.
    #[error(
        "{kind} {namespace}/{name} exists but is not controlled by Flow {flow}: delete or rename it so the operator can create the worker"
    )]
    NameTaken {
        kind: &'static str,
        namespace: String,
        name: String,
        flow: String,
    },
}

/// The workload as the API server returned it, and what it is doing.
#[derive(Clone, Debug)]
pub struct Applied {
    /// Kind of the workload.
    pub kind: WorkloadKind,
    /// Its name.
    pub name: String,
    /// Its observed state.
    pub state: WorkloadState,
}

async fn ssa<K>(api: &Api<K>, obj: &K, kind: &'static str) -> Result<K, ApplyError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let namespace = obj.meta().namespace.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| ApplyError::Apply {
        kind,
        namespace,
        name,
        source,
    })
}

fn child_err(
    action: &'static str,
    kind: &'static str,
    ns: &str,
    name: &str,
) -> impl FnOnce(kube::Error) -> ApplyError {
    let (namespace, name) = (ns.to_owned(), name.to_owned());
    move |source| ApplyError::Child {
        action,
        kind,
        namespace,
        name,
        source,
    }
}

/// Applies every child; returns the workload's state.
pub async fn children(
    client: &Client,
    namespace: &str,
    flow: &str,
    flow_uid: &str,
    suspended: bool,
    children: &Children,
) -> Result<Applied, ApplyError> {
    if let Some(rbac) = &children.rbac {
        ssa(
            &Api::<ServiceAccount>::namespaced(client.clone(), namespace),
            &rbac.service_account,
            "ServiceAccount",
        )
        .await?;
        ssa(
            &Api::<Role>::namespaced(client.clone(), namespace),
            &rbac.role,
            "Role",
        )
        .await?;
        ssa(
            &Api::<RoleBinding>::namespaced(client.clone(), namespace),
            &rbac.role_binding,
            "RoleBinding",
        )
        .await?;
    }
    let name = child_name(flow);
    let state = match &children.workload {
        Workload::Deployment(d) => {
            let api = Api::<Deployment>::namespaced(client.clone(), namespace);
            guard_name(&api, namespace, &name, flow, flow_uid, "Deployment").await?;
            let applied = ssa(&api, d.as_ref(), "Deployment").await?;
            conditions::observe_deployment(&applied, suspended)
        }
        Workload::Job(j) => {
            let api = Api::<Job>::namespaced(client.clone(), namespace);
            let existing = guard_name(&api, namespace, &name, flow, flow_uid, "Job").await?;
            match existing {
                Some(job) if job.metadata.deletion_timestamp.is_some() => {
                    WorkloadState::Progressing(
                        "waiting for the Job of the previous configuration to be deleted".into(),
                    )
                }
                Some(job)
                    if conditions::observe_job(&job, false) == WorkloadState::Completed
                        && hash_of(&job.metadata) != Some(children.config_hash.as_str()) =>
                {
                    // A finished backfill is not rerun because a Destination or Secret
                    // changed afterwards; deleting the Job asks for a new run.
                    WorkloadState::Completed
                }
                Some(job) if hash_of(&job.metadata) != Some(children.config_hash.as_str()) => {
                    // A Job's pod template is immutable: a new configuration is a new Job.
                    api.delete(&name, &DeleteParams::background())
                        .await
                        .map_err(child_err("deleting", "Job", namespace, &name))?;
                    WorkloadState::Progressing("replacing the Job for the new configuration".into())
                }
                _ => {
                    let applied = ssa(&api, j.as_ref(), "Job").await?;
                    conditions::observe_job(&applied, suspended)
                }
            }
        }
        Workload::CronJob(c) => {
            let api = Api::<CronJob>::namespaced(client.clone(), namespace);
            guard_name(&api, namespace, &name, flow, flow_uid, "CronJob").await?;
            let applied = ssa(&api, c.as_ref(), "CronJob").await?;
            conditions::observe_cronjob(&applied, suspended)
        }
    };
    Ok(Applied {
        kind: children.workload.kind(),
        name,
        state,
    })
}

fn hash_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
        .map(String::as_str)
}

/// Refuses to take over an object of the child's name that another owner controls.
async fn guard_name<K>(
    api: &Api<K>,
    namespace: &str,
    name: &str,
    flow: &str,
    flow_uid: &str,
    kind: &'static str,
) -> Result<Option<K>, ApplyError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let existing = api
        .get_opt(name)
        .await
        .map_err(child_err("reading", kind, namespace, name))?;
    match existing {
        Some(obj) if !controlled_by(obj.meta(), flow_uid) => Err(ApplyError::NameTaken {
            kind,
            namespace: namespace.into(),
            name: name.into(),
            flow: flow.into(),
        }),
        other => Ok(other),
    }
}

async fn delete_if_ours<K>(
    api: &Api<K>,
    namespace: &str,
    name: &str,
    flow_uid: &str,
    kind: &'static str,
) -> Result<bool, ApplyError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let existing = api
        .get_opt(name)
        .await
        .map_err(child_err("reading", kind, namespace, name))?;
    match existing {
        Some(obj)
            if controlled_by(obj.meta(), flow_uid) && obj.meta().deletion_timestamp.is_none() =>
        {
            // Background propagation so a Job's pods go too (the API default for Jobs orphans them).
            api.delete(name, &DeleteParams::background())
                .await
                .map_err(child_err("deleting", kind, namespace, name))?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Deletes workloads of other kinds than `keep` (e.g. the Deployment after `mode` changed
/// from stream to backfill) and, when the worker uses its own service account, the
/// operator-made RBAC. Only objects controlled by this Flow are touched. Returns the kinds
/// deleted.
pub async fn remove_orphans(
    client: &Client,
    namespace: &str,
    flow: &str,
    flow_uid: &str,
    keep: Option<WorkloadKind>,
    keep_rbac: bool,
) -> Result<Vec<&'static str>, ApplyError> {
    let name = child_name(flow);
    let mut deleted = Vec::new();
    for kind in WorkloadKind::ALL {
        if Some(kind) == keep {
            continue;
        }
        let gone = match kind {
            WorkloadKind::Deployment => {
                delete_if_ours(
                    &Api::<Deployment>::namespaced(client.clone(), namespace),
                    namespace,
                    &name,
                    flow_uid,
                    "Deployment",
                )
                .await?
            }
            WorkloadKind::Job => {
                delete_if_ours(
                    &Api::<Job>::namespaced(client.clone(), namespace),
                    namespace,
                    &name,
                    flow_uid,
                    "Job",
                )
                .await?
            }
            WorkloadKind::CronJob => {
                delete_if_ours(
                    &Api::<CronJob>::namespaced(client.clone(), namespace),
                    namespace,
                    &name,
                    flow_uid,
                    "CronJob",
                )
                .await?
            }
        };
        if gone {
            deleted.push(kind.as_str());
        }
    }
    if !keep_rbac {
        if delete_if_ours(
            &Api::<RoleBinding>::namespaced(client.clone(), namespace),
            namespace,
            &name,
            flow_uid,
            "RoleBinding",
        )
        .await?
        {
            deleted.push("RoleBinding");
        }
        if delete_if_ours(
            &Api::<Role>::namespaced(client.clone(), namespace),
            namespace,
            &name,
            flow_uid,
            "Role",
        )
        .await?
        {
            deleted.push("Role");
        }
        if delete_if_ours(
            &Api::<ServiceAccount>::namespaced(client.clone(), namespace),
            namespace,
            &name,
            flow_uid,
            "ServiceAccount",
        )
        .await?
        {
            deleted.push("ServiceAccount");
        }
    }
    Ok(deleted)
}

/// Deletes the Flow's workloads with foreground propagation (the object stays until its
/// pods are gone) and returns the kinds still present, so the caller can wait until no
/// worker can touch the slot any more.
pub async fn stop_workloads(
    client: &Client,
    namespace: &str,
    flow: &str,
    flow_uid: &str,
) -> Result<Vec<&'static str>, ApplyError> {
    let name = child_name(flow);
    let mut present = Vec::new();
    for kind in WorkloadKind::ALL {
        let still = match kind {
            WorkloadKind::Deployment => {
                stop_one(
                    &Api::<Deployment>::namespaced(client.clone(), namespace),
                    namespace,
                    &name,
                    flow_uid,
                    "Deployment",
                )
                .await?
            }
            WorkloadKind::Job => {
                stop_one(
                    &Api::<Job>::namespaced(client.clone(), namespace),
                    namespace,
                    &name,
                    flow_uid,
                    "Job",
                )
                .await?
            }
            WorkloadKind::CronJob => {
                stop_one(
                    &Api::<CronJob>::namespaced(client.clone(), namespace),
                    namespace,
                    &name,
                    flow_uid,
                    "CronJob",
                )
                .await?
            }
        };
        if still {
            present.push(kind.as_str());
        }
    }
    Ok(present)
}

async fn stop_one<K>(
    api: &Api<K>,
    namespace: &str,
    name: &str,
    flow_uid: &str,
    kind: &'static str,
) -> Result<bool, ApplyError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let existing = api
        .get_opt(name)
        .await
        .map_err(child_err("reading", kind, namespace, name))?;
    match existing {
        Some(obj) if controlled_by(obj.meta(), flow_uid) => {
            if obj.meta().deletion_timestamp.is_none() {
                api.delete(name, &DeleteParams::foreground())
                    .await
                    .map_err(child_err("deleting", kind, namespace, name))?;
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}
