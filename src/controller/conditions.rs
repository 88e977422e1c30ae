//! Standard `metav1.Condition`s, computed from the previous status so that
//! `lastTransitionTime` only moves when a condition's status really changes (otherwise every
//! status write would trigger our own watch again).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

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
