//! `wallaby-worker`: runs one flow. Standalone: `wallaby-worker run -f flow.yaml`; in a
//! cluster (the operator's Deployment / Job / CronJob): `wallaby-worker run --flow NS/NAME`.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand};
use pg_walstream::CancellationToken;
use wallaby_crds::flow::FlowStatus;
use wallaby_pipeline::lsn::Lsn;
use wallaby_pipeline::metrics::Metrics;
use wallaby_source::snapshot::SnapshotOutcome;
use wallaby_worker::backfill::{BackfillControl, backfill};
use wallaby_worker::cluster::{self, ClusterError, ConfigChange, FlowRef, FlowStatusApply};
use wallaby_worker::ddl_admin::{self, Action, LogAction};
use wallaby_worker::metrics::{self, DEFAULT_METRICS_ADDR, MetricsAddr};
use wallaby_worker::run::{KubeTarget, RunControl, RunOptions, open_resolved, run_controlled};
use wallaby_worker::standalone;
use wallaby_worker::status::{StatusSink, worker_owned};
use wallaby_worker::telemetry::{self, LogFormat};

/// mimalloc instead of glibc malloc, for Rust and (feature `override`) for the C libraries
/// linked in, librdkafka above all: fewer cycles per allocation on the decode, encode and
/// produce paths, and freed memory goes back instead of staying in per-thread arenas (see
/// docs/benchmarks.md for the figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "wallaby-worker",
    version,
    about = "Streams PostgreSQL changes to destinations"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "WALLABY_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a flow from a manifest file (`-f`: one Flow, its Destinations, optional
    /// Secrets) or, in a cluster, from the Kubernetes API (`--flow NAMESPACE/NAME`).
    Run {
        /// Multi-document YAML with the Flow and its Destinations (standalone mode).
        #[arg(
            short = 'f',
            long = "file",
            value_name = "FILE",
            required_unless_present = "flow"
        )]
        file: Option<PathBuf>,
        /// With -f: the Flow to run when the file holds several (NAME). Without -f: the
        /// Flow to read from the Kubernetes API (NAMESPACE/NAME; the client is configured
        /// from KUBECONFIG, else the in-cluster service account). In-cluster, the worker
        /// reports to Flow.status and exits 0 after a clean stop when the Flow, one of its
        /// Destinations or Secrets changes, so its Deployment restarts it with the change.
        #[arg(long, value_name = "NAME | NAMESPACE/NAME")]
        flow: Option<String>,
        /// Where to write the status JSON (-f only; default: .wallaby/<flow>/status.json).
        #[arg(long, value_name = "PATH")]
        status_file: Option<PathBuf>,
        /// Where transactions streamed before their commit are spilled (created with mode
        /// 0700, spill files of earlier runs deleted at start; default:
        /// <system temp>/wallaby-spill/<slot>).
        #[arg(long, value_name = "DIR", env = "WALLABY_SPILL_DIR")]
        spill_dir: Option<PathBuf>,
        /// Prometheus endpoint (`/metrics`, `/healthz`): IP:PORT, port 0 for any free port,
        /// or `off`.
        #[arg(long, value_name = "ADDR", env = "WALLABY_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
        metrics_addr: MetricsAddr,
        /// Stop cleanly (exit 0) once everything up to the server's WAL position at start
        /// is delivered and confirmed to the slot: a Job / CronJob run.
        #[arg(long)]
        drain: bool,
        /// Start streaming at this LSN (e.g. 0/16B6C50) instead of the slot's confirmed
        /// position, for this run only. It must be at or after the slot's
        /// confirmed_flush_lsn: PostgreSQL cannot rewind a logical slot; transactions
        /// committed in between are skipped.
        #[arg(long, value_name = "LSN")]
        start_lsn: Option<Lsn>,
    },
    /// Copy existing rows of a flow's tables into its destinations and exit (the Job of
    /// `mode: backfill`). Rows arrive as `read` changes; the slot is not touched. An
    /// interrupted backfill resumes its unfinished partitions when run again.
    Backfill {
        /// Multi-document YAML with the Flow and its Destinations (standalone mode).
        #[arg(
            short = 'f',
            long = "file",
            value_name = "FILE",
            required_unless_present = "flow"
        )]
        file: Option<PathBuf>,
        /// With -f: the Flow to run when the file holds several (NAME). Without -f: the
        /// Flow to read from the Kubernetes API (NAMESPACE/NAME); progress goes to its
        /// status.
        #[arg(long, value_name = "NAME | NAMESPACE/NAME")]
        flow: Option<String>,
        /// Tables to copy (`schema.table`, comma-separated); default: snapshot.tables,
        /// else source.postgres.tables, else every table of the publication.
        #[arg(long, value_name = "TABLES", value_delimiter = ',')]
        tables: Vec<String>,
        /// Where to write the status JSON (-f only; default: .wallaby/<flow>/status.json).
        #[arg(long, value_name = "PATH")]
        status_file: Option<PathBuf>,
        /// Prometheus endpoint (`/metrics`, `/healthz`): IP:PORT, port 0 for any free port,
        /// or `off`.
        #[arg(long, value_name = "ADDR", env = "WALLABY_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
        metrics_addr: MetricsAddr,
    },
    /// Captured DDL of a standalone flow: list statements, approve / reject a gated one,
    /// confirm a manual apply, show the schema history, install the capture triggers. A
    /// running worker picks a decision up within a second. (In a cluster, decide on the
    /// DDLApproval with kubectl instead.)
    Ddl {
        /// Multi-document YAML with the Flow (its source connection is used).
        #[arg(short = 'f', long = "file", value_name = "FILE", global = true)]
        file: Option<PathBuf>,
        /// The Flow to use when the file holds several.
        #[arg(long, global = true)]
        flow: Option<String>,
        #[command(subcommand)]
        action: DdlCommand,
    },
    /// Check a manifest file without connecting to anything.
    Validate {
        /// Multi-document YAML with the Flow and its Destinations.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Flow to check when the file holds several.
        #[arg(long)]
        flow: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum DdlCommand {
    /// Captured statements, oldest first.
    List {
        /// Only statements in this state (pending, approved, applied, rejected, failed).
        #[arg(long)]
        state: Option<String>,
    },
    /// Approve a gated statement (ID from `ddl list`, or its LSN).
    Approve {
        /// Statement id or LSN.
        id: String,
    },
    /// Reject a gated statement: the flow stops before it, the slot is held.
    Reject {
        /// Statement id or LSN.
        id: String,
    },
    /// Confirm that an approved statement was applied by hand (ddl.autoApply: false).
    Apply {
        /// Statement id or LSN.
        id: String,
    },
    /// Schema versions of the flow's tables, as JSON.
    History {
        /// Only this table (schema.table).
        #[arg(long)]
        table: Option<String>,
    },
    /// Install the DDL capture event triggers (needs a superuser on PostgreSQL 15).
    Install {
        /// Print the SQL instead of running it (to hand to a DBA).
        #[arg(long)]
        print: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Built before logging: the OTLP exporter's gRPC connection lives on this runtime.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = {
        let _entered = runtime.enter();
        match telemetry::init(cli.log_format, telemetry::log_filter_from_env()) {
            Ok(guard) => guard,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let result = match cli.command {
        Command::Ddl { file, flow, action } => ddl_command(&runtime, file, flow, action),
        Command::Validate { file, flow } => standalone::load(&file, flow.as_deref())
            .map(|r| {
                eprintln!(
                    "{}: Flow {:?} is valid",
                    file.display(),
                    r.flow.metadata.name.unwrap_or_default()
                );
            })
            .map_err(anyhow::Error::from),
        Command::Backfill {
            file,
            flow,
            tables,
            status_file,
            metrics_addr,
        } => backfill_command(&runtime, file, flow, tables, status_file, metrics_addr),
        Command::Run {
            file,
            flow,
            status_file,
            spill_dir,
            metrics_addr,
            drain,
            start_lsn,
        } => {
            let control = RunControl {
                status: None,
                drain,
                start_lsn,
                kube: None,
                manifest: file.clone(),
            };
            match (file, flow) {
                (Some(file), flow) => run_command(
                    &runtime,
                    file,
                    flow,
                    status_file,
                    spill_dir,
                    metrics_addr,
                    control,
                ),
                (None, Some(flow)) if status_file.is_some() => Err(anyhow::anyhow!(
                    "--status-file applies to -f runs; with --flow {flow} status goes to the Flow's status"
                )),
                (None, Some(flow)) => flow
                    .parse::<FlowRef>()
                    .map_err(anyhow::Error::from)
                    .and_then(|flow| {
                        cluster_command(&runtime, flow, spill_dir, metrics_addr, control)
                    }),
                // clap requires -f unless --flow is given.
                (None, None) => Err(anyhow::anyhow!(
                    "give -f FILE (standalone) or --flow NAMESPACE/NAME (in a cluster)"
                )),
            }
        }
    };
    // Export the last spans while the runtime still runs.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run_command(
    runtime: &tokio::runtime::Runtime,
    file: PathBuf,
    flow: Option<String>,
    status_file: Option<PathBuf>,
    spill_dir: Option<PathBuf>,
    metrics_addr: MetricsAddr,
    control: RunControl,
) -> anyhow::Result<()> {
    let resolved = standalone::load(&file, flow.as_deref())?;
    let name = resolved.flow.metadata.name.clone().unwrap_or_default();
    let state_dir = PathBuf::from(".wallaby").join(&name);
    let options = RunOptions {
        status_file: status_file.unwrap_or_else(|| state_dir.join("status.json")),
        state_dir,
        spill_dir,
    };
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        spawn_signal_handler(cancel.clone())?;
        with_metrics(metrics_addr, |metrics| async move {
            let destinations = open_resolved(&resolved)?;
            run_controlled(resolved, destinations, options, control, cancel, metrics).await
        })
        .await
    })
}

/// `ddl …`: the standalone desk of captured DDL.
fn ddl_command(
    runtime: &tokio::runtime::Runtime,
    file: Option<PathBuf>,
    flow: Option<String>,
    command: DdlCommand,
) -> anyhow::Result<()> {
    let file = file.ok_or_else(|| anyhow::anyhow!("give -f FILE: the flow's manifest"))?;
    let resolved = standalone::load(&file, flow.as_deref())?;
    let name = resolved.flow.metadata.name.clone().unwrap_or_default();
    let state_dir = PathBuf::from(".wallaby").join(&name);
    let action = match command {
        DdlCommand::List { state } => Action::Log(LogAction::List { state }),
        DdlCommand::Approve { id } => Action::Log(LogAction::Approve(id)),
        DdlCommand::Reject { id } => Action::Log(LogAction::Reject(id)),
        DdlCommand::Apply { id } => Action::Log(LogAction::Apply(id)),
        DdlCommand::History { table } => Action::Log(LogAction::History { table }),
        DdlCommand::Install { print } => Action::Install { print },
    };
    let out = runtime.block_on(ddl_admin::run(&resolved, &state_dir, action))?;
    println!("{}", out.trim_end());
    Ok(())
}

/// `backfill`: standalone from a manifest, or in-cluster from the Kubernetes API (the
/// operator's Job); a stopped (interrupted) backfill fails so a Job retries it.
fn backfill_command(
    runtime: &tokio::runtime::Runtime,
    file: Option<PathBuf>,
    flow: Option<String>,
    tables: Vec<String>,
    status_file: Option<PathBuf>,
    metrics_addr: MetricsAddr,
) -> anyhow::Result<()> {
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        spawn_signal_handler(cancel.clone())?;
        let (resolved, options, status): (_, _, Option<Arc<dyn StatusSink>>) = match (file, flow) {
            (Some(file), flow) => {
                let resolved = standalone::load(&file, flow.as_deref())?;
                let name = resolved.flow.metadata.name.clone().unwrap_or_default();
                let state_dir = PathBuf::from(".wallaby").join(&name);
                let options = RunOptions {
                    status_file: status_file.unwrap_or_else(|| state_dir.join("status.json")),
                    state_dir,
                    spill_dir: None,
                };
                (resolved, options, None)
            }
            (None, Some(flow)) => {
                if status_file.is_some() {
                    anyhow::bail!("--status-file applies to -f runs; with --flow {flow} status goes to the Flow's status");
                }
                let flow_ref = flow.parse::<FlowRef>()?;
                let client = kube::Client::try_default()
                    .await
                    .map_err(ClusterError::Connect)?;
                let objects = cluster::read(&client, &flow_ref).await?;
                let resolved = objects.resolve()?;
                let state_dir = std::env::temp_dir()
                    .join("wallaby")
                    .join(&flow_ref.namespace)
                    .join(&flow_ref.name);
                let options = RunOptions {
                    status_file: state_dir.join("status.json"),
                    state_dir,
                    spill_dir: None,
                };
                let sink: Arc<dyn StatusSink> = Arc::new(FlowStatusApply::new(client, flow_ref));
                (resolved, options, Some(sink))
            }
            (None, None) => anyhow::bail!(
                "give -f FILE (standalone) or --flow NAMESPACE/NAME (in a cluster)"
            ),
        };
        let control = BackfillControl {
            tables,
            status,
            print_progress: true,
        };
        with_metrics(metrics_addr, |metrics| async move {
            match backfill(resolved, options, control, cancel, metrics).await? {
                SnapshotOutcome::Complete { rows } => {
                    tracing::info!(rows, "backfill complete");
                    Ok(())
                }
                SnapshotOutcome::Stopped => Err(anyhow::anyhow!(
                    "backfill stopped before it finished; run it again to copy the unfinished partitions"
                )),
            }
        })
        .await
    })
}

