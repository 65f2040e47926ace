//! WALlaby's Kubernetes operator: the Flow and Destination controllers, the pure stages they
//! run (dereference → validate → build → apply → status), and the process around them
//! (leader election, health and metrics endpoints).

pub mod backoff;
pub mod conditions;
pub mod controllers;
pub mod destination;
pub mod flow;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod refs;

/// Field manager of every server-side apply the operator makes (children and status).
pub const MANAGER: &str = "wallaby-operator";
/// Finalizer that guards the replication slot and publication of a Flow.
pub const FINALIZER: &str = "wallaby.dev/cleanup";
/// Pod annotation whose change rolls the worker when its configuration changes.
pub const CONFIG_HASH_ANNOTATION: &str = "wallaby.dev/config-hash";
/// Label naming the Flow on every child.
pub const FLOW_LABEL: &str = "wallaby.dev/flow";

/// The worker image the operator uses when `spec.worker.image` is unset.
pub fn default_worker_image() -> String {
    format!(
        "ghcr.io/wallaby-dev/wallaby-worker:{}",
        env!("CARGO_PKG_VERSION")
    )
}
