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
    "70-logpipeline-output-two-sinks",
    "71-logpipeline-regex-without-pattern",
    "72-logpipeline-filter-include-and-exclude",
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
            "LogPipeline",
            json!({"inputs": [i], "outputs": [{"name": "o", "stdout": {}}]}),
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
        // LogPipeline: `pattern` goes with `parser: regex` only.
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
