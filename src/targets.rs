//! From an `Inventory` (and its Secret) to what the SSH transport takes: the one place
//! that maps API types to transport settings, shared by the controller and the local
//! `outrider exec` runner so both reach hosts identically.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{Selector, SelectorExt};

use crate::api::deployment_plan::{self as dp, DeploymentPlanSpec, Stage};
use crate::api::inventory::{HostKeyPolicy, Inventory};
use crate::engine::inventory::{self as checks, SecretProblem};
use crate::engine::plan::{self, Amount, PlanSpec, StageAction, StageSpec};
use crate::ssh::{self, ClientConfig, Endpoint};

/// The SSH material a Secret (or a directory of files named like its keys) carries.
/// Lives only in memory; never logged.
pub struct SshMaterial {
    pub private_key: String,
    pub passphrase: Option<String>,
    pub known_hosts: String,
}

impl std::fmt::Debug for SshMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SshMaterial { <redacted> }")
    }
}

/// Why the inventory cannot be turned into transport settings.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    Secret(#[from] SecretProblem),
    #[error("Secret {secret:?} key {key:?} is not UTF-8 text")]
    NotText { secret: String, key: &'static str },
    #[error("{field}: {message}")]
    InvalidField {
        field: &'static str,
        message: String,
    },
}

/// Reads the keys SSH needs through `lookup` (a Secret's data, or files in a directory).
pub fn ssh_material(
    secret: &str,
    policy: HostKeyPolicy,
    lookup: impl Fn(&str) -> Option<Vec<u8>>,
) -> Result<SshMaterial, TargetError> {
    checks::check_secret(secret, policy == HostKeyPolicy::Strict, |k| {
        lookup(k).map(|v| v.len())
    })?;
    let text = |key: &'static str| -> Result<Option<String>, TargetError> {
        lookup(key)
            .map(|v| {
                String::from_utf8(v).map_err(|_| TargetError::NotText {
                    secret: secret.to_string(),
                    key,
                })
            })
            .transpose()
    };
    Ok(SshMaterial {
        private_key: text(checks::KEY_PRIVATE_KEY)?.unwrap_or_default(),
        passphrase: text(checks::KEY_PASSPHRASE)?
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.trim_end().to_string()),
        known_hosts: text(checks::KEY_KNOWN_HOSTS)?.unwrap_or_default(),
    })
}

/// The transport settings an Inventory asks for.
pub fn client_config(inv: &Inventory) -> Result<ClientConfig, TargetError> {
    let s = &inv.spec.ssh;
    let mut config = ClientConfig::new(s.user.clone());
    config.connect_timeout = s
        .connect_timeout
        .to_std()
        .map_err(|e| TargetError::InvalidField {
            field: "spec.ssh.connectTimeout",
            message: e.to_string(),
        })?;
    config.host_key_policy = match s.host_key_policy {
        HostKeyPolicy::Strict => ssh::HostKeyPolicy::Strict,
        HostKeyPolicy::AcceptNew => ssh::HostKeyPolicy::AcceptNew,
    };
    config.jump_host = s.jump_host.as_ref().map(|j| ssh::JumpHost {
        address: j.address.clone(),
        port: j.port,
        user: j.user.clone().unwrap_or_else(|| s.user.clone()),
    });
    config.become_user = s.become_.as_ref().map(|b| b.user.clone());
    Ok(config)
}

/// The inventory's hosts, in spec order, optionally narrowed by a label selector.
pub fn endpoints(
    inv: &Inventory,
    selector: Option<&LabelSelector>,
) -> Result<Vec<Endpoint>, TargetError> {
    let selector = selector
        .map(|s| Selector::try_from(s.clone()))
        .transpose()
        .map_err(|e| TargetError::InvalidField {
            field: "targets.selector",
            message: e.to_string(),
        })?;
    Ok(inv
        .spec
        .hosts
        .iter()
        .filter(|h| selector.as_ref().is_none_or(|s| s.matches(&h.labels)))
        .map(|h| {
            Endpoint::new(
                h.name.clone(),
                h.address.clone(),
                h.port.unwrap_or(inv.spec.ssh.port),
            )
        })
        .collect())
}

