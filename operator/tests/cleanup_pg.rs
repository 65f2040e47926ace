//! `cleanupPolicy: delete` against the real PostgreSQL of e2e/pg.sh: the operator's drop
//! of the slot and publication, resolved from Secret keys the way a Flow's are, in a
//! database of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use wallaby_crds::flow::PostgresSource;
use wallaby_operator::flow::cleanup::{self, CleanupOutcome};
use wallaby_testkit::{connect, superuser_dsn, with_db};

#[tokio::test]
async fn delete_policy_drops_slot_and_publication_and_is_idempotent() {
    let admin_dsn = superuser_dsn().to_owned();
    let admin = connect(&admin_dsn).await;
    let db = format!("wt_op_cleanup_{}", std::process::id());
    let slot = format!("wt_op_slot_{}", std::process::id());
    let other_slot = format!("wt_op_keep_{}", std::process::id());
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let client = connect(&with_db(&admin_dsn, &db)).await;
    client
        .batch_execute(
            "CREATE TABLE orders (id int primary key); CREATE PUBLICATION wt_pub FOR TABLE orders",
        )
        .await
        .unwrap();
    // Slot creation must not share a transaction with writes: one statement each.
    for s in [&slot, &other_slot] {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[s],
            )
            .await
            .unwrap();
    }

    // The Flow's Secret: a DSN plus a `dbname` override, as users write them.
    let spec: PostgresSource = serde_json::from_value(serde_json::json!({
        "slot": slot, "publication": "wt_pub", "sslMode": "disable"
    }))
    .unwrap();
    let secret = BTreeMap::from([
        ("dsn".to_owned(), admin_dsn.clone()),
        ("dbname".to_owned(), db.clone()),
    ]);
    let target = cleanup::target(&spec, &secret, None).unwrap();

    let first = cleanup::drop_objects("test/flow", &target, &slot, "wt_pub")
        .await
        .unwrap();
    assert_eq!(
        first,
        CleanupOutcome::Dropped {
            slot: true,
            publication: true
        }
    );
    let slots: Vec<String> = admin
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'wt_op_%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!slots.contains(&slot), "{slots:?}");
    assert!(
        slots.contains(&other_slot),
        "another flow's slot must survive: {slots:?}"
    );
    let publications = client
        .query("SELECT 1 FROM pg_publication WHERE pubname = 'wt_pub'", &[])
        .await
        .unwrap();
    assert!(publications.is_empty());

    // A retried cleanup (e.g. the finalizer removal failed) converges.
    let again = cleanup::drop_objects("test/flow", &target, &slot, "wt_pub")
        .await
        .unwrap();
    assert_eq!(
        again,
        CleanupOutcome::Dropped {
            slot: false,
            publication: false
        }
    );

    // Wrong credentials: an error naming the target, never the password.
    let bad = cleanup::target(
        &spec,
        &BTreeMap::from([
            ("dsn".to_owned(), admin_dsn.clone()),
            ("dbname".to_owned(), db.clone()),
            ("user".to_owned(), "nobody_here".to_owned()),
            ("password".to_owned(), "s3cret-value".to_owned()),
        ]),
        None,
    )
    .unwrap();
    let err = cleanup::drop_objects("test/flow", &bad, &slot, "wt_pub")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nobody_here@"), "{err}");
    assert!(err.contains("cleanupPolicy: retain"), "{err}");
    assert!(!err.contains("s3cret-value"), "{err}");

    admin
        .batch_execute(&format!("SELECT pg_drop_replication_slot('{other_slot}')"))
        .await
        .unwrap();
    drop(client);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .unwrap();
}
