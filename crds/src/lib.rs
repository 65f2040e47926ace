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
        quote_yaml11_booleans(&serde_norway::to_string(crd)?)
    ))
}

/// Plain scalars that YAML 1.1 reads as booleans. kubectl and Helm parse manifests with
/// go-yaml's YAML 1.1 rules, so an unquoted enum value `off` (`toastFetch`,
/// `syncPublication`) would reach the API server as `false` and the CRD be rejected;
/// serde_norway emits YAML 1.2, where they are strings, and leaves them plain.
const YAML11_BOOLEANS: [&str; 16] = [
    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
    "OFF",
];

/// Single-quotes every plain scalar value in [`YAML11_BOOLEANS`] (`key: off`, `- off`),
/// leaving block scalars (multi-line descriptions) untouched.
fn quote_yaml11_booleans(yaml: &str) -> String {
    let mut out = String::with_capacity(yaml.len() + 64);
    // Indentation of the line that opened the block scalar being skipped.
    let mut block: Option<usize> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(opened) = block {
            if line.trim().is_empty() || indent > opened {
                out.push_str(line);
                out.push('\n');
                continue;
            }
            block = None;
        }
        let body = &line[indent..];
        let value_at = match body.find(": ") {
            Some(i) => Some(indent + i + 2),
            None if body.starts_with("- ") => Some(indent + 2),
            None => None,
        };
        match value_at {
            Some(at) if YAML11_BOOLEANS.contains(&&line[at..]) => {
                out.push_str(&line[..at]);
                out.push('\'');
                out.push_str(&line[at..]);
                out.push('\'');
            }
            _ => out.push_str(line),
        }
        out.push('\n');
        let end = line.trim_end();
        if ["|", "|-", "|+", ">", ">-", ">+"]
            .iter()
            .any(|m| end.ends_with(&format!(" {m}")))
        {
            block = Some(indent);
        }
    }
    out
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

    #[test]
    fn yaml_1_1_booleans_are_quoted_outside_block_scalars() {
        let yaml =
            "a: off\nb:\n- on\n- offline\n- key: No\nc: |-\n  - off\n  d: yes\ne: 'off'\nf: y\n";
        assert_eq!(
            quote_yaml11_booleans(yaml),
            "a: 'off'\nb:\n- 'on'\n- offline\n- key: 'No'\nc: |-\n  - off\n  d: yes\ne: 'off'\nf: 'y'\n"
        );
    }

    /// What kubectl and Helm read (YAML 1.1) is what the types generate: no enum value
    /// turns into a boolean, and the YAML still reads back as the same CRD.
    #[test]
    fn generated_yaml_reads_back_identically_and_keeps_off_a_string() {
        for (file, crd) in crds() {
            let yaml = crd_yaml(&crd).unwrap();
            let back: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
            assert_eq!(back, serde_json::to_value(&crd).unwrap(), "{file}");
            for line in yaml.lines() {
                let t = line.trim();
                assert!(
                    !YAML11_BOOLEANS
                        .iter()
                        .any(|b| t.ends_with(&format!(": {b}")) || t == format!("- {b}")),
                    "{file}: unquoted YAML 1.1 boolean in {line:?}"
                );
            }
        }
        assert!(crd_yaml(&Flow::crd()).unwrap().contains("default: 'off'"));
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
