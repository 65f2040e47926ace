//! A TEST FIXTURE, not a product feature: an in-memory Kubernetes API server (enough of it for
//! kube-runtime controllers and real kubectl) plus a "kubelet" that runs pod templates as
//! local processes, so WALlaby's operator → worker → status loop runs end to end without a cluster.
//! Its fidelity gaps are listed in e2e/kube-emulator/README.md.

pub mod cron;
pub mod kubelet;
pub mod patch;
pub mod rbac;
pub mod resources;
pub mod schema;
pub mod server;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast;

pub use kubelet::{Kubelet, KubeletError};
pub use store::{ApiError, PatchKind, WatchEvent, WriteOptions};

/// Why the emulator could not start or write its kubeconfig.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("binding the emulator's listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading the emulator's listener address: {0}")]
    LocalAddr(std::io::Error),
    #[error("writing the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: std::io::Error,
    },
    #[error("no resource type {api_version} {kind} is served (install its CRD first)")]
    UnknownKind { api_version: String, kind: String },
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// A running emulator; the server stops when the handle is dropped.
#[derive(Debug)]
pub struct Emulator {
    shared: Arc<server::Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Emulator {
    /// Starts on a free port of 127.0.0.1.
    pub async fn start() -> Result<Self, EmulatorError> {
        Self::start_on(0).await
    }

    /// Starts on 127.0.0.1:`port` (0 picks a free one).
    pub async fn start_on(port: u16) -> Result<Self, EmulatorError> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| EmulatorError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(EmulatorError::LocalAddr)?;
        let shared = Arc::new(server::Shared {
            store: Mutex::new(store::Store::new()),
            bookmark_interval: Duration::from_secs(2),
        });
        let router_state = shared.clone();
        let app = axum::Router::new().fallback(move |method, uri, headers, body| {
            let s = router_state.clone();
            async move { server::handle(s, method, uri, headers, body).await }
        });
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the kube emulator's server stopped");
            }
        });
        Ok(Self { shared, addr, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig pointing at this emulator (context `emulator`, namespace `default`), with
    /// cluster-admin rights.
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(&self.url(), None)
    }

    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), EmulatorError> {
        std::fs::write(path, self.kubeconfig_yaml()).map_err(|source| EmulatorError::Kubeconfig {
            path: path.display().to_string(),
            source,
        })
    }

    pub(crate) fn shared(&self) -> Arc<server::Shared> {
        self.shared.clone()
    }

    /// Every change from now on (what watches see).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.shared.lock().subscribe()
    }

    /// Drops the watch history: watches resuming from an older resourceVersion get 410 Gone.
    pub fn compact(&self) {
        self.shared.lock().compact();
    }

    /// One object by apiVersion/kind, namespace ("" for cluster-scoped) and name.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let store = self.shared.lock();
        let rt = store.find_kind(api_version, kind)?;
        store.get(&rt, namespace, name)
    }

    /// Objects of a kind in a namespace (`None`: all namespaces).
    pub fn list(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Vec<Value> {
        let store = self.shared.lock();
        match store.find_kind(api_version, kind) {
            Some(rt) => store.list(&rt, namespace),
            None => Vec::new(),
        }
    }

    /// Creates an object (its apiVersion/kind/metadata.namespace pick the resource).
    pub fn create(&self, object: Value) -> Result<Value, EmulatorError> {
        let mut store = self.shared.lock();
        let rt = kind_of(&store, &object)?;
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        Ok(store
            .create(&rt, &ns, object, &WriteOptions::default())?
            .object)
    }

    /// Patches an object (or its status subresource) as `manager`.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        patch_kind: PatchKind,
        body: &Value,
        status: bool,
        manager: &str,
    ) -> Result<Value, EmulatorError> {
        let mut store = self.shared.lock();
        let rt = store
            .find_kind(api_version, kind)
            .ok_or_else(|| EmulatorError::UnknownKind {
                api_version: api_version.to_owned(),
                kind: kind.to_owned(),
            })?;
        let opts = WriteOptions {
            field_manager: Some(manager.to_owned()),
            force: true,
            ..WriteOptions::default()
        };
        Ok(store
            .patch(&rt, namespace, name, patch_kind, body, status, &opts)?
            .object)
    }

    /// Deletes an object (finalizers and garbage collection apply).
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, EmulatorError> {
        let mut store = self.shared.lock();
        let rt = store
            .find_kind(api_version, kind)
            .ok_or_else(|| EmulatorError::UnknownKind {
                api_version: api_version.to_owned(),
                kind: kind.to_owned(),
            })?;
        Ok(store.delete(&rt, namespace, name, false)?)
    }
}

/// A kubeconfig for `url`; with a token, requests are made (and authorized) as that identity.
pub fn kubeconfig_yaml(url: &str, token: Option<&str>) -> String {
    let user = match token {
        Some(t) => format!("\n    token: {t}"),
        None => " {}".to_owned(),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {url}\nusers:\n- name: emulator\n  user:{user}\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\ncurrent-context: emulator\n"
    )
}

fn kind_of(store: &store::Store, object: &Value) -> Result<resources::ResourceType, EmulatorError> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    store
        .find_kind(api_version, kind)
        .ok_or_else(|| EmulatorError::UnknownKind {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
        })
}
