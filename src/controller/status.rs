//! Status writes: server-side apply of the `status` subresource only, field manager
//! `outrider`, and only when the status really changed. Spec is never written.
//! [`StatusWriter`] is what long-running tasks write through: it skips unchanged
//! statuses, counts writes, tells the task when its object is gone, and retries the last
//! write of a run with backoff so a run never stays "Running" because one write failed.

use std::fmt::Debug;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::FIELD_MANAGER;
use crate::backoff::Backoff;
use crate::telemetry::Metrics;

/// Applies `new` as the object's status unless it equals `old`. Returns whether it wrote.
pub async fn apply_if_changed<K, S>(
    api: &Api<K>,
    name: &str,
    old: Option<&S>,
    new: &S,
) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if old == Some(new) {
        return Ok(false);
    }
    apply(api, name, new).await?;
    Ok(true)
}

/// Applies `status` unconditionally (server-side apply, forced: status is ours alone).
pub async fn apply<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Why a [`StatusWriter`] write did not land.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The object is gone (404): the task writing for it should end.
    #[error("the object no longer exists")]
    Gone,
    #[error("status write failed: {0}")]
    Failed(#[source] kube::Error),
}

/// Retry timing of a final write: 200 ms doubling to 10 s.
pub const FINAL_WRITE_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(200), Duration::from_secs(10));

/// The status writer of one object for one long-running task.
pub struct StatusWriter<K: Resource> {
    api: Api<K>,
    name: String,
    metrics: Metrics,
    /// The last status written (as JSON), to skip unchanged writes.
    last: Option<serde_json::Value>,
    final_backoff: Backoff,
}

impl<K> StatusWriter<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    /// A writer for `name`; `current` is the status the object has now (nothing is written
    /// while the task's status equals it).
    pub fn new<S: Serialize>(
        api: Api<K>,
        name: impl Into<String>,
        metrics: Metrics,
        current: Option<&S>,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            metrics,
            last: current.and_then(|s| serde_json::to_value(s).ok()),
            final_backoff: FINAL_WRITE_BACKOFF,
        }
    }

    /// Overrides the final write's retry timing (tests).
    pub fn with_final_backoff(mut self, backoff: Backoff) -> Self {
        self.final_backoff = backoff;
        self
    }

    /// Writes `status` unless it equals the last one written. `Ok(true)` when it wrote.
    pub async fn write<S: Serialize>(&mut self, status: &S) -> Result<bool, WriteError> {
        let value = serde_json::to_value(status).ok();
        if value.is_some() && value == self.last {
            return Ok(false);
        }
        match apply(&self.api, &self.name, status).await {
            Ok(()) => {
                self.metrics.status_written(&K::kind(&()));
                self.last = value;
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Err(WriteError::Gone),
            Err(e) => Err(WriteError::Failed(e)),
        }
    }

    /// Writes `status`, retrying failures with backoff until it lands, the object is gone,
    /// or `attempts` writes failed (the last error is returned then).
    pub async fn write_final<S: Serialize>(
        &mut self,
        status: &S,
        attempts: u32,
    ) -> Result<(), WriteError> {
        let mut retry = 0;
        loop {
            match self.write(status).await {
                Ok(_) => return Ok(()),
                Err(WriteError::Gone) => return Err(WriteError::Gone),
                Err(e) if retry + 1 >= attempts.max(1) => return Err(e),
                Err(e) => {
                    let delay = self.final_backoff.delay(retry);
                    tracing::warn!(object = %self.name, error = %e, retry_in = ?delay, "final status write failed; retrying");
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
            }
        }
    }
}
