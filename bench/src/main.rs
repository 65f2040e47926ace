//! `wallaby-bench`: measures the release `wallaby-worker` binary, run as a separate
//! process with `--drain`, against `pg_recvlogical` on the private PostgreSQL, over six
//! workloads and five destinations, plus a commit-to-file latency run. See
//! docs/benchmarks.md for the method; `e2e/bench.sh` is the one command.

mod latency;
mod pg;
mod proc;
mod report;
mod run;
mod snapshot;
mod targets;
mod workload;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Serialize;

use crate::latency::{LatencyPlan, LatencyResult};
use crate::report::Figure;
use crate::run::{Generated, Settings};
use crate::targets::{HttpCounter, Target};
use crate::workload::Workload;

#[derive(Debug, Parser)]
#[command(
    name = "wallaby-bench",
    about = "Benchmarks wallaby-worker against pg_recvlogical on a private PostgreSQL"
)]
struct Cli {
    /// Directory of results.json, results.csv and results.md (and the runs' scratch files).
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Factor applied to every workload's size (1.0: 1M-row inserts, 200k single-row
    /// transactions, …).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// CI mode: scale 0.002 (about 2k rows per workload), targets file-json, file-parquet,
    /// http and grpc, a 2-second latency run. Fails when a run loses rows; never on time.
    #[arg(long)]
    smoke: bool,
    /// Workloads to run (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<Workload>,
    /// Targets to run (comma-separated; default
    /// baseline,file-json,file-parquet,kafka,s3,http,grpc).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<Target>,
    /// Length of the latency run in seconds (0 skips it).
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
    /// Rows per second the latency generator offers.
    #[arg(long, default_value_t = 10_000)]
    latency_rate: u32,
    /// Rows per transaction of the latency generator.
    #[arg(long, default_value_t = 100)]
    latency_rows_per_tx: u32,
    /// The Flow's batchTimeout in the latency run.
    #[arg(long, default_value = "20ms")]
    latency_batch_timeout: String,
    /// The Flow's batchSize in every run.
    #[arg(long, default_value_t = 10_000)]
    batch_size: u32,
    /// The Flow's batchTimeout in the throughput runs.
    #[arg(long, default_value = "100ms")]
    batch_timeout: String,
    /// logical_decoding_work_mem of the benchmark databases (PostgreSQL's default; the
    /// private server runs with 64kB for the large-transaction tests).
    #[arg(long, default_value = "64MB")]
    decoding_work_mem: String,
    /// Superuser DSN of the PostgreSQL to use (e2e/pg.sh env).
    #[arg(long, env = "WALLABY_PG_SUPERUSER_DSN", hide_env_values = true)]
    dsn: String,
    /// The wallaby-worker binary (default: next to this binary, i.e. the same profile).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// pg_recvlogical (default: `pg_config --bindir`, then /usr/lib/postgresql/15/bin).
    #[arg(long, env = "PG_RECVLOGICAL")]
    pg_recvlogical: Option<PathBuf>,
    /// s3s-fs (default: $S3S_FS, then ~/.cargo/bin/s3s-fs, then s3s-fs on PATH).
    #[arg(long, env = "S3S_FS")]
    s3s_fs: Option<PathBuf>,
    /// Limit of one run (a run past it is killed and reported as an error).
    #[arg(long, default_value_t = 1800)]
    run_timeout_seconds: u64,
    /// Rows of the snapshot benchmark's table, one run per size (comma-separated, each
    /// scaled by --scale; 0 skips it): `wallaby-worker backfill` against `COPY … TO STDOUT
    /// (FORMAT binary)`.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000_000, 5_000_000])]
    snapshot_rows: Vec<u64>,
    /// Copy workers of the snapshot benchmark (default: the number of cores).
    #[arg(long)]
    snapshot_workers: Option<u32>,
    /// Run only the snapshot benchmark (no workloads, no latency run).
    #[arg(long)]
    snapshot_only: bool,
    /// Also write this Markdown file (docs/benchmarks.md) with the method and the table.
    #[arg(long)]
    docs: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Results {
    date: String,
    machine: Machine,
    postgres: String,
    scale: f64,
    batch_size: u32,
    batch_timeout: String,
    decoding_work_mem: String,
    workloads: Vec<Generated>,
    figures: Vec<Figure>,
    latency: Option<LatencyResult>,
    latency_error: Option<String>,
    /// One per table size of `--snapshot-rows`.
    snapshots: Vec<snapshot::SnapshotResult>,
    snapshot_errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    kernel: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("error: some runs failed; see the ERROR lines above and in the results");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs everything; `Ok(false)` when a run gave an error instead of a figure.
async fn run(mut cli: Cli) -> Result<bool> {
    if cli.smoke {
        cli.scale = 0.002;
        if cli.targets.is_empty() {
            cli.targets = vec![
                Target::FileJson,
                Target::FileParquet,
                Target::Http,
                Target::Grpc,
            ];
        }
        cli.latency_seconds = cli.latency_seconds.min(2);
    }
    if !(cli.scale > 0.0 && cli.scale.is_finite()) {
        bail!("--scale must be a positive number, got {}", cli.scale);
    }
    if cli.snapshot_only {
        cli.latency_seconds = 0;
    }
    let workloads = if cli.snapshot_only {
        Vec::new()
    } else if cli.workloads.is_empty() {
        workload::ALL.to_vec()
    } else {
        cli.workloads.clone()
    };
    let mut targets = if cli.targets.is_empty() {
        targets::ALL.to_vec()
    } else {
        cli.targets.clone()
    };
    targets.sort();
    targets.dedup();

    std::fs::create_dir_all(&cli.out)
        .with_context(|| format!("creating the output directory {}", cli.out.display()))?;
    let out = std::fs::canonicalize(&cli.out)
        .with_context(|| format!("resolving {}", cli.out.display()))?;
    let worker_bin = worker_binary(cli.worker_bin.as_deref())?;
    let pg_recvlogical = pg_recvlogical(cli.pg_recvlogical.as_deref());
    if targets.contains(&Target::Baseline) && !proc::is_executable(&pg_recvlogical) {
        bail!(
            "pg_recvlogical not found at {}: pass --pg-recvlogical or install postgresql-client-15",
            pg_recvlogical.display()
        );
    }
    let s3s_fs = s3s_fs(cli.s3s_fs.as_deref());
    let (http, http_base) = HttpCounter::start().await?;
    let grpc_addr = http.start_grpc().await?;
    let settings = Settings {
        superuser_dsn: cli.dsn.clone(),
        worker_bin,
        pg_recvlogical,
        s3s_fs,
        work_dir: out.join("work"),
        batch_size: cli.batch_size,
        batch_timeout: cli.batch_timeout.clone(),
        decoding_work_mem: cli.decoding_work_mem.clone(),
        run_timeout: Duration::from_secs(cli.run_timeout_seconds),
        http_base,
        grpc_addr,
    };
    let admin = pg::connect(&cli.dsn).await?;
    let postgres = pg::server_version(&admin).await?;
    eprintln!(
        "worker {}, PostgreSQL {}, scale {}, targets {}",
        settings.worker_bin.display(),
        postgres,
        cli.scale,
        targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(",")
    );

    let mut generated = Vec::new();
    let mut figures = Vec::new();
    let mut ok = true;
    for w in workloads {
        match run::workload(&settings, &admin, &http, w, cli.scale, &targets).await {
            Ok((g, outcomes)) => {
                ok &= outcomes.iter().all(|o| o.result.is_ok());
                figures.extend(report::figures(&g, &outcomes));
                generated.push(g);
            }
            Err(e) => {
                eprintln!("[{w}] ERROR {e:#}");
                ok = false;
                figures.push(Figure {
                    workload: w.name().into(),
                    target: "setup".into(),
                    rows: 0,
                    wal_bytes: 0,
                    seconds: None,
                    rows_per_s: None,
                    wal_mb_per_s: None,
                    client_cpu_s_per_1m_rows: None,
                    walsender_cpu_s_per_1m_rows: None,
                    client_peak_rss_mib: None,
                    rows_per_s_vs_baseline: None,
                    cpu_vs_baseline: None,
                    error: Some(format!("{e:#}")),
                });
            }
        }
    }

    let (latency, latency_error) = if cli.latency_seconds > 0 {
        let plan = LatencyPlan {
            seconds: cli.latency_seconds,
            rows_per_second: cli.latency_rate,
            rows_per_tx: cli.latency_rows_per_tx,
            batch_timeout: cli.latency_batch_timeout.clone(),
        };
        eprintln!(
            "[latency] {} rows/s in transactions of {} rows for {} s",
            plan.rows_per_second, plan.rows_per_tx, plan.seconds
        );
        match latency::run(&settings, &admin, &plan).await {
            Ok(l) => (Some(l), None),
            Err(e) => {
                eprintln!("[latency] ERROR {e:#}");
                ok = false;
                (None, Some(format!("{e:#}")))
            }
        }
    } else {
        (None, None)
    };

    let mut snapshots = Vec::new();
    let mut snapshot_errors = Vec::new();
    for rows in &cli.snapshot_rows {
        let rows = (*rows as f64 * cli.scale).round() as u64;
        if rows == 0 {
            continue;
        }
        let cores = machine().cores.max(1) as u32;
        let plan = snapshot::SnapshotPlan {
            rows,
            workers: cli.snapshot_workers.unwrap_or(cores).max(1),
        };
        match snapshot::run(&settings, &admin, plan).await {
            Ok(r) => {
                ok &= r.figures.iter().all(|f| f.error.is_none());
                snapshots.push(r);
            }
            Err(e) => {
                eprintln!("[snapshot] ERROR ({rows} rows) {e:#}");
                ok = false;
                snapshot_errors.push(format!("{rows} rows: {e:#}"));
            }
        }
    }

    let results = Results {
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        machine: machine(),
        postgres,
        scale: cli.scale,
        batch_size: cli.batch_size,
        batch_timeout: cli.batch_timeout.clone(),
        decoding_work_mem: cli.decoding_work_mem.clone(),
        workloads: generated,
        figures,
        latency,
        latency_error,
        snapshots,
        snapshot_errors,
    };
    let table = tables(&results);
    println!("{table}");
    write(
        &out.join("results.json"),
        &serde_json::to_string_pretty(&results)?,
    )?;
    write(&out.join("results.csv"), &report::csv(&results.figures))?;
    write(&out.join("results.md"), &table)?;
    if let Some(docs) = &cli.docs {
        write(docs, &docs_page(&results, &table))?;
    }
    // Successful runs removed their directories; what is left are failed runs' logs.
    for w in workload::ALL {
        let _ = std::fs::remove_dir(out.join("work").join(w.name()));
    }
    let _ = std::fs::remove_dir(out.join("work"));
    Ok(ok)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn tables(r: &Results) -> String {
    let mut s = format!(
        "Scale {}, batchSize {}, batchTimeout {}, logical_decoding_work_mem {}; {} ({} cores, {:.0} GiB), {}\n\n",
        r.scale,
        r.batch_size,
        r.batch_timeout,
        r.decoding_work_mem,
        r.machine.cpu,
        r.machine.cores,
        r.machine.memory_gib,
        r.date
    );
    s += "| workload | changes | transactions | WAL MB | generated in s |\n|---|---:|---:|---:|---:|\n";
    for g in &r.workloads {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.1} |",
            g.workload,
            g.changes,
            g.transactions,
            g.wal_bytes as f64 / 1e6,
            g.generate_seconds
        );
    }
    s += "\n";
    s += &report::markdown(&r.figures);
    if let Some(l) = &r.latency {
        s += "\nLatency (commit → row visible in the file destination's JSON lines):\n\n";
        s += &report::latency_markdown(l);
    }
    if let Some(e) = &r.latency_error {
        let _ = writeln!(s, "\nLatency run: ERROR {e}");
    }
    for snap in &r.snapshots {
        s += "\n";
        s += &snapshot::markdown(snap);
    }
    for e in &r.snapshot_errors {
        let _ = writeln!(s, "\nSnapshot run: ERROR {e}");
    }
    // Without a baseline (the smoke run) there is nothing to hold the figures against.
    if r.figures.iter().any(|f| f.target == "baseline") {
        s += "\nAgainst the targets (figures of this run):\n\n";
        s += &report::targets_markdown(&r.figures, r.latency.as_ref());
    }
    s
}

fn worker_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()
            .context("locating the wallaby-bench binary")?
            .with_file_name("wallaby-worker"),
    };
    if !proc::is_executable(&path) {
        bail!(
            "wallaby-worker binary not found at {}: build it with the same profile (cargo build --release -p wallaby-worker -p wallaby-bench) or pass --worker-bin",
            path.display()
        );
    }
    Ok(path)
}

