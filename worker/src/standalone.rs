//! Configuration of a run: a Flow, its Destinations and the Secrets they reference,
//! checked by the same code the operator uses and resolved into what the run needs. The
//! objects come from a multi-document YAML file (standalone, [`load`]) or from the
//! Kubernetes API (in-cluster, `crate::cluster`); both go through [`check`]. In a file,
//! Secrets missing from it are read from the environment as `WALLABY_SECRET_<SECRET>_<KEY>`
//! (upper case, non-alphanumerics as `_`), so passwords need not be written to disk.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::Secret;
use wallaby_crds::destination::DestinationSpec;
use wallaby_crds::manifest::{self, Bundle};
use wallaby_crds::{Destination, DestinationType, Flow, validate};

/// A flow ready to run.
#[derive(Debug)]
pub struct Resolved {
    /// The Flow.
    pub flow: Flow,
    /// Its destinations, in `spec.destinations` order.
    pub destinations: Vec<(String, DestinationSpec)>,
    /// Keys of the source Secret (`dsn`, `password`, …).
    pub source_secret: Option<BTreeMap<String, String>>,
    /// PEM CA of `sslRootCert`, when set.
    pub ssl_root_cert_pem: Option<String>,
    /// Credentials of the `kafka` / `bufstream` destinations, by destination name.
    pub kafka_secrets: BTreeMap<String, crate::destination::kafka::KafkaSecrets>,
    /// String data of the Secret each Destination references (by Destination name); for
    /// `grpc`, the PEMs of `spec.grpc.tls` under `tls.ca`, `tls.clientCert`,
    /// `tls.clientKey` (see `destination::grpc::GrpcTlsMaterial`).
    pub destination_secrets: BTreeMap<String, BTreeMap<String, String>>,
}

/// Configuration problems; each names the object and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The manifest is malformed.
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    /// Cross-object validation failed; `path` is the file, or the Flow in the cluster.
    #[error("{path}: invalid configuration:\n  - {}", problems.join("\n  - "))]
    Invalid { path: String, problems: Vec<String> },
}

/// Where the Secrets a flow references come from.
pub trait SecretSource {
    /// The string data of Secret `name`, `None` when it does not exist. `keys` are the keys
    /// the caller reads (a source that cannot list keys, like the environment, reads those).
    fn secret(&self, name: &str, keys: &[&str]) -> Option<BTreeMap<String, String>>;
    /// How the user provides `key` of Secret `name`; ends a "not found" message.
    fn how_to_provide(&self, name: &str, key: &str) -> String;
    /// How the user provides several `keys` of Secret `name` at once.
    fn how_to_provide_keys(&self, name: &str, keys: &[&str]) -> String {
        keys.iter()
            .map(|k| self.how_to_provide(name, k))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Keys of the source Secret the worker reads.
pub const SOURCE_SECRET_KEYS: [&str; 6] = ["dsn", "host", "port", "user", "password", "dbname"];

/// Reads, parses and validates `path`; `flow_name` picks a Flow when the file has several.
pub fn load(path: &Path, flow_name: Option<&str>) -> Result<Resolved, ConfigError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: display.clone(),
        source,
    })?;
    let bundle = manifest::parse(&display, &text)?;
    resolve(&display, bundle, flow_name, |name| std::env::var(name).ok())
}

/// Secrets of a manifest file, else the environment.
struct FileSecrets<'a, E> {
    path: &'a str,
    secrets: &'a BTreeMap<String, Secret>,
    env: E,
}

impl<E: Fn(&str) -> Option<String>> SecretSource for FileSecrets<'_, E> {
    fn secret(&self, name: &str, keys: &[&str]) -> Option<BTreeMap<String, String>> {
        if let Some(secret) = self.secrets.get(name) {
            return Some(secret_strings(secret));
        }
        let data: BTreeMap<String, String> = keys
            .iter()
            .filter_map(|k| (self.env)(&env_name(name, k)).map(|v| ((*k).to_owned(), v)))
            .collect();
        (!data.is_empty()).then_some(data)
    }

    fn how_to_provide(&self, name: &str, key: &str) -> String {
        self.how_to_provide_keys(name, &[key])
    }

    fn how_to_provide_keys(&self, name: &str, keys: &[&str]) -> String {
        let vars: Vec<String> = keys.iter().map(|k| env_name(name, k)).collect();
        format!(
            "add a `kind: Secret` document to {} or set {}",
            self.path,
            vars.join(" and ")
        )
    }
}

