//! End-to-end tests driven by real kubectl: the API server behaviour WALlaby relies on (CRD
//! install, schema/CEL validation, pruning, defaulting, server-side apply, finalizers, garbage
//! collection, watches, the kubelet), and the operator → worker → status loop with the real
//! PostgreSQL. They run against the emulator, or against the cluster `KUBECONFIG` points at.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Cluster, TestDb, example, parse_lsn, raw_get, wait_for, workspace_binary};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

const T: Duration = Duration::from_secs(30);

fn flow_yaml(edit: impl Fn(&mut Value)) -> String {
    example("flow.yaml", edit)
}

/// The CRDs as committed must install with plain `kubectl apply -f crds/` — kubectl reads
/// YAML 1.1, so an unquoted `off` arrives as `false`, and the API server rejects a CRD
/// whose `default` does not match its own schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_install_with_plain_kubectl_apply() {
    let c = Cluster::start("crds").await;
    let out = c
        .kubectl(&["apply", "-f", common::repo().join("crds").to_str().unwrap()])
        .await;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    c.cleanup().await;
    assert!(
        out.status.success(),
        "kubectl apply -f crds/ was rejected (quote YAML 1.1 keywords such as `off` in the generated CRDs): {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_discovery_shortnames_and_printer_columns() {
    let c = Cluster::start("discovery").await;
    c.install_crds(true).await;
    let resources = c
        .ok(&["api-resources", "--api-group=wallaby.dev", "-o", "wide"])
        .await;
    for expected in ["flows", "flw", "destinations", "ddlapprovals", "Flow"] {
        assert!(
            resources.contains(expected),
            "api-resources lacks {expected}: {resources}"
        );
    }
    c.apply_text(&example("secret.yaml", |_| {})).await;
    c.apply_text(&example("destination.yaml", |_| {})).await;
    c.apply_text(&flow_yaml(|_| {})).await;
    // The worker's status write (status subresource), then the printer columns show it.
    c.ok(&[
        "patch",
        "flow",
        "orders",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"checkpoint":{"lsn":"0/16B3748"}}}"#,
    ])
    .await;
    let table = c.ok(&["get", "flw"]).await;
    assert!(
        table.contains("CHECKPOINT") && table.contains("PHASE"),
        "printer columns missing: {table}"
    );
    assert!(
        table.contains("0/16B3748"),
        "checkpoint column not rendered: {table}"
    );
    // A status write does not change the spec generation; a spec write does.
    let flow = c.get(&["flow", "orders"]).await.unwrap();
    assert_eq!(flow["metadata"]["generation"], 1);
    c.ok(&[
        "patch",
        "flow",
        "orders",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":true},"status":{"checkpoint":{"lsn":"0/0"}}}"#,
    ])
    .await;
    let flow = c.get(&["flow", "orders"]).await.unwrap();
    assert_eq!(flow["metadata"]["generation"], 2);
    assert_eq!(
        flow["status"]["checkpoint"]["lsn"], "0/16B3748",
        "the main resource must ignore status"
    );
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_validation_cel_schema_pruning_and_defaults() {
    let c = Cluster::start("validation").await;
    c.install_crds(true).await;
    // CEL rule on spec.
    let err = c
        .apply_fails(
            &flow_yaml(|f| f["spec"]["ackPolicy"] = json!("primary")),
            &[],
        )
        .await;
    assert!(
        err.contains("primaryDestination is required when ackPolicy is primary"),
        "{err}"
    );
    // OpenAPI bounds and enums.
    let err = c
        .apply_fails(&flow_yaml(|f| f["spec"]["parallelism"] = json!(0)), &[])
        .await;
    assert!(err.contains("spec.parallelism"), "{err}");
    let err = c
        .apply_fails(&flow_yaml(|f| f["spec"]["mode"] = json!("sometimes")), &[])
        .await;
    assert!(
        err.contains("Unsupported value") && err.contains("spec.mode"),
        "{err}"
    );
    let err = c
        .apply_fails(
            &flow_yaml(|f| f["spec"]["source"]["postgres"]["slot"] = json!("Bad-Slot")),
            &[],
        )
        .await;
    assert!(err.contains("spec.source.postgres.slot"), "{err}");
    // Unknown fields: kubectl asks for strict validation by default…
    let err = c
        .apply_fails(&flow_yaml(|f| f["spec"]["bogus"] = json!(1)), &[])
        .await;
    assert!(err.contains("unknown field \"spec.bogus\""), "{err}");
    // …and without it the server prunes them and applies schema defaults.
    let path = c.dir.path().join("lenient.json");
    std::fs::write(&path, flow_yaml(|f| f["spec"]["bogus"] = json!(1))).unwrap();
    c.ok(&["apply", "--validate=false", "-f", path.to_str().unwrap()])
        .await;
    let flow = c.get(&["flow", "orders"]).await.expect("flow created");
    assert!(
        flow["spec"].get("bogus").is_none(),
        "unknown field kept: {}",
        flow["spec"]
    );
    assert_eq!(flow["spec"]["parallelism"], 1);
    assert_eq!(flow["spec"]["mode"], "stream");
    assert_eq!(flow["spec"]["source"]["postgres"]["syncPublication"], "off");
    // Transition rule (self == oldSelf): the slot is immutable.
    let err = c
        .apply_fails(
            &flow_yaml(|f| f["spec"]["source"]["postgres"]["slot"] = json!("other_slot")),
            &[],
        )
        .await;
    assert!(err.contains("immutable"), "{err}");
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_ownership_and_conflicts() {
    let c = Cluster::start("ssa").await;
    let cm = |data: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: owned\ndata: {data}\n")
    };
    let out = c
        .server_apply(&cm("{x: '1', y: '2'}"), "alpha", false)
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.server_apply(&cm("{z: '3'}"), "beta", false).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // alpha stops applying y: it is removed; beta's z stays.
    let out = c.server_apply(&cm("{x: '1'}"), "alpha", false).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = c.get(&["configmap", "owned"]).await.unwrap();
    assert_eq!(got["data"], json!({"x": "1", "z": "3"}));
    // beta changing alpha's field conflicts without --force-conflicts.
    let out = c.server_apply(&cm("{x: '9', z: '3'}"), "beta", false).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("conflict"),
        "expected a conflict: {err}"
    );
    let out = c.server_apply(&cm("{x: '9', z: '3'}"), "beta", true).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        c.get(&["configmap", "owned"]).await.unwrap()["data"]["x"],
        "9"
    );
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizers_and_owner_garbage_collection() {
    let c = Cluster::start("gc").await;
    c.apply_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: owner\n  finalizers: [example.com/hold]\ndata: {a: b}\n").await;
    let uid = c.get(&["configmap", "owner"]).await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    c.apply_text(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: dependent\n  ownerReferences:\n  - {{apiVersion: v1, kind: ConfigMap, name: owner, uid: {uid}}}\nstringData: {{k: v}}\n"
    ))
    .await;
    assert_eq!(
        c.get(&["secret", "dependent"]).await.unwrap()["data"]["k"],
        "dg==",
        "stringData becomes base64 data"
    );
    c.ok(&["delete", "configmap", "owner", "--wait=false"])
        .await;
    let owner = c
        .get(&["configmap", "owner"])
        .await
        .expect("held by its finalizer");
    assert!(owner["metadata"]["deletionTimestamp"].is_string());
    assert!(
        c.get(&["secret", "dependent"]).await.is_some(),
        "dependent deleted before its owner"
    );
    c.ok(&[
        "patch",
        "configmap",
        "owner",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])
    .await;
    wait_for("the owner to go", T, async || {
        c.get(&["configmap", "owner"]).await.is_none().then_some(())
    })
    .await;
    wait_for("the dependent to be collected", T, async || {
        c.get(&["secret", "dependent"])
            .await
            .is_none()
            .then_some(())
    })
    .await;
    // `kubectl delete` waits through a watch with a metadata.name field selector.
    c.apply_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: plain\n")
        .await;
    c.ok(&["delete", "configmap", "plain", "--timeout=30s"])
        .await;
    assert!(c.get(&["configmap", "plain"]).await.is_none());
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_terminates_after_its_content() {
    let c = Cluster::start("terminating").await;
    let ns = c.ns.as_str();
    c.apply_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  finalizers: [example.com/hold]\n").await;
    c.apply_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: free\n")
        .await;
    let out = c
        .kubectl(&["delete", "namespace", ns, "--wait=false"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the free ConfigMap to go", T, async || {
        c.get(&["configmap", "free"]).await.is_none().then_some(())
    })
    .await;
    let phase = c
        .kubectl(&["get", "namespace", ns, "-o", "jsonpath={.status.phase}"])
        .await;
    assert_eq!(String::from_utf8_lossy(&phase.stdout), "Terminating");
    let err = c
        .apply_fails(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: late\n",
            &[],
        )
        .await;
    assert!(err.contains("being terminated"), "{err}");
    c.ok(&[
        "patch",
        "configmap",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])
    .await;
    wait_for(
        "the namespace to go",
        Duration::from_secs(120),
        async || {
            let out = c.kubectl(&["get", "namespace", ns]).await;
            (!out.status.success()).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watch_sees_changes() {
    let c = Cluster::start("watch").await;
    let mut child = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .arg("--cache-dir")
        .arg(c.dir.path().join("kube-cache"))
        .args([
            "-n",
            &c.ns,
            "get",
            "configmaps",
            "--watch",
            "--output-watch-events",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl get -w");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    c.apply_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: watched\ndata: {a: '1'}\n")
        .await;
    c.ok(&[
        "patch",
        "configmap",
        "watched",
        "--type=merge",
        "-p",
        r#"{"data":{"a":"2"}}"#,
    ])
    .await;
    c.ok(&["delete", "configmap", "watched"]).await;
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + T;
    let is_watched = |l: &String| l.split_whitespace().nth(1) == Some("watched");
    while !seen
        .iter()
        .any(|l| l.starts_with("DELETED") && is_watched(l))
    {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .expect("watch events in time")
            .unwrap()
            .expect("watch output");
        seen.push(line);
    }
    let kinds: Vec<&str> = seen
        .iter()
        .filter(|l| is_watched(l))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(kinds, vec!["ADDED", "MODIFIED", "DELETED"], "{seen:?}");
    c.cleanup().await;
}

/// Watch resumption, bookmarks and 410 Gone (emulator only: compaction is not controllable
/// on a real cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_bookmarks_and_gone() {
    let c = Cluster::start("gone").await;
    let Some(emulator) = &c.emulator else { return };
    c.apply_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n")
        .await;
    let rv = c.get(&["configmap", "a"]).await.unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    c.ok(&[
        "patch",
        "configmap",
        "a",
        "--type=merge",
        "-p",
        r#"{"data":{"k":"v"}}"#,
    ])
    .await;
    let base = format!(
        "/api/v1/namespaces/{}/configmaps?watch=true&allowWatchBookmarks=true&resourceVersion={rv}",
        c.ns
    );
    let body = raw_get(emulator.addr(), &base, "BOOKMARK", T).await;
    assert!(
        body.contains("\"MODIFIED\"") && body.contains("BOOKMARK"),
        "{body}"
    );
    emulator.compact();
    let body = raw_get(emulator.addr(), &base, "\"code\":410", T).await;
    assert!(
        body.contains("\"ERROR\"") && body.contains("\"code\":410"),
        "{body}"
    );
    c.cleanup().await;
}

/// Processes the kubelet starts act as their ServiceAccount; RBAC decides what they may do
/// (emulator only: the token format is the emulator's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_limits_service_accounts() {
    let c = Cluster::start("rbac").await;
    let Some(emulator) = &c.emulator else { return };
    let token = kube_emulator::rbac::token_for(&c.ns, "reader");
    c.apply_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: mine\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: other\n").await;
    let get = |name: &str| format!("/api/v1/namespaces/{}/configmaps/{name}", c.ns);
    let body = common::raw_request(
        emulator.addr(),
        "GET",
        &get("mine"),
        Some(&token),
        "\"code\":403",
        T,
    )
    .await;
    assert!(
        body.starts_with("HTTP/1.1 403")
            && body.contains("cannot get resource")
            && body.contains("system:serviceaccount:"),
        "{body}"
    );
    c.apply_text(&format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: reader\nrules:\n- {{apiGroups: [''], resources: [configmaps], verbs: [get], resourceNames: [mine]}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: reader\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}}\nsubjects:\n- {{kind: ServiceAccount, name: reader, namespace: {}}}\n",
        c.ns
    ))
    .await;
    let body = common::raw_request(
        emulator.addr(),
        "GET",
        &get("mine"),
        Some(&token),
        "\"mine\"",
        T,
    )
    .await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let body = common::raw_request(
        emulator.addr(),
        "GET",
        &get("other"),
        Some(&token),
        "\"code\":403",
        T,
    )
    .await;
    assert!(
        body.starts_with("HTTP/1.1 403"),
        "resourceNames not enforced: {body}"
    );
    let body = common::raw_request(
        emulator.addr(),
        "DELETE",
        &get("mine"),
        Some(&token),
        "\"code\":403",
        T,
    )
    .await;
    assert!(
        body.starts_with("HTTP/1.1 403"),
        "verbs not enforced: {body}"
    );
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immutable_fields_are_rejected() {
    let c = Cluster::start("immutable").await;
    let job = |cmd: &str| {
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: once\nspec:\n  suspend: true\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: main\n        image: busybox\n        command: [sh, -c, '{cmd}']\n"
        )
    };
    c.apply_text(&job("exit 0")).await;
    let err = c.apply_fails(&job("exit 1"), &[]).await;
    assert!(
        err.contains("field is immutable") && err.contains("spec.template"),
        "{err}"
    );
    let deploy = |app: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  replicas: 0\n  selector: {{matchLabels: {{app: {app}}}}}\n  template:\n    metadata: {{labels: {{app: {app}}}}}\n    spec:\n      containers: [{{name: main, image: busybox, command: [sleep, '1']}}]\n"
        )
    };
    c.apply_text(&deploy("one")).await;
    let err = c.apply_fails(&deploy("two"), &[]).await;
    assert!(
        err.contains("field is immutable") && err.contains("spec.selector"),
        "{err}"
    );
    c.cleanup().await;
}

