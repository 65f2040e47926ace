//! Leader election on a `coordination.k8s.io/v1` Lease (via `kube-lease-manager`, which
//! takes and renews the Lease with server-side apply): only the holder runs controllers;
//! a replica that loses the Lease stops and exits so it restarts as a standby.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Lease settings from the command line.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease object name.
    pub name: String,
    /// Lease namespace (the operator's own).
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// Seconds a Lease stays valid without renewal.
    pub duration_seconds: u64,
    /// Seconds before expiry the holder renews.
    pub grace_seconds: u64,
}

/// Leadership could not be contested.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// Creating or reading the Lease failed.
    #[error(
        "using Lease {namespace}/{name} for leader election failed: {source}; check the operator's RBAC (get, create, patch on coordination.k8s.io leases in {namespace}), or run with --leader-elect=false"
    )]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: LeaseManagerError,
    },
}

/// A running election: `leading` flips to true when this replica holds the Lease.
#[derive(Debug)]
pub struct Election {
    /// Current leadership.
    pub leading: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
}

/// Starts contesting the Lease.
pub async fn start(client: Client, config: &LeaseConfig) -> Result<Election, LeaderError> {
    let manager = LeaseManagerBuilder::new(client, &config.name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_field_manager(format!("{}-lease", crate::MANAGER))
        .with_duration(config.duration_seconds)
        .with_grace(config.grace_seconds)
        .build()
        .await
        .map_err(|source| LeaderError::Lease {
            namespace: config.namespace.clone(),
            name: config.name.clone(),
            source,
        })?;
    let (leading, task) = manager.watch().await;
    Ok(Election { leading, task })
}

impl Election {
    /// Waits until this replica leads. Returns false if the election task ended.
    pub async fn acquired(&mut self) -> bool {
        self.leading.wait_for(|l| *l).await.is_ok()
    }

    /// Resolves when leadership is lost (or the election task ends).
    pub async fn lost(&mut self) {
        let _ = self.leading.wait_for(|l| !*l).await;
    }

    /// Releases the Lease (so a standby takes over at once) and waits for the task.
    pub async fn release(self) {
        let Election { leading, task } = self;
        // Closing the channel makes the manager release the Lease and return.
        drop(leading);
        match task.await {
            Ok(Ok(_)) => tracing::info!("released the leader Lease"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "releasing the leader Lease failed; it expires by itself")
            }
            Err(e) => tracing::warn!(error = %e, "the leader election task failed"),
        }
    }
}
