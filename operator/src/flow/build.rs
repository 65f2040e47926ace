//! Stage 3, build (pure): the child objects of a Flow, exactly as the operator/worker
//! contract describes them — the worker workload (Deployment for `stream`, Job for
//! `backfill`, CronJob for `scheduled`) and the worker's least-privilege ServiceAccount,
//! Role and RoleBinding — plus the config hash that rolls the worker on any input change.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, Job, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use sha2::{Digest, Sha256};
use wallaby_crds::flow::FlowMode;
use wallaby_crds::{Flow, FlowSpec};

use super::dereference::Inputs;
use crate::{CONFIG_HASH_ANNOTATION, FLOW_LABEL};

/// Port of the worker's `/metrics` and `/healthz`.
pub const METRICS_PORT: i32 = 9187;
/// Where the worker spills large transactions.
pub const SPILL_DIR: &str = "/var/lib/wallaby/spill";

/// Settings of the operator process that shape every workload.
#[derive(Clone, Debug)]
pub struct WorkerDefaults {
    /// Image when `spec.worker.image` is unset (`--worker-image`).
    pub image: String,
    /// Operator-wide DDL policy defaults (`WALLABY_DDL_GATE`, `WALLABY_DDL_AUTO_APPROVE`,
    /// `WALLABY_DDL_AUTO_APPLY` of the operator), handed to every worker; a Flow's `spec.ddl`
    /// fields and `spec.worker.env` take precedence.
    pub ddl_env: Vec<(String, String)>,
}

/// The operator's DDL policy defaults from its environment, checked at start.
pub fn ddl_env_from(get: impl Fn(&str) -> Option<String>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for name in [
        "WALLABY_DDL_GATE",
        "WALLABY_DDL_AUTO_APPROVE",
        "WALLABY_DDL_AUTO_APPLY",
    ] {
        if let Some(value) = get(name) {
            match value.trim().to_ascii_lowercase().as_str() {
                "true" | "false" => out.push((name.to_owned(), value.trim().to_ascii_lowercase())),
                _ => return Err(format!("{name}={value:?}: expected true or false")),
            }
        }
    }
    Ok(out)
}

/// Which workload kind a Flow runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    /// `mode: stream`.
    Deployment,
    /// `mode: backfill`.
    Job,
    /// `mode: scheduled`.
    CronJob,
}

impl WorkloadKind {
    /// The kind for a mode.
    pub fn for_mode(mode: FlowMode) -> Self {
        match mode {
            FlowMode::Stream => Self::Deployment,
            FlowMode::Backfill => Self::Job,
            FlowMode::Scheduled => Self::CronJob,
        }
    }

    /// Kubernetes kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::Job => "Job",
            Self::CronJob => "CronJob",
        }
    }

    /// Every kind, for orphan removal.
    pub const ALL: [WorkloadKind; 3] = [Self::Deployment, Self::Job, Self::CronJob];
}

/// The worker workload.
#[derive(Clone, Debug, PartialEq)]
pub enum Workload {
    /// Stream mode.
    Deployment(Box<Deployment>),
    /// Backfill mode.
    Job(Box<Job>),
    /// Scheduled mode.
    CronJob(Box<CronJob>),
}

impl Workload {
    /// Its kind.
    pub fn kind(&self) -> WorkloadKind {
        match self {
            Self::Deployment(_) => WorkloadKind::Deployment,
            Self::Job(_) => WorkloadKind::Job,
            Self::CronJob(_) => WorkloadKind::CronJob,
        }
    }
}

/// Everything the operator applies for one Flow.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    /// The worker's ServiceAccount, Role and RoleBinding; `None` when `spec.worker` names
    /// its own service account.
    pub rbac: Option<WorkerRbac>,
    /// The workload.
    pub workload: Workload,
    /// sha256 over the inputs of the worker's configuration.
    pub config_hash: String,
}

/// Least-privilege identity of the worker.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerRbac {
    /// `wallaby-<flow>`.
    pub service_account: ServiceAccount,
    /// What the worker may read and write.
    pub role: Role,
    /// Binds the Role to the ServiceAccount.
    pub role_binding: RoleBinding,
}

/// Why children cannot be built; only objects the API server never returns hit this.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Flow lacks a name, namespace or uid (it did not come from the API server).
    #[error(
        "Flow {0:?} has no name, namespace or uid, so its children cannot be owned by it; apply it through the API server"
    )]
    Unowned(String),
    /// The spec cannot be serialized for the config hash.
    #[error("serializing the spec of Flow {flow} for its config hash failed: {source}")]
    Hash {
        flow: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Name of every child of a Flow.
pub fn child_name(flow: &str) -> String {
    format!("wallaby-{flow}")
}

/// Labels of every child (and the selector labels of the workload's pods).
pub fn labels(flow: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(flow);
    l.insert("app.kubernetes.io/managed-by".into(), crate::MANAGER.into());
    l.insert(FLOW_LABEL.into(), flow.into());
    l
}

/// The Deployment selector: never changes for a Flow (selectors are immutable).
pub fn selector_labels(flow: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "wallaby-worker".into()),
        ("app.kubernetes.io/instance".into(), flow.into()),
    ])
}

