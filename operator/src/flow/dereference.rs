//! Stage 1, dereference: reads what a Flow points at — its Destinations and the Secrets
//! they and the Flow reference. Absent objects are not errors here (validation reports them
//! with a fix); only failed API calls are.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use wallaby_crds::{Destination, Flow};

use crate::refs;

/// Objects a Flow references, by name; a missing name is simply absent.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Destinations of `spec.destinations` that exist.
    pub destinations: BTreeMap<String, Destination>,
    /// Secrets referenced by the Flow and those Destinations that exist.
    pub secrets: BTreeMap<String, Secret>,
}

/// A read the API server refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DereferenceError {
    /// Reading one referenced object failed.
    #[error(
        "reading {kind} {namespace}/{name} referenced by Flow {flow} failed: {source}; check the operator's RBAC (get on {kind}) and the API server"
    )]
    Read {
        kind: &'static str,
        namespace: String,
        name: String,
        flow: String,
        #[source]
        source: kube::Error,
    },
}

/// Reads the Destinations and Secrets of `flow` from its namespace.
pub async fn read(
    client: &Client,
    namespace: &str,
    flow: &Flow,
) -> Result<Inputs, DereferenceError> {
    let flow_name = flow.metadata.name.clone().unwrap_or_default();
    let destinations_api: Api<Destination> = Api::namespaced(client.clone(), namespace);
    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut inputs = Inputs::default();
    for d in &flow.spec.destinations {
        let found =
            destinations_api
                .get_opt(&d.name)
                .await
                .map_err(|source| DereferenceError::Read {
                    kind: "Destination",
                    namespace: namespace.into(),
                    name: d.name.clone(),
                    flow: flow_name.clone(),
                    source,
                })?;
        if let Some(found) = found {
            inputs.destinations.insert(d.name.clone(), found);
        }
    }
    for name in refs::secret_names(flow, inputs.destinations.values()) {
        let found = secrets_api
            .get_opt(&name)
            .await
            .map_err(|source| DereferenceError::Read {
                kind: "Secret",
                namespace: namespace.into(),
                name: name.clone(),
                flow: flow_name.clone(),
                source,
            })?;
        if let Some(found) = found {
            inputs.secrets.insert(name, found);
        }
    }
    Ok(inputs)
}

/// The string value of `key` in a Secret (`data`, else `stringData`), if present and UTF-8.
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone()).ok();
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned()
}

/// Whether a Secret has `key` (in `data` or `stringData`).
pub fn secret_has(secret: &Secret, key: &str) -> bool {
    secret.data.as_ref().is_some_and(|d| d.contains_key(key))
        || secret
            .string_data
            .as_ref()
            .is_some_and(|d| d.contains_key(key))
}
