//! `wallaby-operator`: `run` starts the Flow and Destination controllers (with leader
//! election, health and metrics endpoints); `crds` prints or writes the CRDs.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use kube::runtime::events::{Recorder, Reporter};
use tracing_subscriber::EnvFilter;
use wallaby_operator::backoff::Backoff;
use wallaby_operator::flow::Context;
use wallaby_operator::flow::build::WorkerDefaults;
use wallaby_operator::http::Readiness;
use wallaby_operator::leader::{self, LeaseConfig};
use wallaby_operator::metrics::Metrics;
use wallaby_operator::{controllers, default_worker_image, http};

#[derive(Debug, Parser)]
#[command(
    name = "wallaby-operator",
    version,
    about = "WALlaby Kubernetes operator"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "WALLABY_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as one YAML stream (pipe to `kubectl apply -f -`),
    /// or write one file per kind into each `--write` directory.
    Crds {
        /// Directory to write `flow.yaml`, `destination.yaml`, `ddlapproval.yaml` into;
        /// repeat it for every committed copy: `--write crds/ --write charts/wallaby/crds/`.
        #[arg(long, value_name = "DIR")]
        write: Vec<PathBuf>,
    },
    /// Run the controllers (connects with KUBECONFIG, else the in-cluster service account).
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Namespace to watch; repeat for several. Default: every namespace.
    #[arg(long = "namespace", value_name = "NAMESPACE")]
    namespaces: Vec<String>,
    /// Worker image for Flows without spec.worker.image.
    #[arg(long, env = "WALLABY_WORKER_IMAGE", default_value_t = default_worker_image())]
    worker_image: String,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "WALLABY_OPERATOR_HTTP_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    http_addr: SocketAddr,
    /// Contest a Lease so only one replica reconciles; needed with more than one replica.
    /// `--leader-elect` alone means true.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, default_value = "wallaby-operator")]
    lease_name: String,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Identity in the Lease; defaults to the pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds the Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("WALLABY_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,kube_runtime=warn,kube_client=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // kube's rustls needs a process-wide crypto provider when more than one is linked.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let client = kube::Client::try_default().await.context(
        "connecting to the Kubernetes API (KUBECONFIG, else the in-cluster service account)",
    )?;
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(
        args.http_addr,
        metrics.clone(),
        readiness.clone(),
        async move {
            let _ = http_stop_rx.await;
        },
    ));

    let identity = args.identity.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "wallaby-operator".into()),
            std::process::id()
        )
    });
    let signal = shutdown_signal();
    tokio::pin!(signal);

    let mut election = None;
    if args.leader_elect {
        readiness.standby();
        let config = LeaseConfig {
            name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone(),
            identity: identity.clone(),
            duration_seconds: args.lease_duration_seconds.max(2),
            grace_seconds: (args.lease_duration_seconds / 3).max(1),
        };
        let mut e = leader::start(client.clone(), &config).await?;
        tracing::info!(lease = %format!("{}/{}", config.namespace, config.name), %identity, "waiting for the leader Lease");
        tokio::select! {
            acquired = e.acquired() => {
                if !acquired {
                    anyhow::bail!("the leader election task ended before this replica acquired the Lease");
                }
            }
            _ = &mut signal => {
                e.release().await;
                readiness.stopping();
                let _ = http_stop_tx.send(());
                return Ok(());
            }
        }
        tracing::info!(%identity, "acquired the leader Lease");
        election = Some(e);
    }
    metrics.set_leader(true);
    readiness.leading();

    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: wallaby_operator::MANAGER.into(),
                instance: Some(identity.clone()),
            },
        ),
        defaults: WorkerDefaults {
            image: args.worker_image.clone(),
            ddl_env: wallaby_operator::flow::build::ddl_env_from(|n| std::env::var(n).ok())
                .map_err(|e| anyhow::anyhow!("operator DDL defaults: {e}"))?,
        },
        metrics: metrics.clone(),
        backoff: Arc::new(Backoff::default()),
    });
    let (stop_tx, stop_rx) = futures::channel::oneshot::channel();
    let controllers = controllers::run(ctx, &args.namespaces, stop_rx);
    tokio::pin!(controllers);
    let lost = async {
        match election.as_mut() {
            Some(e) => e.lost().await,
            None => std::future::pending().await,
        }
    };
    let mut lost_leadership = false;
    tokio::select! {
        _ = &mut controllers => {}
        _ = &mut signal => tracing::info!("shutting down: finishing in-flight reconciliations"),
        _ = lost => {
            tracing::error!("lost the leader Lease: stopping the controllers");
            lost_leadership = true;
        }
    }
    readiness.stopping();
    let _ = stop_tx.send(());
    controllers.await;
    metrics.set_leader(false);
    if let Some(e) = election {
        e.release().await;
    }
    let _ = http_stop_tx.send(());
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP server failed"),
        Err(e) => tracing::warn!(error = %e, "the HTTP server task failed"),
    }
    if lost_leadership {
        anyhow::bail!("lost the leader Lease; exiting so the pod restarts as a standby");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { write } if write.is_empty() => {
            print!("{}", wallaby_crds::all_crds_yaml()?);
        }
        Command::Crds { write } => {
            for dir in write {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                for (file, crd) in wallaby_crds::crds() {
                    let path = dir.join(file);
                    std::fs::write(&path, wallaby_crds::crd_yaml(&crd)?)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
            }
        }
        Command::Run(args) => {
            init_tracing(cli.log_format);
            run(args).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_election_flag_forms() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Run(r) => r,
            Command::Crds { .. } => panic!("expected run"),
        };
        assert!(!parse(&["wallaby-operator", "run"]).leader_elect);
        assert!(parse(&["wallaby-operator", "run", "--leader-elect"]).leader_elect);
        assert!(
            parse(&[
                "wallaby-operator",
                "run",
                "--leader-elect",
                "--namespace",
                "a"
            ])
            .leader_elect
        );
        assert!(!parse(&["wallaby-operator", "run", "--leader-elect=false"]).leader_elect);
        let r = parse(&[
            "wallaby-operator",
            "run",
            "--namespace",
            "a",
            "--namespace",
            "b",
        ]);
        assert_eq!(r.namespaces, ["a", "b"]);
    }
}
