//! The e2e harness: a cluster per test (the emulator, or the real one `KUBECONFIG` points at),
//! real kubectl with a per-test cache dir, a namespace per test; the private PostgreSQL
//! (e2e/pg.sh) with a database per test, the workspace binaries and polling with deadlines
//! (no fixed sleeps) come from wallaby-testkit.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kube_emulator::{Emulator, Kubelet};
use serde_json::Value;
// Not every test file uses every fixture.
#[allow(unused_imports)]
pub use wallaby_testkit::{TestDb, connect, parse_lsn, repo, superuser_dsn, workspace_binary};

/// The kubeconfig of a real cluster to run against instead of the emulator.
pub fn real_cluster() -> Option<PathBuf> {
    std::env::var_os("KUBECONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
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

/// Polls `check` every 100 ms until it returns `Some`, failing after `timeout`.
pub async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    check: impl AsyncFnMut() -> Option<T>,
) -> T {
    wallaby_testkit::wait_for_every(what, timeout, Duration::from_millis(100), check).await
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
