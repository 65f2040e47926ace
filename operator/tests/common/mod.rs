//! Loads the YAML fixtures of the pure-stage tests: one multi-document file per case with a
//! Flow, its Destinations and Secrets, as the API server would return them.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use wallaby_crds::{Destination, Flow};
use wallaby_operator::flow::dereference::Inputs;

/// A fixture: the Flow and what `dereference` would have read for it.
pub struct Fixture {
    pub flow: Flow,
    pub inputs: Inputs,
}

pub fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Reads `tests/fixtures/<name>`.
pub fn load(name: &str) -> Fixture {
    let text = std::fs::read_to_string(path(name)).unwrap();
    let mut flow = None;
    let mut inputs = Inputs::default();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(doc).unwrap();
        match value["kind"].as_str().unwrap() {
            "Flow" => flow = Some(serde_json::from_value::<Flow>(value).unwrap()),
            "Destination" => {
                let d: Destination = serde_json::from_value(value).unwrap();
                inputs
                    .destinations
                    .insert(d.metadata.name.clone().unwrap(), d);
            }
            "Secret" => {
                let s: Secret = serde_json::from_value(value).unwrap();
                inputs.secrets.insert(s.metadata.name.clone().unwrap(), s);
            }
            other => panic!("{name}: unexpected kind {other}"),
        }
    }
    Fixture {
        flow: flow.expect("fixture without a Flow"),
        inputs,
    }
}

/// Compares `actual` with `tests/snapshots/<name>`; `UPDATE_SNAPSHOTS=1` rewrites it.
pub fn assert_snapshot(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs from the generated manifest (rerun with UPDATE_SNAPSHOTS=1 after checking the change):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

pub fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
