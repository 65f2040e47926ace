//! Wires the Flow and Destination controllers for each watched namespace (or the whole
//! cluster): which objects each watches, how changes of Destinations and Secrets map back
//! to the Flows and Destinations that use them, and graceful shutdown.

use std::sync::Arc;

use futures::future::{FutureExt, Shared};
use futures::{StreamExt, channel::oneshot};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource};
use wallaby_crds::{Destination, Flow};

use crate::flow::{self, Context};
use crate::{MANAGER, destination};

type Stop = Shared<futures::future::Map<oneshot::Receiver<()>, fn(Result<(), oneshot::Canceled>)>>;

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn owned() -> watcher::Config {
    // Only the operator's children: keeps the caches small in busy namespaces.
    watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"))
}

fn log_results<T: std::fmt::Debug, E: std::fmt::Display>(
    controller: &'static str,
) -> impl FnMut(
    Result<T, kube::runtime::controller::Error<E, watcher::Error>>,
) -> futures::future::Ready<()> {
    use kube::runtime::controller::Error as ControllerError;
    move |result| {
        match result {
            Ok(obj) => tracing::debug!(controller, object = ?obj, "reconciled"),
            // Logged with its retry delay by the error policy already.
            Err(ControllerError::ReconcilerFailed(..)) => {}
            // A queued reconcile of an object deleted meanwhile: expected.
            Err(e @ ControllerError::ObjectNotFound(_)) => {
                tracing::debug!(controller, error = %e, "skipped")
            }
            // Watch errors (RBAC, a CRD that is not installed); the watcher retries.
            Err(e) => tracing::warn!(controller, error = %e, "controller error"),
        }
        futures::future::ready(())
    }
}

async fn run_scope(ctx: Arc<Context>, namespace: Option<String>, stop: Stop) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let flow_controller = Controller::new(api::<Flow>(&client, ns), watcher::Config::default());
    let flow_store = flow_controller.store();
    let destination_controller =
        Controller::new(api::<Destination>(&client, ns), watcher::Config::default());
    let destination_store = destination_controller.store();

    let flows = {
        let (by_destination, by_secret, destinations) = (
            flow_store.clone(),
            flow_store.clone(),
            destination_store.clone(),
        );
        flow_controller
            .owns(api::<Deployment>(&client, ns), owned())
            .owns(api::<Job>(&client, ns), owned())
            .owns(api::<CronJob>(&client, ns), owned())
            .owns(api::<ServiceAccount>(&client, ns), owned())
            .owns(api::<Role>(&client, ns), owned())
            .owns(api::<RoleBinding>(&client, ns), owned())
            .watches(
                api::<Destination>(&client, ns),
                watcher::Config::default(),
                move |d| flow::flows_for_destination(&by_destination.state(), &d),
            )
            .watches(
                api::<Secret>(&client, ns),
                watcher::Config::default(),
                move |s| flow::flows_for_secret(&by_secret.state(), &destinations.state(), &s),
            )
            .graceful_shutdown_on(stop.clone())
            .run(flow::reconcile, flow::error_policy, ctx.clone())
            .for_each(log_results("flow"))
    };
    let destinations = {
        let (by_flow, by_secret) = (destination_store.clone(), destination_store.clone());
        let users = flow_store.clone();
        destination_controller
            .watches(
                api::<Flow>(&client, ns),
                watcher::Config::default(),
                move |f| destination::destinations_for_flow(&by_flow.state(), &f),
            )
            .watches(
                api::<Secret>(&client, ns),
                watcher::Config::default(),
                move |s| destination::destinations_for_secret(&by_secret.state(), &s),
            )
            .graceful_shutdown_on(stop)
            .run(
                move |d, ctx| destination::reconcile(d, ctx, users.state()),
                destination::error_policy,
                ctx.clone(),
            )
            .for_each(log_results("destination"))
    };
    futures::future::join(flows, destinations).await;
}

/// Runs both controllers for each namespace (all namespaces when `namespaces` is empty)
/// until `stop` fires; in-flight reconciliations finish first.
pub async fn run(ctx: Arc<Context>, namespaces: &[String], stop: oneshot::Receiver<()>) {
    let ignore: fn(Result<(), oneshot::Canceled>) = |_| ();
    let stop: Stop = stop.map(ignore).shared();
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    tracing::info!(namespaces = ?namespaces, "starting the Flow and Destination controllers");
    futures::future::join_all(
        scopes
            .into_iter()
            .map(|ns| run_scope(ctx.clone(), ns, stop.clone())),
    )
    .await;
    tracing::info!("controllers stopped");
}