fn pg_recvlogical(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_owned();
    }
    let from_pg_config = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|d| Path::new(d.trim()).join("pg_recvlogical"))
        .filter(|p| proc::is_executable(p));
    from_pg_config.unwrap_or_else(|| "/usr/lib/postgresql/15/bin/pg_recvlogical".into())
}

fn s3s_fs(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_owned();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let local = Path::new(&home).join(".cargo/bin/s3s-fs");
    if proc::is_executable(&local) {
        local
    } else {
        "s3s-fs".into()
    }
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1048576.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    Machine {
        cpu,
        cores,
        memory_gib,
        kernel,
    }
}

/// docs/benchmarks.md: the command, the method, the machine and this run's tables.
fn docs_page(r: &Results, table: &str) -> String {
    let targets: String = targets::ALL
        .iter()
        .map(|t| format!("- `{}`: {}\n", t.name(), t.description()))
        .collect();
    let workloads: String = r
        .workloads
        .iter()
        .map(|g| format!("- `{}`: {}\n", g.workload, g.description))
        .collect();
    format!(
        include_str!("benchmarks.md.in"),
        date = r.date,
        cpu = r.machine.cpu,
        cores = r.machine.cores,
        memory = format!("{:.0}", r.machine.memory_gib),
        kernel = r.machine.kernel,
        postgres = r.postgres,
        scale = r.scale,
        targets = targets,
        workloads = workloads,
        table = table,
    )
}
