//! The CEL rules evaluated client-side with kube's CEL interpreter (`kube/cel`, a
//! dev-dependency): the same schema the API server gets, no cluster needed.

use std::path::{Path, PathBuf};

use kube::core::cel::{ErrorKind, Validator, compile_schema};
use serde_json::{Value, json};

use super::*;

fn schema_for(kind: &str) -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap();
    let version = &crd.spec.versions[0];
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

/// `field: message` of every CEL failure of `object` (defaults applied first, as the
/// API server does).
///
/// kube-cel 0.8 cannot evaluate `type(self)`, which the IntOrString rules
/// (`batchSize`, `maxUnavailable`) need; those are left to the API server (the e2e
/// suite covers them) and ignored here, and only them.
fn cel_errors(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap();
    let Err(errors) = Validator::new().validate(&schema_for(kind), object, None) else {
        return Vec::new();
    };
    let mut failures = Vec::new();
    for e in errors.iter() {
        if e.kind == ErrorKind::UnsupportedReference {
            assert!(
                e.rule.contains("type(self)"),
                "kube-cel cannot evaluate {:?}: {}",
                e.rule,
                e.message
            );
            continue;
        }
        failures.push(format!("{}: {}", e.field_path, e.message));
    }
    failures
}

fn files(rel: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
    files.sort();
    files
}

#[test]
fn every_cel_rule_compiles() {
    for crd in crds() {
        let compiled = compile_schema(&schema_for(&crd.spec.names.kind));
        let errors: Vec<String> = compiled
            .compilation_errors()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        assert!(
            errors.is_empty(),
            "{}: {}",
            crd.spec.names.kind,
            errors.join("\n")
        );
    }
}

#[test]
fn examples_pass_every_cel_rule() {
    for path in files("examples") {
        let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if doc["kind"] == "Secret" {
            continue;
        }
        assert_eq!(cel_errors(&doc), Vec::<String>::new(), "{}", path.display());
    }
}

/// Invalid objects whose rejection comes from a CEL rule (the others fail on types,
/// enums, patterns, bounds or list-map keys, which this interpreter does not check).
const CEL_REJECTED: &[&str] = &[
    "12-deploymentplan-script-and-command",
    "13-deploymentplan-stage-without-action",
    "15-deploymentplan-healthcheckref",
    "23-deploymentplan-bad-env-name",
    "30-healthcheck-two-probe-kinds",
    "31-healthcheck-success-above-failure",
    "33-healthcheck-endpoint-two-kinds",
    "36-healthcheck-exec-command-and-script",
    "38-healthcheck-checks-without-targets",
    "42-healthcheck-interval-too-short",
    "43-healthcheck-maintenance-end-before-start",
    "44-healthcheck-process-name-and-pidfile",
    "50-securitypolicy-unknown-zone",
    "57-securitypolicy-ports-without-tcp-udp",
    "70-clusterlogpipeline-output-two-sinks",
    "71-clusterlogpipeline-regex-without-pattern",
    "72-clusterlogpipeline-filter-include-and-exclude",
];

#[test]
fn cel_rules_reject_the_invalid_objects_at_the_expected_field() {
    for name in CEL_REJECTED {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("e2e/testdata/invalid/{name}.yaml"));
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap();
        // The API server prints `<path>: Invalid value: ...`; kube-cel prints `<path>: ...`.
        let field = expect.split(": ").next().unwrap();
        let doc: Value = serde_yaml::from_str(&text).unwrap();
        let errors = cel_errors(&doc);
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{field}: "))),
            "{name}: expected a CEL failure at {field}, got {errors:?}"
        );
    }
}

fn object(kind: &str, spec: Value) -> Value {
    json!({"apiVersion": "outrider.dev/v1alpha1", "kind": kind, "metadata": {"name": "x"}, "spec": spec})
}

