//! In-cluster mode (`wallaby-worker run --flow NAMESPACE/NAME`): reads the Flow, its
//! Destinations and the Secrets they reference from the Kubernetes API into the same
//! [`Resolved`] the file mode produces, publishes the worker's part of `Flow.status` with
//! server-side apply, and watches those objects so a config change stops the run.
//!
//! ```text
//!  API ──get──▶ Flow + Destinations + Secrets ──check()──▶ Resolved ──▶ run
//!   ▲                  │ versions                                        │ status
//!   │                  ▼                                                 ▼
//!   └──watch── ConfigWatch ──change──▶ cancel (flush, confirm, exit 0)  FlowStatusApply
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use pg_walstream::CancellationToken;
use serde::de::DeserializeOwned;
use tokio_stream::StreamExt;
use wallaby_crds::flow::FlowStatus;
use wallaby_crds::{API_VERSION, Destination, Flow};

use crate::standalone::{self, ConfigError, Resolved, SOURCE_SECRET_KEYS, SecretSource};
use crate::status::{StatusError, StatusSink, worker_owned};

/// Field manager of everything the worker writes.
pub const FIELD_MANAGER: &str = "wallaby-worker";

/// The Flow a worker runs: `--flow NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRef {
    /// Namespace of the Flow (and of its Destinations and Secrets).
    pub namespace: String,
    /// Name of the Flow.
    pub name: String,
}

impl FromStr for FlowRef {
    type Err = ClusterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(ClusterError::FlowRef {
                given: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for FlowRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Failures talking to the API; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `--flow` is not `NAMESPACE/NAME`.
    #[error(
        "--flow {given:?}: expected NAMESPACE/NAME, e.g. --flow apps/orders (with -f FILE, --flow takes a plain name)"
    )]
    FlowRef { given: String },
    /// No client configuration.
    #[error(
        "cannot configure a Kubernetes client (KUBECONFIG, ~/.kube/config, then the in-cluster service account): {0}"
    )]
    Connect(#[source] kube::Error),
    /// The Flow does not exist.
    #[error("Flow {flow} not found: the worker runs an existing Flow (kubectl -n {namespace} get flows)", namespace = flow.namespace)]
    FlowNotFound { flow: FlowRef },
    /// A read failed.
    #[error("reading {kind} {namespace}/{name}: {message}")]
    Read {
        kind: &'static str,
        namespace: String,
        name: String,
        message: String,
    },
}

/// Versions of the objects a run was configured from; a different version means the
/// configuration changed. Flows and Destinations use `metadata.generation` (status writes do
/// not bump it), Secrets their `resourceVersion`. `None`: the object did not exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigVersions {
    /// The Flow's generation.
    pub flow: Option<String>,
    /// Destinations by name.
    pub destinations: BTreeMap<String, Option<String>>,
    /// Secrets by name.
    pub secrets: BTreeMap<String, Option<String>>,
}

/// Objects read from the API for one Flow.
#[derive(Clone, Debug)]
pub struct FlowObjects {
    /// The Flow.
    pub flow: Flow,
    /// Its Destinations that exist, by name.
    pub destinations: BTreeMap<String, Destination>,
    /// The Secrets it references that exist, by name.
    pub secrets: BTreeMap<String, Secret>,
}

