//! `wallaby-worker`: runs one flow. Standalone: `wallaby-worker run -f flow.yaml`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pg_walstream::CancellationToken;
use wallaby_worker::run::{RunOptions, run};
use wallaby_worker::standalone;

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

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    init_tracing(cli.log_format);
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
        } => run_command(file, flow, status_file, spill_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run_command(
    file: PathBuf,
    flow: Option<String>,
    status_file: Option<PathBuf>,
    spill_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let resolved = standalone::load(&file, flow.as_deref())?;
    let name = resolved.flow.metadata.name.clone().unwrap_or_default();
    let state_dir = PathBuf::from(".wallaby").join(&name);
    let options = RunOptions {
        status_file: status_file.unwrap_or_else(|| state_dir.join("status.json")),
        state_dir,
        spill_dir,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        spawn_signal_handler(cancel.clone())?;
        run(resolved, options, cancel).await
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

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("WALLABY_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,pg_walstream=error,tokio_postgres=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
