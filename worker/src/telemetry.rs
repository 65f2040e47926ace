//! Logs and traces of the worker process: the `tracing` subscriber (human or JSON logs on
//! stderr, filtered by `WALLABY_LOG`) and, when the standard `OTEL_*` variables ask for it,
//! an OpenTelemetry layer exporting spans over OTLP/gRPC, with a guard that flushes it.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, Registry};

/// Service name when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` sets one.
pub const DEFAULT_SERVICE_NAME: &str = "wallaby-worker";

/// The worker's crates: the targets of its own spans (exported at `info` and above).
pub const WORKER_CRATES: [&str; 6] = [
    "wallaby_worker",
    "wallaby_source",
    "wallaby_ddl",
    "wallaby_pipeline",
    "wallaby_destinations",
    "wallaby_pg",
];

/// Filter used when `WALLABY_LOG` is unset or invalid.
pub const DEFAULT_LOG_FILTER: &str = "info,pg_walstream=error,tokio_postgres=warn";

/// How long exit waits for the last spans to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Log format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (colours only on a terminal).
    Text,
    /// One JSON object per event.
    Json,
}

/// A telemetry configuration the worker cannot honour.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `OTEL_TRACES_EXPORTER` names an exporter this build does not have.
    #[error(
        "OTEL_TRACES_EXPORTER={value:?} is not supported: this worker exports traces with \"otlp\" only (or \"none\" to turn them off)"
    )]
    UnsupportedExporter { value: String },
    /// `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` asks for HTTP.
    #[error(
        "{variable}={value:?} is not supported: this worker sends OTLP over gRPC only; set it to \"grpc\" or unset it (the endpoint is then host:4317, not :4318)"
    )]
    UnsupportedProtocol {
        variable: &'static str,
        value: String,
    },
    /// The OTLP exporter rejected its configuration (for instance a malformed endpoint).
    #[error("cannot build the OTLP trace exporter for {endpoint}: {source}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// A global subscriber was already installed (only possible if `init` runs twice).
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the trace pipeline alive; on `shutdown()` or drop, exports the spans still queued.
/// Drop it (or call `shutdown`) while the tokio runtime that built it is still running:
/// the gRPC connection lives on that runtime.
#[derive(Debug)]
#[must_use = "dropping the guard shuts the trace exporter down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported.
    pub fn traces_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the queued spans (waiting at most a few seconds) and stops the exporter.
    pub fn shutdown(mut self) {
        self.shutdown_provider();
    }

    fn shutdown_provider(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            tracing::warn!(error = %e, "flushing the last spans to the OpenTelemetry collector");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown_provider();
    }
}

/// The `WALLABY_LOG` filter, or [`DEFAULT_LOG_FILTER`] when unset or invalid.
pub fn log_filter_from_env() -> EnvFilter {
    EnvFilter::try_from_env("WALLABY_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER))
}

/// Installs the global subscriber: logs on stderr filtered by `filter`, plus span export
/// when the `OTEL_*` environment enables it. With tracing on, call this inside the tokio
/// runtime (`Runtime::enter`) that will outlive the returned guard.
pub fn init(format: LogFormat, filter: EnvFilter) -> Result<TelemetryGuard, TelemetryError> {
    let ansi = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };

    let target = otlp_target(&|name| std::env::var(name).ok())?;
    let provider = match &target {
        Some(t) => Some(tracer_provider(t)?),
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(env!("CARGO_PKG_NAME")))
            // Only the worker's own spans: spans of the gRPC stack would export themselves.
            .with_filter(
                WORKER_CRATES
                    .iter()
                    .fold(Targets::new(), |t, c| t.with_target(*c, LevelFilter::INFO)),
            )
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()?;
    if let (Some(t), Some(p)) = (&target, &provider) {
        let service = resource()
            .get(&opentelemetry::Key::new("service.name"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        tracing::info!(endpoint = %t.endpoint, service = %service, "exporting traces over OTLP/gRPC");
        // Keep the provider reachable for libraries that use the global API.
        opentelemetry::global::set_tracer_provider(p.clone());
    }
    Ok(TelemetryGuard { provider })
}

/// Where spans go, when tracing is on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OtlpTarget {
    /// For the log line only: the exporter reads the variables itself.
    endpoint: String,
}

/// Decides from the standard variables whether spans are exported: `OTEL_SDK_DISABLED=true`
/// or `OTEL_TRACES_EXPORTER=none` turn it off, `OTEL_TRACES_EXPORTER=otlp` or an OTLP
/// endpoint turn it on. Empty values count as unset, as the specification says.
fn otlp_target(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<OtlpTarget>, TelemetryError> {
    let var = |name: &str| {
        env(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let endpoint =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let enabled = match var("OTEL_TRACES_EXPORTER") {
        Some(list) => {
            let mut otlp = false;
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                match name.to_ascii_lowercase().as_str() {
                    "none" => return Ok(None),
                    "otlp" => otlp = true,
                    _ => {
                        return Err(TelemetryError::UnsupportedExporter {
                            value: list.clone(),
                        });
                    }
                }
            }
            otlp
        }
        None => endpoint.is_some(),
    };
    if !enabled {
        return Ok(None);
    }
    for variable in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(value) = var(variable) {
            if value.eq_ignore_ascii_case("grpc") {
                break;
            }
            return Err(TelemetryError::UnsupportedProtocol { variable, value });
        }
    }
    Ok(Some(OtlpTarget {
        endpoint: endpoint.unwrap_or_else(|| "http://localhost:4317".to_owned()),
    }))
}

/// The SDK's detectors (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, SDK attributes),
/// with our service name instead of the SDK's `unknown_service:<binary>` fallback.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::new("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    if named {
        detected
    } else {
        Resource::builder()
            .with_service_name(DEFAULT_SERVICE_NAME)
            .build()
    }
}

