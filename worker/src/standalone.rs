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
use wallaby_crds::{Destination, Flow, validate};

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
    /// What each Destination's check resolved from the Secrets it references (by
    /// Destination name, absent when it reads none), under its module's keys (e.g. `grpc`:
    /// `tls.ca`, `tls.clientCert`, `tls.clientKey`); see `wallaby_destinations::registry`.
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

pub use wallaby_destinations::SecretSource;

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
        match wallaby_destinations::check(&r.name, &flow, &dest.spec, secrets) {
            Ok(data) => {
                if !data.is_empty() {
                    destination_secrets.insert(r.name.clone(), data);
                }
                resolved.push((r.name.clone(), dest.spec.clone()));
            }
            Err(p) => problems.extend(p),
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
    })
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
        let s = &wallaby_destinations::kafka::KafkaSecrets::from_secret_data(
            &r.destination_secrets["k"],
        );
        assert_eq!(s.sasl, Some(("u".to_owned(), "p".to_owned())));
        assert_eq!(s.ca_pem.as_deref(), Some("PEM"));
        let config = wallaby_destinations::kafka::client_config(
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
