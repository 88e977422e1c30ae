//! What `/healthz` answers: whether the process still makes progress, so a kubelet restarts a
//! wedged controller instead of leaving it holding the leader Lease while doing nothing.
//!
//! Every reconcile registers while it runs, and one that has been running longer than
//! `stuck_after` (a deadlock, an await that never resolves) fails the probe. A process whose
//! async runtime is blocked cannot answer at all, which the probe's timeout catches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Reconciles should take seconds (SSH work runs in tasks, not in reconciles); ten minutes
/// is far beyond any healthy one.
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(600);

/// Shared between the reconcilers, the loops that beat, and `/healthz`. Cheap to clone.
#[derive(Clone)]
pub struct Liveness(Arc<Inner>);

struct Inner {
    stuck_after: Duration,
    next: AtomicU64,
    running: Mutex<HashMap<u64, (String, Instant)>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new(DEFAULT_STUCK_AFTER)
    }
}

/// Held while one reconcile of `what` runs; dropping it (any return, a panic) unregisters it.
pub struct Running {
    liveness: Liveness,
    id: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        lock(&self.liveness.0.running).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // the map stays consistent under a panic elsewhere: every update is one insert/remove
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Liveness {
    pub fn new(stuck_after: Duration) -> Self {
        Self(Arc::new(Inner {
            stuck_after,
            next: AtomicU64::new(0),
            running: Mutex::new(HashMap::new()),
        }))
    }

    /// Registers one running reconcile of `what` (e.g. `Inventory ns/name`).
    pub fn running(&self, what: String) -> Running {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.0.running).insert(id, (what, Instant::now()));
        Running {
            liveness: self.clone(),
            id,
        }
    }

    /// `Ok` when alive; otherwise what is stuck, for the probe's body and the log.
    pub fn check(&self, now: Instant) -> Result<(), String> {
        let running = lock(&self.0.running);
        let stuck: Vec<(&String, Duration)> = running
            .values()
            .map(|(what, since)| (what, now.saturating_duration_since(*since)))
            .filter(|(_, age)| *age > self.0.stuck_after)
            .collect();
        match stuck.iter().max_by_key(|(_, age)| *age) {
            None => Ok(()),
            Some((what, age)) => Err(format!(
                "{} reconcile(s) running longer than {}s, the oldest {what} for {}s",
                stuck.len(),
                self.0.stuck_after.as_secs(),
                age.as_secs()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconcile_running_past_the_limit_fails_until_it_returns() {
        let l = Liveness::new(Duration::from_secs(60));
        let start = Instant::now();
        let quick = l.running("Inventory a/quick".into());
        let stuck = l.running("DeploymentPlan b/web".into());
        assert!(l.check(start).is_ok());
        drop(quick);
        let err = l
            .check(start + Duration::from_secs(120))
            .expect_err("stuck reconcile");
        assert!(err.contains("DeploymentPlan b/web"), "{err}");
        assert!(err.contains("1 reconcile(s)"), "{err}");
        drop(stuck);
        assert!(l.check(start + Duration::from_secs(120)).is_ok());
    }

    #[test]
    fn a_clock_reading_from_before_registration_never_panics() {
        let l = Liveness::new(Duration::ZERO);
        let before = Instant::now();
        let _r = l.running("x".into());
        assert!(l.check(before).is_ok());
    }
}