/// In-cluster: read the Flow from the API, run it while watching its configuration, and
/// exit 0 after a clean stop when the configuration changes (the Deployment restarts the
/// worker, which then reads the new configuration; the operator also rolls the pod through
/// its config-hash annotation).
fn cluster_command(
    runtime: &tokio::runtime::Runtime,
    flow_ref: FlowRef,
    spill_dir: Option<PathBuf>,
    metrics_addr: MetricsAddr,
    mut control: RunControl,
) -> anyhow::Result<()> {
    // Private files (the CA bundle) go to the temp dir: a container's working directory
    // may be read-only.
    let state_dir = std::env::temp_dir()
        .join("wallaby")
        .join(&flow_ref.namespace)
        .join(&flow_ref.name);
    let options = RunOptions {
        status_file: state_dir.join("status.json"),
        state_dir,
        spill_dir,
    };
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        spawn_signal_handler(cancel.clone())?;
        let client = kube::Client::try_default()
            .await
            .map_err(ClusterError::Connect)?;
        let objects = cluster::read(&client, &flow_ref).await?;
        let versions = objects.versions();
        let previous_status = objects.flow.status.clone().unwrap_or_default();
        let sink = Arc::new(FlowStatusApply::new(client.clone(), flow_ref.clone()));
        let resolved = match objects.resolve() {
            Ok(resolved) => resolved,
            Err(e) => {
                return wait_out_invalid_config(
                    client,
                    &flow_ref,
                    &versions,
                    sink.as_ref(),
                    &previous_status,
                    e,
                    control.drain,
                    &cancel,
                )
                .await;
            }
        };
        tracing::info!(flow = %flow_ref, "configuration read from the Kubernetes API");
        control.status = Some(sink);
        control.kube = Some(KubeTarget {
            client: client.clone(),
            namespace: flow_ref.namespace.clone(),
            flow_uid: resolved.flow.metadata.uid.clone().unwrap_or_default(),
        });

        let change: Arc<Mutex<Option<ConfigChange>>> = Arc::default();
        let stop_watch = CancellationToken::new();
        let watch = {
            let (client, flow_ref, versions) = (client.clone(), flow_ref.clone(), versions);
            let (change, stop_watch, cancel) = (change.clone(), stop_watch.clone(), cancel.clone());
            tokio::spawn(async move {
                if let Some(c) =
                    cluster::watch_for_change(client, &flow_ref, &versions, &stop_watch).await
                {
                    tracing::info!(flow = %flow_ref, "{c}: stopping cleanly to restart with the new configuration");
                    *change.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(c);
                    cancel.cancel();
                }
            })
        };
        let result = with_metrics(metrics_addr, |metrics| async move {
            let destinations = open_resolved(&resolved)?;
            run_controlled(resolved, destinations, options, control, cancel, metrics).await
        })
        .await;
        stop_watch.cancel();
        let _ = watch.await;
        let change = change
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let (Ok(()), Some(c)) = (&result, change) {
            tracing::info!(flow = %flow_ref, "stopped after a configuration change ({c}); exiting 0 so the worker restarts with it");
        }
        result
    })
}

