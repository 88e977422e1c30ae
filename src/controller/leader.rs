//! Leader election on a `coordination.k8s.io/v1` Lease (kube-lease-manager), so that of
//! the controller's replicas exactly one reconciles at a time.
//!
//! Fencing: kube-lease-manager reports a lost Lease only when it can read that someone else
//! holds it. A leader cut off from the API server reads nothing, so it would go on leading
//! while a standby takes the expired Lease. So, as client-go does with its renew deadline,
//! the leader tracks the last renewal it can see itself and gives up once that is older than
//! two thirds of the Lease duration: before the Lease expires for anyone else.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where the Lease lives and how long it is held without renewal.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per replica; the pod name in a cluster.
    pub identity: String,
    /// Seconds a holder keeps the lease without renewing it: the longest a dead leader blocks.
    pub duration_secs: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_secs: u64,
}

impl LeaderConfig {
    /// The usual shape for a Lease of `duration_secs`: renewed every `duration / 7` (at least
    /// every second: 2 s of 15, like client-go's retry period), so that several renewals fit
    /// in the renew deadline.
    pub fn new(
        lease_name: String,
        namespace: String,
        identity: String,
        duration_secs: u64,
    ) -> Self {
        let duration_secs = duration_secs.max(3);
        let retry = (duration_secs / 7).max(1);
        Self {
            lease_name,
            namespace,
            identity,
            duration_secs,
            grace_secs: duration_secs - retry,
        }
    }

    /// How old the last renewal may get before this leader stops: two thirds of the Lease
    /// (10 s of 15, client-go's default ratio), so it stops a third of the Lease before a
    /// standby may take it.
    pub fn renew_deadline(&self) -> Duration {
        Duration::from_millis(self.duration_secs.saturating_mul(2000) / 3)
    }
}

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election on Lease {lease} failed: {source}")]
    Lease {
        /// `namespace/name` of the Lease.
        lease: String,
        #[source]
        source: LeaseManagerError,
    },
    #[error("the leader election task stopped unexpectedly")]
    TaskEnded,
}

/// Held while this replica leads. Dropping it without [`Leadership::release`] still
/// releases the Lease in the background.
pub struct Leadership {
    lease: String,
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
    /// Why the renew deadline passed, once it has.
    fenced: watch::Receiver<Option<String>>,
    fence: JoinHandle<()>,
}

/// Waits until this replica holds the Lease. Returns `Ok(None)` if `shutdown` fires first.
pub async fn acquire(
    client: Client,
    config: &LeaderConfig,
    shutdown: &CancellationToken,
) -> Result<Option<Leadership>, LeaderError> {
    let lease = format!("{}/{}", config.namespace, config.lease_name);
    let lease_err = |source| LeaderError::Lease {
        lease: lease.clone(),
        source,
    };
    let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&config.identity)
        .with_duration(config.duration_secs)
        .with_grace(config.grace_secs)
        .with_field_manager(format!("outrider-leader-{}", config.identity))
        .build()
        .await
        .map_err(lease_err)?;
    let (mut state, task) = manager.watch().await;
    loop {
        if *state.borrow_and_update() {
            let (tx, fenced) = watch::channel(None);
            let fence = tokio::spawn(fence(
                Api::namespaced(client, &config.namespace),
                config.clone(),
                tx,
            ));
            return Ok(Some(Leadership {
                lease,
                state,
                task,
                fenced,
                fence,
            }));
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                drop(state);
                // the task releases the lease (if it ever got it) once the channel closes
                let _ = task.await;
                return Ok(None);
            }
            changed = state.changed() => {
                if changed.is_err() {
                    return match task.await {
                        Ok(Err(e)) => Err(lease_err(e)),
                        _ => Err(LeaderError::TaskEnded),
                    };
                }
            }
        }
    }
}

