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
///
/// A status the API server rejects as invalid (422: a host's string longer than the schema
/// allows, say) is written again once without the fields the rejection names, with a
/// warning: the rest of the status (conditions above all) still lands, and the write is not
/// retried as an error forever.
pub async fn apply<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let value = serde_json::to_value(status).map_err(kube::Error::SerdeError)?;
    match patch::<K>(api, name, &value).await {
        Err(kube::Error::Api(e)) if e.code == 422 => {
            let fields = rejected_fields(&e.message);
            let mut reduced = value.clone();
            let mut dropped = Vec::new();
            if let Some(map) = reduced.as_object_mut() {
                for f in &fields {
                    if map.remove(f.as_str()).is_some() {
                        dropped.push(f.clone());
                    }
                }
            }
            if dropped.is_empty() {
                return Err(kube::Error::Api(e));
            }
            tracing::warn!(
                kind = %K::kind(&()),
                name,
                dropped = ?dropped,
                message = %crate::text::head(&e.message, 500),
                "the API server rejected the status; written without the rejected fields"
            );
            patch::<K>(api, name, &reduced).await
        }
        other => other,
    }
}

async fn patch<K>(api: &Api<K>, name: &str, status: &serde_json::Value) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
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

/// The top-level status fields a 422 message names (`status.drift[0].message: Too long`
/// names `drift`). Conditions are never dropped: they are what says the object's state.
fn rejected_fields(message: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, _) in message.match_indices("status.") {
        // "status." as a path start, not the tail of another word
        if i > 0
            && message[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '.')
        {
            continue;
        }
        let field: String = message[i + "status.".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        if !field.is_empty() && field != "conditions" && !out.contains(&field) {
            out.push(field);
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::inventory::{Inventory, InventoryStatus};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A kube client whose API server answers status patches from `script` (HTTP codes, in
    /// order; the last repeats) and counts them.
    fn scripted(script: Vec<u16>) -> (kube::Client, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let code = script[n.min(script.len() - 1)];
            assert_eq!(req.method(), http::Method::PATCH);
            assert!(
                req.uri().path().ends_with("/inventories/inv/status"),
                "{}",
                req.uri()
            );
            let body = if code == 200 {
                serde_json::json!({
                    "apiVersion": "outrider.dev/v1alpha1", "kind": "Inventory",
                    "metadata": {"name": "inv", "namespace": "ns"},
                    "spec": {"ssh": {"user": "u", "secretRef": {"name": "s"}}, "hosts": []}
                })
            } else {
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": "scripted", "reason": "InternalError", "code": code})
            };
            async move {
                http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        body.to_string(),
                    )))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        (kube::Client::new(service, "ns"), calls)
    }

    #[test]
    fn a_422_names_the_status_fields_to_drop_but_never_conditions() {
        let m = r#"SecurityPolicy.outrider.dev "fw" is invalid: [status.drift[0].message: Too long: may not be more than 1024 bytes, status.failures[3].host: Too long, status.conditions[0].message: Too long, status.drift[1].message: Too long]"#;
        assert_eq!(rejected_fields(m), vec!["drift", "failures"]);
        assert!(
            rejected_fields("Inventory.outrider.dev \"x\" is invalid: spec.hosts: Required")
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_rejected_status_is_written_again_without_the_rejected_field() {
        let bodies = Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
        let seen = bodies.clone();
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let seen = seen.clone();
            async move {
                use http_body_util::BodyExt;
                let bytes = req
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?
                    .to_bytes();
                let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let n = {
                    let mut b = seen.lock().unwrap();
                    b.push(body);
                    b.len()
                };
                let (code, body) = if n == 1 {
                    (
                        422,
                        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": "Inventory.outrider.dev \"inv\" is invalid: status.reachable: Invalid value: 1: must be less than or equal to 0",
                        "reason": "Invalid", "code": 422}),
                    )
                } else {
                    (
                        200,
                        serde_json::json!({
                            "apiVersion": "outrider.dev/v1alpha1", "kind": "Inventory",
                            "metadata": {"name": "inv", "namespace": "ns"},
                            "spec": {"ssh": {"user": "u", "secretRef": {"name": "s"}}, "hosts": []}
                        }),
                    )
                };
                http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        body.to_string(),
                    )))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        let client = kube::Client::new(service, "ns");
        let api: Api<Inventory> = Api::namespaced(client, "ns");
        let status = InventoryStatus {
            hosts: 3,
            reachable: Some(1),
            ..Default::default()
        };
        apply(&api, "inv", &status)
            .await
            .expect("second write lands");
        let bodies = bodies.lock().unwrap();
        assert_eq!(
            bodies.len(),
            2,
            "one rejected write, one reduced write, no more"
        );
        assert_eq!(bodies[0]["status"]["reachable"], 1);
        assert!(bodies[1]["status"].get("reachable").is_none());
        assert_eq!(bodies[1]["status"]["hosts"], 3);
    }

    fn writer(client: kube::Client) -> StatusWriter<Inventory> {
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        StatusWriter::new(
            Api::namespaced(client, "ns"),
            "inv",
            metrics,
            None::<&InventoryStatus>,
        )
        .with_final_backoff(Backoff::new(
            Duration::from_millis(1),
            Duration::from_millis(5),
        ))
    }

    fn status(hosts: u32) -> InventoryStatus {
        InventoryStatus {
            hosts,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_final_write_is_retried_until_it_lands() {
        let (client, calls) = scripted(vec![500, 503, 429, 200]);
        let mut w = writer(client);
        w.write_final(&status(1), 10)
            .await
            .expect("lands on the 4th try");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        // unchanged: nothing more is sent
        assert!(!w.write(&status(1)).await.expect("skip"));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(
            w.metrics
                .status_writes
                .get_or_create(&crate::telemetry::KindLabel {
                    kind: "Inventory".into()
                })
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn the_final_write_gives_up_after_its_attempts_and_stops_at_once_when_gone() {
        let (client, calls) = scripted(vec![500]);
        let mut w = writer(client);
        assert!(matches!(
            w.write_final(&status(1), 3).await,
            Err(WriteError::Failed(_))
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let (client, calls) = scripted(vec![404]);
        let mut w = writer(client);
        assert!(matches!(
            w.write_final(&status(1), 5).await,
            Err(WriteError::Gone)
        ));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a deleted object is not retried"
        );
    }
}