#[test]
fn cross_field_rules_accept_and_reject_the_edge_cases() {
    let targets = json!({"inventoryRef": {"name": "web"}});
    let failsafe = json!({"ports": [22]});
    let tcp = json!([{"name": "db", "tcp": {"address": "db:5432"}}]);
    let input = |extra: Value| {
        let mut i = json!({"name": "app", "paths": ["/var/log/a.log"]});
        i.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        object(
            "ClusterLogPipeline",
            json!({"inputs": [i], "outputs": [{"name": "o", "stdout": {}}]}),
        )
    };
    let tenant = |output: Value| {
        object(
            "LogPipeline",
            json!({"pods": {"selector": {"matchLabels": {"app": "shop"}}}, "outputs": [output]}),
        )
    };
    let cases: Vec<(Value, Option<&str>)> = vec![
        // SecurityPolicy: `from` must name a zone; rules without `from` need no zones.
        (
            object(
                "SecurityPolicy",
                json!({"targets": targets, "defaultInput": "drop", "failsafe": failsafe,
            "rules": [{"name": "any", "action": "allow", "protocol": "tcp", "ports": [443]}]}),
            ),
            None,
        ),
        (
            object(
                "SecurityPolicy",
                json!({"targets": targets, "defaultInput": "drop", "failsafe": failsafe,
            "rules": [{"name": "r", "action": "allow", "from": "trust"}]}),
            ),
            Some("spec.rules"),
        ),
        (
            object(
                "SecurityPolicy",
                json!({"targets": targets, "defaultInput": "drop", "failsafe": failsafe,
            "zones": {"Trust": ["198.51.100.0/24"]}}),
            ),
            Some("spec.zones"),
        ),
        // HealthCheck: endpoints alone need no targets; interval has a floor of 5s.
        (object("HealthCheck", json!({"endpoints": tcp})), None),
        (
            object("HealthCheck", json!({"endpoints": tcp, "interval": "5s"})),
            None,
        ),
        (
            object(
                "HealthCheck",
                json!({"endpoints": tcp, "interval": "4999ms"}),
            ),
            Some("spec.interval"),
        ),
        (object("HealthCheck", json!({})), Some("spec: ")),
        (
            object(
                "HealthCheck",
                json!({"endpoints": tcp, "failureThreshold": 2, "successThreshold": 2}),
            ),
            None,
        ),
        // LogPipeline: one sink per output, Secrets of its own namespace only.
        (
            tenant(json!({"name": "o", "http": {"url": "https://rx", "secretRef": {"name": "c"}}})),
            None,
        ),
        (
            tenant(
                json!({"name": "o", "http": {"url": "https://rx", "secretRef": {"name": "c", "namespace": "kube-system"}}}),
            ),
            Some("spec.outputs[0]"),
        ),
        (
            tenant(json!({"name": "o", "file": {"path": "/var/log/x"}})),
            Some("spec.outputs[0]"),
        ),
        (
            object(
                "LogPipeline",
                json!({"pods": {"selector": {}}, "parser": "json", "pattern": "(?P<m>.*)",
                    "outputs": [{"name": "o", "http": {"url": "https://rx"}}]}),
            ),
            Some("spec.pattern"),
        ),
        // ClusterLogPipeline: `pattern` goes with `parser: regex` only.
        (
            input(json!({"parser": "regex", "pattern": "(?P<msg>.*)"})),
            None,
        ),
        (
            input(json!({"parser": "json", "pattern": "(?P<msg>.*)"})),
            Some("spec.inputs[0].pattern"),
        ),
        (input(json!({"parser": "cri"})), None),
        // DeploymentPlan: env names are shell-safe identifiers.
        (
            object(
                "DeploymentPlan",
                json!({"targets": targets,
            "stages": [{"name": "a", "script": "true", "env": {"A_1": "x", "_B": "y"}}]}),
            ),
            None,
        ),
        (
            object(
                "DeploymentPlan",
                json!({"targets": targets,
            "stages": [{"name": "a", "script": "true", "env": {"1A": "x"}}]}),
            ),
            Some("spec.stages[0].env"),
        ),
        (
            object(
                "DeploymentPlan",
                json!({"targets": targets,
            "stages": [{"name": "a", "job": {"template": {"spec": {"containers": [{"name": "m", "image": "i"}]}}}}]}),
            ),
            None,
        ),
    ];
    for (object, expect) in cases {
        let errors = cel_errors(&object);
        match expect {
            None => assert_eq!(errors, Vec::<String>::new(), "{object}"),
            Some(field) => assert!(
                errors.len() == 1 && errors[0].starts_with(field),
                "{object}: expected one failure at {field}, got {errors:?}"
            ),
        }
    }
}

