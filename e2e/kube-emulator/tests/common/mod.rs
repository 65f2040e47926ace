//! The e2e harness: a cluster per test (the emulator, or the real one `KUBECONFIG` points at),
//! real kubectl with a per-test cache dir, a namespace per test, the private PostgreSQL
//! (e2e/pg.sh) with a database per test, and polling with deadlines (no fixed sleeps).

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kube_emulator::{Emulator, Kubelet};
use serde_json::Value;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The kubeconfig of a real cluster to run against instead of the emulator.
pub fn real_cluster() -> Option<PathBuf> {
    std::env::var_os("KUBECONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A binary of this workspace (override with `WALLABY_E2E_<NAME>_BIN`).
pub fn workspace_binary(name: &str) -> PathBuf {
    let var = format!(
        "WALLABY_E2E_{}_BIN",
        name.trim_start_matches("wallaby-").to_uppercase()
    );
    if let Some(p) = std::env::var_os(&var) {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p {name}) or set {var}",
        path.display()
    );
    path
}

/// One test's cluster, kubectl settings and namespace.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub ns: String,
    pub emulator: Option<Emulator>,
    pub kubelet: Option<Kubelet>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Cluster {
    /// The emulator (or the real cluster) with the test namespace created.
    pub async fn start(test: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kube-e2e-")
            .tempdir()
            .expect("temp dir");
        let (kubeconfig, emulator) = match real_cluster() {
            Some(path) => (path, None),
            None => {
                let emulator = Emulator::start().await.expect("start the emulator");
                let path = dir.path().join("kubeconfig");
                emulator.write_kubeconfig(&path).expect("write kubeconfig");
                (path, Some(emulator))
            }
        };
        let ns = format!(
            "e2e-{}-{}-{}",
            test.replace('_', "-"),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let cluster = Self {
            dir,
            kubeconfig,
            ns,
            emulator,
            kubelet: None,
        };
        cluster
            .apply_text(&format!(
                "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n",
                cluster.ns
            ))
            .await;
        cluster
    }

    /// Also runs the kubelet (emulator only); `wallaby-worker` maps to `worker`.
    pub fn with_kubelet(mut self, worker: &Path) -> Self {
        if let Some(emulator) = &self.emulator {
            self.kubelet = Some(Kubelet::start(emulator, worker).expect("start the kubelet"));
        }
        self
    }

    pub fn is_emulator(&self) -> bool {
        self.emulator.is_some()
    }

    /// Runs kubectl with this cluster's kubeconfig and the test's own discovery cache.
    pub async fn kubectl(&self, args: &[&str]) -> Output {
        tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("kube-cache"))
            .arg("--request-timeout=30s")
            .args(args)
            .output()
            .await
            .expect("run kubectl")
    }

    /// kubectl in the test namespace; must succeed; returns stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.ns.as_str()];
        full.extend_from_slice(args);
        let out = self.kubectl(&full).await;
        assert!(
            out.status.success(),
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// kubectl in the test namespace; must fail; returns stderr.
    pub async fn fails(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.ns.as_str()];
        full.extend_from_slice(args);
        let out = self.kubectl(&full).await;
        assert!(
            !out.status.success(),
            "kubectl {} unexpectedly succeeded: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `kubectl get … -o json` in the test namespace (`None` when NotFound).
    pub async fn get(&self, what: &[&str]) -> Option<Value> {
        let mut args = vec!["-n", self.ns.as_str(), "get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-o", "json"]);
        let out = self.kubectl(&args).await;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("NotFound") || err.contains("not found"),
                "kubectl get {what:?}: {err}"
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("kubectl -o json"))
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("{n}-{name}"));
        std::fs::write(&path, text).expect("write manifest");
        path
    }

    /// `kubectl apply -f` of a manifest text (client-side apply) in the test namespace.
    pub async fn apply_text(&self, text: &str) -> String {
        let path = self.write("manifest.yaml", text);
        self.ok(&["apply", "-f", path.to_str().unwrap()]).await
    }

    /// `kubectl apply -f` that must fail; returns stderr.
    pub async fn apply_fails(&self, text: &str, extra: &[&str]) -> String {
        let path = self.write("manifest.yaml", text);
        let mut args = vec!["apply", "-f", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.fails(&args).await
    }

    /// Server-side apply as `manager`.
    pub async fn server_apply(&self, text: &str, manager: &str, force: bool) -> Output {
        let path = self.write("ssa.yaml", text);
        let manager_arg = format!("--field-manager={manager}");
        let mut args = vec![
            "-n",
            self.ns.as_str(),
            "apply",
            "--server-side",
            manager_arg.as_str(),
            "-f",
            path.to_str().unwrap(),
        ];
        if force {
            args.push("--force-conflicts");
        }
        self.kubectl(&args).await
    }

    /// Installs the project's CRDs. `via_json`: parse crds/*.yaml as YAML 1.2 and apply
    /// JSON, sidestepping kubectl's YAML 1.1 reading (where a bare `off` is `false`).
    pub async fn install_crds(&self, via_json: bool) {
        let dir = repo().join("crds");
        if !via_json {
            let out = self.kubectl(&["apply", "-f", dir.to_str().unwrap()]).await;
            assert!(
                out.status.success(),
                "kubectl apply -f crds/ failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            for file in ["flow.yaml", "destination.yaml", "ddlapproval.yaml"] {
                let text = std::fs::read_to_string(dir.join(file)).expect("read CRD");
                let value: Value = serde_norway::from_str(&text).expect("CRD YAML");
                let path = self.write(&file.replace(".yaml", ".json"), &value.to_string());
                let out = self.kubectl(&["apply", "-f", path.to_str().unwrap()]).await;
                assert!(
                    out.status.success(),
                    "kubectl apply {file} (as JSON) failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for crd in [
            "flows.wallaby.dev",
            "destinations.wallaby.dev",
            "ddlapprovals.wallaby.dev",
        ] {
            let out = self
                .kubectl(&[
                    "wait",
                    "--for=condition=Established",
                    "--timeout=60s",
                    &format!("crd/{crd}"),
                ])
                .await;
            assert!(
                out.status.success(),
                "CRD {crd} not Established: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Deletes the namespace (in the background: a real cluster takes its time).
    pub async fn cleanup(&self) {
        let _ = self
            .kubectl(&["delete", "namespace", &self.ns, "--wait=false"])
            .await;
    }

    /// Kubelet container logs (emulator), for failure messages.
    pub async fn pod_logs(&self) -> String {
        match &self.kubelet {
            Some(k) => k.logs().await,
            None => String::new(),
        }
    }
}

/// Polls `check` until it returns `Some`, failing after `timeout`.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').expect("lsn");
    (u64::from_str_radix(hi, 16).expect("hi") << 32) | u64::from_str_radix(lo, 16).expect("lo")
}

/// Superuser DSN of the private PostgreSQL, started on first use.
pub fn superuser_dsn() -> &'static str {
    static DSN: OnceLock<String> = OnceLock::new();
    DSN.get_or_init(|| {
        let pg = repo().join("e2e/pg.sh");
        let start = std::process::Command::new(&pg)
            .arg("start")
            .output()
            .expect("running e2e/pg.sh start");
        assert!(
            start.status.success(),
            "e2e/pg.sh start failed: {}",
            String::from_utf8_lossy(&start.stderr)
        );
        let env = std::process::Command::new(&pg)
            .arg("env")
            .output()
            .expect("running e2e/pg.sh env");
        let text = String::from_utf8_lossy(&env.stdout);
        text.split_whitespace()
            .find_map(|w| w.strip_prefix("WALLABY_PG_SUPERUSER_DSN="))
            .map(|s| s.trim_matches(|c| c == '"' || c == '\'').to_owned())
            .expect("pg.sh env prints WALLABY_PG_SUPERUSER_DSN")
    })
}

pub async fn connect(dsn: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database owned by the `wallaby` role, dropped (with its slots) by `drop_all`.
pub struct TestDb {
    pub admin: tokio_postgres::Client,
    pub name: String,
    /// DSN of the `wallaby` role for this database.
    pub dsn: String,
}

impl TestDb {
    pub async fn create(prefix: &str) -> Self {
        let name = format!(
            "wt_{prefix}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(superuser_dsn()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name} OWNER wallaby"))
            .await
            .expect("create database");
        let base = superuser_dsn().replace("postgres:postgres@", "wallaby:wallaby@");
        let dsn = format!(
            "{}/{name}",
            base.rsplit_once('/').expect("dsn has a database").0
        );
        Self { admin, name, dsn }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.dsn).await
    }

    /// `(confirmed_flush_lsn, active)` of a slot, `None` when it does not exist.
    pub async fn slot(&self, slot: &str) -> Option<(Option<String>, bool)> {
        self.admin
            .query_opt("SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
            .expect("slot query")
            .map(|r| (r.get(0), r.get(1)))
    }

    pub async fn drop_all(self) {
        let _ = self
            .admin
            .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active", &[&self.name])
            .await;
        let _ = self
            .admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await;
    }
}

/// Reads a manifest from examples/k8s/ and applies `edit` to each document.
pub fn example(file: &str, edit: impl Fn(&mut Value)) -> String {
    let text =
        std::fs::read_to_string(repo().join("examples/k8s").join(file)).expect("read example");
    let mut value: Value = serde_norway::from_str(&text).expect("example YAML");
    edit(&mut value);
    value.to_string()
}

/// A raw HTTP/1.1 GET against the emulator, read until `until` appears (or the deadline).
pub async fn raw_get(
    addr: std::net::SocketAddr,
    path: &str,
    until: &str,
    timeout: Duration,
) -> String {
    raw_request(addr, "GET", path, None, until, timeout).await
}

/// A raw HTTP/1.1 request (optionally with a bearer token), read until `until` appears.
pub async fn raw_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    until: &str,
    timeout: Duration,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the emulator");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\n{auth}Content-Length: 0\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .expect("send request");
    let mut buf = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&buf).contains(until) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut chunk)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => panic!("reading {path}: {e}"),
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}
