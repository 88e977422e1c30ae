//! The machinery every kind's controller runs on:
//! - [`controller`]: the trigger stream (objects wrapped in [`DeserializeGuard`] so one
//!   malformed object cannot stop the watch for the others, `managedFields` stripped before
//!   caching, a queue-depth gauge) behind a [`changed`] filter, so the controller's own
//!   status writes do not trigger another reconcile, and bounded reconcile concurrency;
//! - [`reconciler`]: wraps a kind's plain `reconcile(Obj<K>, Arc<Context>)` with the timer,
//!   queue bookkeeping, one way of reporting unreadable objects, and the backoff reset;
//! - [`Shared`]: one Inventory stream and one Secret-metadata stream for every kind.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::{Action, Config};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{self, ObjectRef, ReflectHandle, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use prometheus_client::metrics::gauge::Gauge;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::conditions::{self, Desired};
use super::{At, Context, Error, Stage, status};
use crate::api::inventory::Inventory;

/// How the Api of one object is made: in its namespace, or cluster-wide.
pub trait ObjectScope {
    fn api_for<K: Resource<DynamicType = (), Scope = Self>>(
        client: kube::Client,
        namespace: Option<&str>,
    ) -> Api<K>;
}

impl ObjectScope for NamespaceResourceScope {
    fn api_for<K: Resource<DynamicType = (), Scope = Self>>(
        client: kube::Client,
        namespace: Option<&str>,
    ) -> Api<K> {
        match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        }
    }
}

impl ObjectScope for k8s_openapi::ClusterResourceScope {
    fn api_for<K: Resource<DynamicType = (), Scope = Self>>(
        client: kube::Client,
        _namespace: Option<&str>,
    ) -> Api<K> {
        Api::all(client)
    }
}

/// The Api of the object `obj` (of a namespaced or a cluster-scoped kind).
pub fn object_api<K, O>(ctx: &Context, obj: &O) -> Api<K>
where
    K: Resource<DynamicType = ()>,
    K::Scope: ObjectScope,
    O: Resource,
{
    <K::Scope as ObjectScope>::api_for(ctx.client.clone(), obj.meta().namespace.as_deref())
}

/// What the shared machinery needs of a kind: an Outrider custom resource (namespaced, or
/// cluster-scoped like ClusterLogPipeline) that deserializes and moves between tasks.
pub trait Kind:
    Resource<DynamicType = (), Scope: ObjectScope>
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Kind for K where
    K: Resource<DynamicType = (), Scope: ObjectScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static
{
}

/// Requeue interval for objects that are fine: a safety net, watches do the real work.
pub const RESYNC: Duration = Duration::from_secs(300);
/// Reconciles of one kind running at once.
pub const CONCURRENCY: u16 = 8;
/// Shared streams buffer this many changes per subscriber before applying backpressure.
const SHARED_BUFFER: usize = 1024;

/// Objects that changed but have not been reconciled since, for the queue-depth gauge.
pub struct QueueDepth {
    pending: Mutex<std::collections::HashSet<String>>,
    gauge: Gauge,
}

impl QueueDepth {
    pub fn new(gauge: Gauge) -> Self {
        Self {
            pending: Mutex::new(std::collections::HashSet::new()),
            gauge,
        }
    }