impl FlowObjects {
    /// Names of the Secrets the worker reads: the source connection and its CA, and the
    /// credentials of the Kafka / Bufstream, S3 and HTTP destinations.
    pub fn secret_names(flow: &Flow, destinations: &BTreeMap<String, Destination>) -> Vec<String> {
        let pg = &flow.spec.source.postgres;
        let mut names: Vec<String> = pg
            .secret_ref
            .iter()
            .map(|r| r.name.clone())
            .chain(pg.ssl_root_cert.iter().map(|s| s.name.clone()))
            .chain(
                destinations
                    .values()
                    .flat_map(|d| wallaby_destinations::secret_names(&d.spec)),
            )
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The versions of what was read (missing objects as `None`).
    pub fn versions(&self) -> ConfigVersions {
        ConfigVersions {
            flow: generation(&self.flow),
            destinations: self
                .flow
                .spec
                .destinations
                .iter()
                .map(|d| {
                    let v = self.destinations.get(&d.name).and_then(generation);
                    (d.name.clone(), v)
                })
                .collect(),
            secrets: Self::secret_names(&self.flow, &self.destinations)
                .into_iter()
                .map(|n| {
                    let v = self.secrets.get(&n).and_then(|s| s.resource_version());
                    (n, v)
                })
                .collect(),
        }
    }

    /// Validates and resolves, exactly as a manifest file is.
    pub fn resolve(self) -> Result<Resolved, ConfigError> {
        let namespace = self.flow.namespace().unwrap_or_default();
        let origin = format!(
            "Flow {namespace}/{}",
            self.flow.metadata.name.as_deref().unwrap_or_default()
        );
        let secrets = ClusterSecrets {
            namespace,
            secrets: &self.secrets,
        };
        standalone::check(&origin, self.flow, &self.destinations, &secrets)
    }
}

fn generation<K: Resource>(object: &K) -> Option<String> {
    object.meta().generation.map(|g| g.to_string())
}

/// Secrets read from the namespace.
struct ClusterSecrets<'a> {
    namespace: String,
    secrets: &'a BTreeMap<String, Secret>,
}

impl SecretSource for ClusterSecrets<'_> {
    fn secret(&self, name: &str, _keys: &[&str]) -> Option<BTreeMap<String, String>> {
        self.secrets.get(name).map(standalone::secret_strings)
    }

    fn how_to_provide(&self, name: &str, key: &str) -> String {
        let ns = &self.namespace;
        match self.secrets.get(name) {
            Some(secret) => {
                let keys: Vec<String> = standalone::secret_strings(secret).into_keys().collect();
                format!(
                    "Secret {ns}/{name} exists but has no key {key:?} (it has: {}); add the key",
                    if keys.is_empty() {
                        "no keys".to_owned()
                    } else {
                        keys.join(", ")
                    }
                )
            }
            None if SOURCE_SECRET_KEYS.contains(&key) => format!(
                "create it in namespace {ns} with key `dsn` (or `host`, `port`, `user`, `password`, `dbname`), e.g. `kubectl -n {ns} create secret generic {name} --from-literal=dsn=postgres://USER:PASSWORD@HOST:5432/DB`"
            ),
            None => format!(
                "create it in namespace {ns} with key {key:?}, e.g. `kubectl -n {ns} create secret generic {name} --from-file={key}=PATH`"
            ),
        }
    }

    fn how_to_provide_keys(&self, name: &str, keys: &[&str]) -> String {
        let ns = &self.namespace;
        let list = keys
            .iter()
            .map(|k| format!("{k:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        match self.secrets.get(name) {
            Some(secret) => {
                let has: Vec<String> = standalone::secret_strings(secret).into_keys().collect();
                format!(
                    "Secret {ns}/{name} exists but lacks {list} (it has: {}); add them",
                    if has.is_empty() {
                        "no keys".to_owned()
                    } else {
                        has.join(", ")
                    }
                )
            }
            None => {
                let literals: String = keys
                    .iter()
                    .map(|k| format!(" --from-literal={k}=…"))
                    .collect();
                format!(
                    "create it in namespace {ns} with keys {list}, e.g. `kubectl -n {ns} create secret generic {name}{literals}`"
                )
            }
        }
    }
}

