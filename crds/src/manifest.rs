//! Reading manifests outside the API server: a multi-document YAML stream with one Flow,
//! its Destinations and (optionally) Secrets, checked the way the API server would check
//! them — unknown fields rejected, the CRD schema's CEL rules evaluated (feature `cel`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use serde::de::DeserializeOwned;

use crate::{API_VERSION, Destination, Flow};

/// Objects found in a manifest stream.
#[derive(Debug, Default)]
pub struct Bundle {
    /// Flows, in document order.
    pub flows: Vec<Flow>,
    /// Destinations by name.
    pub destinations: BTreeMap<String, Destination>,
    /// Secrets by name.
    pub secrets: BTreeMap<String, Secret>,
}

/// A problem with a manifest, naming the document and what to change.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The text is not YAML.
    #[error("{source_name}: document {doc}: invalid YAML: {message}")]
    Yaml {
        source_name: String,
        doc: usize,
        message: String,
    },
    /// A document lacks `apiVersion`/`kind`, or has a kind WALlaby does not read.
    #[error("{source_name}: document {doc}: {message}")]
    Kind {
        source_name: String,
        doc: usize,
        message: String,
    },
    /// A field is not part of the schema.
    #[error(
        "{source_name}: {kind} {name:?}: unknown field `{field}`; see `kubectl explain {plural}` or docs/resources.md for the fields"
    )]
    UnknownField {
        source_name: String,
        kind: String,
        plural: String,
        name: String,
        field: String,
    },
    /// The object does not match the schema's types.
    #[error("{source_name}: {kind} {name:?}: {message}")]
    Schema {
        source_name: String,
        kind: String,
        name: String,
        message: String,
    },
    /// A CEL rule of the CRD failed.
    #[error("{source_name}: {kind} {name:?}: {message}")]
    Rule {
        source_name: String,
        kind: String,
        name: String,
        message: String,
    },
    /// Two objects of the same kind share a name.
    #[error("{source_name}: two {kind} objects are named {name:?}; names must be unique")]
    Duplicate {
        source_name: String,
        kind: String,
        name: String,
    },
}

/// Parses a multi-document YAML stream. `source_name` (usually the file path) prefixes
/// every error.
pub fn parse(source_name: &str, text: &str) -> Result<Bundle, ManifestError> {
    let mut bundle = Bundle::default();
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc = index + 1;
        let value: serde_json::Value =
            serde::Deserialize::deserialize(document).map_err(|e| ManifestError::Yaml {
                source_name: source_name.into(),
                doc,
                message: e.to_string(),
            })?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        let kind_err = |message: String| ManifestError::Kind {
            source_name: source_name.into(),
            doc,
            message,
        };
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        match (api_version, kind) {
            (API_VERSION, "Flow") => {
                let flow: Flow = typed(source_name, "Flow", "flows", value)?;
                if bundle
                    .flows
                    .iter()
                    .any(|f| f.metadata.name == flow.metadata.name)
                {
                    return Err(duplicate(source_name, "Flow", &flow.metadata.name));
                }
                bundle.flows.push(flow);
            }
            (API_VERSION, "Destination") => {
                let dest: Destination = typed(source_name, "Destination", "destinations", value)?;
                let name = dest.metadata.name.clone().unwrap_or_default();
                if bundle.destinations.insert(name.clone(), dest).is_some() {
                    return Err(duplicate(source_name, "Destination", &Some(name)));
                }
            }
            ("v1", "Secret") => {
                let secret: Secret = typed(source_name, "Secret", "secrets", value)?;
                let name = secret.metadata.name.clone().unwrap_or_default();
                if bundle.secrets.insert(name.clone(), secret).is_some() {
                    return Err(duplicate(source_name, "Secret", &Some(name)));
                }
            }
            ("", _) | (_, "") => {
                return Err(kind_err(
                    "missing apiVersion or kind: every document needs `apiVersion: wallaby.dev/v1alpha1` and `kind: Flow` or `kind: Destination` (or `apiVersion: v1`, `kind: Secret`)".into(),
                ));
            }
            (other_version, "Flow" | "Destination") => {
                return Err(kind_err(format!(
                    "apiVersion {other_version:?} is not served: use {API_VERSION:?}"
                )));
            }
            (_, other) => {
                return Err(kind_err(format!(
                    "kind {other:?} is not read by wallaby-worker: a manifest holds Flow, Destination and Secret documents"
                )));
            }
        }
    }
    Ok(bundle)
}

fn duplicate(source_name: &str, kind: &str, name: &Option<String>) -> ManifestError {
    ManifestError::Duplicate {
        source_name: source_name.into(),
        kind: kind.into(),
        name: name.clone().unwrap_or_default(),
    }
}

