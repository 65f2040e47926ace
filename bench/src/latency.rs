//! Commit-to-destination latency: a generator commits small transactions at a fixed rate
//! into one table while the worker streams live to a `file` destination (JSON lines); the
//! harness tails the files and, for each change line, records the time it became visible
//! minus the transaction's `commit_time` (PostgreSQL's commit timestamp, same host clock).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::Client;

use crate::pg;
use crate::proc::ChildGuard;
use crate::run::{PUBLICATION, Settings};

const DB: &str = "bench_latency";
const SLOT: &str = "bench_latency_file_json";

/// The latency run's parameters.
#[derive(Debug, Clone)]
pub struct LatencyPlan {
    pub seconds: u64,
    pub rows_per_second: u32,
    pub rows_per_tx: u32,
    pub batch_timeout: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    pub offered_rows_per_s: u32,
    pub rows_per_tx: u32,
    pub batch_timeout: String,
    pub seconds: u64,
    pub rows: u64,
    /// Rows committed per second as achieved by the generator.
    pub achieved_rows_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub async fn run(settings: &Settings, admin: &Client, plan: &LatencyPlan) -> Result<LatencyResult> {
    pg::create_database(admin, DB, &settings.decoding_work_mem).await?;
    let result = run_in_database(settings, plan).await;
    let dropped = pg::drop_database(admin, DB).await;
    let out = result?;
    dropped?;
    Ok(out)
}

async fn run_in_database(settings: &Settings, plan: &LatencyPlan) -> Result<LatencyResult> {
    let dsn = pg::dsn_for(&settings.superuser_dsn, DB, "wallaby-bench")?;
    let sql = pg::connect(&dsn).await?;
    sql.batch_execute(&format!(
        "CREATE TABLE t (id bigserial PRIMARY KEY, k int, v text, ts timestamptz);
         CREATE PUBLICATION {PUBLICATION} FOR TABLE t"
    ))
    .await
    .context("creating the latency table and publication")?;
    pg::create_slot(&sql, SLOT).await?;

    let dir = settings.work_dir.join("latency");
    let _ = std::fs::remove_dir_all(&dir);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let manifest = dir.join("flow.yaml");
    let destination = format!(
        "  type: file\n  format: json\n  file: {{path: \"{}\"}}\n",
        out.display()
    );
    std::fs::write(
        &manifest,
        crate::run::manifest_text(
            "latency",
            SLOT,
            &dsn,
            (settings.batch_size, &plan.batch_timeout),
            "1s",
            &destination,
        ),
    )
    .with_context(|| format!("writing {}", manifest.display()))?;
    let log = dir.join("log.txt");
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let log_err = log_file.try_clone().context("opening the worker log")?;
    let child = Command::new(&settings.worker_bin)
        .current_dir(&dir)
        .args(["run", "-f"])
        .arg(&manifest)
        .args(["--metrics-addr", "off", "--status-file"])
        .arg(dir.join("status.json"))
        .env("WALLABY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .spawn()
        .with_context(|| format!("starting {}", settings.worker_bin.display()))?;
    let mut worker = ChildGuard::new(child);

    // Generate only once the worker streams from the slot.
    let attach_deadline = Instant::now() + Duration::from_secs(60);
    while pg::slot_walsender(&sql, SLOT).await?.is_none() {
        if let Some(status) = worker.try_wait().context("polling the worker")? {
            bail!(
                "the latency worker exited with {status} before attaching; log {}",
                log.display()
            );
        }
        if Instant::now() > attach_deadline {
            bail!(
                "the latency worker did not attach to slot {SLOT} within 60 s; log {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let generator = pg::connect(&dsn).await?;
    let tx_per_second = (plan.rows_per_second / plan.rows_per_tx.max(1)).max(1);
    let total_tx = u64::from(tx_per_second) * plan.seconds;
    let rows_per_tx = plan.rows_per_tx;
    let insert = format!(
        "INSERT INTO t (k, v, ts) SELECT g, md5(g::text), clock_timestamp() FROM generate_series(1, {rows_per_tx}) g"
    );
    let mut gen_task = Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / tx_per_second);
        let began = Instant::now();
        for _ in 0..total_tx {
            tick.tick().await;
            generator.batch_execute(&insert).await?;
        }
        Ok::<f64, tokio_postgres::Error>(began.elapsed().as_secs_f64())
    }));

    let expected = total_tx * u64::from(rows_per_tx);
    let mut tail = Tail::default();
    let mut latencies_ms: Vec<f64> = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
    let mut generated_seconds = None;
    let mut deadline = None;
    while (latencies_ms.len() as u64) < expected {
        tail.read(&out, &mut latencies_ms)?;
        if let Some(task) = gen_task.take_if(|t| t.is_finished()) {
            generated_seconds = Some(
                task.await
                    .context("joining the latency generator")?
                    .context("generating the latency workload")?,
            );
        }
        if let Some(status) = worker.try_wait().context("polling the worker")? {
            bail!(
                "the latency worker exited with {status} while streaming; log {}",
                log.display()
            );
        }
        if generated_seconds.is_some() {
            let d = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(60));
            if Instant::now() > d {
                bail!(
                    "latency run: {} of {expected} rows reached the destination within 60 s after the generator stopped; rows lost",
                    latencies_ms.len()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = worker.stop(Duration::from_secs(30)).await;
    let generated_seconds = match (generated_seconds, gen_task) {
        (Some(s), _) => s,
        (None, Some(task)) => task
            .await
            .context("joining the latency generator")?
            .context("generating the latency workload")?,
        (None, None) => 0.0,
    };
    if latencies_ms.len() as u64 != expected {
        bail!(
            "latency run: {} rows reached the destination, {expected} were committed (rows duplicated)",
            latencies_ms.len()
        );
    }
    latencies_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        let i = ((latencies_ms.len() as f64 * p).ceil() as usize).saturating_sub(1);
        latencies_ms.get(i).copied().unwrap_or(0.0)
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(LatencyResult {
        offered_rows_per_s: tx_per_second * rows_per_tx,
        rows_per_tx,
        batch_timeout: plan.batch_timeout.clone(),
        seconds: plan.seconds,
        rows: expected,
        achieved_rows_per_s: expected as f64 / generated_seconds.max(f64::EPSILON),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: latencies_ms.last().copied().unwrap_or(0.0),
    })
}

/// Reads new complete lines of the JSON-lines files of a directory, file by file.
#[derive(Debug, Default)]
struct Tail {
    /// Bytes consumed per file name.
    offsets: BTreeMap<String, u64>,
    /// An incomplete last line per file, kept until its newline arrives.
    partial: BTreeMap<String, Vec<u8>>,
}

impl Tail {
    fn read(&mut self, dir: &Path, latencies_ms: &mut Vec<f64>) -> Result<()> {
        let mut names: Vec<String> = match std::fs::read_dir(dir) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".jsonl") && !n.starts_with('.'))
                .collect(),
            Err(_) => return Ok(()),
        };
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let offset = self.offsets.entry(name.clone()).or_default();
            let mut file = std::fs::File::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            file.seek(SeekFrom::Start(*offset))
                .with_context(|| format!("seeking in {}", path.display()))?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if buf.is_empty() {
                continue;
            }
            let seen_at = Utc::now();
            *offset += buf.len() as u64;
            let partial = self.partial.entry(name).or_default();
            partial.extend_from_slice(&buf);
            let Some(last_nl) = partial.iter().rposition(|b| *b == b'\n') else {
                continue;
            };
            let rest = partial.split_off(last_nl + 1);
            for line in partial.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                if let Some(commit) = commit_time(line) {
                    let ms = (seen_at - commit).num_microseconds().unwrap_or(0) as f64 / 1000.0;
                    latencies_ms.push(ms);
                }
            }
            *partial = rest;
        }
        Ok(())
    }
}

/// `commit_time` of a change line; `None` for schema header and message lines.
fn commit_time(line: &[u8]) -> Option<DateTime<Utc>> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    v.get("op")?;
    let t = v.get("commit_time")?.as_str()?;
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}