/// A duration field: where it is in an object, the path the API server names, the name
/// its messages use, and its bounds.
struct Bounded {
    pointer: &'static str,
    path: &'static str,
    name: &'static str,
    min: Option<&'static str>,
    max: &'static str,
}

const fn bounded(
    pointer: &'static str,
    path: &'static str,
    name: &'static str,
    min: Option<&'static str>,
    max: &'static str,
) -> Bounded {
    Bounded {
        pointer,
        path,
        name,
        min,
        max,
    }
}

/// `object` with `value` at `pointer`.
fn with(object: &Value, pointer: &str, value: &str) -> Value {
    let mut changed = object.clone();
    *changed
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer} not in {object}")) = json!(value);
    changed
}

/// One millisecond less than `d`, e.g. `5s` -> `4999ms`.
fn just_under(d: &str) -> String {
    format!("{}ms", common::parse_duration(d).unwrap().as_millis() - 1)
}

/// For every duration field of `object` (which sets each of them): the largest value and
/// the smallest pass; one millisecond past either bound, and `9999999999999999h` (too large
/// for Go's duration, which the API server's `duration()` parses into), fail with exactly
/// one error naming the field and the bound. `minimal` (no duration field set) passes with
/// the defaults.
fn assert_duration_bounds(minimal: Value, object: Value, fields: &[Bounded]) {
    assert_eq!(cel_errors(&minimal), Vec::<String>::new(), "defaults");
    assert_eq!(cel_errors(&object), Vec::<String>::new(), "{object}");
    for f in fields {
        let at_most = format!("{}: {} must be at most {}", f.path, f.name, f.max);
        for too_long in ["9999999999999999h".to_string(), format!("{}1ms", f.max)] {
            assert_eq!(
                cel_errors(&with(&object, f.pointer, &too_long)),
                std::slice::from_ref(&at_most),
                "{} = {too_long}",
                f.path
            );
        }
        assert_eq!(
            cel_errors(&with(&object, f.pointer, f.max)),
            Vec::<String>::new(),
            "{} = {}",
            f.path,
            f.max
        );
        let Some(min) = f.min else {
            assert_eq!(
                cel_errors(&with(&object, f.pointer, "0s")),
                Vec::<String>::new(),
                "{} = 0s",
                f.path
            );
            continue;
        };
        assert_eq!(
            cel_errors(&with(&object, f.pointer, min)),
            Vec::<String>::new(),
            "{} = {min}",
            f.path
        );
        assert_eq!(
            cel_errors(&with(&object, f.pointer, &just_under(min))),
            [format!("{}: {} must be at least {min}", f.path, f.name)],
            "{} = {}",
            f.path,
            just_under(min)
        );
    }
}

#[test]
fn deployment_plan_durations_past_their_bounds_or_overflowing_are_rejected_at_the_field() {
    let targets = json!({"inventoryRef": {"name": "web"}});
    assert_duration_bounds(
        object(
            "DeploymentPlan",
            json!({"targets": targets, "stages": [{"name": "a", "script": "true"}],
                "rollback": [{"name": "r", "script": "true"}]}),
        ),
        object(
            "DeploymentPlan",
            json!({"targets": targets, "strategy": {"pauseBetweenBatches": "2s"},
                "stages": [{"name": "a", "script": "true", "timeout": "5m"}],
                "rollback": [{"name": "r", "script": "true", "timeout": "1m"}]}),
        ),
        &[
            bounded(
                "/spec/strategy/pauseBetweenBatches",
                "spec.strategy.pauseBetweenBatches",
                "pauseBetweenBatches",
                None,
                "24h",
            ),
            bounded(
                "/spec/stages/0/timeout",
                "spec.stages[0].timeout",
                "timeout",
                None,
                "24h",
            ),
            bounded(
                "/spec/rollback/0/timeout",
                "spec.rollback[0].timeout",
                "timeout",
                None,
                "24h",
            ),
        ],
    );
}

