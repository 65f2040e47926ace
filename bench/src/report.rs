//! Figures of a run and their renderings: one JSON document, a CSV of the throughput
//! table, and the Markdown table printed to stdout and written to docs/benchmarks.md.

use std::fmt::Write as _;

use serde::Serialize;

use crate::latency::LatencyResult;
use crate::run::{Generated, Outcome};
use crate::targets::Target;

/// One (workload, target) line.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub workload: String,
    pub target: String,
    pub rows: u64,
    pub wal_bytes: u64,
    pub seconds: Option<f64>,
    pub rows_per_s: Option<f64>,
    /// WAL bytes between the start and end LSN per second, in MB (10^6 bytes).
    pub wal_mb_per_s: Option<f64>,
    /// CPU of the client process (the worker, or pg_recvlogical) per 1M row changes.
    pub client_cpu_s_per_1m_rows: Option<f64>,
    pub walsender_cpu_s_per_1m_rows: Option<f64>,
    pub client_peak_rss_mib: Option<f64>,
    /// rows/s divided by the baseline's rows/s on the same workload.
    pub rows_per_s_vs_baseline: Option<f64>,
    /// (client + walsender) CPU divided by the baseline's (pg_recvlogical + walsender).
    pub cpu_vs_baseline: Option<f64>,
    pub error: Option<String>,
}

pub fn figures(generated: &Generated, outcomes: &[Outcome]) -> Vec<Figure> {
    let per_m = |cpu: f64| cpu / generated.changes as f64 * 1e6;
    let baseline = outcomes
        .iter()
        .find(|o| o.target == Target::Baseline)
        .and_then(|o| o.result.as_ref().ok())
        .map(|(s, _)| {
            (
                generated.changes as f64 / s.seconds,
                s.client_cpu + s.walsender_cpu,
            )
        });
    outcomes
        .iter()
        .map(|o| match &o.result {
            Ok((s, rows)) => {
                let rows_per_s = *rows as f64 / s.seconds;
                let cpu = s.client_cpu + s.walsender_cpu;
                Figure {
                    workload: generated.workload.clone(),
                    target: o.target.name().into(),
                    rows: *rows,
                    wal_bytes: generated.wal_bytes,
                    seconds: Some(s.seconds),
                    rows_per_s: Some(rows_per_s),
                    wal_mb_per_s: Some(generated.wal_bytes as f64 / 1e6 / s.seconds),
                    client_cpu_s_per_1m_rows: Some(per_m(s.client_cpu)),
                    walsender_cpu_s_per_1m_rows: Some(per_m(s.walsender_cpu)),
                    client_peak_rss_mib: Some(s.client_peak_rss as f64 / 1048576.0),
                    rows_per_s_vs_baseline: baseline.map(|(r, _)| rows_per_s / r),
                    cpu_vs_baseline: baseline.map(|(_, c)| cpu / c),
                    error: None,
                }
            }
            Err(e) => Figure {
                workload: generated.workload.clone(),
                target: o.target.name().into(),
                rows: generated.changes,
                wal_bytes: generated.wal_bytes,
                seconds: None,
                rows_per_s: None,
                wal_mb_per_s: None,
                client_cpu_s_per_1m_rows: None,
                walsender_cpu_s_per_1m_rows: None,
                client_peak_rss_mib: None,
                rows_per_s_vs_baseline: None,
                cpu_vs_baseline: None,
                error: Some(format!("{e:#}")),
            },
        })
        .collect()
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.decimals$}"))
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.2}×"))
}

pub fn markdown(figures: &[Figure]) -> String {
    let mut s = String::from(
        "| workload | target | rows | seconds | rows/s | WAL MB/s | client CPU s / 1M rows | walsender CPU s / 1M rows | peak RSS MiB | rows/s vs baseline | CPU vs baseline |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for f in figures {
        if let Some(e) = &f.error {
            let e = e.replace('\n', " ").replace('|', "/");
            let _ = writeln!(
                s,
                "| {} | {} | {} | ERROR: {e} | | | | | | | |",
                f.workload, f.target, f.rows
            );
            continue;
        }
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            f.workload,
            f.target,
            f.rows,
            cell(f.seconds, 2),
            cell(f.rows_per_s, 0),
            cell(f.wal_mb_per_s, 1),
            cell(f.client_cpu_s_per_1m_rows, 2),
            cell(f.walsender_cpu_s_per_1m_rows, 2),
            cell(f.client_peak_rss_mib, 0),
            ratio(f.rows_per_s_vs_baseline),
            ratio(f.cpu_vs_baseline),
        );
    }
    s
}

