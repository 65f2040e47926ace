//! The emulator's "kubelet" (plus the Deployment/Job/CronJob controllers' part that matters):
//! runs each pod template's first container as a local process (`wallaby-worker` mapped to a
//! local binary), restarts with backoff, stops on scale-down/deletion/template change
//! (Recreate), mirrors Pods, and writes Deployment/Job/CronJob status.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use crate::server::Shared;
use crate::store::{WriteOptions, new_uid};
use crate::{Emulator, EmulatorError};

const MANAGER: &str = "kube-controller-manager";
/// The longest a stopped process gets between SIGTERM and SIGKILL (pods ask for 30s).
const MAX_GRACE: Duration = Duration::from_secs(10);
/// A process that ran this long before exiting restarts without accumulated backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(10);

/// Why the kubelet could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("creating the kubelet's pod directory: {0}")]
    Root(std::io::Error),
    #[error(transparent)]
    Emulator(#[from] EmulatorError),
}

/// Why one container could not start (reported like the kubelet's waiting reasons).
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("CreateContainerConfigError: {0}")]
    Config(String),
    #[error(
        "the container has no command: the emulator cannot run an image's entrypoint; set `command`"
    )]
    NoCommand,
    #[error("RunContainerError: starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("preparing the pod directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Pod {
    name: String,
    uid: String,
    namespace: String,
    owner_uid: String,
    owner_kind: &'static str,
    owner_name: String,
    hash: u64,
    template: Value,
    child: Option<Child>,
    started_at: Option<Instant>,
    restarts: u32,
    next_start: Instant,
    waiting: Option<String>,
    last_exit: Option<i32>,
    ready: bool,
    last_probe: Option<Instant>,
    ports: HashMap<i64, u16>,
    dir: PathBuf,
    /// Job pods: how their runs ended.
    succeeded: u32,
    failed: u32,
    finished: bool,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    worker: PathBuf,
    root: PathBuf,
    /// The emulator's URL, for the per-ServiceAccount kubeconfigs.
    url: String,
    pods: Mutex<Vec<Pod>>,
    cron_ticks: Mutex<HashMap<String, chrono::DateTime<chrono::Utc>>>,
    cron_triggers: Mutex<Vec<(String, String)>>,
}

/// A running kubelet; its processes are killed when it is dropped (or by [`Kubelet::stop`]).
#[derive(Debug)]
pub struct Kubelet {
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
    _root: tempfile::TempDir,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubelet {
    /// Starts running the emulator's Deployments, Jobs and CronJobs; containers whose command is
    /// `wallaby-worker` run `worker_binary`.
    pub fn start(
        emulator: &Emulator,
        worker_binary: impl Into<PathBuf>,
    ) -> Result<Self, KubeletError> {
        let root = tempfile::Builder::new()
            .prefix("kubelet-")
            .tempdir()
            .map_err(KubeletError::Root)?;
        let inner = Arc::new(Inner {
            shared: emulator.shared(),
            worker: worker_binary.into(),
            root: root.path().to_owned(),
            url: emulator.url(),
            pods: Mutex::new(Vec::new()),
            cron_ticks: Mutex::new(HashMap::new()),
            cron_triggers: Mutex::new(Vec::new()),
        });
        let mut events = emulator.subscribe();
        let looping = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = events.recv() => {}
                    () = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                looping.reconcile().await;
            }
        });
        Ok(Self {
            inner,
            task,
            _root: root,
        })
    }

    /// Where a pod's container output goes (`<dir>/container.log`), for test diagnostics.
    pub async fn log_paths(&self) -> Vec<PathBuf> {
        self.inner
            .pods
            .lock()
            .await
            .iter()
            .map(|p| p.dir.join("container.log"))
            .collect()
    }

    /// The container output of every pod so far (for test failure messages).
    pub async fn logs(&self) -> String {
        let mut out = String::new();
        for path in self.log_paths().await {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            out.push_str(&format!("==> {} <==\n{text}\n", path.display()));
        }
        out
    }

    /// Starts a Job from a CronJob now (what `kubectl create job --from=cronjob/…` does).
    pub async fn trigger_cronjob(&self, namespace: &str, name: &str) {
        self.inner
            .cron_triggers
            .lock()
            .await
            .push((namespace.to_owned(), name.to_owned()));
    }

    /// How many pod processes are running now.
    pub async fn running(&self) -> usize {
        self.inner
            .pods
            .lock()
            .await
            .iter()
            .filter(|p| p.child.is_some())
            .count()
    }

    /// Stops every process (SIGTERM, then SIGKILL after the grace period) and the loop.
    pub async fn stop(&self) {
        self.task.abort();
        let mut pods = self.inner.pods.lock().await;
        for pod in pods.iter_mut() {
            stop_process(pod).await;
        }
    }
}

