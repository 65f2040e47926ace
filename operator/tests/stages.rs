//! The pure reconcile stages (validate, build, status) run on YAML fixtures, without a
//! cluster: validation findings and their reasons, the generated children (snapshots plus
//! targeted asserts), config-hash changes, and status/phase computation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{assert_snapshot, load, map};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use wallaby_crds::flow::{FlowPhase, FlowStatus, ReplaySpec, ReplayStatus};
use wallaby_operator::conditions::{Outcome, WorkloadState, reason};
use wallaby_operator::flow::build::{self, Children, WorkerDefaults, Workload};
use wallaby_operator::flow::{status, validate};

fn defaults() -> WorkerDefaults {
    WorkerDefaults {
        image: "ghcr.io/wallaby-dev/wallaby-worker:test".into(),
        ddl_env: vec![("WALLABY_DDL_GATE".into(), "true".into())],
    }
}

#[test]
fn operator_ddl_defaults_are_checked_booleans() {
    use wallaby_operator::flow::build::ddl_env_from;
    let env = ddl_env_from(|n| (n == "WALLABY_DDL_AUTO_APPLY").then(|| "False".into())).unwrap();
    assert_eq!(
        env,
        [("WALLABY_DDL_AUTO_APPLY".to_owned(), "false".to_owned())]
    );
    let err = ddl_env_from(|n| (n == "WALLABY_DDL_GATE").then(|| "sometimes".into())).unwrap_err();
    assert!(err.contains("WALLABY_DDL_GATE"), "{err}");
}

fn build_fixture(name: &str) -> Children {
    let f = load(name);
    assert!(
        validate::flow(&f.flow, &f.inputs).is_empty(),
        "{name} should be valid"
    );
    build::children(&f.flow, &f.inputs, &defaults(), None).unwrap()
}

fn deployment(children: &Children) -> &Deployment {
    match &children.workload {
        Workload::Deployment(d) => d,
        other => panic!("expected a Deployment, got {:?}", other.kind()),
    }
}

/// YAML of a child with the config hash redacted: the hash covers the whole rendered spec,
/// so any new defaulted CRD field would change it; its behaviour is asserted separately.
fn yaml<T: serde::Serialize>(v: &T, hash: &str) -> String {
    serde_norway::to_string(v)
        .unwrap()
        .replace(hash, "<config-hash>")
}

#[test]
fn valid_fixtures_have_no_findings() {
    for name in ["stream.yaml", "backfill.yaml", "scheduled.yaml"] {
        let f = load(name);
        assert_eq!(validate::flow(&f.flow, &f.inputs), vec![], "{name}");
    }
}

#[test]
fn invalid_fixtures_report_the_blocking_reason_first_and_name_the_fix() {
    // (fixture, Ready reason, fragments every message must contain)
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "missing-destination.yaml",
            reason::DESTINATION_NOT_FOUND,
            &[
                "Flow/orders",
                "spec.destinations[1].name",
                "\"archive\" does not exist",
                "create it",
            ],
        ),
        (
            "missing-secret.yaml",
            reason::SECRET_NOT_FOUND,
            &[
                "Flow/orders",
                "spec.source.postgres.secretRef",
                "\"orders-postgres\" does not exist in namespace shop",
                "create it",
            ],
        ),
        (
            "secret-key-missing.yaml",
            reason::SECRET_KEY_MISSING,
            &[
                "has no key \"ca.crt\"",
                "neither key `dsn` nor `host`",
                "add `dsn`",
            ],
        ),
        (
            "unsupported-type.yaml",
            reason::DESTINATION_TYPE_UNSUPPORTED,
            &[
                "Destination/events",
                "type clickhouse is not delivered",
                "delivered types: file, kafka, bufstream, s3, http, grpc",
            ],
        ),
        (
            "primary-not-listed.yaml",
            reason::INVALID_SPEC,
            &[
                "spec.primaryDestination",
                "\"warehouse\" is not one of spec.destinations",
                "spec.replay",
            ],
        ),
    ];
    for (name, want_reason, fragments) in cases {
        let f = load(name);
        let findings = validate::flow(&f.flow, &f.inputs);
        let (got_reason, message) =
            validate::summary(&findings).unwrap_or_else(|| panic!("{name}: no findings"));
        assert_eq!(got_reason, *want_reason, "{name}: {message}");
        for fragment in *fragments {
            assert!(
                message.contains(fragment),
                "{name}: {fragment:?} not in {message:?}"
            );
        }
        // Secret values never reach a message.
        assert!(!message.contains("hunter2"));
    }
}