    fn update(&self, f: impl FnOnce(&mut std::collections::HashSet<String>)) {
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

/// What a change must touch to trigger a reconcile: the spec (`generation`), annotations
/// (`outrider.dev/rerun`), finalizers and deletion. Status writes, ours included, touch
/// none of these.
pub fn trigger_hash<K: Resource>(obj: &K) -> u64 {
    let meta = obj.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.annotations.hash(&mut h);
    meta.finalizers.hash(&mut h);
    meta.deletion_timestamp.as_ref().map(|t| t.0).hash(&mut h);
    meta.uid.hash(&mut h);
    h.finish()
}

/// Drops objects whose [`trigger_hash`] equals the last one seen for them.
#[derive(Default)]
pub struct Changed {
    seen: Mutex<HashMap<(Option<String>, String), u64>>,
}

impl Changed {
    /// Whether `obj` differs from the last version seen in what [`trigger_hash`] covers.
    pub fn check<K: Resource>(&self, obj: &K) -> bool {
        let key = (
            obj.meta().namespace.clone(),
            obj.meta().name.clone().unwrap_or_default(),
        );
        let hash = trigger_hash(obj);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(key, hash) != Some(hash)
    }
}

/// Filters a stream of shared objects through a fresh [`Changed`].
pub fn changed<K, S>(stream: S) -> impl Stream<Item = Arc<K>> + Send + 'static
where
    K: Resource + Send + Sync + 'static,
    S: Stream<Item = Arc<K>> + Send + 'static,
{
    let filter = Changed::default();
    stream.filter(move |obj| futures::future::ready(filter.check(obj.as_ref())))
}

/// The controller of kind `K` over `trigger` (from [`Shared`] or [`watch`]), with bounded
/// concurrency; the caller adds `watches`/`owns` and runs it with [`reconciler`].
pub fn controller<K>(
    ctx: &Context,
    trigger: impl Stream<Item = Arc<DeserializeGuard<K>>> + Send + 'static,
    store: Store<DeserializeGuard<K>>,
) -> (Controller<DeserializeGuard<K>>, Arc<QueueDepth>)
where
    K: Kind,
{
    let queue = queue_depth(ctx, &K::kind(&()));
    let q = queue.clone();
    let trigger = changed(trigger).inspect(move |obj| q.queued(object_key(obj.as_ref())));
    let controller = Controller::for_shared_stream(trigger, store)
        .with_config(Config::default().concurrency(CONCURRENCY));
    (controller, queue)
}

/// A watch of kind `K` in the watched scope, shared (subscribe as often as needed before
/// driving it): its store, a subscription and the future that drives it.
pub struct SharedWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    pub store: Store<K>,
    handle: ReflectHandle<K>,
}

impl<K> SharedWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    /// Starts the watch; the returned future must be polled for any subscriber to see
    /// anything (and every subscriber must be polled, or the watch stalls).
    fn start(
        api: Api<K>,
        modify: impl FnMut(&mut K) + Send + 'static,
    ) -> (Self, BoxFuture<'static, ()>) {
        let (store, writer) = reflector::store_shared(SHARED_BUFFER);
        let handle = writer
            .subscribe()
            .unwrap_or_else(|| unreachable!("a shared store always hands out subscriptions"));
        let driver = watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(modify)
            .reflect_shared(writer)
            .for_each(|event| {
                if let Err(e) = event {
                    tracing::warn!(error = %e, kind = %K::kind(&()), "watch error; retrying");
                }
                futures::future::ready(())
            })
            .boxed();
        (Self { store, handle }, driver)
    }

    /// One more subscriber: every change (applied object) from now on.
    pub fn subscribe(&self) -> ReflectHandle<K> {
        self.handle.clone()
    }
}

/// Caches of one kind, one per watched namespace: lookups go to the one holding the key.
#[derive(Clone)]
pub struct Stores<K>(Vec<Store<K>>)
where
    K: Resource<DynamicType = ()> + Clone + 'static;

impl<K> Stores<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    pub fn new(stores: Vec<Store<K>>) -> Self {
        Self(stores)
    }

    pub fn get(&self, key: &ObjectRef<K>) -> Option<Arc<K>> {
        self.0.iter().find_map(|s| s.get(key))
    }

    /// Every cached object, of every namespace.
    pub fn state(&self) -> Vec<Arc<K>> {
        self.0.iter().flat_map(|s| s.state()).collect()
    }
}

/// A shared watch per tenant namespace (or one over the watched scope): what only tenants
/// grant (Secret metadata) is never listed cluster-wide when they must opt in.
pub struct TenantWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    parts: Vec<SharedWatch<K>>,
}

impl<K> TenantWatch<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    pub fn start(
        apis: Vec<Api<K>>,
        modify: impl FnMut(&mut K) + Clone + Send + 'static,
    ) -> (Self, Vec<BoxFuture<'static, ()>>) {
        let (parts, drivers) = apis
            .into_iter()
            .map(|api| SharedWatch::start(api, modify.clone()))
            .unzip();
        (Self { parts }, drivers)
    }

    /// Every change in any of the namespaces.
    pub fn subscribe(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        futures::stream::select_all(self.parts.iter().map(|p| p.subscribe().boxed()))
    }

    pub fn stores(&self) -> Stores<K> {
        Stores::new(self.parts.iter().map(|p| p.store.clone()).collect())
    }
}

/// The streams every kind that needs them shares: one watch of Inventories and one of
/// Secret metadata per tenant namespace (Secret data never enters this process's cache).
pub struct Shared {
    pub inventories: SharedWatch<DeserializeGuard<Inventory>>,
    pub secrets: TenantWatch<PartialObjectMeta<Secret>>,
    drivers: Mutex<Vec<BoxFuture<'static, ()>>>,
}

