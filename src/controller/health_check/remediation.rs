//! Remediation: a copy of the referenced DeploymentPlan, owned by the HealthCheck and
//! scoped to the unhealthy hosts (an `outrider.dev/host In (...)` requirement added to its
//! selector), so the user's plan is never edited (Argo CD would revert it) and every run
//! is an object `kubectl get deploymentplans` shows. The newest [`KEEP`] are kept;
//! all go with the HealthCheck (owner references). `cooldown` and `maxPerHour` are
//! counted from `status.remediations`, so a restarted controller honours them too.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, Time,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Resource, ResourceExt};

use super::super::Context;
use crate::api::deployment_plan::{DeploymentPlan, DeploymentPlanSpec};
use crate::api::health_check::{HealthCheck, Remediation, RemediationRecord};
use crate::resolve::inventory::HOST_LABEL;

/// Remediation plans kept per HealthCheck (older ones are deleted).
pub const KEEP: usize = 3;
/// Label naming the HealthCheck a remediation plan belongs to.
pub const REMEDIATION_LABEL: &str = "outrider.dev/remediation-of";
/// Hosts named in one remediation (the status record's limit).
const MAX_HOSTS: usize = 100;

/// Whether a remediation may start at `now`, given the ones recorded (newest first).
pub fn allowed(
    spec: &Remediation,
    history: &[RemediationRecord],
    now: SystemTime,
) -> Result<(), &'static str> {
    let cooldown = spec
        .cooldown
        .to_std()
        .unwrap_or(Duration::from_secs(900))
        .min(Duration::from_secs(365 * 24 * 3600));
    let age = |r: &RemediationRecord| {
        now.duration_since(SystemTime::from(r.at.0))
            .ok()
            .unwrap_or(Duration::ZERO)
    };
    if history.first().is_some_and(|r| age(r) < cooldown) {
        return Err("in cooldown");
    }
    let last_hour = history
        .iter()
        .filter(|r| age(r) < Duration::from_secs(3600))
        .count();
    if last_hour >= usize::try_from(spec.max_per_hour).unwrap_or(usize::MAX) {
        return Err("maxPerHour reached");
    }
    Ok(())
}

/// Creates the remediation plan for `hosts`; returns its name and the status record.
pub async fn start(
    ctx: &Context,
    hc: &HealthCheck,
    spec: &Remediation,
    hosts: &[String],
) -> Result<(String, RemediationRecord), String> {
    let ns = hc.namespace().unwrap_or_default();
    let plans = ctx.api_in::<DeploymentPlan>(&ns);
    let source_name = &spec.deployment_plan_ref.name;
    let source = match plans.get_opt(source_name).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(format!(
                "DeploymentPlan {source_name:?} (spec.remediation.deploymentPlanRef) does not exist in this namespace"
            ));
        }
        Err(e) => return Err(format!("reading DeploymentPlan {source_name:?}: {e}")),
    };
    let hosts: Vec<String> = hosts.iter().take(MAX_HOSTS).cloned().collect();
    let plan_spec = scoped(&source.spec, &hosts);
    let now = Timestamp::now();
    let owner = crate::text::head(&hc.name_any(), 200).to_string();
    let name = format!("{owner}-fix-{}", now.as_second());
    let plan = DeploymentPlan {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".into(), "outrider".into()),
                (REMEDIATION_LABEL.into(), label_value(&hc.name_any())),
            ])),
            annotations: Some(BTreeMap::from([(
                "outrider.dev/remediation-source".into(),
                source_name.clone(),
            )])),
            owner_references: hc.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: plan_spec,
        status: None,
    };
    plans
        .create(&PostParams::default(), &plan)
        .await
        .map_err(|e| format!("creating remediation DeploymentPlan {name:?}: {e}"))?;
    prune(ctx, hc).await;
    Ok((
        name,
        RemediationRecord {
            plan: source_name.clone(),
            hosts,
            at: Time(now),
        },
    ))
}

/// The source plan's spec restricted to `hosts` (its own selector still applies).
pub fn scoped(source: &DeploymentPlanSpec, hosts: &[String]) -> DeploymentPlanSpec {
    let mut spec = source.clone();
    spec.paused = false;
    let mut selector = spec.targets.selector.take().unwrap_or(LabelSelector {
        match_expressions: None,
        match_labels: None,
    });
    selector
        .match_expressions
        .get_or_insert_with(Vec::new)
        .push(LabelSelectorRequirement {
            key: HOST_LABEL.into(),
            operator: "In".into(),
            values: Some(hosts.to_vec()),
        });
    spec.targets.selector = Some(selector);
    spec
}

