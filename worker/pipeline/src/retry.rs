//! Retry schedule for destination writes: exponential backoff with jitter, capped, and the
//! give-up rule. Jitter keeps many workers that failed together from retrying together.

use std::time::Duration;

use rand::Rng;
use wallaby_crds::destination::RetrySpec;
use wallaby_crds::flow::GiveUpPolicy;

use wallaby_crds::destination::DestinationSpec;

use crate::error::{DestinationError, ErrorClass};

/// A validated retry policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub max_retries: u32,
    /// First backoff.
    pub base: Duration,
    /// Largest backoff.
    pub max: Duration,
    /// Growth factor.
    pub factor: f64,
    /// Whether to give up once retries are exhausted.
    pub give_up: GiveUpPolicy,
}

impl RetryPolicy {
    /// From the Destination's `retry` block and the Flow's `giveUpPolicy`.
    pub fn from_spec(spec: &RetrySpec, give_up: GiveUpPolicy) -> Result<Self, String> {
        Ok(Self {
            max_retries: spec.max_retries,
            base: spec.backoff_base.parse()?,
            max: spec.backoff_max.parse()?,
            factor: spec.backoff_factor.max(1.0),
            give_up,
        })
    }

    /// Backoff before retry number `retry` (1-based): `base · factor^(retry-1)` capped at
    /// `max`, then "equal jitter" — half fixed, half random — so the wait never collapses
    /// to zero yet spreads out.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self.factor.powi(retry.saturating_sub(1).min(64) as i32);
        let nominal = self.base.as_secs_f64() * exp;
        let capped = nominal.min(self.max.as_secs_f64()).max(0.0);
        let half = capped / 2.0;
        let jitter = if half > 0.0 {
            rand::rng().random_range(0.0..=half)
        } else {
            0.0
        };
        Duration::from_secs_f64(half + jitter)
    }

    /// What to do after failed attempt number `attempt` (1-based) with `error`.
    pub fn decide(&self, attempt: u32, error: &DestinationError) -> RetryDecision {
        let exhausted = match error.class {
            ErrorClass::Permanent => true,
            ErrorClass::Transient => attempt > self.max_retries,
        };
        if !exhausted {
            return RetryDecision::RetryAfter(self.backoff(attempt));
        }
        match self.give_up {
            GiveUpPolicy::OnRetryExhaustion => RetryDecision::GiveUp,
            // Never give up: keep trying at the longest backoff so a fixed destination
            // picks up where it stopped, with the slot still held.
            GiveUpPolicy::Never => RetryDecision::RetryAfter(self.backoff(attempt.max(64))),
        }
    }
}

/// Outcome of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this long.
    RetryAfter(Duration),
    /// Stop: apply the flow's failure mode.
    GiveUp,
}

/// The retry block the pipeline uses for a Destination. The seeds put `max_retries` and
/// the backoff next to the URL of request/response destinations (`spec.http.retry`,
/// `spec.grpc.retry`) while every Destination also has `spec.retry`; both feed the one
/// retry loop of the pipeline (a destination never retries by itself, so nothing is
/// retried twice). The typed block's `retry` wins when it differs from the defaults,
/// otherwise `spec.retry` applies.
pub fn effective_retry(spec: &DestinationSpec) -> &RetrySpec {
    let typed = spec
        .http
        .as_ref()
        .map(|h| &h.retry)
        .or(spec.grpc.as_ref().map(|g| &g.retry));
    match typed {
        Some(retry) if *retry != RetrySpec::default() => retry,
        _ => &spec.retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(give_up: GiveUpPolicy) -> RetryPolicy {
        RetryPolicy {
            max_retries: 3,
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            factor: 2.0,
            give_up,
        }
    }

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let p = policy(GiveUpPolicy::OnRetryExhaustion);
        for retry in 1..=10 {
            let nominal = (0.1 * 2f64.powi(retry - 1)).min(1.0);
            for _ in 0..50 {
                let d = p.backoff(retry as u32).as_secs_f64();
                assert!(
                    d >= nominal / 2.0 - 1e-9 && d <= nominal + 1e-9,
                    "{retry}: {d}"
                );
            }
        }
    }

    #[test]
    fn transient_errors_retry_then_give_up_permanent_ones_give_up_at_once() {
        let p = policy(GiveUpPolicy::OnRetryExhaustion);
        let t = DestinationError::transient("timeout");
        for attempt in 1..=3 {
            assert!(matches!(
                p.decide(attempt, &t),
                RetryDecision::RetryAfter(_)
            ));
        }
        assert_eq!(p.decide(4, &t), RetryDecision::GiveUp);
        assert_eq!(
            p.decide(1, &DestinationError::permanent("bad credentials")),
            RetryDecision::GiveUp
        );
        let never = policy(GiveUpPolicy::Never);
        assert!(matches!(
            never.decide(100, &t),
            RetryDecision::RetryAfter(_)
        ));
        assert!(matches!(
            never.decide(1, &DestinationError::permanent("x")),
            RetryDecision::RetryAfter(_)
        ));
    }
}
