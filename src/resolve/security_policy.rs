//! A SecurityPolicy to what the firewall engine takes: the compiled ruleset (with its
//! static-check findings) and the rollout settings. Shared by the controller and
//! `outrider policy`.

use std::time::Duration;

use kube::ResourceExt;

use super::ResolveError;
use super::deployment_plan::amount;
use crate::api::security_policy::SecurityPolicy;
use crate::engine::firewall::{self, CompileError, Compiled, Meta};
use crate::engine::plan::Amount;

/// The longest drift interval honoured (a schema-valid `9999h` must not overflow a timer).
pub const MAX_DRIFT_INTERVAL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest: a read of every host is not free.
pub const MIN_DRIFT_INTERVAL: Duration = Duration::from_secs(10);

/// Everything a rollout of one SecurityPolicy needs besides the hosts.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub compiled: Compiled,
    pub batch_size: Amount,
    pub max_unavailable: Amount,
    pub confirm: Duration,
    pub drift_interval: Duration,
}

/// Why a SecurityPolicy cannot be rolled out.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Field(#[from] ResolveError),
    #[error(transparent)]
    Compile(#[from] CompileError),
}

/// `<namespace>/<name>`: the owner written on hosts.
pub fn policy_id(sp: &SecurityPolicy) -> String {
    format!(
        "{}/{}",
        sp.namespace().unwrap_or_else(|| "default".into()),
        sp.name_any()
    )
}

/// Compiles and checks a SecurityPolicy.
pub fn resolve(sp: &SecurityPolicy) -> Result<Resolved, PolicyError> {
    let spec = &sp.spec;
    let duration = |field: &'static str, d: &crate::api::common::DurationString| {
        d.to_std().map_err(|e| ResolveError::InvalidField {
            field,
            message: e.to_string(),
        })
    };
    let confirm = duration("spec.apply.confirmTimeout", &spec.apply.confirm_timeout)?;
    let drift_interval = duration("spec.driftCheckInterval", &spec.drift_check_interval)?
        .clamp(MIN_DRIFT_INTERVAL, MAX_DRIFT_INTERVAL);
    let batch_size = amount("spec.apply.batchSize", &spec.apply.batch_size)?;
    if matches!(batch_size, Amount::Count(0) | Amount::Percent(0)) {
        return Err(ResolveError::InvalidField {
            field: "spec.apply.batchSize",
            message: "must be at least 1 host".into(),
        }
        .into());
    }
    let max_unavailable = amount("spec.apply.maxUnavailable", &spec.apply.max_unavailable)?;
    let compiled = firewall::compile(
        spec,
        &Meta {
            policy: policy_id(sp),
            generation: sp.metadata.generation.unwrap_or(0),
        },
    )?;
    Ok(Resolved {
        compiled,
        batch_size,
        max_unavailable,
        confirm: firewall::apply::confirm_window(confirm),
        drift_interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(extra: &str) -> SecurityPolicy {
        serde_yaml::from_str(&format!(
            "apiVersion: outrider.dev/v1alpha1\nkind: SecurityPolicy\nmetadata: {{name: fw, namespace: prod}}\nspec:\n  targets: {{inventoryRef: {{name: x}}}}\n  defaultInput: drop\n  failsafe: {{ports: [22]}}\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn schema_valid_huge_durations_are_errors_or_clamped_never_a_panic() {
        let e = resolve(&policy("  apply: {confirmTimeout: 9999999999999999h}\n")).unwrap_err();
        assert!(e.to_string().contains("spec.apply.confirmTimeout"), "{e}");
        let r = resolve(&policy(
            "  apply: {confirmTimeout: 99999h}\n  driftCheckInterval: 99999h\n",
        ))
        .unwrap();
        assert_eq!(r.confirm, firewall::apply::MAX_CONFIRM);
        assert_eq!(r.drift_interval, MAX_DRIFT_INTERVAL);
        let r = resolve(&policy(
            "  apply: {confirmTimeout: 1ms}\n  driftCheckInterval: 1ms\n",
        ))
        .unwrap();
        assert_eq!(r.confirm, firewall::apply::MIN_CONFIRM);
        assert_eq!(r.drift_interval, MIN_DRIFT_INTERVAL);
    }

    #[test]
    fn the_owner_is_namespace_and_name() {
        let r = resolve(&policy("")).unwrap();
        assert_eq!(policy_id(&policy("")), "prod/fw");
        assert!(r.compiled.text().contains("outrider prod/fw g0 "));
    }
}