fn resolve(
    path: &str,
    mut bundle: Bundle,
    flow_name: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Resolved, ConfigError> {
    let invalid = |problems: Vec<String>| ConfigError::Invalid {
        path: path.into(),
        problems,
    };
    let names: Vec<String> = bundle
        .flows
        .iter()
        .filter_map(|f| f.metadata.name.clone())
        .collect();
    let index = match (flow_name, bundle.flows.len()) {
        (None, 0) => {
            return Err(invalid(vec![
                "no Flow in the file: add a document with `kind: Flow` (see examples/)".into(),
            ]));
        }
        (None, 1) => 0,
        (None, _) => {
            return Err(invalid(vec![format!(
                "the file holds several Flows ({}): choose one with --flow NAME",
                names.join(", ")
            )]));
        }
        (Some(want), _) => names.iter().position(|n| n == want).ok_or_else(|| {
            invalid(vec![format!(
                "no Flow named {want:?} in the file (found: {})",
                names.join(", ")
            )])
        })?,
    };
    let flow = bundle.flows.swap_remove(index);
    let secrets = FileSecrets {
        path,
        secrets: &bundle.secrets,
        env,
    };
    check(path, flow, &bundle.destinations, &secrets)
}

/// Validates `flow` with its Destinations (by name; missing ones are reported) and resolves
/// the Secrets it references. `origin` (the file, or `Flow ns/name`) prefixes the error.
pub fn check(
    origin: &str,
    flow: Flow,
    destinations: &BTreeMap<String, Destination>,
    secrets: &dyn SecretSource,
) -> Result<Resolved, ConfigError> {
    let mut problems: Vec<String> = validate::flow(&flow, |name| destinations.get(name))
        .iter()
        .map(ToString::to_string)
        .collect();
    let mut resolved = Vec::new();
    let mut kafka_secrets = BTreeMap::new();
    let mut destination_secrets = BTreeMap::new();
    for r in &flow.spec.destinations {
        let Some(dest) = destinations.get(&r.name) else {
            continue;
        };
        problems.extend(
            validate::destination(&r.name, &dest.spec)
                .iter()
                .map(ToString::to_string),
        );
        for (pg_type, target) in &dest.spec.type_mappings {
            if let Err(e) = wallaby_codec::format::check_type_mapping(pg_type, target) {
                problems.push(format!(
                    "Destination/{} spec.typeMappings.{pg_type}: {e}",
                    r.name
                ));
            }
        }
        match (&dest.spec.kind, &dest.spec.file) {
            (DestinationType::File, Some(_)) => resolved.push((r.name.clone(), dest.spec.clone())),
            (DestinationType::File, None) => {}
            (DestinationType::Kafka | DestinationType::Bufstream, _) => {
                let block = dest.spec.kafka.as_ref().or(dest.spec.bufstream.as_ref());
                if let Some(spec) = block {
                    match kafka_check(&r.name, dest.spec.kind.as_str(), spec, secrets) {
                        Ok(s) => {
                            kafka_secrets.insert(r.name.clone(), s);
                            resolved.push((r.name.clone(), dest.spec.clone()));
                        }
                        Err(p) => problems.extend(p),
                    }
                }
            }
            (DestinationType::Grpc, _) => {
                match crate::destination::grpc::resolve(&r.name, &dest.spec, secrets) {
                    Ok(material) => {
                        let data = material.into_secret_data();
                        if !data.is_empty() {
                            destination_secrets.insert(r.name.clone(), data);
                        }
                        resolved.push((r.name.clone(), dest.spec.clone()));
                    }
                    Err(p) => problems.extend(p),
                }
            }
            (DestinationType::Http, _) => {
                match crate::destination::http::resolve(&r.name, &dest.spec, secrets) {
                    Ok(spec) => resolved.push((r.name.clone(), spec)),
                    Err(p) => problems.extend(p),
                }
            }
            (DestinationType::S3, _) => {
                let before = problems.len();
                if let Some(data) = check_s3(&r.name, &flow, &dest.spec, secrets, &mut problems)
                {
                    destination_secrets.insert(r.name.clone(), data);
                }
                if problems.len() == before {
                    resolved.push((r.name.clone(), dest.spec.clone()));
                }
            }
            (other, _) => problems.push(format!(
                "Destination/{} spec.type: {:?} is declared in the CRD but not delivered by this worker version yet; use type: file, kafka, bufstream, s3, http or grpc (see docs/destinations.md)",
                r.name,
                other.as_str()
            )),
        }
    }
    let pg = &flow.spec.source.postgres;
    let mut source_secret = None;
    if let Some(secret_ref) = &pg.secret_ref {
        match secrets.secret(&secret_ref.name, &SOURCE_SECRET_KEYS) {
            Some(data) => source_secret = Some(data),
            None => problems.push(format!(
                "Flow/{} spec.source.postgres.secretRef: Secret {:?} not found: {}",
                flow.metadata.name.as_deref().unwrap_or_default(),
                secret_ref.name,
                secrets.how_to_provide(&secret_ref.name, "dsn")
            )),
        }
    }
    let mut ssl_root_cert_pem = None;
    if let Some(sel) = &pg.ssl_root_cert {
        match secrets
            .secret(&sel.name, &[sel.key.as_str()])
            .and_then(|mut d| d.remove(&sel.key))
        {
            Some(pem) => ssl_root_cert_pem = Some(pem),
            None => problems.push(format!(
                "Flow/{} spec.source.postgres.sslRootCert: key {:?} of Secret {:?} not found: {}",
                flow.metadata.name.as_deref().unwrap_or_default(),
                sel.key,
                sel.name,
                secrets.how_to_provide(&sel.name, &sel.key)
            )),
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError::Invalid {
            path: origin.into(),
            problems,
        });
    }
    Ok(Resolved {
        flow,
        destinations: resolved,
        source_secret,
        ssl_root_cert_pem,
        destination_secrets,
        kafka_secrets,
    })
}

/// Checks a `kafka` / `bufstream` block (`kind` is the block's name) and resolves its
/// Secrets: SASL credentials from `secretRef`, TLS material from the `tls` selectors.
fn kafka_check(
    name: &str,
    kind: &str,
    spec: &wallaby_crds::destination::KafkaSpec,
    secrets: &dyn SecretSource,
) -> Result<crate::destination::kafka::KafkaSecrets, Vec<String>> {
    use crate::destination::kafka::{self, KafkaSecrets, SASL_SECRET_KEYS};
    let field = |f: &str| format!("Destination/{name} spec.{kind}.{f}");
    let mut problems = Vec::new();
    if spec.brokers.is_empty() || spec.brokers.iter().any(|b| b.trim().is_empty()) {
        problems.push(format!(
            "{}: list at least one broker as host:port, without empty entries",
            field("brokers")
        ));
    }
    for b in &spec.brokers {
        if !b.trim().is_empty() && !b.contains(':') {
            problems.push(format!(
                "{}: {b:?} has no port: write host:port (e.g. {b}:9092)",
                field("brokers")
            ));
        }
    }
    if spec.topic.trim().is_empty() {
        problems.push(format!(
            "{}: set a topic, or a template such as cdc.{{schema}}.{{table}}",
            field("topic")
        ));
    }
    let unknown = kafka::unknown_placeholders(&spec.topic);
    if !unknown.is_empty() {
        problems.push(format!(
            "{}: unknown placeholder(s) {} in {:?}: only {{schema}} and {{table}} are expanded",
            field("topic"),
            unknown.join(", "),
            spec.topic
        ));
    }
    if let Err(e) = spec.delivery_timeout.parse() {
        problems.push(format!("{}: {e}", field("deliveryTimeout")));
    }
    let mut out = KafkaSecrets::default();
    match (&spec.sasl, &spec.secret_ref) {
        (Some(_), Some(secret_ref)) => {
            let data = secrets
                .secret(&secret_ref.name, &SASL_SECRET_KEYS)
                .unwrap_or_default();
            match (data.get("username"), data.get("password")) {
                (Some(u), Some(p)) => out.sasl = Some((u.clone(), p.clone())),
                _ => {
                    let missing: Vec<&str> = SASL_SECRET_KEYS
                        .into_iter()
                        .filter(|k| !data.contains_key(*k))
                        .collect();
                    problems.push(format!(
                        "{}: Secret {:?} with keys username and password not found: {}",
                        field("secretRef"),
                        secret_ref.name,
                        secrets.how_to_provide_keys(&secret_ref.name, &missing)
                    ));
                }
            }
        }
        (Some(_), None) => problems.push(format!(
            "{}: sasl is set: name the Secret holding username and password",
            field("secretRef")
        )),
        (None, _) => {}
    }
    if let Some(tls) = spec.tls.as_ref().filter(|t| t.enabled) {
        for (sub, sel, slot) in [
            ("tls.ca", &tls.ca, &mut out.ca_pem),
            ("tls.clientCert", &tls.client_cert, &mut out.client_cert_pem),
            ("tls.clientKey", &tls.client_key, &mut out.client_key_pem),
        ] {
            let Some(sel) = sel else { continue };
            match secrets
                .secret(&sel.name, &[sel.key.as_str()])
                .and_then(|mut d| d.remove(&sel.key))
            {
                Some(pem) => *slot = Some(pem),
                None => problems.push(format!(
                    "{}: key {:?} of Secret {:?} not found: {}",
                    field(sub),
                    sel.key,
                    sel.name,
                    secrets.how_to_provide(&sel.name, &sel.key)
                )),
            }
        }
    }
    if problems.is_empty()
        && let Err(e) = kafka::client_config(spec, &out)
    {
        problems.push(
            format!("Destination/{name} {e}").replace("spec.kafka.", &format!("spec.{kind}.")),
        );
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// Checks an `s3` block against the Flow (format × compression, partitionBy) and reads
/// its credentials Secret; returns the Secret's data when it references one.
fn check_s3(
    name: &str,
    flow: &Flow,
    spec: &DestinationSpec,
    secrets: &dyn SecretSource,
    problems: &mut Vec<String>,
) -> Option<BTreeMap<String, String>> {
    use crate::destination::s3;
    let s3 = spec.s3.as_ref()?;
    if s3.bucket.trim().is_empty() {
        problems.push(format!(
            "Destination/{name} spec.s3.bucket: must name the bucket objects are written to"
        ));
    }
    if let Some(endpoint) = &s3.endpoint
        && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        problems.push(format!(
            "Destination/{name} spec.s3.endpoint: {endpoint:?} is not an http:// or https:// URL"
        ));
    }
    for p in &s3.partition_by {
        if let Err(e) = s3::PartitionField::parse(p) {
            problems.push(format!("Destination/{name} spec.s3.partitionBy: {e}"));
        }
    }
    let format = crate::run::wire_format(spec.format.unwrap_or(flow.spec.wire_format));
    if let Err(e) = s3::check_compression(format, s3.compression) {
        problems.push(format!("Destination/{name} spec.s3.compression: {e}"));
    }
    let secret_ref = s3.secret_ref.as_ref()?;
    let data = secrets.secret(&secret_ref.name, &s3::SECRET_KEYS);
    let Some(data) = data else {
        problems.push(format!(
            "Destination/{name} spec.s3.secretRef: Secret {:?} not found: {}",
            secret_ref.name,
            secrets.how_to_provide(&secret_ref.name, "accessKeyId")
        ));
        return None;
    };
    if let Err(e) = s3::SecretCredentials::from_secret(&data) {
        problems.push(format!(
            "Destination/{name} spec.s3.secretRef: Secret {:?}: {e}: {}",
            secret_ref.name,
            secrets.how_to_provide(&secret_ref.name, "accessKeyId")
        ));
        return None;
    }
    Some(data)
}

fn env_name(secret: &str, key: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("WALLABY_SECRET_{}_{}", clean(secret), clean(key))
}

/// The string data of a Secret: `data` (decoded) overlaid with `stringData`.
pub fn secret_strings(secret: &Secret) -> BTreeMap<String, String> {
    let mut data: BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    data.extend(secret.string_data.clone().unwrap_or_default());
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOW: &str = "apiVersion: wallaby.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {source: {postgres: {secretRef: {name: pg-creds}, slot: s, publication: p}}, destinations: [{name: files}]}\n---\napiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {name: files}\nspec: {type: file, file: {path: /tmp/x}}\n";

    #[test]
    fn secrets_come_from_the_environment_when_not_in_the_file() {
        let bundle = manifest::parse("f.yaml", FLOW).unwrap();
        let env =
            |k: &str| (k == "WALLABY_SECRET_PG_CREDS_DSN").then(|| "postgres://u:p@h/d".to_owned());
        let r = resolve("f.yaml", bundle, None, env).unwrap();
        assert_eq!(r.source_secret.unwrap()["dsn"], "postgres://u:p@h/d");
        assert_eq!(r.destinations[0].0, "files");
    }

    const KAFKA: &str = "apiVersion: wallaby.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {source: {postgres: {secretRef: {name: pg}, slot: s, publication: p}}, destinations: [{name: k}]}\n---\napiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {name: k}\nspec: {type: bufstream, bufstream: {brokers: [\"b:9092\"], topic: \"cdc.{table}\", sasl: {mechanism: SCRAM-SHA-256}, secretRef: {name: kc}, tls: {enabled: true, ca: {name: kca, key: ca.crt}}}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: kc}\nstringData: {username: u, password: p}\n";

    #[test]
    fn kafka_credentials_come_from_the_file_or_the_environment() {
        let bundle = manifest::parse("f.yaml", KAFKA).unwrap();
        let env = |k: &str| match k {
            "WALLABY_SECRET_PG_DSN" => Some("postgres://u:p@h/d".to_owned()),
            "WALLABY_SECRET_KCA_CA_CRT" => Some("PEM".to_owned()),
            _ => None,
        };
        let r = resolve("f.yaml", bundle, None, env).unwrap();
        let s = &r.kafka_secrets["k"];
        assert_eq!(s.sasl, Some(("u".to_owned(), "p".to_owned())));
        assert_eq!(s.ca_pem.as_deref(), Some("PEM"));
        let config = crate::destination::kafka::client_config(
            r.destinations[0].1.bufstream.as_ref().unwrap(),
            s,
        )
        .unwrap();
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.mechanisms"), Some("SCRAM-SHA-256"));
        assert_eq!(config.get("ssl.ca.pem"), Some("PEM"));
        assert_eq!(config.get("enable.idempotence"), Some("true"));

        let bundle = manifest::parse("f.yaml", KAFKA).unwrap();
        let env = |k: &str| (k == "WALLABY_SECRET_PG_DSN").then(|| "x".to_owned());
        let err = resolve("f.yaml", bundle, None, env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "Destination/k spec.bufstream.tls.ca: key \"ca.crt\" of Secret \"kca\" not found"
            ) && err.contains("WALLABY_SECRET_KCA_CA_CRT"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_secret_names_both_ways_to_provide_it() {
        let bundle = manifest::parse("f.yaml", FLOW).unwrap();
        let err = resolve("f.yaml", bundle, None, |_| None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Secret \"pg-creds\" not found")
                && err.contains("WALLABY_SECRET_PG_CREDS_DSN"),
            "{err}"
        );
    }
}