fn hash_of(v: &Value) -> u64 {
    let mut h = DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

fn backoff(restarts: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << restarts.min(5))).min(Duration::from_secs(10))
}

async fn stop_process(pod: &mut Pod) {
    let Some(mut child) = pod.child.take() else {
        return;
    };
    let grace = pod.template["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .map(Duration::from_secs)
        .unwrap_or(MAX_GRACE)
        .min(MAX_GRACE);
    if let Some(pid) = child.id() {
        // SIGTERM first, as the kubelet does, so the worker can flush and release its slot.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
    pod.ready = false;
}

fn pod_name(owner: &str, hash: Option<u64>) -> String {
    let suffix: String = new_uid()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(5)
        .collect();
    match hash {
        Some(h) => format!("{owner}-{:010x}-{suffix}", h & 0xff_ffff_ffff),
        None => format!("{owner}-{suffix}"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn is_true_condition(obj: &Value, kind: &str) -> bool {
    obj["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == kind && c["status"] == "True")
    })
}

/// Keeps `lastTransitionTime` of conditions whose status did not change.
fn conditions(old: &Value, wanted: Vec<(&str, &str, &str, String)>) -> Value {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let list: Vec<Value> = wanted
        .into_iter()
        .map(|(ty, status, reason, message)| {
            let prev = old["conditions"].as_array().and_then(|cs| cs.iter().find(|c| c["type"] == ty));
            let time = match prev {
                Some(p) if p["status"] == status => p["lastTransitionTime"].clone(),
                _ => json!(now),
            };
            json!({"type": ty, "status": status, "reason": reason, "message": message, "lastTransitionTime": time, "lastUpdateTime": time})
        })
        .collect();
    json!(list)
}

impl Inner {
    fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let store = self.shared.lock();
        match store.find_kind(api_version, kind) {
            Some(rt) => store.list(&rt, None),
            None => Vec::new(),
        }
    }

    /// Replaces an object's status (no write when it is unchanged).
    fn write_status(&self, api_version: &str, kind: &str, obj: &Value, status: Value) {
        if obj["status"] == status {
            return;
        }
        let mut store = self.shared.lock();
        let Some(rt) = store.find_kind(api_version, kind) else {
            return;
        };
        let mut body = obj.clone();
        body["status"] = status;
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let opts = WriteOptions {
            field_manager: Some(MANAGER.to_owned()),
            ..WriteOptions::default()
        };
        if let Err(e) = store.update(&rt, ns, name, body, true, &opts) {
            tracing::debug!(error = %e, kind, name, "kubelet status write lost a race; retrying on the next pass");
        }
    }

    fn service_account_exists(&self, ns: &str, name: &str) -> bool {
        let store = self.shared.lock();
        store
            .find_kind("v1", "ServiceAccount")
            .is_some_and(|rt| store.get(&rt, ns, name).is_some())
    }

    fn secret_or_configmap(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
    ) -> Option<HashMap<String, String>> {
        use base64::Engine;
        let store = self.shared.lock();
        let rt = store.find_kind("v1", kind)?;
        let obj = store.get(&rt, ns, name)?;
        let mut out = HashMap::new();
        for (k, v) in obj["data"].as_object().into_iter().flatten() {
            let text = match kind {
                "Secret" => base64::engine::general_purpose::STANDARD
                    .decode(v.as_str().unwrap_or_default())
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default(),
                _ => v.as_str().unwrap_or_default().to_owned(),
            };
            out.insert(k.clone(), text);
        }
        Some(out)
    }

    /// Starts (or restarts) a pod's first container.
    fn start(&self, pod: &mut Pod) -> Result<(), StartError> {
        let spec = &pod.template["spec"];
        let container = &spec["containers"][0];
        let dir_err = |path: &Path, source| StartError::Dir {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&pod.dir).map_err(|e| dir_err(&pod.dir, e))?;
        // The process talks to the API as its pod's ServiceAccount (RBAC applies).
        let sa = spec["serviceAccountName"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        if !self.service_account_exists(&pod.namespace, sa) {
            return Err(StartError::Config(format!(
                "serviceaccount \"{sa}\" not found in namespace {}",
                pod.namespace
            )));
        }
        let kubeconfig = pod.dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            crate::kubeconfig_yaml(&self.url, Some(&crate::rbac::token_for(&pod.namespace, sa))),
        )
        .map_err(|e| dir_err(&kubeconfig, e))?;
        // Volumes live under the pod directory; mount paths in args/env are rewritten to them.
        let mut mounts: Vec<(String, String)> = Vec::new();
        for m in container["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().unwrap_or_default();
            let host = pod.dir.join("volumes").join(vname);
            std::fs::create_dir_all(&host).map_err(|e| dir_err(&host, e))?;
            let volume = spec["volumes"]
                .as_array()
                .and_then(|vs| vs.iter().find(|v| v["name"] == vname))
                .cloned()
                .unwrap_or(Value::Null);
            for (kind, field, name_key) in [
                ("Secret", "secret", "secretName"),
                ("ConfigMap", "configMap", "name"),
            ] {
                if let Some(src) = volume.get(field) {
                    let sname = src[name_key].as_str().unwrap_or_default();
                    let data = self
                        .secret_or_configmap(kind, &pod.namespace, sname)
                        .ok_or_else(|| {
                            StartError::Config(format!(
                                "{kind} \"{sname}\" not found (volume {vname})"
                            ))
                        })?;
                    for (k, v) in data {
                        std::fs::write(host.join(&k), v).map_err(|e| dir_err(&host, e))?;
                    }
                }
            }
            mounts.push((
                m["mountPath"].as_str().unwrap_or_default().to_owned(),
                host.display().to_string(),
            ));
        }
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let ports = &pod.ports;
        let rewrite = |s: &str| -> String {
            let mut out = s.to_owned();
            for (mount, host) in &mounts {
                if out.starts_with(mount.as_str()) {
                    out = format!("{host}{}", &out[mount.len()..]);
                }
            }
            for (cport, hport) in ports {
                for bind in ["0.0.0.0", "127.0.0.1", "[::]", "localhost"] {
                    out = out.replace(&format!("{bind}:{cport}"), &format!("127.0.0.1:{hport}"));
                }
                if out == format!(":{cport}") {
                    out = format!("127.0.0.1:{hport}");
                }
            }
            out
        };
        let mut env: Vec<(String, String)> = Vec::new();
        for src in container["envFrom"].as_array().into_iter().flatten() {
            let prefix = src["prefix"].as_str().unwrap_or_default();
            for (kind, field) in [("Secret", "secretRef"), ("ConfigMap", "configMapRef")] {
                if let Some(r) = src.get(field) {
                    let name = r["name"].as_str().unwrap_or_default();
                    match self.secret_or_configmap(kind, &pod.namespace, name) {
                        Some(data) => {
                            env.extend(data.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)))
                        }
                        None if r["optional"] == json!(true) => {}
                        None => {
                            return Err(StartError::Config(format!(
                                "{kind} \"{name}\" not found (envFrom)"
                            )));
                        }
                    }
                }
            }
        }
        for e in container["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or_default().to_owned();
            let value = if let Some(v) = e.get("value") {
                expand(v.as_str().unwrap_or_default(), &env)
            } else if let Some(from) = e.get("valueFrom") {
                match self.env_from(pod, from)? {
                    Some(v) => v,
                    None => continue,
                }
            } else {
                String::new()
            };
            env.push((name, rewrite(&value)));
        }
        let mut argv: Vec<String> = container["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(container["args"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .map(|a| rewrite(&expand(a, &env)))
            .collect();
        if container["command"].as_array().is_none_or(Vec::is_empty) {
            return Err(StartError::NoCommand);
        }
        let program = argv.remove(0);
        let program = if program == "wallaby-worker" || program.ends_with("/wallaby-worker") {
            self.worker.display().to_string()
        } else {
            program
        };
        let log_path = pod.dir.join("container.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| dir_err(&log_path, e))?;
        let log2 = log.try_clone().map_err(|e| dir_err(&log_path, e))?;
        let workdir = container["workingDir"]
            .as_str()
            .map(|w| PathBuf::from(rewrite(w)))
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| pod.dir.clone());
        let mut cmd = Command::new(&program);
        cmd.args(&argv)
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("HOME", &pod.dir)
            .env("HOSTNAME", &pod.name)
            .env("KUBECONFIG", &kubeconfig)
            .envs(env)
            .current_dir(workdir)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|source| StartError::Spawn {
            program: program.clone(),
            source,
        })?;
        pod.child = Some(child);
        pod.started_at = Some(Instant::now());
        pod.waiting = None;
        pod.last_probe = None;
        pod.ready = false;
        Ok(())
    }

    fn env_from(&self, pod: &Pod, from: &Value) -> Result<Option<String>, StartError> {
        for (kind, field) in [("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")] {
            if let Some(r) = from.get(field) {
                let name = r["name"].as_str().unwrap_or_default();
                let key = r["key"].as_str().unwrap_or_default();
                let optional = r["optional"] == json!(true);
                let value = self
                    .secret_or_configmap(kind, &pod.namespace, name)
                    .and_then(|d| d.get(key).cloned());
                return match value {
                    Some(v) => Ok(Some(v)),
                    None if optional => Ok(None),
                    None => Err(StartError::Config(format!(
                        "{kind} \"{name}\" key \"{key}\" not found in namespace {}",
                        pod.namespace
                    ))),
                };
            }
        }
        if let Some(f) = from.get("fieldRef") {
            let path = f["fieldPath"].as_str().unwrap_or_default();
            let labels = &pod.template["metadata"]["labels"];
            let annotations = &pod.template["metadata"]["annotations"];
            let v = match path {
                "metadata.name" => pod.name.clone(),
                "metadata.namespace" => pod.namespace.clone(),
                "metadata.uid" => pod.uid.clone(),
                "spec.nodeName" => "emulator-node".into(),
                "spec.serviceAccountName" => pod.template["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned(),
                "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                p => {
                    let lookup = |prefix: &str, map: &Value| {
                        p.strip_prefix(prefix)
                            .and_then(|k| k.strip_suffix("']"))
                            .and_then(|k| map[k].as_str().map(str::to_owned))
                    };
                    lookup("metadata.labels['", labels)
                        .or_else(|| lookup("metadata.annotations['", annotations))
                        .unwrap_or_default()
                }
            };
            return Ok(Some(v));
        }
        Ok(None)
    }

    /// Reaps exited processes and starts the ones whose backoff elapsed.
    fn drive(&self, pod: &mut Pod, restart: bool) {
        if let Some(child) = &mut pod.child
            && let Ok(Some(status)) = child.try_wait()
        {
            let ran = pod.started_at.map(|s| s.elapsed()).unwrap_or_default();
            pod.child = None;
            pod.ready = false;
            pod.last_exit = status.code().or(Some(137));
            if pod.owner_kind == "Job" {
                if status.success() {
                    pod.succeeded += 1;
                    pod.finished = true;
                } else {
                    pod.failed += 1;
                }
            }
            if ran >= BACKOFF_RESET {
                pod.restarts = 0;
            }
            pod.restarts += 1;
            pod.next_start = Instant::now() + backoff(pod.restarts);
            pod.waiting = Some(format!("CrashLoopBackOff: exited with {:?}", pod.last_exit));
        }
        if pod.child.is_none()
            && restart
            && !pod.finished
            && Instant::now() >= pod.next_start
            && let Err(e) = self.start(pod)
        {
            tracing::warn!(pod = %pod.name, error = %e, "kubelet could not start the container");
            pod.waiting = Some(e.to_string());
            pod.restarts += 1;
            pod.next_start = Instant::now() + backoff(pod.restarts);
        }
    }

    async fn probe(pod: &mut Pod) {
        let Some(started) = pod.started_at.filter(|_| pod.child.is_some()) else {
            pod.ready = false;
            return;
        };
        let container = &pod.template["spec"]["containers"][0];
        let probe = &container["readinessProbe"];
        if probe.is_null() {
            pod.ready = true;
            return;
        }
        let initial = Duration::from_secs(probe["initialDelaySeconds"].as_u64().unwrap_or(0));
        if started.elapsed() < initial
            || pod
                .last_probe
                .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return;
        }
        pod.last_probe = Some(Instant::now());
        let port_of = |p: &Value| -> Option<u16> {
            let cport = match p {
                Value::Number(n) => n.as_i64(),
                Value::String(name) => container["ports"]
                    .as_array()?
                    .iter()
                    .find(|x| x["name"] == *name)?["containerPort"]
                    .as_i64(),
                _ => None,
            }?;
            pod.ports.get(&cport).copied()
        };
        let ok = if let Some(http) = probe.get("httpGet") {
            match port_of(&http["port"]) {
                Some(port) => http_ok(port, http["path"].as_str().unwrap_or("/")).await,
                None => false,
            }
        } else if let Some(tcp) = probe.get("tcpSocket") {
            match port_of(&tcp["port"]) {
                Some(port) => tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok(),
                None => false,
            }
        } else {
            // exec probes are not run: the container counts as ready once started.
            true
        };
        pod.ready = ok;
    }

    fn new_pod(
        &self,
        owner: &Value,
        owner_kind: &'static str,
        template: &Value,
        hash: Option<u64>,
    ) -> Pod {
        let owner_name = owner["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = pod_name(&owner_name, hash);
        let ports = template["spec"]["containers"][0]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["containerPort"].as_i64())
            .map(|p| (p, free_port()))
            .collect();
        Pod {
            dir: self.root.join(&name),
            name,
            uid: new_uid(),
            namespace: owner["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            owner_uid: owner["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            owner_kind,
            owner_name,
            hash: hash.unwrap_or(0),
            template: template.clone(),
            child: None,
            started_at: None,
            restarts: 0,
            next_start: Instant::now(),
            waiting: None,
            last_exit: None,
            ready: false,
            last_probe: None,
            ports,
            succeeded: 0,
            failed: 0,
            finished: false,
        }
    }

    /// Mirrors a pod as a Pod object (so `kubectl get pods` shows it).
    fn mirror_pod(&self, pod: &Pod, owner_api_version: &str) {
        let phase = match (&pod.child, pod.finished, pod.last_exit) {
            (Some(_), _, _) => "Running",
            (None, true, _) => "Succeeded",
            (None, false, Some(_)) if pod.owner_kind == "Job" => "Failed",
            _ => "Pending",
        };
        let state = match (&pod.child, &pod.waiting) {
            (Some(_), _) => json!({"running": {}}),
            (None, Some(reason)) => {
                json!({"waiting": {"reason": reason.split(':').next().unwrap_or_default(), "message": reason}})
            }
            (None, None) => json!({"terminated": {"exitCode": pod.last_exit.unwrap_or(0)}}),
        };
        let mut meta = pod.template["metadata"].clone();
        if !meta.is_object() {
            meta = json!({});
        }
        meta["name"] = json!(pod.name);
        meta["namespace"] = json!(pod.namespace);
        meta["ownerReferences"] = json!([{"apiVersion": owner_api_version, "kind": pod.owner_kind, "name": pod.owner_name, "uid": pod.owner_uid, "controller": true, "blockOwnerDeletion": true}]);
        let status = json!({
            "phase": phase,
            "podIP": "127.0.0.1",
            "hostIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": if pod.ready { "True" } else { "False" }}],
            "containerStatuses": [{"name": pod.template["spec"]["containers"][0]["name"], "ready": pod.ready, "restartCount": pod.restarts.saturating_sub(1), "state": state, "image": pod.template["spec"]["containers"][0]["image"], "imageID": ""}],
        });
        let mut store = self.shared.lock();
        let Some(rt) = store.find_kind("v1", "Pod") else {
            return;
        };
        let opts = WriteOptions {
            field_manager: Some("kubelet".into()),
            ..WriteOptions::default()
        };
        match store.get(&rt, &pod.namespace, &pod.name) {
            None => {
                let obj = json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod.template["spec"]});
                if store.create(&rt, &pod.namespace, obj, &opts).is_ok()
                    && let Some(created) = store.get(&rt, &pod.namespace, &pod.name)
                {
                    let mut body = created;
                    body["status"] = status;
                    let _ = store.update(&rt, &pod.namespace, &pod.name, body, true, &opts);
                }
            }
            Some(existing) if existing["status"] != status => {
                let mut body = existing;
                body["status"] = status;
                let _ = store.update(&rt, &pod.namespace, &pod.name, body, true, &opts);
            }
            Some(_) => {}
        }
    }

    fn forget_pod(&self, pod: &Pod) {
        let mut store = self.shared.lock();
        if let Some(rt) = store.find_kind("v1", "Pod") {
            let _ = store.delete(&rt, &pod.namespace, &pod.name, false);
        }
    }

    async fn reconcile(&self) {
        let mut pods = self.pods.lock().await;
        let deployments = self.list("apps/v1", "Deployment");
        let jobs = self.list("batch/v1", "Job");
        // Pods whose owner is gone are stopped (what garbage collection + the kubelet do).
        let live: Vec<&str> = deployments
            .iter()
            .chain(&jobs)
            .filter_map(|o| o["metadata"]["uid"].as_str())
            .collect();
        let mut i = 0;
        while i < pods.len() {
            if live.contains(&pods[i].owner_uid.as_str()) {
                i += 1;
            } else {
                let mut pod = pods.remove(i);
                stop_process(&mut pod).await;
                self.forget_pod(&pod);
            }
        }
        for d in &deployments {
            self.reconcile_deployment(d, &mut pods).await;
        }
        for j in &jobs {
            self.reconcile_job(j, &mut pods).await;
        }
        drop(pods);
        self.reconcile_cronjobs(&jobs).await;
    }

    async fn reconcile_deployment(&self, d: &Value, pods: &mut Vec<Pod>) {
        let uid = d["metadata"]["uid"].as_str().unwrap_or_default();
        let deleting = d["metadata"].get("deletionTimestamp").is_some();
        let desired = if deleting {
            0
        } else {
            d["spec"]["replicas"].as_u64().unwrap_or(1) as usize
        };
        let template = &d["spec"]["template"];
        let hash = hash_of(template);
        // Recreate: every pod of an older template stops before a new one starts.
        let mut i = 0;
        let mut count = pods
            .iter()
            .filter(|p| p.owner_uid == uid && p.hash == hash)
            .count();
        while i < pods.len() {
            let stale = pods[i].owner_uid == uid && (pods[i].hash != hash || count > desired);
            if stale {
                if pods[i].hash == hash {
                    count -= 1;
                }
                let mut pod = pods.remove(i);
                stop_process(&mut pod).await;
                self.forget_pod(&pod);
            } else {
                i += 1;
            }
        }
        for _ in count..desired {
            pods.push(self.new_pod(d, "Deployment", template, Some(hash)));
        }
        let (mut replicas, mut ready) = (0u64, 0u64);
        for pod in pods.iter_mut().filter(|p| p.owner_uid == uid) {
            self.drive(pod, true);
            Self::probe(pod).await;
            self.mirror_pod(pod, "apps/v1");
            replicas += 1;
            if pod.ready {
                ready += 1;
            }
        }
        let old = &d["status"];
        let available = ready >= desired as u64;
        let mut status = json!({
            "observedGeneration": d["metadata"]["generation"],
            "conditions": conditions(old, vec![
                ("Available", if available { "True" } else { "False" }, if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" }, format!("Deployment has {ready}/{desired} ready replicas.")),
                ("Progressing", "True", if available { "NewReplicaSetAvailable" } else { "ReplicaSetUpdated" }, format!("ReplicaSet \"{}-{:010x}\" is progressing.", d["metadata"]["name"].as_str().unwrap_or_default(), hash & 0xff_ffff_ffff)),
            ]),
        });
        for (k, v) in [
            ("replicas", replicas),
            ("updatedReplicas", replicas),
            ("readyReplicas", ready),
            ("availableReplicas", ready),
            ("unavailableReplicas", replicas.saturating_sub(ready)),
        ] {
            if v > 0 {
                status[k] = json!(v);
            }
        }
        self.write_status("apps/v1", "Deployment", d, status);
    }

    async fn reconcile_job(&self, j: &Value, pods: &mut Vec<Pod>) {
        let uid = j["metadata"]["uid"].as_str().unwrap_or_default();
        let done = is_true_condition(j, "Complete") || is_true_condition(j, "Failed");
        let suspended = j["spec"]["suspend"] == json!(true);
        let template = &j["spec"]["template"];
        if !pods.iter().any(|p| p.owner_uid == uid) && !done {
            pods.push(self.new_pod(j, "Job", template, None));
        }
        let backoff_limit = j["spec"]["backoffLimit"].as_u64().unwrap_or(6) as u32;
        let completions = j["spec"]["completions"].as_u64().unwrap_or(1) as u32;
        let Some(pod) = pods.iter_mut().find(|p| p.owner_uid == uid) else {
            return;
        };
        if suspended || done {
            stop_process(pod).await;
        }
        let give_up = pod.failed > backoff_limit;
        self.drive(pod, !(suspended || done || give_up));
        Self::probe(pod).await;
        self.mirror_pod(pod, "batch/v1");
        let old = &j["status"];
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let mut status = json!({});
        if let Some(start) = old
            .get("startTime")
            .cloned()
            .or_else(|| pod.started_at.map(|_| json!(now)))
        {
            status["startTime"] = start;
        }
        if pod.child.is_some() {
            status["active"] = json!(1);
        }
        status["ready"] = json!(u32::from(pod.ready));
        status["terminating"] = json!(0);
        if pod.succeeded > 0 {
            status["succeeded"] = json!(pod.succeeded);
        }
        if pod.failed > 0 {
            status["failed"] = json!(pod.failed);
        }
        if pod.succeeded >= completions {
            status["completionTime"] = old.get("completionTime").cloned().unwrap_or(json!(now));
            status["conditions"] = conditions(
                old,
                vec![
                    (
                        "SuccessCriteriaMet",
                        "True",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods".into(),
                    ),
                    (
                        "Complete",
                        "True",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods".into(),
                    ),
                ],
            );
        } else if pod.failed > backoff_limit {
            status["conditions"] = conditions(
                old,
                vec![
                    (
                        "FailureTarget",
                        "True",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit".into(),
                    ),
                    (
                        "Failed",
                        "True",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit".into(),
                    ),
                ],
            );
        } else if suspended {
            status["conditions"] = conditions(
                old,
                vec![("Suspended", "True", "JobSuspended", "Job suspended".into())],
            );
        }
        self.write_status("batch/v1", "Job", j, status);
    }

    async fn reconcile_cronjobs(&self, jobs: &[Value]) {
        let cronjobs = self.list("batch/v1", "CronJob");
        let triggers: Vec<(String, String)> = std::mem::take(&mut *self.cron_triggers.lock().await);
        let now = chrono::Utc::now();
        let mut ticks = self.cron_ticks.lock().await;
        for cj in &cronjobs {
            let meta = &cj["metadata"];
            let (ns, name, uid) = (
                meta["namespace"].as_str().unwrap_or_default(),
                meta["name"].as_str().unwrap_or_default(),
                meta["uid"].as_str().unwrap_or_default(),
            );
            let owned: Vec<&Value> = jobs
                .iter()
                .filter(|j| {
                    j["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|r| r.iter().any(|o| o["uid"] == uid))
                })
                .collect();
            let active: Vec<&&Value> = owned
                .iter()
                .filter(|j| !is_true_condition(j, "Complete") && !is_true_condition(j, "Failed"))
                .collect();
            let manual = triggers.iter().any(|(n, m)| n == ns && m == name);
            let created_at = meta["creationTimestamp"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc))
                .unwrap_or(now);
            let last = *ticks.entry(uid.to_owned()).or_insert_with(|| {
                cj["status"]["lastScheduleTime"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .unwrap_or(created_at)
            });
            let schedule = cj["spec"]["schedule"]
                .as_str()
                .and_then(|s| crate::cron::Schedule::parse(s).ok());
            let due = schedule
                .as_ref()
                .and_then(|s| s.next_after(last))
                .filter(|t| *t <= now);
            let suspended = cj["spec"]["suspend"] == json!(true);
            let mut status = cj["status"].clone();
            if !status.is_object() {
                status = json!({});
            }
            if let Some(tick) = due {
                ticks.insert(uid.to_owned(), tick);
            }
            if (due.is_some() && !suspended) || manual {
                let forbid = cj["spec"]["concurrencyPolicy"] == "Forbid";
                if forbid && !active.is_empty() && !manual {
                    tracing::info!(
                        cronjob = name,
                        "skipping a scheduled run: concurrencyPolicy Forbid and a Job is still active"
                    );
                } else {
                    let job_name = match due {
                        Some(t) if !manual => format!("{name}-{}", t.timestamp() / 60),
                        _ => format!("{name}-manual-{}", now.timestamp()),
                    };
                    let template = &cj["spec"]["jobTemplate"];
                    let mut job_meta = template["metadata"].clone();
                    if !job_meta.is_object() {
                        job_meta = json!({});
                    }
                    job_meta["name"] = json!(job_name);
                    job_meta["namespace"] = json!(ns);
                    job_meta["ownerReferences"] = json!([{"apiVersion": "batch/v1", "kind": "CronJob", "name": name, "uid": uid, "controller": true, "blockOwnerDeletion": true}]);
                    let job = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": template["spec"]});
                    let mut store = self.shared.lock();
                    if let Some(rt) = store.find_kind("batch/v1", "Job") {
                        match store.create(
                            &rt,
                            ns,
                            job,
                            &WriteOptions {
                                field_manager: Some("cronjob-controller".into()),
                                ..WriteOptions::default()
                            },
                        ) {
                            Ok(w) => {
                                let m = &w.object["metadata"];
                                let mut list =
                                    status["active"].as_array().cloned().unwrap_or_default();
                                list.push(json!({"apiVersion": "batch/v1", "kind": "Job", "name": m["name"], "namespace": ns, "uid": m["uid"], "resourceVersion": m["resourceVersion"]}));
                                status["active"] = json!(list);
                            }
                            Err(e) => {
                                tracing::warn!(cronjob = name, error = %e, "creating a Job for a CronJob failed")
                            }
                        }
                    }
                }
                if let Some(t) = due {
                    status["lastScheduleTime"] =
                        json!(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                } else {
                    status["lastScheduleTime"] =
                        json!(now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
                }
            }
            // Keep `active` to the Jobs still running; remember the last success.
            let active_names: Vec<&str> = active
                .iter()
                .filter_map(|j| j["metadata"]["name"].as_str())
                .collect();
            if let Some(list) = status["active"].as_array_mut() {
                list.retain(|r| {
                    r["name"].as_str().is_some_and(|n| {
                        active_names.contains(&n)
                            || !owned.iter().any(|j| j["metadata"]["name"] == n)
                    })
                });
                if list.is_empty()
                    && let Some(m) = status.as_object_mut()
                {
                    m.remove("active");
                }
            }
            if let Some(t) = owned
                .iter()
                .filter(|j| is_true_condition(j, "Complete"))
                .filter_map(|j| j["status"]["completionTime"].as_str())
                .max()
            {
                status["lastSuccessfulTime"] = json!(t);
            }
            self.write_status("batch/v1", "CronJob", cj, status);
            self.prune_history(cj, &owned);
        }
    }

    /// Deletes finished Jobs beyond the CronJob's history limits (oldest first).
    fn prune_history(&self, cj: &Value, owned: &[&Value]) {
        let mut store = self.shared.lock();
        let Some(rt) = store.find_kind("batch/v1", "Job") else {
            return;
        };
        for (cond, limit_key, default) in [
            ("Complete", "successfulJobsHistoryLimit", 3),
            ("Failed", "failedJobsHistoryLimit", 1),
        ] {
            let limit = cj["spec"][limit_key].as_u64().unwrap_or(default) as usize;
            let mut finished: Vec<&&Value> = owned
                .iter()
                .filter(|j| is_true_condition(j, cond))
                .collect();
            finished.sort_by_key(|j| {
                j["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            });
            let excess = finished.len().saturating_sub(limit);
            for j in finished.into_iter().take(excess) {
                let ns = j["metadata"]["namespace"].as_str().unwrap_or_default();
                let name = j["metadata"]["name"].as_str().unwrap_or_default();
                let _ = store.delete(&rt, ns, name, false);
            }
        }
    }
}

/// `$(VAR)` references in env values and args, as the kubelet expands them.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = s.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

async fn http_ok(port: u16, path: &str) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 32];
        let n = stream.read(&mut buf).await.ok()?;
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        let code: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