/// An invalid configuration in a cluster: report it as `Degraded` on the Flow and wait for
/// an edit (exit 0 then, to restart with it) instead of crash-looping. A `--drain` run
/// (Job / CronJob) fails at once instead, so the Job reports it.
#[allow(clippy::too_many_arguments)]
async fn wait_out_invalid_config(
    client: kube::Client,
    flow_ref: &FlowRef,
    versions: &cluster::ConfigVersions,
    sink: &dyn StatusSink,
    previous: &FlowStatus,
    error: standalone::ConfigError,
    drain: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    // Server-side apply drops fields the manager stops sending: resend the worker's last
    // fields with the new Degraded condition so the checkpoint stays visible.
    let mut status = worker_owned(previous);
    status.conditions.retain(|c| c.type_ != "Degraded");
    status
        .conditions
        .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: "Degraded".into(),
            status: "True".into(),
            reason: "InvalidConfiguration".into(),
            message: error.to_string(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ),
            observed_generation: None,
        });
    if let Err(e) = sink.publish(&status).await {
        tracing::warn!(error = %e, "publishing the invalid-configuration status");
    }
    if drain {
        return Err(error.into());
    }
    tracing::error!(flow = %flow_ref, "{error}");
    tracing::info!(flow = %flow_ref, "waiting for the Flow, its Destinations or Secrets to change");
    match cluster::watch_for_change(client, flow_ref, versions, cancel).await {
        Some(c) => {
            tracing::info!(flow = %flow_ref, "{c}: exiting 0 to restart with the new configuration");
            Ok(())
        }
        None => {
            tracing::info!(flow = %flow_ref, "stopped while the configuration is invalid");
            Ok(())
        }
    }
}

/// Serves `/metrics` while `body` runs; the endpoint outlives the flow's own shutdown so
/// the last scrape sees final values.
async fn with_metrics<F, Fut>(metrics_addr: MetricsAddr, body: F) -> anyhow::Result<()>
where
    F: FnOnce(Metrics) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let metrics = Metrics::new();
    let stop_metrics = CancellationToken::new();
    let server = match metrics_addr {
        MetricsAddr::Off => None,
        MetricsAddr::Listen(addr) => {
            Some(metrics::serve(addr, metrics.clone(), stop_metrics.clone()).await?)
        }
    };
    let result = body(metrics).await;
    stop_metrics.cancel();
    if let Some((_, task)) = server {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics endpoint"),
            Err(e) => tracing::warn!(error = %e, "metrics endpoint task"),
        }
    }
    result
}

/// SIGTERM / SIGINT: stop reading, make everything durable, confirm, exit 0.
fn spawn_signal_handler(cancel: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: flushing and stopping"),
            _ = int.recv() => tracing::info!("SIGINT: flushing and stopping"),
        }
        cancel.cancel();
    });
    Ok(())
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
