//! Prometheus metrics of one worker: the metric families (`wallaby_*`), typed methods the
//! pipeline, the source and the DDL gate call to record them, and their OpenMetrics text
//! encoding. The worker binary serves them over HTTP.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use wallaby_crds::flow::FlowStatus;

/// Content type of the OpenMetrics text exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TableOpLabels {
    table: String,
    op: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DestinationLabels {
    destination: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BatchOutcomeLabels {
    destination: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RetryLabels {
    destination: String,
    class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ErrorLabels {
    stage: String,
    kind: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets: 0.5 ms … ~16 s, doubling (an fsync is ~ms, a remote write up to s).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The metric families. Handles inside are `Arc`s, the registry only encodes them.
struct Families {
    registry: Registry,
    rows: Family<TableOpLabels, Counter>,
    bytes: Family<DestinationLabels, Counter>,
    batches: Family<BatchOutcomeLabels, Counter>,
    transactions: Counter,
    write_seconds: HistogramFamily<DestinationLabels>,
    flush_seconds: HistogramFamily<DestinationLabels>,
    batch_rows: Histogram,
    batch_bytes: Histogram,
    retries: Family<RetryLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    lag_bytes: Gauge<u64, AtomicU64>,
    lag_seconds: Gauge<f64, AtomicU64>,
    confirmed_lsn: Gauge<u64, AtomicU64>,
    destination_lsn: Family<DestinationLabels, Gauge<u64, AtomicU64>>,
    retained_wal: Gauge<u64, AtomicU64>,
    pending_bytes: Gauge<u64, AtomicU64>,
    ddl_gated: Counter,
    schema_changes: Family<SourceLabels, Counter>,
}

/// Label of a schema change's origin.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

/// The worker's metrics. Cheap to clone (one `Arc`); every method is lock-free on the
/// metric itself and takes a read lock on a label family only to find the series.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Families>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every `wallaby_*` family, all at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wallaby");
        let f = Families {
            rows: Family::default(),
            bytes: Family::default(),
            batches: Family::default(),
            transactions: Counter::default(),
            write_seconds: HistogramFamily::new_with_constructor(latency_histogram),
            flush_seconds: HistogramFamily::new_with_constructor(latency_histogram),
            // 1 … 262,144 rows, ×4.
            batch_rows: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            // 256 B … 1 GiB, ×4.
            batch_bytes: Histogram::new(exponential_buckets(256.0, 4.0, 12)),
            retries: Family::default(),
            errors: Family::default(),
            lag_bytes: Gauge::default(),
            lag_seconds: Gauge::default(),
            confirmed_lsn: Gauge::default(),
            destination_lsn: Family::default(),
            retained_wal: Gauge::default(),
            pending_bytes: Gauge::default(),
            ddl_gated: Counter::default(),
            schema_changes: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rows",
            "Row changes written to the destinations, by source table (schema.table) and operation (insert, update, delete, truncate)",
            f.rows.clone(),
        );
        registry.register(
            "bytes",
            "Encoded bytes written to a destination (records as the destination received them)",
            f.bytes.clone(),
        );
        registry.register(
            "batches",
            "Batches written to a destination, by outcome (ok: written and durable; error: the write or sync failed)",
            f.batches.clone(),
        );
        registry.register(
            "transactions",
            "Source transactions made durable in every destination and confirmed to the replication slot",
            f.transactions.clone(),
        );
        registry.register_with_unit(
            "destination_write",
            "Time spent writing one batch's records to a destination, before it is made durable (see wallaby_destination_flush_seconds)",
            Unit::Seconds,
            f.write_seconds.clone(),
        );
        registry.register_with_unit(
            "destination_flush",
            "Time for a destination to make a written batch durable (flush and fsync, or the remote acknowledgement)",
            Unit::Seconds,
            f.flush_seconds.clone(),
        );
        registry.register(
            "batch_rows",
            "Row changes per durable batch",
            f.batch_rows.clone(),
        );
        registry.register_with_unit(
            "batch",
            "Encoded bytes per durable batch",
            Unit::Bytes,
            f.batch_bytes.clone(),
        );
        registry.register(
            "retries",
            "Retried destination operations, by error class (transient: retried with backoff; permanent: not retried)",
            f.retries.clone(),
        );
        registry.register(
            "errors",
            "Errors by pipeline stage (source, pipeline, destination) and kind",
            f.errors.clone(),
        );
        registry.register_with_unit(
            "lag",
            "WAL bytes between the server's current position and the confirmed position (as of the last status report)",
            Unit::Bytes,
            f.lag_bytes.clone(),
        );
        registry.register_with_unit(
            "lag",
            "Age of the oldest received but not yet confirmed transaction, from its commit time (0 when everything received is confirmed)",
            Unit::Seconds,
            f.lag_seconds.clone(),
        );
        registry.register(
            "confirmed_lsn",
            "Position confirmed to the replication slot (end of the last durable transaction), as a 64-bit LSN",
            f.confirmed_lsn.clone(),
        );
        registry.register(
            "destination_durable_lsn",
            "Position up to which a destination made every change durable, as a 64-bit LSN",
            f.destination_lsn.clone(),
        );
        registry.register_with_unit(
            "slot_retained_wal",
            "WAL the server keeps for the replication slot (current WAL position minus the slot's restart_lsn)",
            Unit::Bytes,
            f.retained_wal.clone(),
        );
        registry.register_with_unit(
            "pending",
            "Bytes of changes held in the pipeline's memory budget, received but not yet durable",
            Unit::Bytes,
            f.pending_bytes.clone(),
        );
        registry.register(
            "ddl_gated",
            "Captured DDL statements that stopped the flow to wait for a decision or an apply confirmation (ddl.gate / ddl.autoApply)",
            f.ddl_gated.clone(),
        );
        registry.register(
            "schema_changes",
            "New schema versions of the flow's tables, by origin (ddl: a captured statement; stream: drift seen in a relation description)",
            f.schema_changes.clone(),
        );
        Self {
            inner: Arc::new(Families { registry, ..f }),
        }
    }

    /// A captured statement stopped the flow.
    pub fn ddl_gated(&self) {
        self.inner.ddl_gated.inc();
    }

    /// A table got a new schema version (`source`: `ddl` or `stream`).
    pub fn schema_change(&self, source: &str) {
        self.inner
            .schema_changes
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
            })
            .inc();
    }

    /// `n` row changes of `table` (`schema.table`) with operation `op` were written.
    pub fn rows(&self, table: &str, op: &str, n: u64) {
        self.inner
            .rows
            .get_or_create(&TableOpLabels {
                table: table.to_owned(),
                op: op.to_owned(),
            })
            .inc_by(n);
    }

    /// One batch was written to `dest`: `bytes` encoded bytes in `d`; `ok` is false when the
    /// write failed (the bytes then count nothing).
    pub fn destination_write(&self, dest: &str, bytes: u64, d: Duration, ok: bool) {
        let dest_labels = DestinationLabels {
            destination: dest.to_owned(),
        };
        if ok {
            self.inner.bytes.get_or_create(&dest_labels).inc_by(bytes);
        }
        self.inner
            .write_seconds
            .get_or_create(&dest_labels)
            .observe(d.as_secs_f64());
        self.inner
            .batches
            .get_or_create(&BatchOutcomeLabels {
                destination: dest_labels.destination,
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// `dest` made a written batch durable in `d`.
    pub fn destination_flush(&self, dest: &str, d: Duration) {
        self.inner
            .flush_seconds
            .get_or_create(&DestinationLabels {
                destination: dest.to_owned(),
            })
            .observe(d.as_secs_f64());
    }

    /// An operation on `dest` failed and is retried (`transient`) or given up (permanent).
    pub fn retry(&self, dest: &str, transient: bool) {
        self.inner
            .retries
            .get_or_create(&RetryLabels {
                destination: dest.to_owned(),
                class: if transient { "transient" } else { "permanent" },
            })
            .inc();
    }

    /// An error of `kind` in `stage`. Keep both to a small fixed vocabulary (label values
    /// are series): e.g. `("destination", "write")`, `("source", "replication")`.
    pub fn error(&self, stage: &str, kind: &str) {
        self.inner
            .errors
            .get_or_create(&ErrorLabels {
                stage: stage.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// A batch of `rows` row changes and `bytes` encoded bytes became durable.
    pub fn batch(&self, rows: u64, bytes: u64) {
        self.inner.batch_rows.observe(rows as f64);
        self.inner.batch_bytes.observe(bytes as f64);
    }

    /// `n` more source transactions were confirmed.
    pub fn transactions(&self, n: u64) {
        self.inner.transactions.inc_by(n);
    }

    /// Replication lag in WAL bytes and in seconds.
    pub fn set_lag(&self, bytes: u64, seconds: f64) {
        self.inner.lag_bytes.set(bytes);
        self.inner.lag_seconds.set(seconds);
    }

    /// The position confirmed to the slot.
    pub fn set_confirmed_lsn(&self, lsn: u64) {
        self.inner.confirmed_lsn.set(lsn);
    }

    /// The position `dest` made durable.
    pub fn set_destination_lsn(&self, dest: &str, lsn: u64) {
        self.inner
            .destination_lsn
            .get_or_create(&DestinationLabels {
                destination: dest.to_owned(),
            })
            .set(lsn);
    }

    /// WAL retained by the slot on the server.
    pub fn set_retained_wal(&self, bytes: u64) {
        self.inner.retained_wal.set(bytes);
    }

    /// Bytes currently held in the pipeline's memory budget.
    pub fn set_pending_bytes(&self, bytes: u64) {
        self.inner.pending_bytes.set(bytes);
    }

    /// Lag and retained WAL from a status report (the status reporter already queries the
    /// server for them at every `statusInterval`).
    pub fn observe_status(&self, status: &FlowStatus) {
        if let Some(lag) = &status.lag {
            self.set_lag(lag.bytes, lag.seconds);
        }
        if let Some(slot) = &status.slot {
            self.set_retained_wal(slot.retained_wal_bytes);
        }
    }

    /// The OpenMetrics text exposition of every family, ending in `# EOF`.
    pub fn encode_text(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail and every metric encodes infallibly, so an error
        // here would be a bug in the encoder; serve what was written rather than nothing.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    #[test]
    fn every_family_is_exposed_with_its_labels() {
        let m = Metrics::new();
        m.rows("public.items", "insert", 3);
        m.rows("public.items", "insert", 2);
        m.rows("public.items", "delete", 1);
        m.destination_write("files", 120, Duration::from_millis(3), true);
        m.destination_write("files", 80, Duration::from_millis(1), false);
        m.destination_flush("files", Duration::from_millis(2));
        m.retry("files", true);
        m.retry("files", false);
        m.error("destination", "write");
        m.batch(6, 200);
        m.transactions(4);
        m.set_lag(4096, 1.5);
        m.set_confirmed_lsn(0x0000_0001_0000_0010);
        m.set_destination_lsn("files", 42);
        m.set_retained_wal(8192);
        m.set_pending_bytes(512);
        let text = m.encode_text();

        for (series, want) in [
            (
                r#"wallaby_rows_total{table="public.items",op="insert"}"#,
                5.0,
            ),
            (
                r#"wallaby_rows_total{table="public.items",op="delete"}"#,
                1.0,
            ),
            (r#"wallaby_bytes_total{destination="files"}"#, 120.0),
            (
                r#"wallaby_batches_total{destination="files",outcome="ok"}"#,
                1.0,
            ),
            (
                r#"wallaby_batches_total{destination="files",outcome="error"}"#,
                1.0,
            ),
            ("wallaby_transactions_total", 4.0),
            (
                r#"wallaby_destination_write_seconds_count{destination="files"}"#,
                2.0,
            ),
            (
                r#"wallaby_destination_flush_seconds_count{destination="files"}"#,
                1.0,
            ),
            ("wallaby_batch_rows_count", 1.0),
            ("wallaby_batch_rows_sum", 6.0),
            ("wallaby_batch_bytes_sum", 200.0),
            (
                r#"wallaby_retries_total{destination="files",class="transient"}"#,
                1.0,
            ),
            (
                r#"wallaby_retries_total{destination="files",class="permanent"}"#,
                1.0,
            ),
            (
                r#"wallaby_errors_total{stage="destination",kind="write"}"#,
                1.0,
            ),
            ("wallaby_lag_bytes", 4096.0),
            ("wallaby_lag_seconds", 1.5),
            ("wallaby_confirmed_lsn", 4_294_967_312.0),
            (
                r#"wallaby_destination_durable_lsn{destination="files"}"#,
                42.0,
            ),
            ("wallaby_slot_retained_wal_bytes", 8192.0),
            ("wallaby_pending_bytes", 512.0),
        ] {
            assert_eq!(sample(&text, series), Some(want), "{series} in:\n{text}");
        }
        for header in [
            "# TYPE wallaby_rows counter",
            "# TYPE wallaby_destination_write_seconds histogram",
            "# UNIT wallaby_destination_write_seconds seconds",
            "# TYPE wallaby_lag_seconds gauge",
            "# HELP wallaby_confirmed_lsn Position confirmed",
        ] {
            assert!(text.contains(header), "{header} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
