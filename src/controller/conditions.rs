//! Standard `metav1.Condition`s, computed from the previous status so that
//! `lastTransitionTime` only moves when a condition's status really changes (otherwise every
//! status write would trigger our own watch again).

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::runtime::events::EventType;
use serde::Serialize;

use super::{At, Context, Error, Stage, runtime, status};

/// The condition every kind has.
pub const READY: &str = "Ready";

/// A user-side problem that stops the work: reported as `Ready=False` with this reason and
/// message (never an error to retry: the user must change something).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReady {
    pub reason: &'static str,
    pub message: String,
}

impl NotReady {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    /// The `Ready=False` condition saying it.
    pub fn ready(&self) -> Desired {
        Desired::new(READY, false, self.reason, self.message.clone())
    }
}

impl From<crate::resolve::ResolveError> for NotReady {
    fn from(e: crate::resolve::ResolveError) -> Self {
        NotReady::new(e.reason(), e.to_string())
    }
}

/// Which Ready transitions become Events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Events {
    /// Every change of the Ready reason (Warning when not ready).
    OnReadyChange,
    /// Only changes to a not-ready reason: reaching Ready is not news (e.g. a rollout).
    OnProblem,
}

/// Writes `new` as `obj`'s status when it differs from `old`, and publishes an Event when
/// the Ready reason changed from `old_conditions` as `events` asks. The one way a short
/// reconcile reports; long-running tasks use a `StatusWriter` and [`ready_changed`].
pub async fn report<K, S>(
    ctx: &Context,
    obj: &K,
    (old, new): (Option<&S>, &S),
    old_conditions: &[Condition],
    ready: &Desired,
    events: Events,
) -> Result<(), Error>
where
    K: runtime::Kind,
    S: Serialize + PartialEq,
{
    let api = runtime::object_api::<K, K>(ctx, obj);
    if status::apply_if_changed(&api, &obj.name_any(), old, new)
        .await
        .at(Stage::Status)?
    {
        ctx.metrics.status_written(&K::kind(&()));
    }
    let wanted = events == Events::OnReadyChange || !ready.status;
    if wanted && ready_changed(old_conditions, ready) {
        runtime::publish_event(
            ctx,
            obj,
            event_type(ready),
            ready.reason,
            ready.message.clone(),
        )
        .await;
    }
    Ok(())
}

/// Whether `ready`'s reason differs from the Ready condition in `old` (or there was none):
/// the one test for "publish an Event", so Events mark transitions, not rounds.
pub fn ready_changed(old: &[Condition], ready: &Desired) -> bool {
    find(old, ready.type_).is_none_or(|c| c.reason != ready.reason)
}

/// Normal for a true condition, Warning for a false one.
pub fn event_type(ready: &Desired) -> EventType {
    if ready.status {
        EventType::Normal
    } else {
        EventType::Warning
    }
}

/// A condition as a reconciler decides it; [`merge`] turns it into a `metav1.Condition`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    /// CamelCase reason, a short static string.
    pub reason: &'static str,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Builds the full conditions list from `desired`, keeping each condition's
/// `lastTransitionTime` from `old` when its status is unchanged.
pub fn merge(
    old: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    desired
        .iter()
        .map(|d| {
            let status = if d.status { "True" } else { "False" };
            let previous = old.iter().find(|c| c.type_ == d.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: d.type_.to_string(),
                status: status.to_string(),
                reason: d.reason.to_string(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn unchanged_status_keeps_last_transition_time_but_takes_new_reason() {
        let first = merge(
            &[],
            &[Desired::new("Ready", false, "SecretNotFound", "no secret")],
            Some(1),
            &at(100),
        );
        let second = merge(
            &first,
            &[Desired::new("Ready", false, "SecretInvalid", "no key")],
            Some(2),
            &at(200),
        );
        assert_eq!(second[0].last_transition_time, at(100));
        assert_eq!(second[0].reason, "SecretInvalid");
        assert_eq!(second[0].observed_generation, Some(2));
    }

    #[test]
    fn status_flip_moves_last_transition_time() {
        let first = merge(
            &[],
            &[Desired::new("Ready", false, "SecretNotFound", "")],
            Some(1),
            &at(100),
        );
        let second = merge(
            &first,
            &[Desired::new("Ready", true, "Resolved", "")],
            Some(1),
            &at(200),
        );
        assert_eq!(second[0].status, "True");
        assert_eq!(second[0].last_transition_time, at(200));
        assert_eq!(
            find(&second, "Ready").map(|c| c.reason.as_str()),
            Some("Resolved")
        );
    }
}
