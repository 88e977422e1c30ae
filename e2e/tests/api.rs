//! The API as the API server serves it: CRDs, examples, and rejection of bad objects.

use crate::support::*;

#[test]
fn every_kind_is_served_with_short_names_and_category() {
    let kc = kubeconfig();
    let out = kubectl(
        &kc,
        &["api-resources", "--api-group=outrider.dev", "-o", "wide"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    for (kind, short) in [
        ("Inventory", "inv"),
        ("DeploymentPlan", "dp"),
        ("HealthCheck", "hc"),
        ("SecurityPolicy", "secpol"),
        ("LogPipeline", "lp"),
        ("ClusterLogPipeline", "clp"),
    ] {
        let line = table
            .lines()
            .find(|l| l.contains(&format!(" {kind} ")))
            .unwrap_or_else(|| panic!("{kind} not served:\n{table}"));
        assert!(
            line.contains(short),
            "{kind} lacks short name {short}: {line}"
        );
        assert!(
            line.contains("outrider"),
            "{kind} lacks category outrider: {line}"
        );
        let namespaced = !kind.starts_with("Cluster");
        assert_eq!(
            line.split_whitespace().any(|w| w == "true"),
            namespaced,
            "{kind} namespaced must be {namespaced}: {line}"
        );
    }
}

#[test]
fn every_example_is_accepted_by_the_api_server() {
    let kc = kubeconfig();
    let ns = namespace("examples");
    let mut files: Vec<_> = std::fs::read_dir(repo().join("examples"))
        .expect("examples/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "expected an example per kind, found {files:?}"
    );
    for f in &files {
        let out = kubectl(
            &kc,
            &[
                "apply",
                "--dry-run=server",
                "-n",
                &ns,
                "-f",
                f.to_str().expect("utf-8 path"),
            ],
        );
        assert!(
            out.status.success(),
            "{} rejected: {}",
            f.display(),
            stderr(&out)
        );
    }
}

#[test]
fn invalid_objects_are_rejected_with_a_message_naming_the_field() {
    let kc = kubeconfig();
    let ns = namespace("invalid");
    let dir = repo().join("e2e/testdata/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("e2e/testdata/invalid")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    assert!(
        files.len() >= 15,
        "need at least 15 invalid objects, found {}",
        files.len()
    );
    let mut kinds = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read invalid object");
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect:"))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{} must start with `# expect: <substring>`", f.display()));
        if let Some(kind) = text.lines().find_map(|l| l.strip_prefix("kind:")) {
            kinds.insert(kind.trim().to_string());
        }
        let out = kubectl_stdin(
            &kc,
            &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
            &text,
        );
        let err = stderr(&out);
        if out.status.success() {
            failures.push(format!(
                "{}: accepted, expected rejection mentioning {expect:?}",
                f.display()
            ));
        } else if !err.contains(expect) {
            failures.push(format!(
                "{}: rejected, but the message does not name {expect:?}:\n  {err}",
                f.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid objects misbehaved:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    assert_eq!(
        kinds.len(),
        6,
        "invalid objects must cover all six kinds, got {kinds:?}"
    );
}

/// A duration field: its JSON pointer in [`with_durations`]'s object, the path and name the
/// API server's message uses, and its bounds.
struct Duration {
    pointer: &'static str,
    path: &'static str,
    name: &'static str,
    min: Option<&'static str>,
    max: &'static str,
}

const fn duration(
    pointer: &'static str,
    path: &'static str,
    name: &'static str,
    min: Option<&'static str>,
    max: &'static str,
) -> Duration {
    Duration {
        pointer,
        path,
        name,
        min,
        max,
    }
}

/// An object of `kind` that sets every duration field, and those fields.
fn with_durations(kind: &str) -> (serde_json::Value, Vec<Duration>) {
    use serde_json::json;
    let targets = json!({"inventoryRef": {"name": "web"}});
    let (spec, fields) = match kind {
        "DeploymentPlan" => (
            json!({"targets": targets, "strategy": {"pauseBetweenBatches": "2s"},
                "stages": [{"name": "a", "script": "true", "timeout": "5m"}],
                "rollback": [{"name": "r", "script": "true", "timeout": "1m"}]}),
            vec![
                duration(
                    "/spec/strategy/pauseBetweenBatches",
                    "spec.strategy.pauseBetweenBatches",
                    "pauseBetweenBatches",
                    None,
                    "24h",
                ),
                duration(
                    "/spec/stages/0/timeout",
                    "spec.stages[0].timeout",
                    "timeout",
                    None,
                    "24h",
                ),
                duration(
                    "/spec/rollback/0/timeout",
                    "spec.rollback[0].timeout",
                    "timeout",
                    None,
                    "24h",
                ),
            ],
        ),
        "HealthCheck" => (
            json!({"interval": "30s", "targets": targets,
                "remediation": {"deploymentPlanRef": {"name": "fix"}, "cooldown": "15m"},
                "checks": [{"name": "mem", "memory": {"maxUsedPercent": 90}, "timeout": "10s"}],
                "endpoints": [
                    {"name": "api", "http": {"url": "http://api/healthz", "maxLatency": "300ms"},
                        "timeout": "2s"},
                    {"name": "cert", "tls": {"address": "api:443", "minValidFor": "336h"}}]}),
            vec![
                duration(
                    "/spec/interval",
                    "spec.interval",
                    "interval",
                    Some("5s"),
                    "24h",
                ),
                duration(
                    "/spec/checks/0/timeout",
                    "spec.checks[0].timeout",
                    "timeout",
                    None,
                    "5m",
                ),
                duration(
                    "/spec/endpoints/0/timeout",
                    "spec.endpoints[0].timeout",
                    "timeout",
                    None,
                    "5m",
                ),
                duration(
                    "/spec/endpoints/0/http/maxLatency",
                    "spec.endpoints[0].http.maxLatency",
                    "maxLatency",
                    None,
                    "5m",
                ),
                duration(
                    "/spec/endpoints/1/tls/minValidFor",
                    "spec.endpoints[1].tls.minValidFor",
                    "minValidFor",
                    None,
                    "8760h",
                ),
                duration(
                    "/spec/remediation/cooldown",
                    "spec.remediation.cooldown",
                    "cooldown",
                    None,
                    "24h",
                ),
            ],
        ),
        "Inventory" => (
            json!({"ssh": {"user": "deploy", "secretRef": {"name": "s"}, "connectTimeout": "5s"},
                "probe": {"interval": "30s"},
                "hosts": [{"name": "web-1", "address": "192.0.2.11"}]}),
            vec![
                duration(
                    "/spec/probe/interval",
                    "spec.probe.interval",
                    "interval",
                    Some("1s"),
                    "24h",
                ),
                duration(
                    "/spec/ssh/connectTimeout",
                    "spec.ssh.connectTimeout",
                    "connectTimeout",
                    None,
                    "5m",
                ),
            ],
        ),
        "LogPipeline" => (
            json!({"pods": {"selector": {}},
                "multiline": {"startPattern": "^\\S", "flushTimeout": "2s"},
                "outputs": [{"name": "o", "http": {"url": "https://rx"}}],
                "delivery": {"batch": {"maxWait": "1s"}}}),
            vec![
                duration(
                    "/spec/multiline/flushTimeout",
                    "spec.multiline.flushTimeout",
                    "flushTimeout",
                    None,
                    "5m",
                ),
                duration(
                    "/spec/delivery/batch/maxWait",
                    "spec.delivery.batch.maxWait",
                    "maxWait",
                    None,
                    "5m",
                ),
            ],
        ),
        "ClusterLogPipeline" => (
            json!({"inputs": [{"name": "app", "paths": ["/var/log/a.log"],
                    "multiline": {"startPattern": "^\\S", "flushTimeout": "2s"}}],
                "outputs": [{"name": "o", "stdout": {}}],
                "delivery": {"batch": {"maxWait": "1s"}}}),
            vec![
                duration(
                    "/spec/inputs/0/multiline/flushTimeout",
                    "spec.inputs[0].multiline.flushTimeout",
                    "flushTimeout",
                    None,
                    "5m",
                ),
                duration(
                    "/spec/delivery/batch/maxWait",
                    "spec.delivery.batch.maxWait",
                    "maxWait",
                    None,
                    "5m",
                ),
            ],
        ),
        "SecurityPolicy" => (
            json!({"targets": targets, "defaultInput": "drop", "failsafe": {"ports": [22]},
                "apply": {"confirmTimeout": "30s"}, "driftCheckInterval": "1m"}),
            vec![
                duration(
                    "/spec/apply/confirmTimeout",
                    "spec.apply.confirmTimeout",
                    "confirmTimeout",
                    Some("3s"),
                    "1h",
                ),
                duration(
                    "/spec/driftCheckInterval",
                    "spec.driftCheckInterval",
                    "driftCheckInterval",
                    Some("10s"),
                    "24h",
                ),
            ],
        ),
        other => panic!("no duration fields listed for {other}"),
    };
    let object = json!({"apiVersion": "outrider.dev/v1alpha1", "kind": kind,
        "metadata": {"name": "durations"}, "spec": spec});
    (object, fields)
}

/// `object` with each field set to `value(field)`.
fn set(
    object: &serde_json::Value,
    fields: &[&Duration],
    value: impl Fn(&Duration) -> String,
) -> serde_json::Value {
    let mut changed = object.clone();
    for f in fields {
        *changed.pointer_mut(f.pointer).expect("field in object") = value(f).into();
    }
    changed
}

/// `kubectl apply --dry-run=server` of `object`: the API server's error, if any.
fn dry_run(ns: &str, object: &serde_json::Value) -> Result<(), String> {
    let out = kubectl_stdin(
        &kubeconfig(),
        &["apply", "--dry-run=server", "-n", ns, "-f", "-"],
        &object.to_string(),
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(stderr(&out))
    }
}

/// Every duration field of `kind` set to `value(field)` at once: the API server rejects the
/// object with `<path>: Invalid value: "<value>": <name> must be at most <max>` for each
/// field, from the rule itself (no rule evaluation error).
fn assert_every_duration_rejected_at_most(kind: &str, value: impl Fn(&Duration) -> String) {
    let ns = namespace("durations");
    let (object, fields) = with_durations(kind);
    dry_run(&ns, &object).unwrap_or_else(|e| panic!("{kind} within bounds rejected: {e}"));
    let all: Vec<&Duration> = fields.iter().collect();
    let err = dry_run(&ns, &set(&object, &all, &value))
        .expect_err(&format!("{kind} with every duration too long was accepted"));
    for f in &fields {
        let expect = format!(
            "{}: Invalid value: \"{}\": {} must be at most {}",
            f.path,
            value(f),
            f.name,
            f.max
        );
        assert!(err.contains(&expect), "{kind}: no {expect:?} in:\n{err}");
    }
    assert!(!err.contains("evaluating rule"), "{kind}: {err}");
}

/// Too large for Go's `time.Duration`, which the API server's CEL `duration()` parses
/// into, yet schema-valid: pattern and 17 of the 32 characters allowed.
const OVERFLOW: &str = "9999999999999999h";

#[test]
fn deployment_plan_durations_of_9999999999999999h_are_rejected_naming_the_field() {
    assert_every_duration_rejected_at_most("DeploymentPlan", |_| OVERFLOW.into());
}

#[test]
fn health_check_durations_of_9999999999999999h_are_rejected_naming_the_field() {
    assert_every_duration_rejected_at_most("HealthCheck", |_| OVERFLOW.into());
}

#[test]
fn inventory_durations_of_9999999999999999h_are_rejected_naming_the_field() {
    assert_every_duration_rejected_at_most("Inventory", |_| OVERFLOW.into());
}

#[test]
fn log_pipeline_durations_of_9999999999999999h_are_rejected_naming_the_field() {
    assert_every_duration_rejected_at_most("LogPipeline", |_| OVERFLOW.into());
    assert_every_duration_rejected_at_most("ClusterLogPipeline", |_| OVERFLOW.into());
}

#[test]
fn security_policy_durations_of_9999999999999999h_are_rejected_naming_the_field() {
    assert_every_duration_rejected_at_most("SecurityPolicy", |_| OVERFLOW.into());
}

/// One millisecond over the maximum: `24h1ms`.
fn just_over(f: &Duration) -> String {
    format!("{}1ms", f.max)
}

#[test]
fn deployment_plan_durations_over_their_maximum_are_rejected_naming_the_field_and_the_maximum() {
    assert_every_duration_rejected_at_most("DeploymentPlan", just_over);
}

#[test]
fn health_check_durations_over_their_maximum_are_rejected_naming_the_field_and_the_maximum() {
    assert_every_duration_rejected_at_most("HealthCheck", just_over);
}

#[test]
fn inventory_durations_over_their_maximum_are_rejected_naming_the_field_and_the_maximum() {
    assert_every_duration_rejected_at_most("Inventory", just_over);
}

#[test]
fn log_pipeline_durations_over_their_maximum_are_rejected_naming_the_field_and_the_maximum() {
    assert_every_duration_rejected_at_most("LogPipeline", just_over);
    assert_every_duration_rejected_at_most("ClusterLogPipeline", just_over);
}

#[test]
fn security_policy_durations_over_their_maximum_are_rejected_naming_the_field_and_the_maximum() {
    assert_every_duration_rejected_at_most("SecurityPolicy", just_over);
}

#[test]
fn durations_at_their_bounds_and_in_every_go_form_are_accepted_and_under_a_minimum_rejected() {
    let ns = namespace("durations");
    for kind in [
        "DeploymentPlan",
        "HealthCheck",
        "Inventory",
        "LogPipeline",
        "ClusterLogPipeline",
        "SecurityPolicy",
    ] {
        let (object, fields) = with_durations(kind);
        let all: Vec<&Duration> = fields.iter().collect();
        dry_run(&ns, &set(&object, &all, |f| f.max.into()))
            .unwrap_or_else(|e| panic!("{kind} at every maximum rejected: {e}"));
        dry_run(&ns, &set(&object, &all, |f| f.min.unwrap_or("0s").into()))
            .unwrap_or_else(|e| panic!("{kind} at every minimum rejected: {e}"));
        let with_min: Vec<&Duration> = fields.iter().filter(|f| f.min.is_some()).collect();
        if with_min.is_empty() {
            continue;
        }
        // a minimum in seconds, one millisecond less: `5s` -> `4999ms`
        let under = |f: &Duration| {
            let secs: u64 = f.min.unwrap().trim_end_matches('s').parse().unwrap();
            format!("{}ms", secs * 1000 - 1)
        };
        let err = dry_run(&ns, &set(&object, &with_min, under))
            .expect_err(&format!("{kind} under every minimum was accepted"));
        for f in &with_min {
            let expect = format!(
                "{}: Invalid value: \"{}\": {} must be at least {}",
                f.path,
                under(f),
                f.name,
                f.min.unwrap()
            );
            assert!(err.contains(&expect), "{kind}: no {expect:?} in:\n{err}");
        }
    }
    // what Go's time.ParseDuration (the API server's `duration()`) must accept of the
    // pattern: fractions, several parts, milliseconds, leading zeros, long fractions
    let (object, fields) = with_durations("DeploymentPlan");
    let timeout = fields
        .iter()
        .find(|f| f.path == "spec.stages[0].timeout")
        .unwrap();
    for form in [
        "1.5s",
        "1h30m",
        "300ms",
        "0.5h",
        "1h0m0.5s",
        "0000000000000000000000000024h",
        "23h59m59.999999999999999999s",
    ] {
        dry_run(&ns, &set(&object, &[timeout], |_| form.into()))
            .unwrap_or_else(|e| panic!("timeout: {form} rejected: {e}"));
    }
}