#[test]
fn secret_key_missing_lists_both_problems() {
    let f = load("secret-key-missing.yaml");
    let findings = validate::flow(&f.flow, &f.inputs);
    assert_eq!(findings.len(), 2, "{findings:#?}");
    assert!(
        findings
            .iter()
            .all(|x| x.reason == reason::SECRET_KEY_MISSING)
    );
}

#[test]
fn stream_deployment_matches_the_contract() {
    let children = build_fixture("stream.yaml");
    let d = deployment(&children);
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(d.metadata.name.as_deref(), Some("wallaby-orders"));
    assert_eq!(d.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy.as_ref().unwrap().type_.as_deref(),
        Some("Recreate")
    );
    let labels = d.metadata.labels.clone().unwrap();
    assert_eq!(
        labels,
        map(&[
            ("app.kubernetes.io/name", "wallaby-worker"),
            ("app.kubernetes.io/instance", "orders"),
            ("app.kubernetes.io/managed-by", "wallaby-operator"),
            ("wallaby.dev/flow", "orders"),
        ])
    );
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (
            owner.kind.as_str(),
            owner.name.as_str(),
            owner.uid.as_str(),
            owner.controller
        ),
        (
            "Flow",
            "orders",
            "6f1c2b0e-0000-4000-8000-000000000001",
            Some(true)
        )
    );
    assert_eq!(owner.api_version, "wallaby.dev/v1alpha1");
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert_eq!(c.name, "worker");
    assert_eq!(
        c.image.as_deref(),
        Some("ghcr.io/wallaby-dev/wallaby-worker:test")
    );
    assert_eq!(
        c.command.as_deref(),
        Some(&["wallaby-worker".to_string()][..])
    );
    assert_eq!(
        c.args.clone().unwrap(),
        [
            "run",
            "--flow",
            "shop/orders",
            "--metrics-addr",
            "0.0.0.0:9187",
            "--spill-dir",
            "/var/lib/wallaby/spill"
        ]
    );
    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert_eq!(
        env,
        [
            "WALLABY_LOG",
            "POD_NAME",
            "POD_NAMESPACE",
            // The operator-wide DDL default, before the Flow's own env (which wins).
            "WALLABY_DDL_GATE",
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        ]
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("wallaby-orders"));
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(
        annotations.get("wallaby.dev/config-hash"),
        Some(&children.config_hash)
    );
    assert_eq!(annotations.get("team").map(String::as_str), Some("data"));
    assert_eq!(children.config_hash.len(), 64);
    // Selector labels are a subset of the pod labels.
    let selector = spec.selector.match_labels.clone().unwrap();
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    assert_snapshot("stream-deployment.yaml", &yaml(d, &children.config_hash));
}

#[test]
fn worker_rbac_is_least_privilege() {
    let children = build_fixture("stream.yaml");
    let rbac = children.rbac.as_ref().unwrap();
    let rules = rbac.role.rules.clone().unwrap();
    let find = |resource: &str| {
        rules
            .iter()
            .find(|r| r.resources.iter().flatten().any(|x| x == resource))
            .unwrap_or_else(|| panic!("no rule for {resource}"))
    };
    assert_eq!(find("flows").resource_names.clone().unwrap(), ["orders"]);
    assert_eq!(find("flows/status").verbs, ["get", "patch"]);
    assert_eq!(
        find("destinations").resource_names.clone().unwrap(),
        ["files"]
    );
    assert_eq!(
        find("secrets").resource_names.clone().unwrap(),
        ["orders-postgres"]
    );
    assert_eq!(find("secrets").verbs, ["get", "list", "watch"]);
    assert_eq!(
        find("ddlapprovals").verbs,
        ["create", "get", "list", "watch", "patch"]
    );
    assert_eq!(find("ddlapprovals/status").verbs, ["get", "patch"]);
    assert!(
        rules
            .iter()
            .all(|r| !r.verbs.iter().any(|v| v == "*" || v == "delete"))
    );
    let subject = &rbac.role_binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", "wallaby-orders")
    );
    assert_eq!(rbac.role_binding.role_ref.name, "wallaby-orders");
    for meta in [
        &rbac.service_account.metadata,
        &rbac.role.metadata,
        &rbac.role_binding.metadata,
    ] {
        assert_eq!(meta.owner_references.as_ref().unwrap()[0].name, "orders");
    }
    assert_snapshot("stream-role.yaml", &yaml(&rbac.role, &children.config_hash));
}