fn sleeper(greeting: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: sleeper
spec:
  replicas: 1
  strategy: {{type: Recreate}}
  selector: {{matchLabels: {{app: sleeper}}}}
  template:
    metadata: {{labels: {{app: sleeper}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: main
        image: busybox
        command: [sh, -c, 'echo "started $POD_NAME $(GREETING) $SECRET_VALUE pid=$$"; exec sleep 600']
        env:
        - {{name: GREETING, value: {greeting}}}
        - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
        - {{name: SECRET_VALUE, valueFrom: {{secretKeyRef: {{name: sleeper, key: token}}}}}}
      - name: sidecar
        image: busybox
        command: [sleep, '600']
"#
    )
}

fn started_pids(logs: &str) -> Vec<u32> {
    logs.lines()
        .filter_map(|l| l.split("pid=").nth(1))
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

/// The kubelet runs pod templates as processes: env from Secrets and the downward API,
/// Recreate on template change (client-side apply keeps both containers by name), scale to
/// zero, deletion. Emulator only (a real cluster has a real kubelet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_runs_deployments_with_recreate() {
    let c = Cluster::start("kubelet").await;
    if !c.is_emulator() {
        return;
    }
    let c = c.with_kubelet(std::path::Path::new("/bin/false"));
    let kubelet = c.kubelet.as_ref().unwrap();
    c.apply_text(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: sleeper\nstringData: {token: s3cret}\n",
    )
    .await;
    c.apply_text(&sleeper("hello")).await;
    wait_for("the Deployment to be ready", T, async || {
        let d = c.get(&["deployment", "sleeper"]).await?;
        (d["status"]["readyReplicas"] == 1 && d["status"]["availableReplicas"] == 1).then_some(())
    })
    .await;
    let logs = wait_for("the first container output", T, async || {
        let logs = kubelet.logs().await;
        logs.contains("started sleeper-").then_some(logs)
    })
    .await;
    assert!(logs.contains("hello s3cret"), "env not resolved: {logs}");
    let first = started_pids(&logs);
    assert_eq!(first.len(), 1, "{logs}");
    let pods = c.get(&["pods", "-l", "app=sleeper"]).await.unwrap();
    assert_eq!(pods["items"].as_array().unwrap().len(), 1, "{pods}");
    // Client-side apply of a changed template: strategic merge keeps both containers.
    c.apply_text(&sleeper("bye")).await;
    let d = c.get(&["deployment", "sleeper"]).await.unwrap();
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "containers merged by name: {d}"
    );
    let logs = wait_for("the recreated container", T, async || {
        let logs = kubelet.logs().await;
        logs.contains("bye s3cret").then_some(logs)
    })
    .await;
    assert!(
        !std::path::Path::new(&format!("/proc/{}", first[0])).exists(),
        "the old process survived the template change: {logs}"
    );
    assert_eq!(kubelet.running().await, 1);
    c.ok(&["scale", "deployment/sleeper", "--replicas=0"]).await;
    wait_for("scale to zero", T, async || {
        (kubelet.running().await == 0).then_some(())
    })
    .await;
    wait_for("status without ready replicas", T, async || {
        let d = c.get(&["deployment", "sleeper"]).await?;
        d["status"].get("readyReplicas").is_none().then_some(())
    })
    .await;
    c.ok(&[
        "patch",
        "deployment",
        "sleeper",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":1}}"#,
    ])
    .await;
    wait_for("scale back up", T, async || {
        (kubelet.running().await == 1).then_some(())
    })
    .await;
    c.ok(&["delete", "deployment", "sleeper"]).await;
    wait_for("deletion to stop the process", T, async || {
        (kubelet.running().await == 0).then_some(())
    })
    .await;
    wait_for("pods collected", T, async || {
        let pods = c.get(&["pods"]).await?;
        pods["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    })
    .await;
    c.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_runs_jobs_and_cronjobs() {
    let c = Cluster::start("jobs").await;
    if !c.is_emulator() {
        return;
    }
    let c = c.with_kubelet(std::path::Path::new("/bin/false"));
    let job = |name: &str, code: u8| {
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\nspec:\n  backoffLimit: 1\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: main\n        image: busybox\n        command: [sh, -c, 'exit {code}']\n"
        )
    };
    c.apply_text(&job("passes", 0)).await;
    c.apply_text(&job("fails", 3)).await;
    c.ok(&[
        "wait",
        "--for=condition=complete",
        "job/passes",
        "--timeout=30s",
    ])
    .await;
    c.ok(&[
        "wait",
        "--for=condition=failed",
        "job/fails",
        "--timeout=60s",
    ])
    .await;
    let failed = c.get(&["job", "fails"]).await.unwrap();
    assert_eq!(
        failed["status"]["failed"], 2,
        "backoffLimit 1 means two attempts: {}",
        failed["status"]
    );
    c.apply_text("apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: tick\nspec:\n  schedule: '0 0 1 1 *'\n  concurrencyPolicy: Forbid\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n          - {name: main, image: busybox, command: [sh, -c, 'exit 0']}\n").await;
    c.kubelet
        .as_ref()
        .unwrap()
        .trigger_cronjob(&c.ns, "tick")
        .await;
    let name = wait_for("a Job from the CronJob", T, async || {
        let jobs = c.get(&["jobs"]).await?;
        jobs["items"].as_array()?.iter().find_map(|j| {
            j["metadata"]["name"]
                .as_str()
                .filter(|n| n.starts_with("tick-"))
                .map(str::to_owned)
        })
    })
    .await;
    c.ok(&[
        "wait",
        "--for=condition=complete",
        &format!("job/{name}"),
        "--timeout=30s",
    ])
    .await;
    wait_for("lastSuccessfulTime on the CronJob", T, async || {
        c.get(&["cronjob", "tick"]).await?["status"]["lastSuccessfulTime"]
            .as_str()
            .map(|_| ())
    })
    .await;
    c.ok(&["delete", "cronjob", "tick"]).await;
    wait_for("the CronJob's Job collected", T, async || {
        c.get(&["job", &name]).await.is_none().then_some(())
    })
    .await;
    c.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// The operator → worker → status loop (needs the operator and the in-cluster worker).

struct Operator {
    /// Killed on drop.
    _child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl Operator {
    fn start(c: &Cluster) -> Option<Self> {
        // Against a real cluster the operator is expected to be deployed already (chart).
        if !c.is_emulator() {
            return None;
        }
        let log = c.dir.path().join("operator.log");
        let child = tokio::process::Command::new(workspace_binary("wallaby-operator"))
            .arg("run")
            .env("KUBECONFIG", &c.kubeconfig)
            // Leader election contests a Lease in the test namespace; tests run side by side,
            // so health/metrics listen on any free port.
            .env("POD_NAMESPACE", &c.ns)
            .env("POD_NAME", "wallaby-operator-e2e")
            .env("WALLABY_OPERATOR_HTTP_ADDR", "127.0.0.1:0")
            .env("WALLABY_LOG", "info,wallaby_operator=debug")
            .env("RUST_LOG", "info,wallaby_operator=debug")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(c.dir.path().join("operator.err")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("start wallaby-operator");
        Some(Self { _child: child, log })
    }

    fn logs(&self) -> String {
        let err = self.log.with_file_name("operator.err");
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default()
        )
    }
}

async fn files_contain(dir: &std::path::Path, needle: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if Box::pin(files_contain(&p, needle)).await {
                return true;
            }
        } else if std::fs::read_to_string(&p).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
    }
    false
}

/// Waits (60 s at most) for `needle` in the destination's files.
async fn delivered(out: &std::path::Path, needle: &str) -> bool {
    tokio::time::timeout(Duration::from_secs(60), async {
        while !files_contain(out, needle).await {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .is_ok()
}

/// Waits for the worker to hold `slot`: rows count from then on.
async fn slot_held(db: &TestDb, slot: &str, timeout: Duration) {
    wait_for("the worker to hold its slot", timeout, async || {
        db.slot(slot)
            .await
            .filter(|(_, active)| *active)
            .map(|_| ())
    })
    .await;
}

async fn checkpoint(c: &Cluster) -> Option<u64> {
    let out = c
        .ok(&[
            "get",
            "flows",
            "orders",
            "--no-headers",
            "-o",
            "custom-columns=CHECKPOINT:.status.checkpoint.lsn",
        ])
        .await;
    let lsn = out.trim();
    (lsn.contains('/')).then(|| parse_lsn(lsn))
}

async fn flow_lifecycle(cleanup_policy: &str) {
    let worker = workspace_binary("wallaby-worker");
    let c = Cluster::start(&format!("flow-{cleanup_policy}"))
        .await
        .with_kubelet(&worker);
    c.install_crds(true).await;
    let operator = Operator::start(&c);
    let db = TestDb::create("k8s").await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE public.orders (id int PRIMARY KEY, note text)")
        .await
        .unwrap();
    let slot = db.name.clone();
    let out = c.dir.path().join("out");
    c.apply_text(&example("secret.yaml", |s| {
        s["stringData"]["dsn"] = json!(db.dsn)
    }))
    .await;
    c.apply_text(&example("destination.yaml", |d| {
        if c.is_emulator() {
            d["spec"]["file"]["path"] = json!(out.display().to_string());
        }
    }))
    .await;
    c.apply_text(&flow_yaml(|f| {
        f["spec"]["source"]["postgres"]["slot"] = json!(slot);
        f["spec"]["source"]["postgres"]["publication"] = json!(slot);
        f["spec"]["cleanupPolicy"] = json!(cleanup_policy);
    }))
    .await;
    let diagnostics = async || {
        format!(
            "operator:\n{}\npods:\n{}",
            operator.as_ref().map(Operator::logs).unwrap_or_default(),
            c.pod_logs().await
        )
    };

    let deployment = wait_for(
        "the worker Deployment to be ready",
        Duration::from_secs(90),
        async || {
            let d = c.get(&["deployment", "wallaby-orders"]).await?;
            (d["status"]["readyReplicas"] == 1).then_some(d)
        },
    )
    .await;
    assert_eq!(
        deployment["metadata"]["labels"]["wallaby.dev/flow"],
        "orders"
    );
    assert_eq!(deployment["metadata"]["ownerReferences"][0]["kind"], "Flow");
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    // The worker runs as its own ServiceAccount: on the emulator RBAC then holds it to the
    // operator's least-privilege Role.
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "wallaby-orders"
    );
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert_eq!(args[0], "run");
    assert_eq!(args[2], format!("{}/orders", c.ns));

    // Ready means "serves /healthz"; rows count from the slot's creation, so wait for the
    // worker to hold its slot before the first insert.
    slot_held(&db, &slot, Duration::from_secs(60)).await;
    client
        .execute("INSERT INTO public.orders VALUES (1, 'hello-k8s')", &[])
        .await
        .unwrap();
    if c.is_emulator() {
        let seen = delivered(&out, "hello-k8s").await;
        assert!(
            seen,
            "the row never reached the file destination\n{}",
            diagnostics().await
        );
    }
    let first = wait_for(
        "a checkpoint in `kubectl get flows`",
        Duration::from_secs(60),
        async || checkpoint(&c).await,
    )
    .await;
    client
        .execute("INSERT INTO public.orders VALUES (2, 'second')", &[])
        .await
        .unwrap();
    wait_for(
        "the checkpoint to advance",
        Duration::from_secs(60),
        async || checkpoint(&c).await.filter(|l| *l > first),
    )
    .await;

    // Suspend: the worker stops, the slot (and its WAL) stays.
    c.ok(&[
        "patch",
        "flow",
        "orders",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"suspend":true}}"#,
    ])
    .await;
    wait_for("the worker to stop", Duration::from_secs(60), async || {
        let stopped = match &c.kubelet {
            Some(k) => k.running().await == 0,
            None => c
                .get(&["deployment", "wallaby-orders"])
                .await
                .is_none_or(|d| d["status"].get("readyReplicas").is_none()),
        };
        stopped.then_some(())
    })
    .await;
    let (_, active) = wait_for("the slot to be released", T, async || {
        db.slot(&slot).await.filter(|(_, active)| !active)
    })
    .await;
    assert!(!active);

    // Resume: the worker comes back and streams again.
    c.ok(&[
        "patch",
        "flow",
        "orders",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ])
    .await;
    wait_for(
        "the worker to be ready again",
        Duration::from_secs(60),
        async || {
            let d = c.get(&["deployment", "wallaby-orders"]).await?;
            (d["status"]["readyReplicas"] == 1).then_some(())
        },
    )
    .await;
    client
        .execute("INSERT INTO public.orders VALUES (3, 'after-resume')", &[])
        .await
        .unwrap();
    if c.is_emulator() {
        let seen = delivered(&out, "after-resume").await;
        assert!(seen, "no rows after resume\n{}", diagnostics().await);
    }

    // Delete: children go; the slot follows cleanupPolicy.
    c.ok(&["delete", "flow", "orders", "--timeout=90s"]).await;
    for kind in ["deployment", "serviceaccount", "role", "rolebinding"] {
        wait_for(&format!("the {kind} to be deleted"), T, async || {
            c.get(&[kind, "wallaby-orders"])
                .await
                .is_none()
                .then_some(())
        })
        .await;
    }
    if cleanup_policy == "delete" {
        wait_for("the slot to be dropped", T, async || {
            db.slot(&slot).await.is_none().then_some(())
        })
        .await;
    } else {
        assert!(
            db.slot(&slot).await.is_some(),
            "cleanupPolicy retain dropped the slot"
        );
    }
    c.cleanup().await;
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flow_streams_suspends_resumes_and_retains_the_slot() {
    flow_lifecycle("retain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flow_deletion_drops_the_slot_with_cleanup_policy_delete() {
    flow_lifecycle("delete").await;
}

// ---------------------------------------------------------------------------------------------
// DDL governance: a captured ALTER TABLE on a gated Flow → a DDLApproval → real `kubectl patch`.

/// A superuser DSN for `db`: the worker installs the DDL capture event triggers itself,
/// which PostgreSQL 15 allows only to superusers.
fn superuser_dsn_for(db: &TestDb) -> String {
    let base = common::superuser_dsn();
    format!("{}/{}", base.rsplit_once('/').unwrap().0, db.name)
}

async fn approvals(c: &Cluster) -> Vec<Value> {
    c.get(&["ddlapprovals", "-l", "wallaby.dev/flow=orders"])
        .await
        .and_then(|l| l["items"].as_array().cloned())
        .unwrap_or_default()
}

/// `kubectl patch ddlapproval <name> --type merge -p '{"spec":{"decision":…}}'`.
async fn decide(c: &Cluster, name: &str, decision: &str) {
    let patch = format!(r#"{{"spec":{{"decision":"{decision}"}}}}"#);
    c.ok(&[
        "patch",
        "ddlapproval",
        name,
        "--type",
        "merge",
        "-p",
        &patch,
    ])
    .await;
}

fn flow_condition(flow: &Value, kind: &str) -> Value {
    flow["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind).cloned())
        .unwrap_or(Value::Null)
}

/// Starts the operator and a Flow with DDL capture (and `ddl` as given) over a fresh
/// database; returns once the worker holds its slot.
async fn ddl_flow(
    name: &str,
    ddl: Value,
) -> (Cluster, Option<Operator>, TestDb, std::path::PathBuf) {
    let worker = workspace_binary("wallaby-worker");
    let c = Cluster::start(name).await.with_kubelet(&worker);
    c.install_crds(true).await;
    let operator = Operator::start(&c);
    let db = TestDb::create("k8sddl").await;
    db.client()
        .await
        .batch_execute("CREATE TABLE public.orders (id int PRIMARY KEY, note text)")
        .await
        .unwrap();
    let slot = db.name.clone();
    let out = c.dir.path().join("out");
    let dsn = superuser_dsn_for(&db);
    c.apply_text(&example("secret.yaml", |s| {
        s["stringData"]["dsn"] = json!(dsn)
    }))
    .await;
    c.apply_text(&example("destination.yaml", |d| {
        d["spec"]["file"]["path"] = json!(out.display().to_string());
    }))
    .await;
    c.apply_text(&flow_yaml(|f| {
        f["spec"]["source"]["postgres"]["slot"] = json!(slot);
        f["spec"]["source"]["postgres"]["publication"] = json!(slot);
        f["spec"]["source"]["postgres"]["captureDDL"] = json!(true);
        f["spec"]["ddl"] = ddl.clone();
    }))
    .await;
    slot_held(&db, &slot, Duration::from_secs(90)).await;
    (c, operator, db, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gated_ddl_waits_for_kubectl_patch_then_resumes_or_stops_on_rejection() {
    let (c, operator, db, out) =
        ddl_flow("ddl-gate", json!({"gate": true, "autoApprove": false})).await;
    if !c.is_emulator() {
        // The file destination is inside the pod on a real cluster; the approval flow is the
        // same, but delivery cannot be read from here.
        c.cleanup().await;
        return;
    }
    let sql = db.client().await;
    let diagnostics = async || {
        format!(
            "operator:\n{}\npods:\n{}",
            operator.as_ref().map(Operator::logs).unwrap_or_default(),
            c.pod_logs().await
        )
    };
    sql.batch_execute("INSERT INTO public.orders VALUES (1, 'before')")
        .await
        .unwrap();
    sql.batch_execute("ALTER TABLE public.orders ADD COLUMN email text")
        .await
        .unwrap();
    sql.batch_execute("INSERT INTO public.orders VALUES (2, 'after', 'ann@example.com')")
        .await
        .unwrap();

    // The worker stops before the statement and asks.
    let approval = wait_for("a DDLApproval", Duration::from_secs(60), async || {
        approvals(&c).await.into_iter().next()
    })
    .await;
    let name = approval["metadata"]["name"].as_str().unwrap().to_owned();
    assert_eq!(approval["spec"]["flow"], "orders");
    assert_eq!(approval["spec"]["decision"], "Pending");
    assert_eq!(approval["spec"]["tables"], json!(["public.orders"]));
    assert!(
        approval["spec"]["statement"]
            .as_str()
            .unwrap()
            .contains("ADD COLUMN email"),
        "{approval}"
    );
    assert_eq!(approval["spec"]["plan"][0]["name"], "orders-files");
    assert!(
        approval["spec"]["plan"][0]["actions"][0]
            .as_str()
            .unwrap()
            .contains("+email text"),
        "{approval}"
    );
    assert_eq!(approval["metadata"]["ownerReferences"][0]["kind"], "Flow");
    let gated = wait_for("DDLGated=True on the Flow", T, async || {
        let flow = c.get(&["flow", "orders"]).await?;
        (flow_condition(&flow, "DDLGated")["status"] == "True").then_some(flow)
    })
    .await;
    assert!(
        flow_condition(&gated, "DDLGated")["message"]
            .as_str()
            .unwrap()
            .contains(&name),
        "{gated}"
    );
    wait_for("a DDLGated Event", T, async || {
        let events = c.ok(&["get", "events.events.k8s.io", "-o", "json"]).await;
        events.contains("DDLGated").then_some(())
    })
    .await;
    let approval_lsn = parse_lsn(approval["spec"]["lsn"].as_str().unwrap());
    assert!(
        files_contain(&out, "before").await,
        "{}",
        diagnostics().await
    );
    assert!(!files_contain(&out, "ann@example.com").await);
    let (confirmed, _) = db.slot(&db.name).await.unwrap();
    assert!(parse_lsn(&confirmed.unwrap()) <= approval_lsn);

    // A human approves with kubectl: the flow resumes and the new column arrives.
    decide(&c, &name, "Approved").await;
    let arrived = delivered(&out, "ann@example.com").await;
    assert!(arrived, "no row after approval\n{}", diagnostics().await);
    let applied = wait_for("the approval to be Applied", T, async || {
        let a = c.get(&["ddlapproval", &name]).await?;
        (a["status"]["state"] == "Applied").then_some(a)
    })
    .await;
    assert_eq!(applied["status"]["destinations"][0]["state"], "Applied");
    wait_for("DDLGated=False", T, async || {
        let flow = c.get(&["flow", "orders"]).await?;
        (flow_condition(&flow, "DDLGated")["status"] == "False").then_some(())
    })
    .await;

    // The next statement is rejected: the flow stops there, the slot is held, the worker
    // stays up (no crash loop) reporting why.
    sql.batch_execute("ALTER TABLE public.orders DROP COLUMN note")
        .await
        .unwrap();
    sql.batch_execute("INSERT INTO public.orders VALUES (3, 'bob@example.com')")
        .await
        .unwrap();
    let second = wait_for(
        "a second DDLApproval",
        Duration::from_secs(60),
        async || {
            approvals(&c)
                .await
                .into_iter()
                .find(|a| a["metadata"]["name"] != name.as_str())
        },
    )
    .await;
    let second_name = second["metadata"]["name"].as_str().unwrap().to_owned();
    decide(&c, &second_name, "Rejected").await;
    wait_for("the approval to be Rejected", T, async || {
        let a = c.get(&["ddlapproval", &second_name]).await?;
        (a["status"]["state"] == "Rejected").then_some(())
    })
    .await;
    let flow = wait_for("DDLGated=True (Rejected)", T, async || {
        let flow = c.get(&["flow", "orders"]).await?;
        (flow_condition(&flow, "DDLGated")["reason"] == "Rejected").then_some(flow)
    })
    .await;
    assert!(
        flow_condition(&flow, "DDLGated")["message"]
            .as_str()
            .unwrap()
            .contains("rejected"),
        "{flow}"
    );
    // A decision is final (the CRD's transition rule).
    let reopen = c
        .kubectl(&[
            "-n",
            &c.ns,
            "patch",
            "ddlapproval",
            &second_name,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"decision":"Approved"}}"#,
        ])
        .await;
    assert!(!reopen.status.success());
    assert!(!files_contain(&out, "bob@example.com").await);
    let (confirmed, _) = db.slot(&db.name).await.unwrap();
    assert!(parse_lsn(&confirmed.unwrap()) <= parse_lsn(second["spec"]["lsn"].as_str().unwrap()));

    // Deleting the rejected approval asks again: the parked worker recreates it Pending,
    // and an approval this time lets the row through.
    let rejected_uid = second["metadata"]["uid"].clone();
    c.ok(&["delete", "ddlapproval", &second_name]).await;
    wait_for("the approval to be asked again", T, async || {
        let a = c.get(&["ddlapproval", &second_name]).await?;
        (a["metadata"]["uid"] != rejected_uid && a["spec"]["decision"] == "Pending").then_some(())
    })
    .await;
    decide(&c, &second_name, "Approved").await;
    let arrived = delivered(&out, "bob@example.com").await;
    assert!(
        arrived,
        "no row after the second approval\n{}",
        diagnostics().await
    );
    c.cleanup().await;
    db.drop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ungated_ddl_is_applied_and_recorded_without_an_approval() {
    let (c, operator, db, out) = ddl_flow("ddl-open", json!({})).await;
    if !c.is_emulator() {
        c.cleanup().await;
        return;
    }
    let sql = db.client().await;
    sql.batch_execute("INSERT INTO public.orders VALUES (0, 'first')")
        .await
        .unwrap();
    sql.batch_execute("ALTER TABLE public.orders ADD COLUMN email text")
        .await
        .unwrap();
    sql.batch_execute("INSERT INTO public.orders VALUES (1, 'x', 'cy@example.com')")
        .await
        .unwrap();
    let arrived = delivered(&out, "cy@example.com").await;
    assert!(
        arrived,
        "no row\noperator:\n{}\npods:\n{}",
        operator.as_ref().map(Operator::logs).unwrap_or_default(),
        c.pod_logs().await
    );
    let mut last = Value::Null;
    let changed = tokio::time::timeout(T, async {
        loop {
            if let Some(flow) = c.get(&["flow", "orders"]).await {
                if flow["status"]["lastSchemaChange"]["source"] == "ddl" {
                    return flow;
                }
                last = flow;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let Ok(flow) = changed else {
        panic!(
            "no schema change in the Flow status: {last:#}\npods:\n{}",
            c.pod_logs().await
        );
    };
    assert_eq!(flow["status"]["lastSchemaChange"]["version"], 2);
    assert_eq!(flow_condition(&flow, "DDLGated")["status"], "False");
    assert!(approvals(&c).await.is_empty());
    let admin = common::connect(&superuser_dsn_for(&db)).await;
    let recorded = admin
        .query_one("SELECT state, gated FROM wallaby.ddl_events", &[])
        .await
        .unwrap();
    assert_eq!(recorded.get::<_, String>(0), "Applied");
    assert!(!recorded.get::<_, bool>(1));
    c.cleanup().await;
    db.drop_all().await;
}