/// sha256 of the rendered Flow spec (without `suspend`, which scales the workload instead
/// of changing its configuration), the specs of the referenced Destinations, and the
/// resourceVersions of the referenced Secrets.
pub fn config_hash(spec: &FlowSpec, inputs: &Inputs) -> Result<String, serde_json::Error> {
    let mut spec = spec.clone();
    spec.suspend = false;
    let destinations: BTreeMap<&String, serde_json::Value> = inputs
        .destinations
        .iter()
        .map(|(n, d)| Ok((n, serde_json::to_value(&d.spec)?)))
        .collect::<Result<_, serde_json::Error>>()?;
    let secrets: BTreeMap<&String, Option<&String>> = inputs
        .secrets
        .iter()
        .map(|(n, s)| (n, s.metadata.resource_version.as_ref()))
        .collect();
    let rendered = serde_json::to_vec(&serde_json::json!({
        "flow": spec,
        "destinations": destinations,
        "secrets": secrets,
    }))?;
    let digest = Sha256::digest(&rendered);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Builds every child of `flow`. `start_lsn` is the replay LSN to hand to the worker once
/// (see the status stage for when it is dropped again).
pub fn children(
    flow: &Flow,
    inputs: &Inputs,
    defaults: &WorkerDefaults,
    start_lsn: Option<&str>,
) -> Result<Children, BuildError> {
    let (Some(name), Some(namespace), Some(owner)) = (
        flow.metadata.name.clone(),
        flow.metadata.namespace.clone(),
        flow.controller_owner_ref(&()),
    ) else {
        return Err(BuildError::Unowned(
            flow.metadata.name.clone().unwrap_or_default(),
        ));
    };
    let config_hash = config_hash(&flow.spec, inputs).map_err(|source| BuildError::Hash {
        flow: format!("{namespace}/{name}"),
        source,
    })?;
    let meta = |annotations: Option<BTreeMap<String, String>>| ObjectMeta {
        name: Some(child_name(&name)),
        namespace: Some(namespace.clone()),
        labels: Some(labels(&name)),
        annotations,
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    };
    let worker = flow.spec.worker.clone().unwrap_or_default();
    let rbac = worker
        .service_account_name
        .is_none()
        .then(|| worker_rbac(flow, &name, inputs, &meta(None)));
    let service_account = worker
        .service_account_name
        .clone()
        .unwrap_or_else(|| child_name(&name));

    let mode = flow.spec.mode;
    let bounded = mode != FlowMode::Stream;
    // A backfill Job copies `snapshot.tables` (the worker reads them from the Flow) and
    // exits; stream and scheduled runs consume the slot.
    let mut args: Vec<String> = if mode == FlowMode::Backfill {
        vec![
            "backfill".into(),
            "--flow".into(),
            format!("{namespace}/{name}"),
            "--metrics-addr".into(),
            format!("0.0.0.0:{METRICS_PORT}"),
        ]
    } else {
        [
            "run",
            "--flow",
            &format!("{namespace}/{name}"),
            "--metrics-addr",
            &format!("0.0.0.0:{METRICS_PORT}"),
            "--spill-dir",
            SPILL_DIR,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    if mode == FlowMode::Scheduled {
        args.push("--drain".into());
    }
    // A replay concerns the slot, which a backfill does not read.
    if let Some(lsn) = start_lsn.filter(|_| mode != FlowMode::Backfill) {
        args.push("--start-lsn".into());
        args.push(lsn.into());
    }
    let field_env = |env: &str, path: &str| EnvVar {
        name: env.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: path.into(),
            }),
            ..Default::default()
        }),
    };
    let mut env = vec![
        EnvVar {
            name: "WALLABY_LOG".into(),
            value: Some("info".into()),
            value_from: None,
        },
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
    ];
    env.extend(defaults.ddl_env.iter().map(|(name, value)| EnvVar {
        name: name.clone(),
        value: Some(value.clone()),
        value_from: None,
    }));
    env.extend(worker.env.iter().cloned());

    let container = Container {
        name: "worker".into(),
        image: Some(
            worker
                .image
                .clone()
                .unwrap_or_else(|| defaults.image.clone()),
        ),
        image_pull_policy: worker.image_pull_policy.clone(),
        command: Some(vec!["wallaby-worker".into()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: METRICS_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: worker.resources.clone(),
        // Ready once the worker serves /healthz: the Deployment is only "available" (and a
        // replay only counted as applied) when a worker actually runs.
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::String("metrics".into()),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "spill".into(),
            mount_path: SPILL_DIR.into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let mut pod_annotations = worker.annotations.clone();
    pod_annotations.insert(CONFIG_HASH_ANNOTATION.into(), config_hash.clone());
    let mut pod_labels = labels(&name);
    pod_labels.extend(selector_labels(&name));
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(pod_annotations),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(service_account),
            containers: vec![container],
            volumes: Some(vec![Volume {
                name: "spill".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }]),
            node_selector: (!worker.node_selector.is_empty()).then(|| worker.node_selector.clone()),
            tolerations: (!worker.tolerations.is_empty()).then(|| worker.tolerations.clone()),
            // A Job's pod is retried by the Job controller (backoffLimit); a Deployment's
            // pod restarts in place.
            restart_policy: Some(if bounded { "OnFailure" } else { "Always" }.into()),
            // The worker confirms its last durable LSN and closes the slot on SIGTERM.
            termination_grace_period_seconds: Some(60),
            ..Default::default()
        }),
    };
    let hash_annotation = Some(BTreeMap::from([(
        CONFIG_HASH_ANNOTATION.to_owned(),
        config_hash.clone(),
    )]));
    let suspend = flow.spec.suspend;
    let workload = match mode {
        FlowMode::Stream => Workload::Deployment(Box::new(Deployment {
            metadata: meta(hash_annotation),
            spec: Some(DeploymentSpec {
                // Suspend scales to zero: the Deployment (and its history) stays, so resuming
                // is a scale-up and the workload reference in status keeps pointing at it.
                replicas: Some(if suspend { 0 } else { 1 }),
                // Never two consumers on one slot: the old pod stops before the new starts.
                strategy: Some(DeploymentStrategy {
                    type_: Some("Recreate".into()),
                    rolling_update: None,
                }),
                selector: LabelSelector {
                    match_labels: Some(selector_labels(&name)),
                    match_expressions: None,
                },
                revision_history_limit: Some(3),
                template,
                ..Default::default()
            }),
            status: None,
        })),
        FlowMode::Backfill => Workload::Job(Box::new(Job {
            metadata: meta(hash_annotation),
            spec: Some(job_spec(template, suspend)),
            status: None,
        })),
        FlowMode::Scheduled => Workload::CronJob(Box::new(CronJob {
            metadata: meta(hash_annotation),
            spec: Some(CronJobSpec {
                schedule: flow.spec.schedule.clone().unwrap_or_default(),
                concurrency_policy: Some("Forbid".into()),
                suspend: Some(suspend),
                successful_jobs_history_limit: Some(3),
                failed_jobs_history_limit: Some(1),
                job_template: JobTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels(&name)),
                        ..Default::default()
                    }),
                    spec: Some(job_spec(template, false)),
                },
                ..Default::default()
            }),
            status: None,
        })),
    };
    Ok(Children {
        rbac,
        workload,
        config_hash,
    })
}

