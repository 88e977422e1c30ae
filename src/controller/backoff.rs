//! Per-object error backoff. kube-runtime requeues a failed object at whatever delay the
//! error policy returns, with no memory of earlier failures: this keeps a failure count per
//! object (reset on success) and turns it into the crate's one exponential backoff with
//! jitter ([`crate::backoff::Backoff`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::backoff::Backoff;

/// Failure counts per object key (`kind/namespace/name`).
#[derive(Debug)]
pub struct ErrorBackoff {
    timing: Backoff,
    failures: Mutex<HashMap<String, u32>>,
}

impl Default for ErrorBackoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

impl ErrorBackoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            timing: Backoff::new(base, max),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Records one more failure of `key` and returns how long to wait before retrying:
    /// `base * 2^(n-1)`, capped at `max`, jittered so a fleet of failing objects does not
    /// retry in lock step.
    pub fn next_delay(&self, key: &str) -> Duration {
        let n = {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            let n = failures.entry(key.to_string()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        self.timing.delay(n - 1)
    }

    /// Forgets `key`'s failures after a successful reconcile.
    pub fn reset(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Number of consecutive failures recorded for `key`.
    pub fn failures(&self, key: &str) -> u32 {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_per_failure_within_jitter_and_is_capped() {
        let b = ErrorBackoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let d1 = b.next_delay("x");
        let d2 = b.next_delay("x");
        let d3 = b.next_delay("x");
        assert!(
            d1 >= Duration::from_millis(500) && d1 <= Duration::from_millis(1000),
            "{d1:?}"
        );
        assert!(
            d2 >= Duration::from_millis(1000) && d2 <= Duration::from_millis(2000),
            "{d2:?}"
        );
        assert!(
            d3 >= Duration::from_millis(2000) && d3 <= Duration::from_millis(4000),
            "{d3:?}"
        );
        for _ in 0..30 {
            assert!(b.next_delay("x") <= Duration::from_secs(10));
        }
    }

    #[test]
    fn success_resets_only_that_object() {
        let b = ErrorBackoff::default();
        b.next_delay("a");
        b.next_delay("a");
        b.next_delay("b");
        b.reset("a");
        assert_eq!(b.failures("a"), 0);
        assert_eq!(b.failures("b"), 1);
        let d = b.next_delay("a");
        assert!(d <= Duration::from_millis(1000), "{d:?}");
    }
}
