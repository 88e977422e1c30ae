//! Leader election on a `coordination.k8s.io/v1` Lease (kube-lease-manager), so that of
//! the controller's replicas exactly one reconciles at a time.

use kube::Client;
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
    let manager = LeaseManagerBuilder::new(client, &config.lease_name)
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
            return Ok(Some(Leadership { lease, state, task }));
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
    /// Resolves when this replica no longer holds the Lease (lost renewal, or the
    /// election task died).
    pub async fn lost(&mut self) {
        loop {
            if !*self.state.borrow_and_update() {
                return;
            }
            if self.state.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives the Lease up so a standby replica takes over at once, not after expiry.
    pub async fn release(self) -> Result<(), LeaderError> {
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
