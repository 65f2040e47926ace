//! `wallaby-operator`: the control plane. In this version it prints (or writes) the CRDs;
//! the reconcilers arrive with the operator issue.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "wallaby-operator",
    version,
    about = "WALlaby Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
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
    }
    Ok(())
}