#[test]
fn backfill_is_a_job_running_the_backfill_command() {
    let children = build_fixture("backfill.yaml");
    let Workload::Job(job) = &children.workload else {
        panic!("expected a Job");
    };
    let spec = job.spec.as_ref().unwrap();
    assert_eq!(spec.suspend, Some(false));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("OnFailure"));
    let args = pod.containers[0].args.clone().unwrap();
    assert_eq!(args.first().map(String::as_str), Some("backfill"));
    assert!(!args.contains(&"--drain".to_string()));
    assert!(args.contains(&"shop/orders-backfill".to_string()));
    // No Secret referenced: the Role grants no Secret at all (not every Secret).
    let rules = children.rbac.unwrap().role.rules.unwrap();
    assert!(
        !rules
            .iter()
            .any(|r| r.resources.iter().flatten().any(|x| x == "secrets"))
    );
    assert_snapshot("backfill-job.yaml", &yaml(job, &children.config_hash));
}

#[test]
fn scheduled_is_a_forbid_cronjob_with_the_users_service_account() {
    let children = build_fixture("scheduled.yaml");
    let Workload::CronJob(cron) = &children.workload else {
        panic!("expected a CronJob");
    };
    let spec = cron.spec.as_ref().unwrap();
    assert_eq!(spec.schedule, "0 2 * * *");
    assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
    let pod = spec
        .job_template
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("cdc-reader"));
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("registry.local/wallaby-worker:dev")
    );
    assert!(
        pod.containers[0]
            .args
            .clone()
            .unwrap()
            .contains(&"--drain".to_string())
    );
    // The user's service account: the operator makes none.
    assert!(children.rbac.is_none());
    assert_snapshot("scheduled-cronjob.yaml", &yaml(cron, &children.config_hash));
}

#[test]
fn suspend_scales_to_zero_without_changing_the_config_hash() {
    let mut f = load("stream.yaml");
    let running = build::children(&f.flow, &f.inputs, &defaults(), None).unwrap();
    f.flow.spec.suspend = true;
    let suspended = build::children(&f.flow, &f.inputs, &defaults(), None).unwrap();
    assert_eq!(
        deployment(&suspended).spec.as_ref().unwrap().replicas,
        Some(0)
    );
    assert_eq!(running.config_hash, suspended.config_hash);

    let mut b = load("backfill.yaml");
    b.flow.spec.suspend = true;
    let Workload::Job(job) = build::children(&b.flow, &b.inputs, &defaults(), None)
        .unwrap()
        .workload
    else {
        panic!("expected a Job");
    };
    assert_eq!(job.spec.unwrap().suspend, Some(true));
}

#[test]
fn config_hash_follows_destinations_secrets_and_spec() {
    let f = load("stream.yaml");
    let base = build::config_hash(&f.flow.spec, &f.inputs).unwrap();
    assert_eq!(
        base,
        build::config_hash(&f.flow.spec, &f.inputs).unwrap(),
        "deterministic"
    );

    let mut changed_destination = f.inputs.clone();
    changed_destination
        .destinations
        .get_mut("files")
        .unwrap()
        .spec
        .file
        .as_mut()
        .unwrap()
        .path = "/data/other".into();
    assert_ne!(
        base,
        build::config_hash(&f.flow.spec, &changed_destination).unwrap()
    );

    let mut rotated_secret = f.inputs.clone();
    rotated_secret
        .secrets
        .get_mut("orders-postgres")
        .unwrap()
        .metadata
        .resource_version = Some("43".into());
    assert_ne!(
        base,
        build::config_hash(&f.flow.spec, &rotated_secret).unwrap()
    );

    let mut spec = f.flow.spec.clone();
    spec.source.postgres.batch_size += 1;
    assert_ne!(base, build::config_hash(&spec, &f.inputs).unwrap());

    // A Destination's status (or metadata) does not roll the worker.
    let mut status_only = f.inputs.clone();
    status_only
        .destinations
        .get_mut("files")
        .unwrap()
        .metadata
        .resource_version = Some("99".into());
    assert_eq!(
        base,
        build::config_hash(&f.flow.spec, &status_only).unwrap()
    );

    // The Deployment carries the new hash in its pod template.
    let children = build::children(&f.flow, &changed_destination, &defaults(), None).unwrap();
    let annotations = deployment(&children)
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_ne!(annotations.get("wallaby.dev/config-hash"), Some(&base));
}

