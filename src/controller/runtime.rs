//! The watch stream every kind's controller runs on: objects wrapped in
//! [`DeserializeGuard`] (one malformed object must not stop the watch for the others),
//! `managedFields` stripped before caching, and a queue-depth gauge fed from it.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, TryStreamExt};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use prometheus_client::metrics::gauge::Gauge;
use serde::de::DeserializeOwned;

use super::{Context, Error};

/// Objects that changed but have not been reconciled since, for the queue-depth gauge.
pub struct QueueDepth {
    pending: Mutex<HashSet<String>>,
    gauge: Gauge,
}

impl QueueDepth {
    pub fn new(gauge: Gauge) -> Self {
        Self {
            pending: Mutex::new(HashSet::new()),
            gauge,
        }
    }

    fn update(&self, f: impl FnOnce(&mut HashSet<String>)) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut pending);
        self.gauge
            .set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
    }

    pub fn queued(&self, key: String) {
        self.update(|p| {
            p.insert(key);
        });
    }

    pub fn started(&self, key: &str) {
        self.update(|p| {
            p.remove(key);
        });
    }
}

/// Stable key of an object for backoff and queue bookkeeping.
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// The trigger stream and its store for kind `K`, watched in `namespace` or cluster-wide.
pub fn watch<K>(
    api: Api<DeserializeGuard<K>>,
    queue: Arc<QueueDepth>,
) -> (
    impl Stream<Item = Result<DeserializeGuard<K>, watcher::Error>> + Send + 'static,
    Store<DeserializeGuard<K>>,
)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|obj| obj.managed_fields_mut().clear())
        .reflect(writer)
        .applied_objects()
        .inspect_ok(move |obj| queue.queued(object_key(obj)));
    (stream, reader)
}

/// Error policy shared by every kind: count the failure, back off per object.
pub fn error_policy<K>(obj: Arc<DeserializeGuard<K>>, err: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    let kind = K::kind(&());
    ctx.metrics.reconcile_failed(&kind, err.category());
    let key = object_key(obj.as_ref());
    let delay = ctx.backoff.next_delay(&key);
    tracing::warn!(object = %key, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Publishes an Event on `obj`; failures are logged, never fatal (Events are best effort).
pub async fn publish_event<K>(ctx: &Context, obj: &K, type_: EventType, reason: &str, note: String)
where
    K: Resource<DynamicType = ()>,
{
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(truncate(note, 1000)),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "could not publish Event");
    }
}

/// The object, or `None` after a Warning Event on it saying why it cannot be read (only when
/// the stored object no longer matches these types, e.g. a CRD newer than this controller).
pub async fn readable<'a, K>(ctx: &Context, guard: &'a DeserializeGuard<K>) -> Option<&'a K>
where
    K: Resource<DynamicType = ()>,
{
    match &guard.0 {
        Ok(obj) => Some(obj),
        Err(invalid) => {
            let message = format!("cannot read this {}: {}", K::kind(&()), invalid.error);
            publish_event(ctx, guard, EventType::Warning, "InvalidObject", message).await;
            None
        }
    }
}

/// Caps a message at `max` bytes on a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Requeue interval for objects that are fine: a safety net, watches do the real work.
pub const RESYNC: Duration = Duration::from_secs(300);

/// Maps a changed object of another kind to the objects of `K` in the store that refer
/// to it, for `Controller::watches_stream`.
pub fn referrers<K>(
    store: &Store<DeserializeGuard<K>>,
    namespace: Option<String>,
    refers: impl Fn(&K) -> bool,
) -> Vec<ObjectRef<DeserializeGuard<K>>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .state()
        .iter()
        .filter(|g| g.namespace() == namespace)
        .filter(|g| matches!(&g.0, Ok(obj) if refers(obj)))
        .map(|g| ObjectRef::from_obj(g.as_ref()))
        .collect()
}

/// A Secret key's value, from `data` or (not yet normalised by the API server) `stringData`.
pub fn secret_value(secret: &k8s_openapi::api::core::v1::Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.as_bytes().to_vec())
        })
}

/// The queue-depth tracker of `kind`, fed into the shared gauge family.
pub fn queue_depth(ctx: &Context, kind: &str) -> Arc<QueueDepth> {
    let gauge = ctx
        .metrics
        .queue_depth
        .get_or_create(&crate::telemetry::KindLabel { kind: kind.into() })
        .clone();
    Arc::new(QueueDepth::new(gauge))
}