impl Leadership {
    /// Resolves, saying why, when this replica must stop leading: another holder, the
    /// election task died, or no renewal within the renew deadline (cut off from the API
    /// server: a standby may take the Lease soon).
    pub async fn lost(&mut self) -> String {
        let lease = self.lease.clone();
        let held = async {
            loop {
                if !*self.state.borrow_and_update() {
                    return format!("the Lease {lease} is held by another replica");
                }
                if self.state.changed().await.is_err() {
                    return "the leader election task stopped".to_string();
                }
            }
        };
        let fenced = async {
            loop {
                if let Some(why) = self.fenced.borrow_and_update().clone() {
                    return why;
                }
                if self.fenced.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        tokio::select! {
            why = held => why,
            why = fenced => why,
        }
    }

    /// Gives the Lease up so a standby replica takes over at once, not after expiry.
    pub async fn release(self) -> Result<(), LeaderError> {
        self.fence.abort();
        drop(self.state);
        match self.task.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(LeaderError::Lease {
                lease: self.lease,
                source,
            }),
            Err(_) => Err(LeaderError::TaskEnded),
        }
    }
}

/// How often the leader reads its Lease back, and how long one read may take.
const FENCE_TICK: Duration = Duration::from_secs(1);

/// Milliseconds from `renewed` to `now` (negative when the renewal is in our future).
fn age_ms(now: Timestamp, renewed: Timestamp) -> i64 {
    now.as_millisecond()
        .saturating_sub(renewed.as_millisecond())
}

/// Whether a leader whose last seen renewal is `age_ms` old must stop.
fn past_deadline(age_ms: i64, deadline: Duration) -> bool {
    age_ms > i64::try_from(deadline.as_millis()).unwrap_or(i64::MAX)
}

/// Reads the Lease every [`FENCE_TICK`] and reports (once) when this replica must stop:
/// the Lease names another holder, or the newest renewal seen is older than the renew
/// deadline (unreadable Lease included: a partitioned leader reads nothing at all).
async fn fence(api: Api<Lease>, config: LeaderConfig, tripped: watch::Sender<Option<String>>) {
    let deadline = config.renew_deadline();
    // just acquired: the renewal that made us leader is this recent
    let mut renewed = Timestamp::now();
    loop {
        tokio::time::sleep(FENCE_TICK).await;
        match tokio::time::timeout(FENCE_TICK, api.get(&config.lease_name)).await {
            Ok(Ok(lease)) => {
                let spec = lease.spec.unwrap_or_default();
                if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
                    let holder = spec.holder_identity.unwrap_or_default();
                    let _ = tripped.send(Some(format!(
                        "the Lease {}/{} is held by {holder:?}",
                        config.namespace, config.lease_name
                    )));
                    return;
                }
                if let Some(t) = spec.renew_time {
                    renewed = renewed.max(t.0);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the leader Lease failed");
            }
            Err(_) => tracing::warn!("reading the leader Lease timed out"),
        }
        let age = age_ms(Timestamp::now(), renewed);
        if past_deadline(age, deadline) {
            let _ = tripped.send(Some(format!(
                "no renewal of the Lease {}/{} seen for {:.1}s (renew deadline {:.1}s, Lease {}s): \
                 stopping before a standby can take it",
                config.namespace,
                config.lease_name,
                age as f64 / 1000.0,
                deadline.as_secs_f64(),
                config.duration_secs
            )));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_fit_several_times_in_a_deadline_that_ends_before_the_lease() {
        for d in [3, 6, 9, 15, 60, 3600] {
            let c = LeaderConfig::new("l".into(), "ns".into(), "me".into(), d);
            let renew_every = c.duration_secs - c.grace_secs;
            let deadline = c.renew_deadline();
            assert!(renew_every >= 1, "{d}");
            assert!(
                Duration::from_secs(renew_every * 2) <= deadline,
                "{d}: renew every {renew_every}s, deadline {deadline:?}"
            );
            assert!(deadline < Duration::from_secs(d), "{d}");
        }
        // a tiny or huge flag value never panics
        let c = LeaderConfig::new("l".into(), "ns".into(), "me".into(), 0);
        assert_eq!(c.duration_secs, 3);
        let c = LeaderConfig::new("l".into(), "ns".into(), "me".into(), u64::MAX);
        assert!(c.renew_deadline() > Duration::ZERO);
    }

    #[test]
    fn the_deadline_trips_on_an_old_renewal_only() {
        let deadline = Duration::from_secs(10);
        let now = Timestamp::now();
        let recent = now - k8s_openapi::jiff::SignedDuration::from_secs(3);
        let old = now - k8s_openapi::jiff::SignedDuration::from_secs(11);
        assert!(!past_deadline(age_ms(now, recent), deadline));
        assert!(past_deadline(age_ms(now, old), deadline));
        // a renewal stamped in our future (clock step) is not old
        let future = now + k8s_openapi::jiff::SignedDuration::from_secs(30);
        assert!(!past_deadline(age_ms(now, future), deadline));
    }
}
