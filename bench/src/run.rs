//! One workload end to end: a fresh database, the publication and one slot per target
//! created before the changes, the changes generated, then each target run as a child
//! process (pg_recvlogical for the baseline, `wallaby-worker run --drain` for every
//! destination) while the harness samples its CPU, peak RSS and its walsender's CPU.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio_postgres::Client;

use crate::pg::{self, Lsn};
use crate::proc::{self, ChildGuard, Usage};
use crate::targets::{self, HttpCounter, KafkaPeer, S3_BUCKET, S3Peer, Target};
use crate::workload::{Plan, Workload};

pub const PUBLICATION: &str = "bench_pub";

/// Settings shared by every run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub superuser_dsn: String,
    pub worker_bin: PathBuf,
    pub pg_recvlogical: PathBuf,
    pub s3s_fs: PathBuf,
    pub work_dir: PathBuf,
    pub batch_size: u32,
    pub batch_timeout: String,
    pub decoding_work_mem: String,
    pub run_timeout: Duration,
    pub http_base: String,
    pub grpc_addr: String,
}

/// Why a run gave no figure.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "{target} on {workload}: delivered {got} row changes, expected {expected} ({}); the run is not a figure",
        if got < expected { "rows lost" } else { "rows duplicated" }
    )]
    RowsMismatch {
        workload: Workload,
        target: Target,
        expected: u64,
        got: u64,
    },
    #[error(
        "baseline on {workload}: pg_recvlogical exited with its slot confirmed at {confirmed}, before the end LSN {end}; it did not read every change"
    )]
    BaselineShort {
        workload: Workload,
        confirmed: String,
        end: String,
    },
    #[error("{what} exited with {status}; last lines of its log {log}:\n{tail}")]
    ChildFailed {
        what: String,
        status: String,
        log: String,
        tail: String,
    },
    #[error("{what} did not finish within {timeout:?}; killed (log: {log})")]
    Timeout {
        what: String,
        timeout: Duration,
        log: String,
    },
}

/// What one child run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub seconds: f64,
    /// The child's own CPU (worker or pg_recvlogical), seconds.
    pub client_cpu: f64,
    pub client_peak_rss: u64,
    /// CPU of the walsender that served the slot, seconds.
    pub walsender_cpu: f64,
}

/// The workload's changes, as generated.
#[derive(Debug, Clone, Serialize)]
pub struct Generated {
    pub workload: String,
    pub description: String,
    pub changes: u64,
    pub transactions: u64,
    pub start_lsn: String,
    pub end_lsn: String,
    pub wal_bytes: u64,
    pub generate_seconds: f64,
}

/// A run's outcome: a measurement, or why there is none.
#[derive(Debug)]
pub struct Outcome {
    pub target: Target,
    pub result: Result<(Sample, u64), anyhow::Error>,
}

/// Runs `workload` against every target and drops its database.
pub async fn workload(
    settings: &Settings,
    admin: &Client,
    http: &HttpCounter,
    workload: Workload,
    scale: f64,
    targets: &[Target],
) -> Result<(Generated, Vec<Outcome>)> {
    let db = workload.database();
    let plan = workload.plan(scale);
    pg::create_database(admin, &db, &settings.decoding_work_mem).await?;
    let result = run_in_database(settings, http, workload, &plan, &db, targets).await;
    // Dropped whatever happened; a failed drop is reported after the run's own error.
    let dropped = pg::drop_database(admin, &db).await;
    let out = result?;
    dropped?;
    Ok(out)
}