#[test]
fn health_check_durations_past_their_bounds_or_overflowing_are_rejected_at_the_field() {
    let targets = json!({"inventoryRef": {"name": "web"}});
    let remediation = json!({"deploymentPlanRef": {"name": "fix"}});
    assert_duration_bounds(
        object(
            "HealthCheck",
            json!({"targets": targets, "remediation": remediation,
                "checks": [{"name": "mem", "memory": {"maxUsedPercent": 90}}],
                "endpoints": [{"name": "api", "http": {"url": "http://api/healthz"}},
                    {"name": "cert", "tls": {"address": "api:443"}}]}),
        ),
        object(
            "HealthCheck",
            json!({"interval": "30s", "targets": targets,
                "remediation": {"deploymentPlanRef": {"name": "fix"}, "cooldown": "15m"},
                "checks": [{"name": "mem", "memory": {"maxUsedPercent": 90}, "timeout": "10s"}],
                "endpoints": [
                    {"name": "api", "http": {"url": "http://api/healthz", "maxLatency": "300ms"},
                        "timeout": "2s"},
                    {"name": "cert", "tls": {"address": "api:443", "minValidFor": "336h"}}]}),
        ),
        &[
            bounded(
                "/spec/interval",
                "spec.interval",
                "interval",
                Some("5s"),
                "24h",
            ),
            bounded(
                "/spec/checks/0/timeout",
                "spec.checks[0].timeout",
                "timeout",
                None,
                "5m",
            ),
            bounded(
                "/spec/endpoints/0/timeout",
                "spec.endpoints[0].timeout",
                "timeout",
                None,
                "5m",
            ),
            bounded(
                "/spec/endpoints/0/http/maxLatency",
                "spec.endpoints[0].http.maxLatency",
                "maxLatency",
                None,
                "5m",
            ),
            bounded(
                "/spec/endpoints/1/tls/minValidFor",
                "spec.endpoints[1].tls.minValidFor",
                "minValidFor",
                None,
                "8760h",
            ),
            bounded(
                "/spec/remediation/cooldown",
                "spec.remediation.cooldown",
                "cooldown",
                None,
                "24h",
            ),
        ],
    );
}

#[test]
fn inventory_durations_past_their_bounds_or_overflowing_are_rejected_at_the_field() {
    let hosts = json!([{"name": "web-1", "address": "192.0.2.11"}]);
    assert_duration_bounds(
        object(
            "Inventory",
            json!({"ssh": {"user": "deploy", "secretRef": {"name": "s"}}, "hosts": hosts}),
        ),
        object(
            "Inventory",
            json!({"ssh": {"user": "deploy", "secretRef": {"name": "s"}, "connectTimeout": "5s"},
                "probe": {"interval": "30s"}, "hosts": hosts}),
        ),
        &[
            bounded(
                "/spec/probe/interval",
                "spec.probe.interval",
                "interval",
                Some("1s"),
                "24h",
            ),
            bounded(
                "/spec/ssh/connectTimeout",
                "spec.ssh.connectTimeout",
                "connectTimeout",
                None,
                "5m",
            ),
        ],
    );
}