pub fn csv(figures: &[Figure]) -> String {
    let opt = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.4}"));
    let mut s = String::from(
        "workload,target,rows,wal_bytes,seconds,rows_per_s,wal_mb_per_s,client_cpu_s_per_1m_rows,walsender_cpu_s_per_1m_rows,client_peak_rss_mib,rows_per_s_vs_baseline,cpu_vs_baseline,error\n",
    );
    for f in figures {
        let error = f
            .error
            .as_deref()
            .map(|e| format!("\"{}\"", e.replace('"', "\"\"").replace('\n', " ")))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
            f.workload,
            f.target,
            f.rows,
            f.wal_bytes,
            opt(f.seconds),
            opt(f.rows_per_s),
            opt(f.wal_mb_per_s),
            opt(f.client_cpu_s_per_1m_rows),
            opt(f.walsender_cpu_s_per_1m_rows),
            opt(f.client_peak_rss_mib),
            opt(f.rows_per_s_vs_baseline),
            opt(f.cpu_vs_baseline),
            error
        );
    }
    s
}

pub fn latency_markdown(l: &LatencyResult) -> String {
    format!(
        "| offered rows/s | rows per tx | batchTimeout | seconds | rows | achieved rows/s | p50 ms | p99 ms | max ms |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|\n| {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} |\n",
        l.offered_rows_per_s,
        l.rows_per_tx,
        l.batch_timeout,
        l.seconds,
        l.rows,
        l.achieved_rows_per_s,
        l.p50_ms,
        l.p99_ms,
        l.max_ms
    )
}

/// The figures of the run against the benchmark's targets: end-to-end rows/s to `file`
/// and Kafka ≥ 0.9× the baseline, worker CPU per row ≤ 0.5× the walsender's, p99
/// commit → durable ≤ 50 ms at 10k rows/s, peak RSS ≤ 256 MiB on the 1M-row transaction.
pub fn targets_markdown(figures: &[Figure], latency: Option<&LatencyResult>) -> String {
    let find = |w: &str, t: &str| figures.iter().find(|f| f.workload == w && f.target == t);
    let mut workloads: Vec<&str> = Vec::new();
    for f in figures {
        if !workloads.contains(&f.workload.as_str()) {
            workloads.push(&f.workload);
        }
    }
    let met = |ok: bool| if ok { "yes" } else { "**no**" };
    let mut s = String::from(
        "| workload | target | rows/s vs baseline (≥ 0.9×) | worker CPU / its walsender's (≤ 0.5×) | worker CPU / baseline walsender's |\n|---|---|---:|---:|---:|\n",
    );
    for w in &workloads {
        let baseline_walsender = find(w, "baseline").and_then(|b| b.walsender_cpu_s_per_1m_rows);
        for t in ["file-json", "file-parquet", "kafka"] {
            let Some(f) = find(w, t) else { continue };
            let own = f
                .client_cpu_s_per_1m_rows
                .zip(f.walsender_cpu_s_per_1m_rows)
                .filter(|(_, ws)| *ws > 0.0)
                .map(|(c, ws)| c / ws);
            let vs_baseline = f
                .client_cpu_s_per_1m_rows
                .zip(baseline_walsender)
                .filter(|(_, ws)| *ws > 0.0)
                .map(|(c, ws)| c / ws);
            let _ = writeln!(
                s,
                "| {w} | {t} | {} {} | {} {} | {} |",
                ratio(f.rows_per_s_vs_baseline),
                met(f.rows_per_s_vs_baseline.is_some_and(|r| r >= 0.9)),
                ratio(own),
                met(own.is_some_and(|r| r <= 0.5)),
                ratio(vs_baseline),
            );
        }
    }
    s += "\n";
    match latency {
        Some(l) => {
            let _ = writeln!(
                s,
                "- p99 commit → durable at {} rows/s: {:.1} ms (target ≤ 50 ms: {})",
                l.offered_rows_per_s,
                l.p99_ms,
                met(l.p99_ms <= 50.0)
            );
        }
        None => s += "- p99 commit → durable: no latency run\n",
    }
    let peak = figures
        .iter()
        .filter(|f| f.workload == "one-big-tx" && f.target != "baseline")
        .filter_map(|f| f.client_peak_rss_mib.map(|m| (m, f.target.as_str())))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match peak {
        Some((mib, target)) => {
            let _ = writeln!(
                s,
                "- peak RSS of the worker on `one-big-tx` (highest over the targets, `{target}`): {mib:.0} MiB (target ≤ 256 MiB: {})",
                met(mib <= 256.0)
            );
        }
        None => s += "- peak RSS on `one-big-tx`: not run\n",
    }
    s
}
