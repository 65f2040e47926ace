//! WALlaby's API: the `Flow`, `Destination` and `DDLApproval` custom resources
//! (group `wallaby.dev`, version `v1alpha1`), the generator of their CRD YAML, and the
//! validation shared by the operator and the standalone worker.

// kube's `printcolumn(...)` repeats `type_ = …` per column, which clippy misreads as a
// duplicated attribute.
#![allow(clippy::duplicated_attributes)]

pub mod common;
pub mod ddl_approval;
pub mod destination;
pub mod flow;
pub mod manifest;
pub mod validate;

pub use common::{DurationString, SecretKeySelector, SecretReference, WireFormat};
pub use ddl_approval::{DDLApproval, DDLApprovalSpec, DDLApprovalStatus, Decision};
pub use destination::{Destination, DestinationSpec, DestinationStatus, DestinationType};
pub use flow::{Flow, FlowSpec, FlowStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every WALlaby resource.
pub const GROUP: &str = "wallaby.dev";
/// API version of every WALlaby resource.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of every WALlaby resource.
pub const API_VERSION: &str = "wallaby.dev/v1alpha1";

/// Every CRD with the file name it is committed under in `crds/` (and the chart).
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("flow.yaml", Flow::crd()),
        ("destination.yaml", Destination::crd()),
        ("ddlapproval.yaml", DDLApproval::crd()),
    ]
}

const GENERATED_HEADER: &str = "# Generated from the Rust types in crds/src by `wallaby-operator crds --write crds/`.\n# Do not edit: change the types and regenerate.\n";

/// YAML of one CRD exactly as committed.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_norway::Error> {
    Ok(format!(
        "{GENERATED_HEADER}{}",
        serde_norway::to_string(crd)?
    ))
}

/// All CRDs as one multi-document YAML stream (what `wallaby-operator crds` prints).
pub fn all_crds_yaml() -> Result<String, serde_norway::Error> {
    let mut out = String::new();
    for (_, crd) in crds() {
        out.push_str("---\n");
        out.push_str(&crd_yaml(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGENERATE: &str =
        "cargo run -p wallaby-operator -- crds --write crds/ --write charts/wallaby/crds/";

    /// Every committed copy of a CRD must be what the types generate.
    fn assert_current(dir: &std::path::Path) {
        for (file, crd) in crds() {
            let want = crd_yaml(&crd).unwrap();
            let path = dir.join(file);
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{} is stale: run `{REGENERATE}`",
                path.display()
            );
        }
    }

    /// `crds/` (what `kubectl apply -f crds/` installs).
    #[test]
    fn committed_crd_yaml_is_current() {
        assert_current(std::path::Path::new(env!("CARGO_MANIFEST_DIR")));
    }

    /// The Helm chart's `crds/` (what `helm install` installs).
    #[test]
    fn chart_crd_copies_are_current() {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        assert_current(&repo.join("charts/wallaby/crds"));
    }

    /// `kubectl explain` shows descriptions: every property of every schema must have one.
    #[test]
    fn every_field_is_documented() {
        fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                for (name, sub) in props {
                    let p = format!("{path}.{name}");
                    let top = path.matches('.').count() == 0
                        && ["apiVersion", "kind", "metadata"].contains(&name.as_str());
                    if !top && sub.get("description").is_none() {
                        missing.push(p.clone());
                    }
                    walk(&p, sub, missing);
                }
            }
            if let Some(items) = v.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
            if let Some(ap) = v.get("additionalProperties").filter(|a| a.is_object()) {
                walk(&format!("{path}{{}}"), ap, missing);
            }
        }
        let mut missing = Vec::new();
        for (_, crd) in crds() {
            let kind = &crd.spec.names.kind;
            for version in &crd.spec.versions {
                let schema = serde_json::to_value(&version.schema).unwrap();
                walk(kind, &schema["openAPIV3Schema"], &mut missing);
            }
        }
        // Fields of embedded Kubernetes types (Condition, EnvVar, ...) come documented
        // from k8s-openapi; anything missing is ours.
        assert!(
            missing.is_empty(),
            "fields without a doc comment: {missing:#?}"
        );
    }
}
