//! The snapshot benchmark: one table copied by `wallaby-worker backfill` (copy workers =
//! cores, page-range partitions) into the file destination, against the same table read
//! with `COPY t TO STDOUT (FORMAT binary)` and thrown away in the same run — the floor of
//! getting the rows out of PostgreSQL at all.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio_postgres::Client;
use tokio_stream::StreamExt;

use crate::pg;
use crate::run::{Settings, manifest_text, sample_child};
use crate::targets::count_rows;

const DATABASE: &str = "wallaby_bench_snapshot";
/// Timed rounds (a baseline read and a backfill per format each; the median is the figure).
const RUNS: usize = 5;
/// The file destination's formats backfilled into.
const FORMATS: [&str; 2] = ["parquet", "json"];

/// What to copy.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotPlan {
    /// Rows in the table.
    pub rows: u64,
    /// Copy workers (and twice as many partitions).
    pub workers: u32,
}

/// One copy of the table.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotFigure {
    /// `copy-binary` (the baseline) or the destination format.
    pub target: String,
    /// Wall time.
    pub seconds: Option<f64>,
    /// Rows per second.
    pub rows_per_s: Option<f64>,
    /// Rows per second over the baseline's.
    pub vs_baseline: Option<f64>,
    /// CPU seconds of the copying process (the worker; none for the baseline).
    pub client_cpu_s: Option<f64>,
    /// Peak RSS of the worker.
    pub peak_rss_mib: Option<f64>,
    /// Why the run gave no figure.
    pub error: Option<String>,
}

/// The snapshot runs.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotResult {
    /// Rows in the table.
    pub rows: u64,
    /// Heap size of the table.
    pub table_mb: f64,
    /// Copy workers of the worker runs.
    pub workers: u32,
    /// Baseline first, then each format.
    pub figures: Vec<SnapshotFigure>,
}

/// Creates the table, runs the baseline and one backfill per format.
pub async fn run(
    settings: &Settings,
    admin: &Client,
    plan: SnapshotPlan,
) -> Result<SnapshotResult> {
    pg::create_database(admin, DATABASE, &settings.decoding_work_mem).await?;
    let dsn = pg::dsn_for(&settings.superuser_dsn, DATABASE, "wallaby-bench")?;
    let sql = pg::connect(&dsn).await?;
    eprintln!("[snapshot] generating {} rows", plan.rows);
    sql.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, name text NOT NULL, qty int, price numeric(12,2), updated_at timestamptz NOT NULL);
         INSERT INTO t SELECT g, 'item ' || g, (g % 1000)::int, (g % 100000) / 100.0, now() - g * interval '1 second'
         FROM generate_series(1, {}) g;",
        plan.rows
    ))
    .await
    .context("generating the snapshot table")?;
    // Hint bits and visibility map set before either copy, so neither pays for them; the
    // checkpoint writes what generating dirtied now, not while one of the copies is timed.
    sql.batch_execute("VACUUM (FREEZE, ANALYZE) t")
        .await
        .context("VACUUM of the snapshot table")?;
    admin
        .batch_execute("CHECKPOINT")
        .await
        .context("CHECKPOINT after generating the snapshot table")?;
    let bytes: i64 = sql
        .query_one("SELECT pg_relation_size('t')", &[])
        .await?
        .get(0);

    // One untimed read first, so the baseline does not pay for pages the generation left
    // outside the caches. Then rounds of one baseline read and one backfill per format, so
    // that whatever else the machine does in the meantime falls on all of them alike; the
    // figure of each is its median.
    copy_binary(&sql).await?;
    let mut baseline_times = Vec::with_capacity(RUNS);
    let mut runs: Vec<Vec<(f64, f64, u64)>> = vec![Vec::with_capacity(RUNS); FORMATS.len()];
    let mut errors: Vec<Option<String>> = vec![None; FORMATS.len()];
    for round in 0..RUNS {
        let started = Instant::now();
        let rows = copy_binary(&sql).await?;
        if rows != plan.rows {
            anyhow::bail!(
                "COPY binary returned {rows} rows, the table has {}",
                plan.rows
            );
        }
        baseline_times.push(started.elapsed().as_secs_f64());
        for (i, format) in FORMATS.iter().enumerate() {
            if errors[i].is_some() {
                continue;
            }
            match backfill(settings, &sql, &dsn, plan, format).await {
                Ok(run) => runs[i].push(run),
                Err(e) => {
                    eprintln!("[snapshot] backfill → file {format} (round {round}): ERROR {e:#}");
                    errors[i] = Some(format!("{e:#}"));
                }
            }
        }
    }
    baseline_times.sort_by(f64::total_cmp);
    let seconds = baseline_times[RUNS / 2];
    eprintln!(
        "[snapshot] COPY binary: {} rows in {seconds:.2} s ({:.0} rows/s; median of {RUNS})",
        plan.rows,
        plan.rows as f64 / seconds
    );
    let baseline_rate = plan.rows as f64 / seconds;
    let mut figures = vec![SnapshotFigure {
        target: "copy-binary".into(),
        seconds: Some(seconds),
        rows_per_s: Some(baseline_rate),
        vs_baseline: Some(1.0),
        client_cpu_s: None,
        peak_rss_mib: None,
        error: None,
    }];
    for ((format, mut runs), error) in FORMATS.iter().zip(runs).zip(errors) {
        let figure = match error {
            None => {
                // The run of median time (its CPU and memory with it).
                runs.sort_by(|a, b| a.0.total_cmp(&b.0));
                let (seconds, cpu, rss) = runs[RUNS / 2];
                let rate = plan.rows as f64 / seconds;
                eprintln!(
                    "[snapshot] backfill → file {format}: {} rows in {seconds:.2} s ({rate:.0} rows/s, {:.2}× COPY binary; median of {RUNS})",
                    plan.rows,
                    rate / baseline_rate
                );
                SnapshotFigure {
                    target: format!("backfill-file-{format}"),
                    seconds: Some(seconds),
                    rows_per_s: Some(rate),
                    vs_baseline: Some(rate / baseline_rate),
                    client_cpu_s: Some(cpu),
                    peak_rss_mib: Some(rss as f64 / (1024.0 * 1024.0)),
                    error: None,
                }
            }
            Some(e) => SnapshotFigure {
                target: format!("backfill-file-{format}"),
                seconds: None,
                rows_per_s: None,
                vs_baseline: None,
                client_cpu_s: None,
                peak_rss_mib: None,
                error: Some(e),
            },
        };
        figures.push(figure);
    }
    drop(sql);
    pg::drop_database(admin, DATABASE).await?;
    Ok(SnapshotResult {
        rows: plan.rows,
        table_mb: bytes as f64 / 1e6,
        workers: plan.workers,
        figures,
    })
}