async fn run_in_database(
    settings: &Settings,
    http: &HttpCounter,
    workload: Workload,
    plan: &Plan,
    db: &str,
    targets: &[Target],
) -> Result<(Generated, Vec<Outcome>)> {
    let dsn = pg::dsn_for(&settings.superuser_dsn, db, "wallaby-bench")?;
    let sql = pg::connect(&dsn).await?;
    for stmt in &plan.setup {
        sql.batch_execute(stmt)
            .await
            .with_context(|| format!("setting up {workload}: {}", first_line(stmt)))?;
    }
    // No autovacuum of the fresh table while the targets run: it would compete with the
    // first of them for the two cores.
    sql.batch_execute(
        "ALTER TABLE t SET (autovacuum_enabled = false, toast.autovacuum_enabled = false)",
    )
    .await
    .with_context(|| format!("disabling autovacuum on {db}.t"))?;
    sql.batch_execute(&format!("CREATE PUBLICATION {PUBLICATION} FOR TABLE t"))
        .await
        .with_context(|| format!("creating publication {PUBLICATION} in {db}"))?;
    for t in targets {
        pg::create_slot(&sql, &t.slot(db)).await?;
    }

    // The generator does not wait for each commit's WAL flush (the walsender still only
    // sends flushed WAL): it is not what is measured, and 200k flushes would dominate.
    let generator = pg::connect(&dsn).await?;
    generator
        .batch_execute("SET synchronous_commit = off")
        .await
        .context("setting synchronous_commit for the generator")?;
    let start = pg::insert_lsn(&sql).await?;
    let began = Instant::now();
    for stmt in &plan.generate {
        generator
            .batch_execute(stmt)
            .await
            .with_context(|| format!("generating {workload}: {stmt}"))?;
    }
    let generate_seconds = began.elapsed().as_secs_f64();
    let end = pg::insert_lsn(&sql).await?;
    pg::wait_flushed(&sql, &end).await?;
    // Write the generation's dirty buffers out now rather than during the first target's
    // run (the checkpoint record lies after the end LSN and carries no changes).
    sql.batch_execute("CHECKPOINT")
        .await
        .context("running CHECKPOINT after the generation")?;
    let generated = Generated {
        workload: workload.name().into(),
        description: plan.description.clone(),
        changes: plan.changes,
        transactions: plan.transactions,
        start_lsn: start.text.clone(),
        end_lsn: end.text.clone(),
        wal_bytes: end.bytes.saturating_sub(start.bytes),
        generate_seconds,
    };
    eprintln!(
        "[{workload}] generated {} changes in {} transactions, {:.1} MB of WAL, in {generate_seconds:.1} s",
        plan.changes,
        plan.transactions,
        generated.wal_bytes as f64 / 1e6
    );

    let mut outcomes = Vec::new();
    for &target in targets {
        let dir = settings.work_dir.join(workload.name()).join(target.name());
        let _ = std::fs::remove_dir_all(&dir);
        let result = match std::fs::create_dir_all(&dir) {
            Ok(()) => {
                run_target(
                    settings, &sql, http, workload, plan, db, &dsn, &end, target, &dir,
                )
                .await
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("creating {}", dir.display()))),
        };
        match &result {
            Ok((s, rows)) => eprintln!(
                "[{workload}] {target}: {rows} rows in {:.2} s, client CPU {:.2} s, walsender CPU {:.2} s, peak RSS {:.0} MiB",
                s.seconds,
                s.client_cpu,
                s.walsender_cpu,
                s.client_peak_rss as f64 / 1048576.0
            ),
            Err(e) => eprintln!("[{workload}] {target}: ERROR {e:#}"),
        }
        // The outputs can be large (1M JSON lines); the counts are taken.
        if result.is_ok() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        outcomes.push(Outcome { target, result });
    }
    Ok((generated, outcomes))
}