/// Deserializes one object, rejecting unknown fields and checking the CRD's CEL rules.
fn typed<T: DeserializeOwned + serde::Serialize>(
    source_name: &str,
    kind: &str,
    plural: &str,
    value: serde_json::Value,
) -> Result<T, ManifestError> {
    let name = value
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_owned();
    let schema_err = |message: String| ManifestError::Schema {
        source_name: source_name.into(),
        kind: kind.into(),
        name: name.clone(),
        message,
    };
    if value
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .is_none_or(str::is_empty)
    {
        return Err(schema_err("metadata.name is required".into()));
    }
    let mut unknown = Vec::new();
    let parsed: T = serde_ignored::deserialize(&value, |path| unknown.push(path.to_string()))
        .map_err(|e| schema_err(e.to_string()))?;
    // `status` is owned by the worker; `metadata` fields are free-form server state.
    // `apiVersion`/`kind` are read by kube's own deserializer.
    unknown.retain(|p| {
        !["status", "metadata", "apiVersion", "kind"]
            .iter()
            .any(|top| p.starts_with(top))
    });
    // serde_ignored writes `?` for the inside of an Option; users think in field paths.
    if let Some(field) = unknown.into_iter().next().map(|p| p.replace(".?", "")) {
        return Err(ManifestError::UnknownField {
            source_name: source_name.into(),
            kind: kind.into(),
            plural: plural.into(),
            name,
            field,
        });
    }
    // Rules see the object with defaults applied, as they do on the API server.
    #[cfg(feature = "cel")]
    let defaulted = serde_json::to_value(&parsed).map_err(|e| schema_err(e.to_string()))?;
    #[cfg(feature = "cel")]
    cel::check(kind, &defaulted).map_err(|message| ManifestError::Rule {
        source_name: source_name.into(),
        kind: kind.into(),
        name: name.clone(),
        message,
    })?;
    Ok(parsed)
}

#[cfg(feature = "cel")]
mod cel {
    //! Evaluates the `x-kubernetes-validations` rules of the generated CRDs, so a standalone
    //! manifest is held to exactly the rules `kubectl apply` would be.

    use std::sync::OnceLock;

    fn schemas() -> &'static Vec<(String, serde_json::Value)> {
        static SCHEMAS: OnceLock<Vec<(String, serde_json::Value)>> = OnceLock::new();
        SCHEMAS.get_or_init(|| {
            crate::crds()
                .into_iter()
                .filter_map(|(_, crd)| {
                    let version = crd.spec.versions.first()?;
                    let schema = version.schema.as_ref()?.open_api_v3_schema.as_ref()?;
                    Some((
                        crd.spec.names.kind.clone(),
                        serde_json::to_value(schema).ok()?,
                    ))
                })
                .collect()
        })
    }

    pub(super) fn check(kind: &str, object: &serde_json::Value) -> Result<(), String> {
        let Some((_, schema)) = schemas().iter().find(|(k, _)| k == kind) else {
            return Ok(()); // Secrets: no CRD rules
        };
        kube_cel::Validator::new()
            .validate(schema, object, None)
            .map_err(|errors| {
                errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {name: demo}
spec:
  source:
    postgres: {dsn: "postgres://wallaby@127.0.0.1/db", slot: demo, publication: demo}
  destinations: [{name: files}]
---
apiVersion: wallaby.dev/v1alpha1
kind: Destination
metadata: {name: files}
spec: {type: file, file: {path: /tmp/out}}
---
apiVersion: v1
kind: Secret
metadata: {name: pg}
stringData: {dsn: "postgres://u:p@h/db"}
"#;

    #[test]
    fn parses_flow_destinations_and_secrets() {
        let b = parse("good.yaml", GOOD).unwrap();
        assert_eq!(b.flows.len(), 1);
        assert_eq!(b.flows[0].spec.source.postgres.batch_size, 100);
        assert!(b.destinations.contains_key("files"));
        assert!(b.secrets.contains_key("pg"));
    }

    #[test]
    fn rejects_bad_manifests_with_precise_messages() {
        let cases: &[(&str, &str)] = &[
            ("kind: Flow\n", "missing apiVersion or kind"),
            (
                "apiVersion: wallaby.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: x}\n",
                "kind \"Pipeline\"",
            ),
            ("a: [1\n", "invalid YAML"),
            (
                "apiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {name: d}\nspec: {type: file, file: {path: /x, colour: red}}\n",
                "unknown field `spec.file.colour`",
            ),
            (
                "apiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {name: d}\nspec: {type: files, file: {path: /x}}\n",
                "unknown variant `files`",
            ),
            (
                "apiVersion: wallaby.dev/v1beta9\nkind: Flow\nmetadata: {name: x}\n",
                "is not served",
            ),
        ];
        for (text, want) in cases {
            let err = parse("t.yaml", text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
        }
    }

    #[cfg(feature = "cel")]
    #[test]
    fn cel_rules_of_the_crd_apply_to_standalone_manifests() {
        let cases: &[(&str, &str)] = &[
            (
                "apiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {name: d}\nspec: {type: s3, file: {path: /x}}\n",
                "exactly one typed block",
            ),
            (
                "apiVersion: wallaby.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {source: {postgres: {dsn: 'postgres://a@h/d', slot: s, publication: p}}, destinations: [{name: d}], ackPolicy: primary}\n",
                "primaryDestination is required",
            ),
            (
                "apiVersion: wallaby.dev/v1alpha1\nkind: Flow\nmetadata: {name: f}\nspec: {source: {postgres: {dsn: 'postgres://a:secret@h/d', slot: s, publication: p}}, destinations: [{name: d}]}\n",
                "must not contain a password",
            ),
        ];
        for (text, want) in cases {
            let err = parse("t.yaml", text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: got {err:?}, want {want:?}");
        }
    }
}
