//! Which Secrets a Flow and its Destinations reference, found in one place so the
//! dereference stage reads them, validation checks them, the config hash covers them, the
//! worker's Role grants them, and Secret watches map back to the objects that use them.

use std::collections::BTreeSet;

use serde_json::Value;
use wallaby_crds::{Destination, Flow};

/// One reference to a Secret.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SecretUse {
    /// `Flow/demo` or `Destination/files`.
    pub object: String,
    /// Dotted path of the referencing field, e.g. `spec.source.postgres.secretRef`.
    pub field: String,
    /// Secret name (same namespace).
    pub secret: String,
    /// The key that must exist, for key selectors; `None` for whole-Secret references.
    pub key: Option<String>,
}

/// Secret references of a Flow's own spec.
pub fn of_flow(flow: &Flow) -> Vec<SecretUse> {
    let name = flow.metadata.name.as_deref().unwrap_or_default();
    let pg = &flow.spec.source.postgres;
    let object = format!("Flow/{name}");
    let mut uses = Vec::new();
    if let Some(r) = &pg.secret_ref {
        uses.push(SecretUse {
            object: object.clone(),
            field: "spec.source.postgres.secretRef".into(),
            secret: r.name.clone(),
            key: None,
        });
    }
    if let Some(k) = &pg.ssl_root_cert {
        uses.push(SecretUse {
            object,
            field: "spec.source.postgres.sslRootCert".into(),
            secret: k.name.clone(),
            key: Some(k.key.clone()),
        });
    }
    uses
}

/// Secret references of a Destination: every `secretRef`/`*SecretRef` (a whole Secret) and
/// every `{name, key}` selector anywhere in its spec, so a new destination type's
/// references are found without touching this code.
pub fn of_destination(destination: &Destination) -> Vec<SecretUse> {
    let name = destination.metadata.name.as_deref().unwrap_or_default();
    let object = format!("Destination/{name}");
    let mut uses = Vec::new();
    if let Ok(spec) = serde_json::to_value(&destination.spec) {
        walk(&object, "spec", &spec, &mut uses);
    }
    uses
}

fn walk(object: &str, path: &str, value: &Value, out: &mut Vec<SecretUse>) {
    match value {
        Value::Object(map) => {
            for (key, sub) in map {
                let field = format!("{path}.{key}");
                let name = sub.get("name").and_then(Value::as_str);
                let selector_key = sub.get("key").and_then(Value::as_str);
                let fields = sub.as_object().map(|m| m.len()).unwrap_or_default();
                match (name, selector_key) {
                    (Some(secret), None)
                        if (key == "secretRef" || key.ends_with("SecretRef")) && fields == 1 =>
                    {
                        out.push(SecretUse {
                            object: object.into(),
                            field,
                            secret: secret.into(),
                            key: None,
                        });
                    }
                    (Some(secret), Some(k)) if fields == 2 => out.push(SecretUse {
                        object: object.into(),
                        field,
                        secret: secret.into(),
                        key: Some(k.into()),
                    }),
                    _ => walk(object, &field, sub, out),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(object, &format!("{path}[{i}]"), item, out);
            }
        }
        _ => {}
    }
}

/// Names of every Secret a Flow needs, through its own spec and the given Destinations.
pub fn secret_names<'a>(
    flow: &Flow,
    destinations: impl IntoIterator<Item = &'a Destination>,
) -> BTreeSet<String> {
    of_flow(flow)
        .into_iter()
        .chain(destinations.into_iter().flat_map(of_destination))
        .map(|u| u.secret)
        .collect()
}

/// Whether the Flow lists a Destination of this name.
pub fn uses_destination(flow: &Flow, destination: &str) -> bool {
    flow.spec.destinations.iter().any(|d| d.name == destination)
}