/// A label value (at most 63 characters) naming the HealthCheck.
fn label_value(name: &str) -> String {
    if name.len() <= 63 {
        return name.to_string();
    }
    let hash = crate::resolve::deployment_plan::fnv(name.as_bytes());
    let keep = 62usize.saturating_sub(hash.len());
    format!(
        "{}-{hash}",
        crate::text::head(name, keep).trim_end_matches(['-', '.'])
    )
}

/// Deletes all but the newest [`KEEP`] remediation plans of `hc`.
async fn prune(ctx: &Context, hc: &HealthCheck) {
    let ns = hc.namespace().unwrap_or_default();
    let plans = ctx.api_in::<DeploymentPlan>(&ns);
    let lp = ListParams::default().labels(&format!(
        "{REMEDIATION_LABEL}={}",
        label_value(&hc.name_any())
    ));
    let Ok(list) = plans.list(&lp).await else {
        return;
    };
    let mut items: Vec<DeploymentPlan> = list
        .items
        .into_iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == hc.meta().uid.as_ref())
        })
        .collect();
    items.sort_by(|a, b| {
        b.creation_timestamp()
            .map(|t| t.0)
            .cmp(&a.creation_timestamp().map(|t| t.0))
            .then_with(|| b.name_any().cmp(&a.name_any()))
    });
    for old in items.iter().skip(KEEP) {
        if let Err(e) = plans
            .delete(&old.name_any(), &DeleteParams::background())
            .await
        {
            tracing::warn!(plan = %old.name_any(), error = %e, "old remediation plan not deleted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cooldown: &str, max: u32) -> Remediation {
        serde_yaml::from_str(&format!(
            "{{deploymentPlanRef: {{name: fix}}, cooldown: {cooldown}, maxPerHour: {max}}}"
        ))
        .expect("spec")
    }

    fn record(ago: u64, now: SystemTime) -> RemediationRecord {
        RemediationRecord {
            plan: "fix".into(),
            hosts: vec!["web-1".into()],
            at: Time(Timestamp::try_from(now - Duration::from_secs(ago)).expect("time")),
        }
    }

    #[test]
    fn cooldown_and_max_per_hour_hold_remediations_back() {
        let now = SystemTime::now();
        assert_eq!(allowed(&spec("15m", 4), &[], now), Ok(()));
        assert_eq!(
            allowed(&spec("15m", 4), &[record(60, now)], now),
            Err("in cooldown")
        );
        assert_eq!(allowed(&spec("15m", 4), &[record(901, now)], now), Ok(()));
        let hist: Vec<_> = [700, 1400, 2100].iter().map(|&s| record(s, now)).collect();
        assert_eq!(
            allowed(&spec("10m", 3), &hist, now),
            Err("maxPerHour reached")
        );
        assert_eq!(allowed(&spec("10m", 4), &hist, now), Ok(()));
        assert_eq!(
            allowed(&spec("9999999999999999h", 4), &[record(60, now)], now),
            Err("in cooldown")
        );
    }

    #[test]
    fn the_copy_keeps_the_source_selector_and_adds_the_hosts() {
        let source: DeploymentPlanSpec = serde_yaml::from_str(
            "{targets: {inventoryRef: {name: inv}, selector: {matchLabels: {role: web}}}, paused: true,
              stages: [{name: restart, command: [systemctl, restart, nginx]}]}",
        )
        .expect("plan spec");
        let s = scoped(&source, &["web-7".to_string()]);
        assert!(!s.paused);
        let sel = s.targets.selector.expect("selector");
        assert_eq!(
            sel.match_labels,
            source.targets.selector.and_then(|s| s.match_labels)
        );
        let req = &sel.match_expressions.expect("expressions")[0];
        assert_eq!(
            (req.key.as_str(), req.operator.as_str()),
            (HOST_LABEL, "In")
        );
        assert_eq!(req.values, Some(vec!["web-7".to_string()]));
        assert_eq!(label_value(&"x".repeat(80)).len(), 63);
    }
}
