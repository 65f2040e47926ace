//! Deletion of a Flow (finalizer `wallaby.dev/cleanup`): with `cleanupPolicy: delete` the
//! operator stops the worker, then connects to PostgreSQL with the Flow's connection
//! settings and drops the replication slot and the publication; with `retain` nothing is
//! touched. The operator connects itself instead of running a cleanup Job because a Job
//! cannot be created in a terminating namespace (the namespace would hang on the
//! finalizer), and because the result and its error land directly in events and logs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use wallaby_crds::Flow;
use wallaby_crds::flow::{CleanupPolicy, PostgresSource};
use wallaby_pg::PgError;

use super::apply::{self, ApplyError};
use super::dereference::secret_value;

/// Why a Flow's PostgreSQL objects could not be dropped; the finalizer stays until fixed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// Stopping the worker failed.
    #[error("stopping the worker of Flow {flow} before dropping its slot failed: {source}")]
    StopWorker {
        flow: String,
        #[source]
        source: ApplyError,
    },
    /// The worker's workload is still being deleted; cleanup retries until it is gone.
    #[error(
        "Flow {flow}: waiting for the worker ({kinds}) to stop before dropping the replication slot"
    )]
    WorkerStopping { flow: String, kinds: String },
    /// The connection Secret could not be read.
    #[error(
        "reading Secret {secret} of Flow {flow} to drop its slot failed: {source}; restore the Secret, or set cleanupPolicy: retain to delete the Flow without dropping the slot"
    )]
    Secret {
        flow: String,
        secret: String,
        #[source]
        source: kube::Error,
    },
    /// The connection settings are unusable.
    #[error(
        "Flow {flow}: {message}; fix the connection settings, or set cleanupPolicy: retain to delete the Flow without dropping the slot"
    )]
    Config { flow: String, message: String },
    /// Connecting failed (unreachable, refused login, TLS); the message names the target
    /// and what to check, never the password.
    #[error(
        "Flow {flow}: {source}; the Flow keeps its finalizer and the operator retries (set cleanupPolicy: retain to give up and keep the slot)"
    )]
    Connect {
        flow: String,
        #[source]
        source: PgError,
    },
    /// Running the drop failed.
    #[error(
        "Flow {flow}: {action} on {target} failed: {source}; the Flow keeps its finalizer and the operator retries (set cleanupPolicy: retain to give up and keep the slot)"
    )]
    Postgres {
        flow: String,
        action: &'static str,
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The slot is still used by a walsender after the worker was stopped.
    #[error(
        "Flow {flow}: replication slot {slot:?} is still active (pid {pid}) after the worker was stopped; retrying"
    )]
    SlotActive {
        flow: String,
        slot: String,
        pid: i32,
    },
}

/// What cleanup did, for events and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CleanupOutcome {
    /// `cleanupPolicy: retain`: nothing dropped.
    Retained,
    /// Slot and publication dropped (or already absent).
    Dropped {
        /// Whether the slot existed.
        slot: bool,
        /// Whether the publication existed.
        publication: bool,
    },
}

/// Runs the cleanup of a Flow being deleted.
pub async fn run(client: &Client, flow: &Flow) -> Result<CleanupOutcome, CleanupError> {
    if flow.spec.cleanup_policy == CleanupPolicy::Retain {
        return Ok(CleanupOutcome::Retained);
    }
    let name = flow.metadata.name.clone().unwrap_or_default();
    let namespace = flow.metadata.namespace.clone().unwrap_or_default();
    let uid = flow.metadata.uid.clone().unwrap_or_default();
    let id = format!("{namespace}/{name}");
    // The children are still there (garbage collection waits for the finalizer): stop the
    // worker and wait until its pods are gone, so no worker can reconnect (and, with
    // createSlot, recreate the slot) after the drop.
    let running = apply::stop_workloads(client, &namespace, &name, &uid)
        .await
        .map_err(|source| CleanupError::StopWorker {
            flow: id.clone(),
            source,
        })?;
    if !running.is_empty() {
        return Err(CleanupError::WorkerStopping {
            flow: id,
            kinds: running.join(", "),
        });
    }
    let pg = &flow.spec.source.postgres;
    let secret = match &pg.secret_ref {
        Some(r) => Some(read_secret(client, &namespace, &r.name, &id).await?),
        None => None,
    };
    let root_cert = match &pg.ssl_root_cert {
        Some(sel) => {
            let s = read_secret(client, &namespace, &sel.name, &id).await?;
            Some(
                secret_value(&s, &sel.key).ok_or_else(|| CleanupError::Config {
                    flow: id.clone(),
                    message: format!(
                        "Secret {:?} has no key {:?} (sslRootCert)",
                        sel.name, sel.key
                    ),
                })?,
            )
        }
        None => None,
    };
    let keys: BTreeMap<String, String> = secret
        .as_ref()
        .map(|s| {
            ["dsn", "host", "port", "user", "password", "dbname"]
                .into_iter()
                .filter_map(|k| secret_value(s, k).map(|v| (k.to_owned(), v)))
                .collect()
        })
        .unwrap_or_default();
    let target = target(pg, &keys, root_cert).map_err(|e| CleanupError::Config {
        flow: id.clone(),
        message: e.to_string(),
    })?;
    drop_objects(&id, &target, &pg.slot, &pg.publication).await
}

