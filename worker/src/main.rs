//! `wallaby-worker`: runs one flow. Standalone: `wallaby-worker run -f flow.yaml`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pg_walstream::CancellationToken;
use wallaby_worker::metrics::{self, DEFAULT_METRICS_ADDR, Metrics, MetricsAddr};
use wallaby_worker::run::{RunOptions, run};
use wallaby_worker::standalone;
use wallaby_worker::telemetry::{self, LogFormat};

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
    /// Run a flow from a manifest file (one Flow, its Destinations, optional Secrets).
    Run {
        /// Multi-document YAML with the Flow and its Destinations.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Flow to run when the file holds several.
        #[arg(long)]
        flow: Option<String>,
        /// Where to write the status JSON (default: .wallaby/<flow>/status.json).
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
        Command::Validate { file, flow } => standalone::load(&file, flow.as_deref())
            .map(|r| {
                eprintln!(
                    "{}: Flow {:?} is valid",
                    file.display(),
                    r.flow.metadata.name.unwrap_or_default()
                );
            })
            .map_err(anyhow::Error::from),
        Command::Run {
            file,
            flow,
            status_file,
            spill_dir,
            metrics_addr,
        } => run_command(&runtime, file, flow, status_file, spill_dir, metrics_addr),
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
        let metrics = Metrics::new();
        // The endpoint outlives the flow's own shutdown so the last scrape sees final values.
        let stop_metrics = CancellationToken::new();
        let server = match metrics_addr {
            MetricsAddr::Off => None,
            MetricsAddr::Listen(addr) => {
                Some(metrics::serve(addr, metrics.clone(), stop_metrics.clone()).await?)
            }
        };
        let result = run(resolved, options, cancel, metrics).await;
        stop_metrics.cancel();
        if let Some((_, task)) = server {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "metrics endpoint"),
                Err(e) => tracing::warn!(error = %e, "metrics endpoint task"),
            }
        }
        result
    })
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
