//! `kube-emulator`: runs the test-fixture Kubernetes API emulator (and optionally its kubelet)
//! in the foreground until interrupted, for poking at it with kubectl by hand.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "In-memory Kubernetes API emulator (a test fixture, not a cluster)")]
struct Args {
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where to write a kubeconfig pointing at the emulator.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Also run the kubelet, mapping the `wallaby-worker` command to this binary.
    #[arg(long)]
    worker_binary: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow_free::Result {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let emulator = kube_emulator::Emulator::start_on(args.port).await?;
    emulator.write_kubeconfig(&args.kubeconfig)?;
    let _kubelet = match &args.worker_binary {
        Some(bin) => Some(kube_emulator::Kubelet::start(&emulator, bin.clone())?),
        None => None,
    };
    println!(
        "kube-emulator listening on {} (kubeconfig: {})",
        emulator.url(),
        args.kubeconfig.display()
    );
    tokio::signal::ctrl_c()
        .await
        .map_err(anyhow_free::Error::Signal)?;
    Ok(())
}

mod anyhow_free {
    pub type Result = std::result::Result<(), Error>;

    #[derive(Debug, thiserror::Error)]
    pub enum Error {
        #[error(transparent)]
        Emulator(#[from] kube_emulator::EmulatorError),
        #[error(transparent)]
        Kubelet(#[from] kube_emulator::KubeletError),
        #[error("waiting for Ctrl-C: {0}")]
        Signal(std::io::Error),
    }
}
