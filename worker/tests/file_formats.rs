//! One flow fanned out to `file` destinations in every wire format: the Flow's
//! `wireFormat` applies unless a Destination sets `format`, each payload carries its schema,
//! decodes back to the rows PostgreSQL holds, and `typeMappings` reach the payload.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TestDb, Worker, wait_for};
use wallaby_codec::{Value, WireFormat};

const DEADLINE: Duration = Duration::from_secs(60);

fn manifest(dir: &Path, db: &TestDb) -> std::path::PathBuf {
    let dest = |name: &str, extra: &str| {
        format!(
            "---\napiVersion: wallaby.dev/v1alpha1\nkind: Destination\nmetadata: {{name: {name}}}\nspec: {{type: file, file: {{path: \"{}\"}}{extra}}}\n",
            dir.join(name).display()
        )
    };
    let mut text = format!(
        r#"apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {{name: formats}}
spec:
  wireFormat: parquet
  parallelism: 5
  source:
    postgres:
      secretRef: {{name: pg}}
      slot: {slot}
      publication: {slot}
      tables: ["public.t"]
      batchTimeout: 50ms
  destinations: [{{name: pq}}, {{name: ar}}, {{name: av}}, {{name: pb}}, {{name: js}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: pg}}
stringData: {{dsn: "{dsn}"}}
"#,
        slot = db.name,
        dsn = db.dsn
    );
    text += &dest("pq", "");
    text += &dest("ar", ", format: arrow");
    text += &dest("av", ", format: avro");
    text += &dest("pb", ", format: proto");
    text += &dest("js", ", format: json, typeMappings: {numeric: float64}");
    let path = dir.join("flow.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Decodes every payload file of a destination directory into (id, name, amount) rows.
fn read_back(dir: &Path, format: WireFormat) -> Vec<(i32, String, String)> {
    let mut rows = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return rows;
    };
    for e in entries {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(format.extension()) {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let (schema, changes) = common::decode_payload(format, &bytes);
        assert_eq!(schema.qualified_name(), "public.t");
        for change in changes {
            let after = change.after.unwrap();
            let id = match &after.values[0] {
                Value::Int4(i) => *i,
                other => panic!("id decoded as {other:?}"),
            };
            let name = match &after.values[1] {
                Value::Text(s) => s.clone(),
                other => panic!("name decoded as {other:?}"),
            };
            let amount = match &after.values[2] {
                Value::Numeric(n) => n.clone(),
                Value::Float8(f) => format!("float:{f}"),
                other => panic!("amount decoded as {other:?}"),
            };
            rows.push((id, name, amount));
        }
    }
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_decodes_back_to_the_source_rows() {
    let db = TestDb::create("formats").await;
    let sql = db.client().await;
    sql.batch_execute("CREATE TABLE t (id int PRIMARY KEY, name text, amount numeric(10,2))")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(dir.path(), &db);
    let worker = Worker::spawn(&m, dir.path());
    db.attached().await;
    sql.batch_execute(
        "INSERT INTO t VALUES (1, 'ada', 12.50), (2, 'bob, \"quoted\"', -0.01), (3, 'ünï', 99999999.99)",
    )
    .await
    .unwrap();
    let want = vec![
        (1, "ada".to_owned(), "12.50".to_owned()),
        (2, "bob, \"quoted\"".to_owned(), "-0.01".to_owned()),
        (3, "ünï".to_owned(), "99999999.99".to_owned()),
    ];
    for (sub, format) in [
        ("pq", WireFormat::Parquet),
        ("ar", WireFormat::Arrow),
        ("av", WireFormat::Avro),
        ("pb", WireFormat::Proto),
    ] {
        let got = wait_for(&format!("{sub} payloads"), DEADLINE, async || {
            let rows = read_back(&dir.path().join(sub), format);
            (rows.len() >= 3).then_some(rows)
        })
        .await;
        assert_eq!(got, want, "{format:?}");
    }
    // JSON with `numeric: float64`: the mapping is applied (and is lossy by definition).
    let json = wait_for("json payloads", DEADLINE, async || {
        let rows = read_back(&dir.path().join("js"), WireFormat::Json);
        (rows.len() >= 3).then_some(rows)
    })
    .await;
    // 12.50 travelled as the JSON number 12.5: the scale is gone, as documented.
    assert_eq!(json[0].2, "12.5", "{json:?}");
    let text: String = std::fs::read_dir(dir.path().join("js"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    assert!(text.contains("\"amount\":12.5"), "{text}");
    assert!(
        text.contains("float64"),
        "the header records the mapping: {text}"
    );
    let (code, log) = worker.terminate();
    assert_eq!(code, Some(0), "{log}");
    db.drop_all().await;
}