fn job_spec(template: PodTemplateSpec, suspend: bool) -> JobSpec {
    JobSpec {
        backoff_limit: Some(6),
        // A suspended Job keeps its object and progress; resuming sets suspend back.
        suspend: Some(suspend),
        template,
        ..Default::default()
    }
}

fn rule(group: &str, resources: &[&str], names: &[String], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        resource_names: (!names.is_empty()).then(|| names.to_vec()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        non_resource_urls: None,
    }
}

fn worker_rbac(flow: &Flow, name: &str, inputs: &Inputs, meta: &ObjectMeta) -> WorkerRbac {
    let read = ["get", "list", "watch"];
    let flow_names = vec![name.to_owned()];
    let destinations: Vec<String> = flow
        .spec
        .destinations
        .iter()
        .map(|d| d.name.clone())
        .collect();
    let secrets: Vec<String> = crate::refs::secret_names(flow, inputs.destinations.values())
        .into_iter()
        .collect();
    let mut rules = vec![
        rule(wallaby_crds::GROUP, &["flows"], &flow_names, &read),
        rule(
            wallaby_crds::GROUP,
            &["flows/status"],
            &flow_names,
            &["get", "patch"],
        ),
        rule(wallaby_crds::GROUP, &["destinations"], &destinations, &read),
    ];
    // resourceNames cannot be empty-as-none here: an empty list would grant every Secret.
    if !secrets.is_empty() {
        rules.push(rule("", &["secrets"], &secrets, &read));
    }
    rules.push(rule(
        wallaby_crds::GROUP,
        &["ddlapprovals"],
        &[],
        &["create", "get", "list", "watch", "patch"],
    ));
    // The worker reports each approval's state and per-destination results.
    rules.push(rule(
        wallaby_crds::GROUP,
        &["ddlapprovals/status"],
        &[],
        &["get", "patch"],
    ));
    rules.push(rule(
        "events.k8s.io",
        &["events"],
        &[],
        &["create", "patch"],
    ));
    rules.push(rule("", &["events"], &[], &["create", "patch"]));
    let child = child_name(name);
    WorkerRbac {
        service_account: ServiceAccount {
            metadata: meta.clone(),
            ..Default::default()
        },
        role: Role {
            metadata: meta.clone(),
            rules: Some(rules),
        },
        role_binding: RoleBinding {
            metadata: meta.clone(),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: child.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: child,
                namespace: meta.namespace.clone(),
                api_group: None,
            }]),
        },
    }
}

/// Owner reference check: whether `meta` is controlled by the Flow with this uid.
pub fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}