fn tracer_provider(target: &OtlpTarget) -> Result<SdkTracerProvider, TelemetryError> {
    // The endpoint, headers, timeout and compression come from OTEL_EXPORTER_OTLP_*.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: target.endpoint.clone(),
            source,
        })?;
    // The SDK's batch processor exports from its own thread (OTEL_BSP_* tune it), so a slow
    // or unreachable collector costs queued spans, never pipeline time; the gRPC I/O runs
    // on the tokio runtime current at this call.
    Ok(SdkTracerProvider::builder()
        .with_resource(resource())
        .with_batch_exporter(ReportingExporter {
            inner: exporter,
            endpoint: target.endpoint.clone(),
            failing: AtomicBool::new(false),
        })
        .build())
}

/// Logs when exports start failing and when they recover: the SDK itself reports export
/// errors only through its internal log, which is off in this build.
#[derive(Debug)]
struct ReportingExporter<E> {
    inner: E,
    endpoint: String,
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for ReportingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        endpoint = %self.endpoint,
                        error = %e,
                        spans,
                        "cannot export spans to the OpenTelemetry collector; dropping them until it is reachable (replication is not affected)"
                    );
                }
            }
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.endpoint, "exporting spans again");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn target(vars: &[(&str, &str)]) -> Result<Option<OtlpTarget>, TelemetryError> {
        let env = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        };
        otlp_target(&env)
    }

    fn on(endpoint: &str) -> Option<OtlpTarget> {
        Some(OtlpTarget {
            endpoint: endpoint.to_owned(),
        })
    }

    #[test]
    fn standard_variables_turn_tracing_on_and_off() {
        type Vars<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Vars, Option<OtlpTarget>)] = &[
            (&[], None),
            (&[("OTEL_SERVICE_NAME", "w")], None),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")],
                on("http://c:4317"),
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317"),
                ],
                on("http://t:4317"),
            ),
            (&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")], None),
            (
                &[("OTEL_TRACES_EXPORTER", "otlp")],
                on("http://localhost:4317"),
            ),
            (
                &[
                    ("OTEL_TRACES_EXPORTER", "none"),
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ],
                None,
            ),
            (
                &[
                    ("OTEL_SDK_DISABLED", "TRUE"),
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ],
                None,
            ),
            (
                &[
                    ("OTEL_SDK_DISABLED", "false"),
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ],
                on("http://c:4317"),
            ),
            // An HTTP protocol is only refused when tracing is actually on.
            (&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")], None),
        ];
        for (vars, want) in cases {
            assert_eq!(&target(vars).unwrap(), want, "{vars:?}");
        }
    }

    #[test]
    fn unsupported_exporters_and_protocols_are_refused_precisely() {
        let err = target(&[("OTEL_TRACES_EXPORTER", "zipkin")]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("OTEL_TRACES_EXPORTER=\"zipkin\" is not supported"),
            "{err}"
        );
        let err = target(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ])
        .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=\"http/protobuf\" is not supported"
            ),
            "{err}"
        );
    }
}
