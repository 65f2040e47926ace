//! Per-object retry delays for failed reconciliations: exponential from 5 s to 5 min,
//! reset by the object's next success, so one broken Flow neither hot-loops nor delays the
//! others. Objects that are merely invalid are not errors and wait for a change instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// First retry delay.
pub const BASE: Duration = Duration::from_secs(5);
/// Largest retry delay.
pub const MAX: Duration = Duration::from_secs(300);

/// Delay before retry number `failures` (1-based): 5 s, 10 s, 20 s, … capped at 5 min.
pub fn delay(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    BASE.saturating_mul(1 << exponent).min(MAX)
}

/// Consecutive failures per object key (`kind/namespace/name`).
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records one more failure of `key` and returns the delay before its retry.
    pub fn failed(&self, key: &str) -> Duration {
        // A poisoned lock only means another reconciler panicked mid-update; the counts
        // are still usable.
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key.to_owned()).or_default();
        *n = n.saturating_add(1);
        delay(*n)
    }

    /// Forgets the failures of `key` after a success.
    pub fn succeeded(&self, key: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_per_object_and_reset_on_success() {
        let b = Backoff::default();
        let secs: Vec<u64> = (0..8).map(|_| b.failed("Flow/ns/a").as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300]);
        // Another object starts from the base.
        assert_eq!(b.failed("Flow/ns/b"), BASE);
        b.succeeded("Flow/ns/a");
        assert_eq!(b.failed("Flow/ns/a"), BASE);
        assert_eq!(delay(u32::MAX), MAX);
    }
}