#[test]
fn replay_is_passed_once_then_dropped() {
    let mut f = load("stream.yaml");
    f.flow.spec.replay = Some(ReplaySpec {
        start_lsn: "0/16B6C50".into(),
    });
    let t0 = Timestamp::from_second(1_700_000_000).unwrap();
    // Not applied yet: passed to the worker.
    let lsn = status::replay_to_pass(&f.flow);
    assert_eq!(lsn.as_deref(), Some("0/16B6C50"));
    let children = build::children(&f.flow, &f.inputs, &defaults(), lsn.as_deref()).unwrap();
    let args = deployment(&children)
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap();
    assert_eq!(&args[args.len() - 2..], ["--start-lsn", "0/16B6C50"]);

    // Rolling out: requested, not applied.
    let rolling = status::next_replay(
        &f.flow,
        lsn.as_deref(),
        &WorkloadState::Progressing("rolling".into()),
        t0,
    )
    .unwrap();
    assert_eq!(rolling.applied_time, None);
    assert!(rolling.requested_time.is_some());
    f.flow.status = Some(FlowStatus {
        replay: Some(rolling),
        ..Default::default()
    });
    assert_eq!(
        status::replay_to_pass(&f.flow).as_deref(),
        Some("0/16B6C50")
    );

    // Available with the argument: applied; from then on it is not passed again.
    let applied =
        status::next_replay(&f.flow, Some("0/16B6C50"), &WorkloadState::Available, t0).unwrap();
    assert!(applied.applied_time.is_some());
    f.flow.status = Some(FlowStatus {
        replay: Some(applied.clone()),
        ..Default::default()
    });
    assert_eq!(status::replay_to_pass(&f.flow), None);
    assert_eq!(
        status::next_replay(&f.flow, None, &WorkloadState::Available, t0),
        Some(applied)
    );

    // A new startLSN is a new replay.
    f.flow.spec.replay = Some(ReplaySpec {
        start_lsn: "0/17000000".into(),
    });
    assert_eq!(
        status::replay_to_pass(&f.flow).as_deref(),
        Some("0/17000000")
    );
    let _ = ReplayStatus::default();
}

#[test]
fn status_advances_observed_generation_only_on_success_and_skips_timestamp_only_changes() {
    let mut f = load("stream.yaml");
    let t0 = Timestamp::from_second(1_700_000_000).unwrap();
    let t1 = Timestamp::from_second(1_700_000_100).unwrap();
    let available = Outcome::Workload {
        kind: "Deployment",
        name: "wallaby-orders".into(),
        state: WorkloadState::Available,
    };
    let next = status::compute(&f.flow, &available, None, true, t0);
    assert_eq!(next.observed_generation, Some(3));
    assert_eq!(next.phase, FlowPhase::Running);
    assert_eq!(next.workload.as_ref().unwrap().kind, "Deployment");
    assert!(status::changed(f.flow.status.as_ref(), &next));

    // Stored; the worker adds its own conditions.
    let mut stored = FlowStatus {
        observed_generation: next.observed_generation,
        phase: Some(next.phase),
        conditions: next.conditions.clone(),
        workload: next.workload.clone(),
        ..Default::default()
    };
    f.flow.status = Some(stored.clone());
    let again = status::compute(&f.flow, &available, None, true, t1);
    assert!(
        !status::changed(f.flow.status.as_ref(), &again),
        "only timestamps would change"
    );

    // The worker reports Degraded: the phase follows although our conditions did not change.
    stored
        .conditions
        .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Degraded".into(),
            status: "True".into(),
            reason: "DestinationFailing".into(),
            message: "files: disk full".into(),
            observed_generation: Some(3),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t1),
        });
    f.flow.status = Some(stored);
    let degraded = status::compute(&f.flow, &available, None, true, t1);
    assert_eq!(degraded.phase, FlowPhase::Degraded);
    assert!(status::changed(f.flow.status.as_ref(), &degraded));
    // Only Ready and Progressing are sent; the worker's conditions stay its own.
    assert_eq!(degraded.conditions.len(), 2);

    // A new generation that is invalid keeps the old observedGeneration.
    f.flow.metadata.generation = Some(4);
    let invalid = Outcome::Invalid {
        reason: reason::SECRET_NOT_FOUND,
        message: "Secret missing".into(),
    };
    let failed = status::compute(&f.flow, &invalid, None, false, t1);
    assert_eq!(failed.observed_generation, Some(3));
    assert_eq!(failed.phase, FlowPhase::Failed);
    assert_eq!(failed.conditions[0].observed_generation, Some(4));
}