impl Shared {
    pub fn start(ctx: &Context) -> Self {
        let (inventories, inv_driver) =
            SharedWatch::start(ctx.api::<DeserializeGuard<Inventory>>(), |obj| {
                obj.managed_fields_mut().clear()
            });
        let (secrets, mut drivers) =
            TenantWatch::start(ctx.tenant_apis::<PartialObjectMeta<Secret>>(), |obj| {
                obj.managed_fields_mut().clear()
            });
        drivers.push(inv_driver);
        Self {
            inventories,
            secrets,
            drivers: Mutex::new(drivers),
        }
    }

    /// Drives the shared watches until `stop` fires. Call once.
    pub async fn drive(&self, stop: CancellationToken) {
        let drivers = std::mem::take(&mut *self.drivers.lock().unwrap_or_else(|p| p.into_inner()));
        tokio::select! {
            _ = futures::future::join_all(drivers) => {}
            () = stop.cancelled() => {}
        }
    }
}

/// A private (unshared) watch of kind `K`: its trigger stream and store.
pub fn watch<K>(
    api: Api<DeserializeGuard<K>>,
) -> (
    impl Stream<Item = Arc<DeserializeGuard<K>>> + Send + 'static,
    Store<DeserializeGuard<K>>,
)
where
    K: Kind,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|obj| obj.managed_fields_mut().clear())
        .reflect(writer)
        .applied_objects()
        .filter_map(|r| futures::future::ready(r.ok().map(Arc::new)));
    (stream, reader)
}

/// A readable object handed to a kind's reconcile: derefs to `K`.
pub struct Obj<K: Resource>(Arc<DeserializeGuard<K>>);

impl<K: Resource> std::ops::Deref for Obj<K> {
    type Target = K;
    fn deref(&self) -> &K {
        match &self.0.0 {
            Ok(k) => k,
            Err(_) => unreachable!("Obj is only built from readable objects"),
        }
    }
}

impl<K: Resource> Obj<K> {
    /// The object's namespace (every Outrider kind is namespaced).
    pub fn ns(&self) -> Result<String, Error> {
        self.0.namespace().ok_or(Error::NoNamespace)
    }
}

/// Wraps a kind's reconcile: reconcile timer and queue bookkeeping, unreadable objects
/// reported one way for every kind (a Warning Event and `Ready=False/InvalidObject`, no
/// retry), and the per-object backoff reset on every `Ok`.
pub fn reconciler<K, F, Fut>(
    queue: Arc<QueueDepth>,
    f: F,
) -> impl FnMut(Arc<DeserializeGuard<K>>, Arc<Context>) -> BoxFuture<'static, Result<Action, Error>>
where
    K: Kind,
    F: Fn(Obj<K>, Arc<Context>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    let f = Arc::new(f);
    move |guard, ctx| {
        let f = f.clone();
        let queue = queue.clone();
        async move {
            let kind = K::kind(&());
            let key = object_key(guard.as_ref());
            queue.started(&key);
            let _timer = ctx.metrics.reconcile_started(&kind, &key);
            if guard.0.is_err() {
                report_unreadable(&ctx, guard.as_ref()).await?;
                return Ok(Action::await_change());
            }
            if let Some(why) = guard.namespace().and_then(|ns| ctx.tenants.refusal(&ns)) {
                report_refused(&ctx, guard.as_ref(), "NamespaceNotOptedIn", why).await?;
                return Ok(Action::await_change());
            }
            let action = isolate(f(Obj(guard), ctx.clone())).await?;
            ctx.backoff.reset(&key);
            Ok(action)
        }
        .boxed()
    }
}

/// Runs one reconcile so that a panic in it is that object's error, not the process's
/// end: one tenant's object that meets a bug must not crash-loop the controller for all.
pub async fn isolate<Fut>(reconcile: Fut) -> Result<Action, Error>
where
    Fut: Future<Output = Result<Action, Error>>,
{
    match std::panic::AssertUnwindSafe(reconcile).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            Err(Error::Panicked(crate::text::clip(message, 512)))
        }
    }
}

/// An object that no longer deserializes (e.g. stored by a newer CRD than this controller
/// knows): a Warning Event and `Ready=False/InvalidObject` on it, through its metadata only.
async fn report_unreadable<K>(ctx: &Context, guard: &DeserializeGuard<K>) -> Result<(), Error>
where
    K: Kind,
{
    let Err(invalid) = &guard.0 else {
        return Ok(());
    };
    let message = format!("cannot read this {}: {}", K::kind(&()), invalid.error);
    report_refused(ctx, guard, "InvalidObject", message).await
}