/// Reads the Flow, its Destinations and its Secrets. Missing Destinations and Secrets are
/// left out (validation names them); a missing Flow is an error.
pub async fn read(client: &Client, flow_ref: &FlowRef) -> Result<FlowObjects, ClusterError> {
    let ns = &flow_ref.namespace;
    let flow: Flow = get_opt(client, ns, &flow_ref.name, "Flow")
        .await?
        .ok_or_else(|| ClusterError::FlowNotFound {
            flow: flow_ref.clone(),
        })?;
    let mut destinations = BTreeMap::new();
    for d in &flow.spec.destinations {
        if let Some(dest) = get_opt::<Destination>(client, ns, &d.name, "Destination").await? {
            destinations.insert(d.name.clone(), dest);
        }
    }
    let mut secrets = BTreeMap::new();
    for name in FlowObjects::secret_names(&flow, &destinations) {
        if let Some(secret) = get_opt::<Secret>(client, ns, &name, "Secret").await? {
            secrets.insert(name, secret);
        }
    }
    Ok(FlowObjects {
        flow,
        destinations,
        secrets,
    })
}

async fn get_opt<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    kind: &'static str,
) -> Result<Option<K>, ClusterError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.get_opt(name).await.map_err(|e| ClusterError::Read {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        message: describe(&e, kind),
    })
}

/// A kube error with the fix for the usual causes.
fn describe(e: &kube::Error, kind: &str) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "{e}: the worker's ServiceAccount may not read this {kind}; the operator grants it through the Role wallaby-<flow> (check `kubectl auth can-i`)"
        ),
        _ => e.to_string(),
    }
}

/// The server-side apply body for the status subresource: only the worker's fields.
pub fn status_apply_body(status: &FlowStatus) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": API_VERSION,
        "kind": "Flow",
        "status": worker_owned(status),
    })
}

/// Publishes status to `Flow.status` with server-side apply (field manager
/// [`FIELD_MANAGER`]), leaving the operator's fields alone.
#[derive(Clone)]
pub struct FlowStatusApply {
    api: Api<Flow>,
    flow: FlowRef,
}

impl fmt::Debug for FlowStatusApply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowStatusApply")
            .field("flow", &self.flow)
            .finish()
    }
}

impl FlowStatusApply {
    /// A sink for `flow`.
    pub fn new(client: Client, flow: FlowRef) -> Self {
        Self {
            api: Api::namespaced(client, &flow.namespace),
            flow,
        }
    }
}

#[async_trait]
impl StatusSink for FlowStatusApply {
    async fn publish(&self, status: &FlowStatus) -> Result<(), StatusError> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.api
            .patch_status(
                &self.flow.name,
                &params,
                &Patch::Apply(status_apply_body(status)),
            )
            .await
            .map(|_| ())
            .map_err(|e| StatusError::Api {
                flow: self.flow.to_string(),
                message: describe(&e, "Flow status"),
            })
    }
}

/// What changed in the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigChange {
    /// `Flow`, `Destination` or `Secret`.
    pub kind: &'static str,
    /// Object name.
    pub name: String,
    /// Version the run started with (`None`: absent).
    pub was: Option<String>,
    /// Version now (`None`: deleted or absent).
    pub now: Option<String>,
}

impl fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |v: &Option<String>| v.clone().unwrap_or_else(|| "absent".into());
        write!(
            f,
            "{} {} changed ({} -> {})",
            self.kind,
            self.name,
            v(&self.was),
            v(&self.now)
        )
    }
}

/// Watches every object in `versions` until one differs from its recorded version (the
/// first change is returned) or `cancel` fires (`None`). Each object has its own watch
/// with a `metadata.name` field selector, which the worker Role's `resourceNames` allow.
pub async fn watch_for_change(
    client: Client,
    flow_ref: &FlowRef,
    versions: &ConfigVersions,
    cancel: &CancellationToken,
) -> Option<ConfigChange> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ConfigChange>(4);
    let ns = flow_ref.namespace.as_str();
    let mut tasks = tokio::task::JoinSet::new();
    let flow_api: Api<Flow> = Api::namespaced(client.clone(), ns);
    tasks.spawn(watch_one(
        flow_api,
        "Flow",
        flow_ref.name.clone(),
        versions.flow.clone(),
        generation::<Flow>,
        tx.clone(),
    ));
    for (name, version) in &versions.destinations {
        let api: Api<Destination> = Api::namespaced(client.clone(), ns);
        tasks.spawn(watch_one(
            api,
            "Destination",
            name.clone(),
            version.clone(),
            generation::<Destination>,
            tx.clone(),
        ));
    }
    for (name, version) in &versions.secrets {
        let api: Api<Secret> = Api::namespaced(client.clone(), ns);
        tasks.spawn(watch_one(
            api,
            "Secret",
            name.clone(),
            version.clone(),
            |s: &Secret| s.resource_version(),
            tx.clone(),
        ));
    }
    drop(tx);
    let change = tokio::select! {
        change = rx.recv() => change,
        _ = cancel.cancelled() => None,
    };
    tasks.shutdown().await;
    change
}

