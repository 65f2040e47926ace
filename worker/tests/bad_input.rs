//! Bad input gives a non-zero exit and a message naming the problem and the fix, never a
//! panic: invalid YAML, unknown field, missing Destination, unreachable PostgreSQL, wrong
//! password, wal_level=replica, a publication table that does not exist.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Runs the worker on `manifest`; returns its stderr after asserting exit code 1.
fn run_failing(manifest: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_wallaby-worker"))
        .args(["run", "-f"])
        .arg(manifest)
        .arg("--status-file")
        .arg(manifest.with_file_name("status.json"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1 (error, not a panic):\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn assert_mentions(stderr: &str, wants: &[&str]) {
    for want in wants {
        assert!(stderr.contains(want), "stderr lacks {want:?}:\n{stderr}");
    }
}

/// Writes each case to `<dir>/<name>.yaml`, runs the worker on it, checks the expected
/// phrases, and returns each case's stderr for further checks.
fn run_cases(
    dir: &Path,
    cases: Vec<(&'static str, String, Vec<&str>)>,
) -> Vec<(&'static str, std::path::PathBuf, String)> {
    cases
        .into_iter()
        .map(|(name, text, wants)| {
            let path = dir.join(format!("{}.yaml", name.replace(' ', "-")));
            std::fs::write(&path, text).unwrap();
            let stderr = run_failing(&path);
            assert_mentions(&stderr, &wants);
            (name, path, stderr)
        })
        .collect()
}

fn flow(dsn: &str, extra_spec: &str, destination: &str) -> String {
    format!(
        r#"apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {{name: bad}}
spec:
  source:
    postgres:
      secretRef: {{name: pg}}
      slot: bad
      publication: bad
{extra_spec}
  destinations: [{{name: {destination}}}]
---
apiVersion: wallaby.dev/v1alpha1
kind: Destination
metadata: {{name: files}}
spec: {{type: file, file: {{path: /tmp/wallaby-bad-input-out}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: pg}}
stringData: {{dsn: "{dsn}"}}
"#
    )
}

#[test]
fn manifest_errors_name_the_document_field_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let dsn = "postgres://wallaby:wallaby@127.0.0.1:1/wallaby";
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "invalid yaml",
            "kind: Flow\n  metadata: [oops\n".into(),
            vec!["invalid YAML", "document 1"],
        ),
        (
            "unknown field",
            flow(dsn, "      slott: typo", "files"),
            vec![
                "unknown field `spec.source.postgres.slott`",
                "kubectl explain flows",
            ],
        ),
        (
            "missing destination",
            flow(dsn, "", "nowhere"),
            vec!["Destination \"nowhere\" does not exist", "create it"],
        ),
        (
            "cel rule",
            flow(dsn, "  ackPolicy: primary", "files")
                .replace("  destinations:", "  ackPolicy: primary\n  destinations:")
                .replace("      \n  ackPolicy: primary\n", "\n"),
            vec!["primaryDestination is required when ackPolicy is primary"],
        ),
    ];
    for (name, path, stderr) in run_cases(dir.path(), cases) {
        assert!(
            stderr.contains(&path.display().to_string()),
            "{name}: names the file:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_catalog_errors_name_the_fix() {
    let db = TestDb::create("bad").await;
    db.client()
        .await
        .batch_execute("CREATE TABLE present (id int primary key)")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wrong_password = db
        .dsn
        .replace("wallaby:wallaby@", "wallaby:not-the-password@");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unreachable",
            flow("postgres://wallaby:x@127.0.0.1:1/wallaby", "", "files"),
            vec![
                "cannot connect to PostgreSQL at wallaby@127.0.0.1:1/wallaby",
                "Is the server running",
            ],
        ),
        (
            "wrong password",
            flow(&wrong_password, "", "files"),
            vec![
                "password authentication failed",
                "Check the user and password",
            ],
        ),
        (
            "missing table",
            flow(&db.dsn, "      tables: [present, public.nope]", "files"),
            vec![
                "table public.nope (source.postgres.tables[1]) does not exist",
                "remove it from source.postgres.tables",
            ],
        ),
    ];
    for (name, _, stderr) in run_cases(dir.path(), cases) {
        assert!(
            !stderr.contains("not-the-password"),
            "{name}: password leaked:\n{stderr}"
        );
    }
    db.drop_all().await;
}

#[test]
fn wal_level_replica_is_refused_with_the_fix() {
    // A second private instance with wal_level=replica.
    let state = std::env::temp_dir().join(format!("wallaby-test-replica-{}", std::process::id()));
    let pg = repo().join("e2e/pg.sh");
    let start = Command::new(&pg)
        .arg("start")
        .env("WALLABY_PG_DIR", &state)
        .env("WALLABY_PG_WAL_LEVEL", "replica")
        .env_remove("WALLABY_PG_PORT")
        .output()
        .unwrap();
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );
    let dsn = String::from_utf8_lossy(&start.stdout)
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.yaml");
    std::fs::write(&path, flow(&dsn, "", "files")).unwrap();
    let stderr = run_failing(&path);
    let destroyed = Command::new(&pg)
        .arg("destroy")
        .env("WALLABY_PG_DIR", &state)
        .status()
        .unwrap();
    assert!(destroyed.success());
    assert_mentions(
        &stderr,
        &[
            "wal_level is 'replica'",
            "ALTER SYSTEM SET wal_level = logical",
            "restart PostgreSQL",
        ],
    );
}