#[test]
fn destination_status_reports_validity_and_users() {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use wallaby_operator::destination;

    let t0 = Timestamp::from_second(1_700_000_000).unwrap();
    let stream = load("stream.yaml");
    let files = stream.inputs.destinations["files"].clone();
    let mut other = stream.flow.clone();
    other.metadata.name = Some("audit".into());
    let mut elsewhere = stream.flow.clone();
    elsewhere.metadata.namespace = Some("other-team".into());
    let flows = vec![
        Arc::new(other),
        Arc::new(stream.flow.clone()),
        Arc::new(elsewhere),
    ];
    assert_eq!(destination::used_by(&flows, &files), ["audit", "orders"]);

    let ok = destination::compute(
        &files,
        &destination::validate(&files, &BTreeMap::new()),
        vec!["orders".into()],
        t0,
    );
    assert_eq!(ok.conditions[0].status, "True");
    assert_eq!(ok.conditions[0].reason, reason::VALID);
    assert_eq!(ok.used_by, ["orders"]);

    // ClickHouse: not delivered, and its credentials Secret is missing.
    let clickhouse = load("unsupported-type.yaml").inputs.destinations["events"].clone();
    let findings = destination::validate(&clickhouse, &BTreeMap::new());
    let reasons: Vec<&str> = findings.iter().map(|f| f.reason).collect();
    assert!(
        reasons.contains(&reason::DESTINATION_TYPE_UNSUPPORTED),
        "{findings:?}"
    );
    assert!(reasons.contains(&reason::SECRET_NOT_FOUND), "{findings:?}");
    let status = destination::compute(&clickhouse, &findings, vec![], t0);
    assert_eq!(status.conditions[0].status, "False");
    assert!(
        status.conditions[0]
            .message
            .contains("clickhouse-credentials")
    );
}

#[test]
fn watches_map_changes_back_to_the_objects_that_use_them() {
    use std::sync::Arc;
    use wallaby_operator::{destination, flow};

    let stream = load("stream.yaml");
    let files = Arc::new(stream.inputs.destinations["files"].clone());
    let secret = stream.inputs.secrets["orders-postgres"].clone();
    let unrelated = load("missing-destination.yaml").flow;
    let flows = vec![Arc::new(stream.flow.clone()), Arc::new(unrelated)];

    let by_destination = flow::flows_for_destination(&flows, &files);
    let names: Vec<&str> = by_destination.iter().map(|r| r.name.as_str()).collect();
    // Both Flows are named "orders" in "shop" and list "files": both are reconciled.
    assert_eq!(names, ["orders", "orders"]);

    // The Secret: only the Flow whose source references it.
    let by_secret = flow::flows_for_secret(&flows, std::slice::from_ref(&files), &secret);
    assert_eq!(by_secret.len(), 1);

    // Through a Destination: the ClickHouse credentials reach the Flow that lists "events".
    let clickhouse = load("unsupported-type.yaml");
    let events = Arc::new(clickhouse.inputs.destinations["events"].clone());
    let credentials = clickhouse.inputs.secrets["clickhouse-credentials"].clone();
    let by_destination_secret = flow::flows_for_secret(
        &[Arc::new(clickhouse.flow.clone())],
        std::slice::from_ref(&events),
        &credentials,
    );
    assert_eq!(by_destination_secret.len(), 1);
    assert_eq!(
        destination::destinations_for_secret(std::slice::from_ref(&events), &credentials).len(),
        1
    );
    assert!(
        destination::destinations_for_secret(std::slice::from_ref(&files), &credentials).is_empty()
    );

    // A Flow that stopped listing a Destination still maps to it while usedBy names it.
    let mut stale = (*files).clone();
    stale.status = Some(wallaby_crds::destination::DestinationStatus {
        used_by: vec!["nightly".into()],
        ..Default::default()
    });
    let nightly = load("scheduled.yaml").flow;
    let mut not_listing = nightly.clone();
    not_listing.spec.destinations[0].name = "elsewhere".into();
    assert_eq!(
        destination::destinations_for_flow(&[Arc::new(stale)], &not_listing).len(),
        1
    );
    assert!(
        destination::destinations_for_flow(std::slice::from_ref(&files), &not_listing).is_empty()
    );
}
