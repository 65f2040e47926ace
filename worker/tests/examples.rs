//! Every manifest in `examples/` passes `wallaby-worker validate` once the Secrets it
//! names are supplied the way its header says (environment variables), so the examples
//! stay true to the schema and the checks as both evolve.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

/// `WALLABY_SECRET_…` variables a failed validation asks for.
fn asked_for(stderr: &str) -> Vec<String> {
    stderr
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("WALLABY_SECRET_"))
        .map(|w| {
            format!(
                "WALLABY_SECRET_{}",
                w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            )
        })
        .collect()
}

#[test]
fn every_example_validates() {
    let dir = common::repo().join("examples");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let validate = |env: &[(String, String)]| {
            Command::new(env!("CARGO_BIN_EXE_wallaby-worker"))
                .args(["validate", "-f"])
                .arg(&path)
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .output()
                .unwrap()
        };
        let first = validate(&[]);
        let mut env = Vec::new();
        if !first.status.success() {
            let stderr = String::from_utf8_lossy(&first.stderr);
            let vars = asked_for(&stderr);
            assert!(
                !vars.is_empty(),
                "{} fails for another reason than a Secret:\n{stderr}",
                path.display()
            );
            for var in vars {
                let value = if var.ends_with("_DSN") {
                    "postgres://wallaby:secret@db.example:5432/shop".to_owned()
                } else {
                    "example".to_owned()
                };
                env.push((var, value));
            }
        }
        let second = validate(&env);
        assert!(
            second.status.success(),
            "{} with {env:?}:\n{}",
            path.display(),
            String::from_utf8_lossy(&second.stderr)
        );
        checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    checked.sort();
    for want in [
        "bufstream.yaml",
        "grpc.yaml",
        "http.yaml",
        "kafka.yaml",
        "quickstart.yaml",
        "s3.yaml",
    ] {
        assert!(
            checked.iter().any(|c| c == want),
            "{want} not checked: {checked:?}"
        );
    }
}