fn first_line(s: &str) -> &str {
    s.trim().lines().next().unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
async fn run_target(
    settings: &Settings,
    sql: &Client,
    http: &HttpCounter,
    workload: Workload,
    plan: &Plan,
    db: &str,
    dsn: &str,
    end: &Lsn,
    target: Target,
    dir: &Path,
) -> Result<(Sample, u64)> {
    let slot = target.slot(db);
    let log = dir.join("log.txt");
    if target == Target::Baseline {
        let dsn = pg::dsn_for(dsn, db, "bench-baseline")?;
        let mut cmd = Command::new(&settings.pg_recvlogical);
        cmd.args(["--start", "-S", &slot, "-P", "pgoutput"])
            .args(["-o", "proto_version=1"])
            .args(["-o", &format!("publication_names={PUBLICATION}")])
            .args(["-f", "/dev/null", "--endpos", &end.text, "--no-loop"])
            .args(["-d", &dsn]);
        let sample = sample_child(
            cmd,
            "pg_recvlogical",
            sql,
            Some(&slot),
            &log,
            settings.run_timeout,
        )
        .await?;
        // Its output goes to /dev/null; that it read everything shows in the slot: at exit
        // it confirms what it received, which must reach the end LSN.
        let confirmed = pg::confirmed_flush(sql, &slot).await?;
        if confirmed.bytes < end.bytes {
            return Err(RunError::BaselineShort {
                workload,
                confirmed: confirmed.text,
                end: end.text.clone(),
            }
            .into());
        }
        return Ok((sample, plan.changes));
    }

    let out = dir.join("out");
    let (destination, peer) = destination(settings, workload, target, &out).await?;
    let manifest = dir.join("flow.yaml");
    let text = manifest_text(
        "bench",
        &slot,
        dsn,
        (settings.batch_size, &settings.batch_timeout),
        "200ms",
        &destination,
    );
    std::fs::write(&manifest, text).with_context(|| format!("writing {}", manifest.display()))?;
    let mut cmd = Command::new(&settings.worker_bin);
    cmd.current_dir(dir)
        .args(["run", "-f"])
        .arg(&manifest)
        .args(["--drain", "--metrics-addr", "off", "--status-file"])
        .arg(dir.join("status.json"))
        .arg("--spill-dir")
        .arg(dir.join("spill"))
        .env("WALLABY_LOG", "warn");
    let sample = sample_child(
        cmd,
        "wallaby-worker",
        sql,
        Some(&slot),
        &log,
        settings.run_timeout,
    )
    .await?;

    let got = match &peer {
        Peer::Kafka(k) => k.records()?,
        Peer::S3(p) => targets::count_rows(&p.dir.join(S3_BUCKET))?,
        Peer::None if target == Target::Http => http.rows(&format!("/{}", workload.name())),
        Peer::None if target == Target::Grpc => http.rows(&format!("grpc:{}", workload.name())),
        Peer::None => targets::count_rows(&out)?,
    };
    drop(peer);
    if got != plan.changes {
        return Err(RunError::RowsMismatch {
            workload,
            target,
            expected: plan.changes,
            got,
        }
        .into());
    }
    Ok((sample, got))
}

/// The peer a destination writes to, alive for the run and the count after it.
#[derive(Debug)]
enum Peer {
    None,
    Kafka(KafkaPeer),
    S3(S3Peer),
}

/// The Destination's `spec` (YAML, indented 2; for s3 followed by its Secret) and the peer
/// it writes to.
async fn destination(
    settings: &Settings,
    workload: Workload,
    target: Target,
    out: &Path,
) -> Result<(String, Peer)> {
    Ok(match target {
        Target::Baseline => anyhow::bail!("the baseline (pg_recvlogical) has no destination"),
        Target::FileJson | Target::FileParquet => (
            format!(
                "  type: file\n  format: {}\n  file: {{path: \"{}\"}}\n",
                if target == Target::FileJson {
                    "json"
                } else {
                    "parquet"
                },
                out.display()
            ),
            Peer::None,
        ),
        Target::Kafka => {
            let peer = KafkaPeer::start(&format!("bench.{}", workload.name()))?;
            let brokers = peer
                .brokers()
                .iter()
                .map(|b| format!("\"{b}\""))
                .collect::<Vec<_>>()
                .join(", ");
            (
                format!(
                    "  type: kafka\n  format: json\n  kafka: {{brokers: [{brokers}], topic: \"{}\"}}\n",
                    peer.topic
                ),
                Peer::Kafka(peer),
            )
        }
        Target::S3 => {
            let peer = S3Peer::start(&settings.s3s_fs, out).await?;
            (
                format!(
                    "  type: s3\n  format: parquet\n  s3: {{bucket: {S3_BUCKET}, endpoint: \"http://127.0.0.1:{}\", forcePathStyle: true, region: us-east-1, secretRef: {{name: s3}}}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: s3}}\nstringData: {{accessKeyId: \"{}\", secretAccessKey: \"{}\"}}\n",
                    peer.port, peer.access_key, peer.secret_key
                ),
                Peer::S3(peer),
            )
        }
        Target::Http => (
            format!(
                "  type: http\n  format: json\n  http: {{url: \"{}/{}\"}}\n",
                settings.http_base,
                workload.name()
            ),
            Peer::None,
        ),
        Target::Grpc => (
            format!(
                "  type: grpc\n  format: json\n  grpc: {{endpoint: \"{}\", destination: {}}}\n",
                settings.grpc_addr,
                workload.name()
            ),
            Peer::None,
        ),
    })
}

/// A standalone manifest: one Flow reading the pre-created `slot` (and [`PUBLICATION`]) of
/// `public.t` into one Destination `out` whose spec lines are `destination`.
pub fn manifest_text(
    flow: &str,
    slot: &str,
    dsn: &str,
    batching: (u32, &str),
    status_interval: &str,
    destination: &str,
) -> String {
    let (batch_size, batch_timeout) = batching;
    format!(
        r#"apiVersion: wallaby.dev/v1alpha1
kind: Flow
metadata: {{name: {flow}}}
spec:
  source:
    postgres:
      secretRef: {{name: pg}}
      slot: {slot}
      publication: {PUBLICATION}
      tables: ["public.t"]
      createSlot: false
      ensurePublication: false
      ensureState: false
      batchSize: {batch_size}
      batchTimeout: {batch_timeout}
      statusInterval: {status_interval}
  destinations: [{{name: out}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: pg}}
stringData: {{dsn: "{dsn}"}}
---
apiVersion: wallaby.dev/v1alpha1
kind: Destination
metadata: {{name: out}}
spec:
{destination}"#
    )
}

/// Runs `cmd` to its exit, sampling its CPU and peak RSS and the CPU of the walsender
/// serving `slot` (when it reads one; nothing is asked of the server otherwise) every
/// [`proc::SAMPLE_EVERY`]. The exit is seen without reaping the
/// child, so its final CPU time is read from the zombie.
pub async fn sample_child(
    mut cmd: Command,
    what: &str,
    sql: &Client,
    slot: Option<&str>,
    log: &Path,
    timeout: Duration,
) -> Result<Sample> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let log_err = log_file
        .try_clone()
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(log_file).stderr(log_err);
    let started = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {what} ({})", cmd.get_program().to_string_lossy()))?;
    let child = ChildGuard::new(child);
    let pid = child.pid();
    let mut client = Usage::default();
    let mut walsender = Usage::default();
    let mut walsender_pid = None;
    loop {
        let state = client.observe(pid).map(|s| s.state);
        if let Some(slot) = slot
            && walsender_pid.is_none()
        {
            walsender_pid = pg::slot_walsender(sql, slot).await?;
        }
        if let Some(w) = walsender_pid {
            walsender.observe(w);
        }
        if matches!(state, Some('Z') | None) {
            break;
        }
        if started.elapsed() > timeout {
            return Err(RunError::Timeout {
                what: what.into(),
                timeout,
                log: log.display().to_string(),
            }
            .into());
        }
        tokio::time::sleep(proc::SAMPLE_EVERY).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let status = child
        .reap()
        .with_context(|| format!("waiting for {what}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        return Err(RunError::ChildFailed {
            what: what.into(),
            status: status.to_string(),
            log: log.display().to_string(),
            tail,
        }
        .into());
    }
    Ok(Sample {
        seconds,
        client_cpu: client.cpu_seconds,
        client_peak_rss: client.peak_rss_bytes,
        walsender_cpu: walsender.cpu_seconds,
    })
}