/// An int-or-percent field: `3`, `"3"` or `"25%"`.
fn amount(field: &'static str, v: &IntOrString) -> Result<Amount, TargetError> {
    let bad = |message: String| TargetError::InvalidField { field, message };
    match v {
        IntOrString::Int(n) => u32::try_from(*n)
            .map(Amount::Count)
            .map_err(|_| bad(format!("{n} is negative"))),
        IntOrString::String(s) => {
            let s = s.trim();
            let (digits, percent) = match s.strip_suffix('%') {
                Some(d) => (d, true),
                None => (s, false),
            };
            let n: u32 = digits
                .parse()
                .map_err(|_| bad(format!("{s:?} is neither an integer nor a percentage")))?;
            if percent && n > 100 {
                return Err(bad(format!("{s:?} is more than 100%")));
            }
            Ok(if percent {
                Amount::Percent(n)
            } else {
                Amount::Count(n)
            })
        }
    }
}

fn stage_spec(field: &'static str, s: &Stage) -> Result<StageSpec, TargetError> {
    let action = match (&s.script, &s.command, &s.job) {
        (Some(script), None, None) => StageAction::Script(script.clone()),
        (None, Some(argv), None) if !argv.is_empty() => StageAction::Command(argv.clone()),
        (None, None, Some(job)) => StageAction::Job(job.template.clone()),
        _ => {
            return Err(TargetError::InvalidField {
                field,
                message: format!(
                    "stage {:?}: exactly one of script, command or job must be set",
                    s.name
                ),
            });
        }
    };
    let timeout = s.timeout.to_std().map_err(|e| TargetError::InvalidField {
        field,
        message: format!("stage {:?}: timeout: {e}", s.name),
    })?;
    Ok(StageSpec {
        name: s.name.clone(),
        action,
        env: s.env.clone(),
        timeout,
        retries: s.retries,
        run_once: s.run_once,
    })
}

