//! Exponential backoff with jitter, the one retry timing every layer uses (engine stage
//! retries, the agent's sink retries, the controller's per-object error backoff and its
//! status writes). Without jitter a thousand hosts or objects failing together retry in
//! lock step and hit the server together again.

use std::time::Duration;

use rand::Rng;

/// Delays `base`, `2·base`, `4·base`… capped at `max`; with jitter each delay is drawn
/// uniformly from `[cap/2, cap]` ("equal jitter": never less than half the nominal wait).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// Draw each delay from `[cap/2, cap]`; off only where a test needs exact values.
    pub jitter: bool,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            jitter: true,
        }
    }

    /// The same timing without jitter (exact, for tests).
    pub const fn exact(self) -> Self {
        Self {
            jitter: false,
            ..self
        }
    }

    /// The nominal (un-jittered) delay before retry number `retry` (0-based).
    pub fn cap(&self, retry: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << retry.min(20))
            .min(self.max)
    }

    /// The delay before retry number `retry` (0-based: the first retry waits about `base`).
    pub fn delay(&self, retry: u32) -> Duration {
        let cap = self.cap(retry);
        if !self.jitter {
            return cap;
        }
        let half = cap / 2;
        half + rand::rng().random_range(Duration::ZERO..=cap - half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_equal_jitter_and_stop_at_the_cap() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..200 {
            let d0 = b.delay(0);
            assert!(d0 >= Duration::from_millis(50) && d0 <= Duration::from_millis(100));
            let d3 = b.delay(3);
            assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800));
            let d40 = b.delay(40);
            assert!(d40 >= Duration::from_secs(1) && d40 <= Duration::from_secs(2));
        }
    }

    #[test]
    fn jittered_delays_spread_out() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let draws: std::collections::HashSet<Duration> = (0..50).map(|_| b.delay(2)).collect();
        assert!(draws.len() > 10, "{} distinct delays of 50", draws.len());
    }

    #[test]
    fn exact_backoff_is_deterministic_and_never_overflows() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).exact();
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(2), Duration::from_secs(4));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(30));
        let huge = Backoff::new(Duration::MAX, Duration::MAX).exact();
        assert_eq!(huge.delay(30), Duration::MAX);
    }
}