/// Watches one object; sends the first version different from `expected`.
async fn watch_one<K>(
    api: Api<K>,
    kind: &'static str,
    name: String,
    expected: Option<String>,
    version: fn(&K) -> Option<String>,
    out: tokio::sync::mpsc::Sender<ConfigChange>,
) where
    K: Resource + Clone + DeserializeOwned + fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    // Whether the object showed up in the current (re)list.
    let mut listed = false;
    while let Some(event) = stream.next().await {
        let now = match event {
            Ok(watcher::Event::Init) => {
                listed = false;
                continue;
            }
            Ok(watcher::Event::InitApply(obj)) => {
                listed = true;
                version(&obj)
            }
            Ok(watcher::Event::InitDone) if listed => continue,
            Ok(watcher::Event::InitDone) => None,
            Ok(watcher::Event::Apply(obj)) => version(&obj),
            Ok(watcher::Event::Delete(_)) => None,
            Err(e) => {
                // The backoff retries; a lasting failure (RBAC, network) only delays
                // noticing a change, it never stops the flow.
                tracing::warn!(kind, name = %name, error = %e, "watching for configuration changes");
                continue;
            }
        };
        if now != expected {
            let _ = out
                .send(ConfigChange {
                    kind,
                    name: name.clone(),
                    was: expected.clone(),
                    now,
                })
                .await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use wallaby_crds::flow::{Checkpoint, Counters, FlowPhase, Lag, WorkloadRef};

    fn flow(yaml: &str) -> Flow {
        serde_norway::from_str(yaml).unwrap()
    }

    const FLOW: &str = "apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {name: orders, namespace: apps, generation: 3}
spec:
  source:
    postgres:
      dsn: postgres://wallaby@db:5432/app
      secretRef: {name: pg-creds}
      sslMode: verify-full
      sslRootCert: {name: pg-ca, key: ca.crt}
      slot: orders
      publication: orders
  destinations: [{name: lake}, {name: audit}]
";

    fn destination(name: &str) -> Destination {
        serde_norway::from_str(&format!(
            "apiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {{name: {name}, namespace: apps, generation: 1}}\nspec: {{type: file, file: {{path: /data/{name}}}}}\n"
        ))
        .unwrap()
    }

    fn secret(name: &str, data: &[(&str, &str)], rv: &str) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some(name.into());
        s.metadata.namespace = Some("apps".into());
        s.metadata.resource_version = Some(rv.into());
        s.data = Some(
            data.iter()
                .map(|(k, v)| {
                    (
                        (*k).to_owned(),
                        k8s_openapi::ByteString(v.as_bytes().to_vec()),
                    )
                })
                .collect(),
        );
        s
    }

    fn objects() -> FlowObjects {
        FlowObjects {
            flow: flow(FLOW),
            destinations: ["lake", "audit"]
                .into_iter()
                .map(|n| (n.to_owned(), destination(n)))
                .collect(),
            secrets: [
                secret("pg-creds", &[("password", "s3cret")], "41"),
                secret("pg-ca", &[("ca.crt", "-----BEGIN CERTIFICATE-----")], "7"),
            ]
            .into_iter()
            .map(|s| (s.name_any(), s))
            .collect(),
        }
    }

    #[test]
    fn flow_ref_parses_namespace_and_name() {
        let r: FlowRef = "apps/orders".parse().unwrap();
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("apps", "orders"));
        assert_eq!(r.to_string(), "apps/orders");
        for bad in ["orders", "/orders", "apps/", "a/b/c", ""] {
            let err = bad.parse::<FlowRef>().unwrap_err().to_string();
            assert!(err.contains("expected NAMESPACE/NAME"), "{bad}: {err}");
        }
    }

    #[test]
    fn objects_resolve_like_a_manifest_file() {
        let r = objects().resolve().unwrap();
        assert_eq!(r.flow.metadata.name.as_deref(), Some("orders"));
        let names: Vec<&str> = r.destinations.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["lake", "audit"], "spec.destinations order");
        assert_eq!(
            r.destinations[0].1.file.as_ref().unwrap().path,
            "/data/lake"
        );
        assert_eq!(r.source_secret.unwrap()["password"], "s3cret");
        assert_eq!(
            r.ssl_root_cert_pem.as_deref(),
            Some("-----BEGIN CERTIFICATE-----")
        );
    }

    #[test]
    fn string_data_overrides_data() {
        let mut o = objects();
        if let Some(s) = o.secrets.get_mut("pg-creds") {
            s.string_data = Some([("password".to_owned(), "newer".to_owned())].into());
        }
        assert_eq!(
            o.resolve().unwrap().source_secret.unwrap()["password"],
            "newer"
        );
    }

    #[test]
    fn a_missing_source_secret_names_the_namespace_and_the_command() {
        let mut o = objects();
        o.secrets.remove("pg-creds");
        let err = o.resolve().unwrap_err().to_string();
        assert!(
            err.starts_with("Flow apps/orders: invalid configuration"),
            "{err}"
        );
        assert!(
            err.contains("Flow/orders spec.source.postgres.secretRef: Secret \"pg-creds\" not found: create it in namespace apps with key `dsn`"),
            "{err}"
        );
        assert!(
            err.contains("kubectl -n apps create secret generic pg-creds"),
            "{err}"
        );
        assert!(
            !err.contains("WALLABY_SECRET_"),
            "no standalone hint in a cluster: {err}"
        );
    }

    #[test]
    fn kafka_credentials_name_every_missing_key() {
        let mut o = objects();
        o.destinations.insert(
            "lake".into(),
            serde_norway::from_str(
                "apiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {name: lake, namespace: apps, generation: 1}\nspec: {type: kafka, kafka: {brokers: ['k:9092'], topic: t, sasl: {mechanism: PLAIN}, secretRef: {name: kafka-creds}}}\n",
            )
            .unwrap(),
        );
        assert!(
            FlowObjects::secret_names(&o.flow, &o.destinations).contains(&"kafka-creds".into())
        );
        let err = o.clone().resolve().unwrap_err().to_string();
        assert!(
            err.contains("create it in namespace apps with keys \"username\", \"password\", e.g. `kubectl -n apps create secret generic kafka-creds --from-literal=username=… --from-literal=password=…`"),
            "{err}"
        );
        o.secrets.insert(
            "kafka-creds".into(),
            secret("kafka-creds", &[("username", "u")], "3"),
        );
        let err = o.resolve().unwrap_err().to_string();
        assert!(
            err.contains(
                "Secret apps/kafka-creds exists but lacks \"password\" (it has: username); add them"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_missing_key_lists_the_keys_the_secret_has() {
        let mut o = objects();
        o.secrets.insert(
            "pg-ca".into(),
            secret("pg-ca", &[("tls.crt", "x"), ("tls.key", "y")], "8"),
        );
        let err = o.resolve().unwrap_err().to_string();
        assert!(
            err.contains("sslRootCert: key \"ca.crt\" of Secret \"pg-ca\" not found: Secret apps/pg-ca exists but has no key \"ca.crt\" (it has: tls.crt, tls.key)"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_destination_and_secret_are_reported_together() {
        let mut o = objects();
        o.destinations.remove("audit");
        o.secrets.remove("pg-ca");
        let err = o.resolve().unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems[0].contains("Destination \"audit\" does not exist"),
            "{problems:#?}"
        );
        assert!(
            problems[1].contains(
                "Secret \"pg-ca\" not found: create it in namespace apps with key \"ca.crt\""
            ),
            "{problems:#?}"
        );
    }

    #[test]
    fn grpc_tls_secrets_are_fetched_and_resolved_into_the_destination_secrets() {
        let ca = rcgen::CertificateParams::new(vec!["ingest".to_owned()])
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        let mut o = objects();
        o.destinations.insert(
            "audit".into(),
            serde_norway::from_str(
                "apiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {name: audit, namespace: apps, generation: 1}\nspec: {type: grpc, grpc: {endpoint: \"ingest:443\", insecure: false, tls: {ca: {name: ingest-ca, key: ca.crt}}}}\n",
            )
            .unwrap(),
        );
        assert_eq!(
            FlowObjects::secret_names(&o.flow, &o.destinations),
            ["ingest-ca", "pg-ca", "pg-creds"]
        );
        let missing = o.clone().resolve().unwrap_err().to_string();
        assert!(
            missing.contains("Destination/audit spec.grpc.tls.ca: key \"ca.crt\" of Secret \"ingest-ca\" not found"),
            "{missing}"
        );
        let ingest_ca = secret("ingest-ca", &[("ca.crt", &ca)], "9");
        o.secrets.insert("ingest-ca".into(), ingest_ca);
        let r = o.resolve().unwrap();
        assert_eq!(
            r.destination_secrets["audit"],
            BTreeMap::from([("tls.ca".to_owned(), ca)])
        );
    }

    #[test]
    fn versions_cover_every_referenced_object_and_mark_missing_ones() {
        let mut o = objects();
        o.destinations.remove("audit");
        let v = o.versions();
        assert_eq!(v.flow.as_deref(), Some("3"));
        assert_eq!(
            v.destinations,
            BTreeMap::from([("audit".into(), None), ("lake".into(), Some("1".into()))])
        );
        assert_eq!(
            v.secrets,
            BTreeMap::from([
                ("pg-ca".into(), Some("7".into())),
                ("pg-creds".into(), Some("41".into()))
            ])
        );
    }

    #[test]
    fn the_status_apply_body_holds_only_worker_fields() {
        let cond = |t: &str| Condition {
            type_: t.into(),
            status: "True".into(),
            reason: "R".into(),
            message: "m".into(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            observed_generation: Some(3),
        };
        let status = FlowStatus {
            observed_generation: Some(3),
            phase: Some(FlowPhase::Running),
            conditions: [
                "Ready",
                "Progressing",
                "Degraded",
                "SlotHealthy",
                "DDLGated",
            ]
            .into_iter()
            .map(cond)
            .collect(),
            checkpoint: Some(Checkpoint {
                lsn: "0/16B6C50".into(),
                time: None,
            }),
            lag: Some(Lag {
                bytes: 10,
                seconds: 0.5,
            }),
            workload: Some(WorkloadRef {
                kind: "Deployment".into(),
                name: "wallaby-orders".into(),
            }),
            counters: Some(Counters::default()),
            ..FlowStatus::default()
        };
        let body = status_apply_body(&status);
        assert_eq!(body["apiVersion"], "wallaby.dev/v1alpha1");
        assert_eq!(body["kind"], "Flow");
        let mut top: Vec<&str> = body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        top.sort_unstable();
        assert_eq!(top, ["apiVersion", "kind", "status"], "no metadata or spec");
        let mut fields: Vec<&str> = body["status"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        assert_eq!(fields, ["checkpoint", "conditions", "counters", "lag"]);
        let types: Vec<&str> = body["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["Degraded", "SlotHealthy", "DDLGated"]);
        assert_eq!(body["status"]["checkpoint"]["lsn"], "0/16B6C50");
    }
}