/// The engine's view of a plan: durations parsed, int-or-percent fields resolved. Checks
/// that the API server's schema makes redundant are repeated for plans read from files.
pub fn plan_spec(spec: &DeploymentPlanSpec) -> Result<PlanSpec, TargetError> {
    let st = &spec.strategy;
    let batch_size = amount("spec.strategy.batchSize", &st.batch_size)?;
    if matches!(batch_size, Amount::Count(0) | Amount::Percent(0)) {
        return Err(TargetError::InvalidField {
            field: "spec.strategy.batchSize",
            message: "must be at least 1 (or 1%)".into(),
        });
    }
    let stages = spec
        .stages
        .iter()
        .map(|s| stage_spec("spec.stages", s))
        .collect::<Result<Vec<_>, _>>()?;
    if stages.is_empty() {
        return Err(TargetError::InvalidField {
            field: "spec.stages",
            message: "a plan needs at least one stage".into(),
        });
    }
    let rollback = spec
        .rollback
        .iter()
        .map(|s| stage_spec("spec.rollback", s))
        .collect::<Result<Vec<_>, _>>()?;
    for (field, list) in [("spec.stages", &stages), ("spec.rollback", &rollback)] {
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = list.iter().find(|s| !seen.insert(s.name.as_str())) {
            return Err(TargetError::InvalidField {
                field,
                message: format!("stage name {:?} is used twice", dup.name),
            });
        }
    }
    Ok(PlanSpec {
        stages,
        rollback,
        batch_size,
        max_parallel: st.max_parallel.max(1) as usize,
        max_unavailable: amount("spec.strategy.maxUnavailable", &st.max_unavailable)?,
        pause_between_batches: st.pause_between_batches.to_std().map_err(|e| {
            TargetError::InvalidField {
                field: "spec.strategy.pauseBetweenBatches",
                message: e.to_string(),
            }
        })?,
        on_interrupt: match st.on_interrupt {
            dp::OnInterrupt::Rerun => plan::OnInterrupt::Rerun,
            dp::OnInterrupt::Fail => plan::OnInterrupt::Fail,
        },
        ..plan::PlanSpec::new(Vec::new())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn inventory() -> Inventory {
        serde_yaml::from_str(
            r#"
apiVersion: outrider.dev/v1alpha1
kind: Inventory
metadata: {name: fleet}
spec:
  ssh: {user: deploy, port: 2200, secretRef: {name: s}, connectTimeout: 3s,
        jumpHost: {address: 127.0.0.9}, become: {user: root}}
  hosts:
    - {name: a, address: 127.0.10.1, labels: {role: web}}
    - {name: b, address: 127.0.10.2, port: 22, labels: {role: db}}
"#,
        )
        .expect("inventory yaml")
    }

    #[test]
    fn hosts_inherit_the_inventory_port_and_selectors_narrow_them() {
        let inv = inventory();
        let all = endpoints(&inv, None).unwrap();
        assert_eq!(
            all,
            vec![
                Endpoint::new("a", "127.0.10.1", 2200),
                Endpoint::new("b", "127.0.10.2", 22)
            ]
        );
        let web = LabelSelector {
            match_labels: Some(BTreeMap::from([("role".to_string(), "web".to_string())])),
            ..Default::default()
        };
        assert_eq!(
            endpoints(&inv, Some(&web)).unwrap(),
            vec![Endpoint::new("a", "127.0.10.1", 2200)]
        );
    }

    #[test]
    fn jump_host_user_defaults_to_the_inventory_user() {
        let c = client_config(&inventory()).unwrap();
        assert_eq!(c.connect_timeout, std::time::Duration::from_secs(3));
        let j = c.jump_host.expect("jump host");
        assert_eq!(
            (j.address.as_str(), j.port, j.user.as_str()),
            ("127.0.0.9", 22, "deploy")
        );
        assert_eq!(c.become_user.as_deref(), Some("root"));
    }

    #[test]
    fn plan_spec_resolves_int_or_percent_and_durations() {
        let spec: DeploymentPlanSpec = serde_yaml::from_str(
            r#"
targets: {inventoryRef: {name: fleet}}
strategy: {batchSize: 25%, maxParallel: 5, maxUnavailable: "2", pauseBetweenBatches: 1m}
stages:
  - {name: a, script: "true", timeout: 90s, retries: 2}
  - {name: b, command: [echo, hi], env: {X: "1"}}
  - {name: m, runOnce: true, job: {template: {spec: {containers: [{name: m, image: i}]}}}}
rollback:
  - {name: r, script: "true"}
"#,
        )
        .expect("plan yaml");
        let p = plan_spec(&spec).unwrap();
        assert_eq!(p.batch_size, Amount::Percent(25));
        assert_eq!(p.max_unavailable, Amount::Count(2));
        assert_eq!(p.max_parallel, 5);
        assert_eq!(p.pause_between_batches, std::time::Duration::from_secs(60));
        assert_eq!(p.stages[0].timeout, std::time::Duration::from_secs(90));
        assert_eq!(p.stages[0].retries, 2);
        assert_eq!(
            p.stages[1].action,
            StageAction::Command(vec!["echo".into(), "hi".into()])
        );
        assert!(matches!(p.stages[2].action, StageAction::Job(_)) && p.stages[2].run_once);
        assert_eq!(p.rollback.len(), 1);

        let mut bad = spec.clone();
        bad.strategy.max_unavailable = IntOrString::String("150%".into());
        assert!(plan_spec(&bad).is_err());
        bad.strategy.max_unavailable = IntOrString::Int(-1);
        assert!(plan_spec(&bad).is_err());
        let mut bad = spec;
        bad.strategy.batch_size = IntOrString::String("x%".into());
        assert!(plan_spec(&bad).is_err());
    }

    #[test]
    fn material_requires_known_hosts_only_under_strict() {
        let files = BTreeMap::from([
            ("ssh-privatekey", b"KEY".to_vec()),
            ("passphrase", b"pw\n".to_vec()),
        ]);
        let lookup = |k: &str| files.get(k).cloned();
        assert!(matches!(
            ssh_material("s", HostKeyPolicy::Strict, lookup),
            Err(TargetError::Secret(_))
        ));
        let m = ssh_material("s", HostKeyPolicy::AcceptNew, lookup).unwrap();
        assert_eq!(
            (m.private_key.as_str(), m.passphrase.as_deref()),
            ("KEY", Some("pw"))
        );
    }
}