#[test]
fn log_pipeline_durations_past_their_bounds_or_overflowing_are_rejected_at_the_field() {
    let outputs = json!([{"name": "o", "http": {"url": "https://rx"}}]);
    let pods = json!({"selector": {}});
    assert_duration_bounds(
        object(
            "LogPipeline",
            json!({"pods": pods, "multiline": {"startPattern": "^\\S"}, "outputs": outputs}),
        ),
        object(
            "LogPipeline",
            json!({"pods": pods, "multiline": {"startPattern": "^\\S", "flushTimeout": "2s"},
                "outputs": outputs, "delivery": {"batch": {"maxWait": "1s"}}}),
        ),
        &[
            bounded(
                "/spec/multiline/flushTimeout",
                "spec.multiline.flushTimeout",
                "flushTimeout",
                None,
                "5m",
            ),
            bounded(
                "/spec/delivery/batch/maxWait",
                "spec.delivery.batch.maxWait",
                "maxWait",
                None,
                "5m",
            ),
        ],
    );
    let outputs = json!([{"name": "o", "stdout": {}}]);
    assert_duration_bounds(
        object(
            "ClusterLogPipeline",
            json!({"inputs": [{"name": "app", "paths": ["/var/log/a.log"],
                "multiline": {"startPattern": "^\\S"}}], "outputs": outputs}),
        ),
        object(
            "ClusterLogPipeline",
            json!({"inputs": [{"name": "app", "paths": ["/var/log/a.log"],
                    "multiline": {"startPattern": "^\\S", "flushTimeout": "2s"}}],
                "outputs": outputs, "delivery": {"batch": {"maxWait": "1s"}}}),
        ),
        &[
            bounded(
                "/spec/inputs/0/multiline/flushTimeout",
                "spec.inputs[0].multiline.flushTimeout",
                "flushTimeout",
                None,
                "5m",
            ),
            bounded(
                "/spec/delivery/batch/maxWait",
                "spec.delivery.batch.maxWait",
                "maxWait",
                None,
                "5m",
            ),
        ],
    );
}

#[test]
fn security_policy_durations_past_their_bounds_or_overflowing_are_rejected_at_the_field() {
    let spec = json!({"targets": {"inventoryRef": {"name": "web"}}, "defaultInput": "drop",
        "failsafe": {"ports": [22]}});
    let mut full = spec.clone();
    full["apply"] = json!({"confirmTimeout": "30s"});
    full["driftCheckInterval"] = json!("1m");
    assert_duration_bounds(
        object("SecurityPolicy", spec),
        object("SecurityPolicy", full),
        &[
            bounded(
                "/spec/apply/confirmTimeout",
                "spec.apply.confirmTimeout",
                "confirmTimeout",
                Some("3s"),
                "1h",
            ),
            bounded(
                "/spec/driftCheckInterval",
                "spec.driftCheckInterval",
                "driftCheckInterval",
                Some("10s"),
                "24h",
            ),
        ],
    );
}

#[test]
fn replace_roots_needs_a_secret_ref_on_every_http_based_output() {
    let pipeline = |kind: &str, sink: Value| {
        object(
            "LogPipeline",
            json!({"inputs": [{"name": "app", "paths": ["/var/log/a.log"]}],
                   "outputs": [{"name": "o", kind: sink}]}),
        )
    };
    for (kind, base) in [
        ("loki", json!({"url": "https://loki:3100"})),
        (
            "elasticsearch",
            json!({"url": "https://es:9200", "index": "logs"}),
        ),
        ("http", json!({"url": "https://rx/ingest"})),
    ] {
        let with = |extra: Value| {
            let mut s = base.clone();
            s.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            pipeline(kind, s)
        };
        let field = format!("spec.outputs[0].{kind}.tls.replaceRoots");
        let errors = cel_errors(&with(json!({"tls": {"replaceRoots": true}})));
        assert!(
            errors.len() == 1 && errors[0].starts_with(&format!("{field}: ")),
            "{kind}: expected one failure at {field}, got {errors:?}"
        );
        for ok in [
            json!({"tls": {"replaceRoots": true}, "secretRef": {"name": "ca"}}),
            json!({"tls": {"replaceRoots": false}}),
            json!({"tls": {}}),
            json!({}),
        ] {
            assert_eq!(
                cel_errors(&with(ok.clone())),
                Vec::<String>::new(),
                "{kind}: {ok}"
            );
        }
    }
}
