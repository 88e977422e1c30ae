//! DeploymentPlan → the engine's [`PlanSpec`], and the plan's run identity.
//!
//! A run is identified by a key over what the user wrote: the stored spec as a key-sorted
//! JSON value without `paused`, hashed with a version prefix, plus the `outrider.dev/rerun`
//! annotation. Hashing the *stored* value (not the re-serialised typed spec) keeps the key
//! stable when a later Outrider adds a defaulted field or reorders a struct, so finished
//! plans never run again on their whole fleet after an upgrade.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use super::ResolveError;
use crate::api::deployment_plan::{self as dp, DeploymentPlanSpec, Stage};
use crate::engine::plan::{self, Amount, PlanSpec, StageAction, StageSpec};

/// Version of the run-key scheme; part of every key.
pub const RUN_KEY_VERSION: &str = "k2";

/// The run key of a plan: [`RUN_KEY_VERSION`], the SHA-256 of the canonical stored spec
/// without `paused` (first 128 bits, hex), and the hash of the rerun annotation if set.
pub fn run_key(stored_spec: &serde_json::Value, rerun: Option<&str>) -> String {
    let mut spec = stored_spec.clone();
    if let Some(map) = spec.as_object_mut() {
        map.remove("paused");
    }
    let mut canonical = String::new();
    crate::text::canonical_json(&spec, &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    match rerun {
        Some(v) => format!("{RUN_KEY_VERSION}-{hex}/{}", fnv(v.as_bytes())),
        None => format!("{RUN_KEY_VERSION}-{hex}"),
    }
}

/// The key Outrider ≤ 0.1 computed (FNV-1a of the re-serialised typed spec): only to
/// recognise a run recorded by that version after an upgrade, never for new runs.
pub fn legacy_run_key(spec: &DeploymentPlanSpec, rerun: Option<&str>) -> String {
    let mut spec = spec.clone();
    spec.paused = false;
    let json = serde_json::to_vec(&spec).unwrap_or_default();
    match rerun {
        Some(v) => format!("{}/{}", fnv(&json), fnv(v.as_bytes())),
        None => fnv(&json),
    }
}

/// FNV-1a, stable across builds and platforms (unlike `DefaultHasher`).
pub fn fnv(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// An int-or-percent field: `3`, `"3"` or `"25%"`.
pub(crate) fn amount(field: &'static str, v: &IntOrString) -> Result<Amount, ResolveError> {
    let bad = |message: String| ResolveError::InvalidField { field, message };
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

fn stage_spec(field: &'static str, s: &Stage) -> Result<StageSpec, ResolveError> {
    let action = match (&s.script, &s.command, &s.job) {
        (Some(script), None, None) => StageAction::Script(script.clone()),
        (None, Some(argv), None) if !argv.is_empty() => StageAction::Command(argv.clone()),
        (None, None, Some(job)) => StageAction::Job(job.template.clone()),
        _ => {
            return Err(ResolveError::InvalidField {
                field,
                message: format!(
                    "stage {:?}: exactly one of script, command or job must be set",
                    s.name
                ),
            });
        }
    };
    let timeout = s.timeout.to_std().map_err(|e| ResolveError::InvalidField {
        field,
        message: format!("stage {:?}: timeout: {e}", s.name),
    })?;
    Ok(StageSpec {
        name: s.name.clone(),
        action,
        env: s.env.clone(),
        secret_env: s
            .secret_env
            .iter()
            .map(|v| crate::engine::plan::SecretEnv {
                name: v.name.clone(),
                secret: v.secret_key_ref.name.clone(),
                key: v.secret_key_ref.key.clone(),
                value: None,
            })
            .collect(),
        timeout,
        retries: s.retries,
        run_once: s.run_once,
    })
}

/// The engine's view of a plan: durations parsed, int-or-percent fields resolved. Checks
/// that the API server's schema makes redundant are repeated for plans read from files.
pub fn plan_spec(spec: &DeploymentPlanSpec) -> Result<PlanSpec, ResolveError> {
    let st = &spec.strategy;
    let batch_size = amount("spec.strategy.batchSize", &st.batch_size)?;
    if matches!(batch_size, Amount::Count(0) | Amount::Percent(0)) {
        return Err(ResolveError::InvalidField {
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
        return Err(ResolveError::InvalidField {
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
            return Err(ResolveError::InvalidField {
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
            ResolveError::InvalidField {
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

    const FIXTURE: &str = r#"
targets: {inventoryRef: {name: web-fleet}, selector: {matchLabels: {role: web}}}
strategy: {batchSize: 25%, maxParallel: 50, maxUnavailable: 10%}
stages:
  - {name: pre-check, script: "test -d /opt/shop", timeout: 60s}
  - {name: rollout, command: ["/opt/shop/bin/deploy", "--version", "42"], env: {RELEASE: "42"}, retries: 2}
rollback:
  - {name: restore, command: ["/opt/shop/bin/deploy", "--version", "41"]}
paused: false
"#;

    fn stored(yaml: &str) -> serde_json::Value {
        serde_yaml::from_str(yaml).expect("yaml")
    }

    /// The key of this fixture is part of Outrider's contract with every plan already
    /// applied: if this value changes, every finished plan runs again after an upgrade.
    #[test]
    fn run_key_of_the_fixture_plan_is_pinned() {
        assert_eq!(
            run_key(&stored(FIXTURE), None),
            "k2-1600b87d8d2866fa3b1c5c25cd2295f9"
        );
        assert_eq!(
            run_key(&stored(FIXTURE), Some("again")),
            format!("k2-1600b87d8d2866fa3b1c5c25cd2295f9/{}", fnv(b"again"))
        );
    }

    #[test]
    fn run_key_ignores_paused_and_key_order_but_sees_every_edit() {
        let base = run_key(&stored(FIXTURE), None);
        let paused = stored(&FIXTURE.replace("paused: false", "paused: true"));
        assert_eq!(run_key(&paused, None), base);
        let reordered = stored(
            "{paused: false, rollback: [{command: [/opt/shop/bin/deploy, --version, \"41\"], name: restore}], \
             stages: [{timeout: 60s, name: pre-check, script: \"test -d /opt/shop\"}, \
             {retries: 2, env: {RELEASE: \"42\"}, command: [/opt/shop/bin/deploy, --version, \"42\"], name: rollout}], \
             strategy: {maxUnavailable: 10%, maxParallel: 50, batchSize: 25%}, \
             targets: {selector: {matchLabels: {role: web}}, inventoryRef: {name: web-fleet}}}",
        );
        assert_eq!(run_key(&reordered, None), base);
        let edited = stored(&FIXTURE.replace("\"42\"]", "\"43\"]"));
        assert_ne!(run_key(&edited, None), base);
        assert_ne!(run_key(&stored(FIXTURE), Some("x")), base);
    }

    /// What users wrote decides the key: a field the typed spec would add with its default
    /// (as a newer Outrider might) does not appear in the stored value, so the key holds.
    #[test]
    fn run_key_does_not_depend_on_the_typed_re_serialisation() {
        let typed: DeploymentPlanSpec = serde_yaml::from_str(FIXTURE).expect("spec");
        let reserialised = serde_json::to_value(&typed).expect("json");
        assert_ne!(
            reserialised,
            stored(FIXTURE),
            "the typed form adds defaults"
        );
        assert_ne!(
            run_key(&reserialised, None),
            run_key(&stored(FIXTURE), None)
        );
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
}