/// `COPY t TO STDOUT (FORMAT binary)`, every byte read and dropped; returns the rows.
async fn copy_binary(sql: &Client) -> Result<u64> {
    let stream = sql
        .copy_out("COPY t TO STDOUT (FORMAT binary)")
        .await
        .context("COPY t TO STDOUT (FORMAT binary)")?;
    let mut stream = std::pin::pin!(stream);
    let mut messages = 0u64;
    while let Some(chunk) = stream.next().await {
        chunk.context("reading COPY data")?;
        messages += 1;
    }
    // One CopyData per row, plus the header (with the first row) and the trailer.
    Ok(messages.saturating_sub(1))
}

/// `wallaby-worker backfill` of `t` into a file destination; (seconds, CPU s, peak RSS).
async fn backfill(
    settings: &Settings,
    sql: &Client,
    dsn: &str,
    plan: SnapshotPlan,
    format: &str,
) -> Result<(f64, f64, u64)> {
    let dir = settings.work_dir.join("snapshot").join(format);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join("out");
    let destination = format!(
        "  type: file\n  format: {format}\n  file: {{path: \"{}\"}}\n",
        out.display()
    );
    let manifest = manifest_text(
        "bench-snapshot",
        "unused",
        dsn,
        (settings.batch_size, &settings.batch_timeout),
        "1s",
        &destination,
    )
    .replace(
        "  destinations: [{name: out}]",
        &format!(
            "  snapshot: {{workers: {w}, partitionCount: {p}, batchSize: {b}, stateBackend: none}}\n  destinations: [{{name: out}}]",
            w = plan.workers,
            p = plan.workers * 2,
            b = settings.batch_size
        ),
    );
    let manifest_path = dir.join("flow.yaml");
    std::fs::write(&manifest_path, manifest)
        .with_context(|| format!("writing {}", manifest_path.display()))?;
    let mut cmd = Command::new(&settings.worker_bin);
    cmd.args(["backfill", "-f"])
        .arg(&manifest_path)
        .args([
            "--tables",
            "public.t",
            "--metrics-addr",
            "off",
            "--status-file",
        ])
        .arg(dir.join("status.json"))
        .env("WALLABY_LOG", "warn");
    let sample = sample_child(
        cmd,
        "wallaby-worker backfill",
        sql,
        None,
        &dir.join("worker.log"),
        settings.run_timeout,
    )
    .await?;
    let rows = count_rows(&out)?;
    if rows != plan.rows {
        anyhow::bail!("backfill wrote {rows} rows, the table has {}", plan.rows);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok((sample.seconds, sample.client_cpu, sample.client_peak_rss))
}

/// The Markdown table of the snapshot runs.
pub fn markdown(r: &SnapshotResult) -> String {
    let mut s = format!(
        "Snapshot of one table ({} rows, {:.0} MB heap), {} copy workers, {} partitions:\n\n| copy | seconds | rows/s | vs COPY binary | worker CPU s | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|\n",
        r.rows,
        r.table_mb,
        r.workers,
        r.workers * 2
    );
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    for f in &r.figures {
        match &f.error {
            Some(e) => {
                s += &format!(
                    "| {} | ERROR: {} | | | | |\n",
                    f.target,
                    e.lines().next().unwrap_or_default()
                )
            }
            None => {
                s += &format!(
                    "| {} | {} | {} | {} | {} | {} |\n",
                    f.target,
                    opt(f.seconds, 2),
                    opt(f.rows_per_s, 0),
                    opt(f.vs_baseline, 2),
                    opt(f.client_cpu_s, 1),
                    opt(f.peak_rss_mib, 0)
                )
            }
        }
    }
    s
}
