//! The operator's Prometheus metrics: reconciliations and their duration per controller,
//! failures by controller and error label, and whether this replica leads.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of per-controller series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// `flow` or `destination`.
    pub controller: &'static str,
}

/// Label of failure series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `flow` or `destination`.
    pub controller: &'static str,
    /// Stage or kind of error, e.g. `dereference`, `apply`, `status`, `cleanup`, `finalizer`.
    pub error: &'static str,
}

/// Every metric, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciliations: Family<ControllerLabel, Counter>,
    failures: Family<ErrorLabels, Counter>,
    duration: Family<ControllerLabel, Histogram>,
    leader: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("wallaby_operator");
        let reconciliations = Family::<ControllerLabel, Counter>::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 12))
        });
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "reconciliations",
            "Reconciliations started",
            reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciliations by error label",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciliations",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Self {
            registry,
            reconciliations,
            failures,
            duration,
            leader,
        }
    }
}

impl Metrics {
    /// Counts a reconciliation and its duration.
    pub fn reconciled(&self, controller: &'static str, seconds: f64) {
        let label = ControllerLabel { controller };
        self.reconciliations.get_or_create(&label).inc();
        self.duration.get_or_create(&label).observe(seconds);
    }

    /// Counts a failure.
    pub fn failed(&self, controller: &'static str, error: &'static str) {
        self.failures
            .get_or_create(&ErrorLabels { controller, error })
            .inc();
    }

    /// Failures so far for a label pair (for tests and logs).
    pub fn failures(&self, controller: &'static str, error: &'static str) -> u64 {
        self.failures
            .get_or_create(&ErrorLabels { controller, error })
            .get()
    }

    /// Records leadership.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_by_label() {
        let m = Metrics::default();
        m.failed("flow", "apply");
        m.failed("flow", "apply");
        m.failed("destination", "status");
        m.reconciled("flow", 0.02);
        m.set_leader(true);
        assert_eq!(m.failures("flow", "apply"), 2);
        let text = m.encode().unwrap();
        assert!(
            text.contains(
                r#"wallaby_operator_reconcile_errors_total{controller="flow",error="apply"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"wallaby_operator_reconcile_errors_total{controller="destination",error="status"} 1"#
        ));
        assert!(text.contains(r#"wallaby_operator_reconciliations_total{controller="flow"} 1"#));
        assert!(text.contains("wallaby_operator_leader 1"));
    }
}