async fn read_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    flow: &str,
) -> Result<Secret, CleanupError> {
    Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|source| CleanupError::Secret {
            flow: flow.into(),
            secret: name.into(),
            source,
        })
}

/// Where to connect: the worker's connection settings; `Debug` omits the password.
pub use wallaby_pg::PgConnection as Target;

/// Resolves the connection the way the worker does ([`Target::resolve`]): the Secret's
/// `dsn`, else `spec.source.postgres.dsn`, then the Secret's `host`, `port`, `user`,
/// `password`, `dbname` override its parts (without any DSN, `host` must be among them).
/// `root_cert_pem` is `sslRootCert` as read from its Secret. TLS follows the worker too:
/// `verify-full` checks chain and host name; `verify-ca` checks the chain against the CA
/// (stricter than the operator's former own TLS set-up, which encrypted without verifying
/// for `verify-ca`); lower modes encrypt without verifying.
pub fn target(
    spec: &PostgresSource,
    keys: &BTreeMap<String, String>,
    root_cert_pem: Option<String>,
) -> Result<Target, PgError> {
    let target = Target::resolve(spec, Some(keys), None)?.with_application_name("wallaby-operator");
    Ok(match root_cert_pem {
        Some(pem) => target.with_root_cert_pem(pem),
        None => target,
    })
}

/// Connects without the worker's session options (the drop reads no values).
async fn connect(flow: &str, target: &Target) -> Result<tokio_postgres::Client, CleanupError> {
    target.connect_plain().await.map_err(|e| match e {
        PgError::Config(message) => CleanupError::Config {
            flow: flow.into(),
            message,
        },
        source => CleanupError::Connect {
            flow: flow.into(),
            source,
        },
    })
}

/// Drops `slot` (ending a walsender still holding it) and `publication` on `target`;
/// absent objects are not errors, so a retried cleanup converges.
pub async fn drop_objects(
    flow: &str,
    target: &Target,
    slot: &str,
    publication: &str,
) -> Result<CleanupOutcome, CleanupError> {
    let client = connect(flow, target).await?;
    let pg_err = |action: &'static str| {
        let (flow, target) = (flow.to_owned(), target.describe());
        move |source| CleanupError::Postgres {
            flow,
            action,
            target,
            source,
        }
    };
    let active: Option<Option<i32>> = client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg_err("reading pg_replication_slots"))?
        .map(|row| row.get(0));
    let slot_existed = active.is_some();
    if let Some(Some(pid)) = active {
        // The worker was deleted above; a walsender still holding the slot is its
        // leftover (pod still terminating). Ending it is what the worker's stop would do.
        client
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .map_err(pg_err("terminating the slot's walsender"))?;
        let still: Option<Option<i32>> = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(pg_err("reading pg_replication_slots"))?
            .map(|row| row.get(0));
        if let Some(Some(pid)) = still {
            return Err(CleanupError::SlotActive {
                flow: flow.into(),
                slot: slot.into(),
                pid,
            });
        }
    }
    if slot_existed {
        client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(pg_err("dropping the replication slot"))?;
    }
    let publication_existed = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(pg_err("reading pg_publication"))?
        .is_some();
    if publication_existed {
        // The name matched the CRD's pattern ^[A-Za-z0-9_]+$; quoting keeps its case.
        client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                wallaby_pg::quote_ident(publication)
            ))
            .await
            .map_err(pg_err("dropping the publication"))?;
    }
    Ok(CleanupOutcome::Dropped {
        slot: slot_existed,
        publication: publication_existed,
    })
}

#[cfg(test)]
mod tests {
    use wallaby_crds::flow::SslMode;

    use super::*;

    fn source(dsn: Option<&str>) -> PostgresSource {
        serde_json::from_value(serde_json::json!({
            "dsn": dsn, "slot": "s", "publication": "p"
        }))
        .unwrap()
    }

    #[test]
    fn connection_resolves_like_the_worker() {
        let keys = BTreeMap::from([
            ("host".to_owned(), "db.internal".to_owned()),
            ("password".to_owned(), "hunter2".to_owned()),
        ]);
        let t = target(
            &source(Some("postgres://app@ignored:6543/shop?sslmode=disable")),
            &keys,
            None,
        )
        .unwrap();
        assert_eq!(format!("{t:?}"), "app@db.internal:6543/shop");
        assert_eq!(t.ssl_mode(), SslMode::Disable);
        assert!(!format!("{t:?}").contains("hunter2"));
        // The Secret's dsn wins over spec.dsn.
        let keys = BTreeMap::from([("dsn".to_owned(), "host=h1 user=u dbname=d".to_owned())]);
        let t = target(&source(Some("postgres://x@h2/y")), &keys, None).unwrap();
        assert_eq!(format!("{t:?}"), "u@h1:5432/d");
        assert!(target(&source(None), &BTreeMap::new(), None).is_err());
    }
}