/// An object the controller will not act on: a Warning Event and `Ready=False/<reason>`,
/// written through its metadata only (so it works whether or not the object reads).
async fn report_refused<K>(
    ctx: &Context,
    guard: &DeserializeGuard<K>,
    reason: &'static str,
    message: String,
) -> Result<(), Error>
where
    K: Kind,
{
    publish_event(ctx, guard, EventType::Warning, reason, message.clone()).await;
    let generation = match &guard.0 {
        Ok(obj) => obj.meta().generation,
        Err(invalid) => invalid.metadata.generation,
    };
    let status = serde_json::json!({
        "conditions": conditions::merge(
            &[],
            &[Desired::new(conditions::READY, false, reason, message)],
            generation,
            &Time(Timestamp::now()),
        ),
    });
    let api: Api<PartialObjectMeta<K>> = object_api(ctx, guard);
    status::apply(&api, &guard.name_any(), &status)
        .await
        .at(Stage::Status)?;
    ctx.metrics.status_written(&K::kind(&()));
    Ok(())
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

/// Drives a built controller to completion, discarding its per-reconcile results (errors
/// are already counted and logged by [`error_policy`]).
pub async fn drive<K>(
    controller: Controller<DeserializeGuard<K>>,
    stop: CancellationToken,
    ctx: Arc<Context>,
    reconcile: impl FnMut(
        Arc<DeserializeGuard<K>>,
        Arc<Context>,
    ) -> BoxFuture<'static, Result<Action, Error>>
    + Send
    + 'static,
) where
    K: Kind,
{
    controller
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Publishes an Event on `obj`; failures are logged, never fatal (Events are best effort).
pub async fn publish_event<K>(ctx: &Context, obj: &K, type_: EventType, reason: &str, note: String)
where
    K: Resource<DynamicType = ()>,
{
    publish_event_related(ctx, obj, type_, reason, note, None).await;
}

/// [`publish_event`] with a related object. The recorder folds Events with the same object,
/// reason and related object into one series (keeping the first note): per-host Events
/// name the host as the related Inventory's `spec.hosts{<name>}` so each stays its own.
pub async fn publish_event_related<K>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: String,
    related: Option<k8s_openapi::api::core::v1::ObjectReference>,
) where
    K: Resource<DynamicType = ()>,
{
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(crate::text::clip(note, 1000)),
        action: "Reconcile".into(),
        secondary: related,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "could not publish Event");
    }
}

/// Maps a changed object of another kind to the objects of `K` in the store (same
/// namespace) that `refers` accepts, for `watches_shared_stream`.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::inventory::Inventory;

    fn inv(yaml: &str) -> Inventory {
        serde_yaml::from_str(yaml).expect("inventory")
    }

    const BASE: &str = r#"
apiVersion: outrider.dev/v1alpha1
kind: Inventory
metadata: {name: a, namespace: n, generation: 1, resourceVersion: "10"}
spec:
  ssh: {user: u, secretRef: {name: s}}
  hosts: [{name: h, address: 127.0.0.1}]
"#;

    #[test]
    fn our_status_writes_do_not_pass_the_trigger_filter_but_spec_annotation_and_finalizer_changes_do()
     {
        let changed = Changed::default();
        let base = inv(BASE);
        assert!(changed.check(&base), "first sight passes");
        let mut status_only = base.clone();
        status_only.metadata.resource_version = Some("11".into());
        status_only.status = Some(Default::default());
        assert!(
            !changed.check(&status_only),
            "a status write must not re-trigger"
        );
        let mut spec = status_only.clone();
        spec.metadata.generation = Some(2);
        assert!(changed.check(&spec));
        let mut annotated = spec.clone();
        annotated
            .annotations_mut()
            .insert("outrider.dev/rerun".into(), "1".into());
        assert!(changed.check(&annotated));
        let mut finalized = annotated.clone();
        finalized
            .finalizers_mut()
            .push("outrider.dev/cleanup".into());
        assert!(changed.check(&finalized));
        assert!(!changed.check(&finalized));
    }

    #[tokio::test]
    async fn a_panicking_reconcile_is_that_objects_error_and_the_next_one_runs() {
        let boom = isolate(async {
            let v: Vec<u8> = Vec::new();
            #[allow(clippy::indexing_slicing)]
            let x = v[3];
            Ok(Action::requeue(std::time::Duration::from_secs(u64::from(
                x,
            ))))
        })
        .await;
        match boom {
            Err(Error::Panicked(msg)) => assert!(msg.contains("index out of bounds"), "{msg}"),
            other => panic!("expected Panicked, got {other:?}"),
        }
        assert_eq!(Error::Panicked(String::new()).category(), "panic");
        let fine = isolate(async { Ok(Action::await_change()) }).await;
        assert!(fine.is_ok());
    }
}
