//! Schema-level tests of the CRDs: examples parse, statuses decode, the schema is
//! structural and carries the cross-field rules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::*;

const KINDS: [&str; 6] = [
    "Inventory",
    "DeploymentPlan",
    "HealthCheck",
    "SecurityPolicy",
    "LogPipeline",
    "ClusterLogPipeline",
];

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn yaml_files(rel: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_path(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn kind_of(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or_default()
}

/// Parses `doc` as `T`, checks that serializing and parsing again changes nothing, and
/// returns the typed value serialized back to JSON (with serde defaults filled in).
fn round_trip<T: Serialize + DeserializeOwned>(doc: &Value, what: &str) -> Value {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let yaml = serde_yaml::to_string(&typed).unwrap();
    let again: T = serde_yaml::from_str(&yaml)
        .unwrap_or_else(|e| panic!("{what} after round trip: {e}\n{yaml}"));
    let value = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        value,
        serde_json::to_value(&again).unwrap(),
        "{what}: round trip changed the object"
    );
    value
}

/// The typed form of any Outrider object, serialized back with defaults applied.
fn typed(doc: &Value, what: &str) -> Value {
    match kind_of(doc) {
        "Inventory" => round_trip::<Inventory>(doc, what),
        "DeploymentPlan" => round_trip::<DeploymentPlan>(doc, what),
        "HealthCheck" => round_trip::<HealthCheck>(doc, what),
        "SecurityPolicy" => round_trip::<SecurityPolicy>(doc, what),
        "LogPipeline" => round_trip::<LogPipeline>(doc, what),
        "ClusterLogPipeline" => round_trip::<ClusterLogPipeline>(doc, what),
        other => panic!("{what}: unexpected kind {other:?}"),
    }
}

fn load(path: &Path) -> (String, Value) {
    let text = std::fs::read_to_string(path).unwrap();
    let doc: Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (text, doc)
}

#[test]
fn every_example_parses_into_its_type_and_round_trips() {
    let mut seen = Vec::new();
    for path in yaml_files("examples") {
        let (_, doc) = load(&path);
        let what = path.display().to_string();
        assert!(
            doc.pointer("/metadata/namespace").is_none(),
            "{what}: examples must not set a namespace"
        );
        if kind_of(&doc) == "Secret" {
            continue;
        }
        assert_eq!(doc["apiVersion"], "outrider.dev/v1alpha1", "{what}");
        typed(&doc, &what);
        seen.push(kind_of(&doc).to_string());
    }
    seen.sort();
    let mut want: Vec<String> = KINDS.iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(seen, want, "one example per kind");
}

#[test]
fn every_status_deserializes_from_an_empty_object() {
    let empty = serde_json::json!({});
    let _: InventoryStatus = serde_json::from_value(empty.clone()).unwrap();
    let _: DeploymentPlanStatus = serde_json::from_value(empty.clone()).unwrap();
    let _: HealthCheckStatus = serde_json::from_value(empty.clone()).unwrap();
    let _: SecurityPolicyStatus = serde_json::from_value(empty.clone()).unwrap();
    let _: LogPipelineStatus = serde_json::from_value(empty).unwrap();
}

#[test]
fn api_md_statuses_deserialize() {
    let plan: DeploymentPlanStatus = serde_yaml::from_str(
        r#"
observedGeneration: 3
run: "3"
phase: Running
batch: {current: 2, total: 4}
hosts: {total: 40, succeeded: 18, failed: 1, running: 10, pending: 11}
stages:
  - {name: pre-check, succeeded: 29, failed: 0}
  - {name: rollout, succeeded: 18, failed: 1}
failures:
  - {host: web-7, stage: rollout, reason: NonZeroExit, exitCode: 3, attempts: 3,
 outputTail: "disk full", finishedAt: "2026-11-28T10:04:11Z"}
startedAt: "2026-11-28T10:00:00Z"
conditions: [{type: Progressing, status: "True", reason: BatchRunning, message: "", lastTransitionTime: "2026-11-28T10:00:00Z"}]
"#,
    )
    .unwrap();
    assert_eq!(plan.phase, Some(deployment_plan::PlanPhase::Running));
    assert_eq!(plan.failures[0].exit_code, Some(3));

    let hc: HealthCheckStatus = serde_yaml::from_str(
        r#"
lastRunAt: "2026-11-28T10:00:00Z"
summary: {healthy: 38, unhealthy: 1, unknown: 1}
results:
  - {target: web-7, check: root-disk, state: Unhealthy, value: 93, threshold: 85,
 since: "2026-11-28T09:00:00Z", message: "/ is 93% used (limit 85%)"}
  - {target: api, check: api, state: Anomalous, value: 412, baseline: 120, message: "latency 412ms"}
remediations: [{plan: restart-nginx, hosts: [web-7], at: "2026-11-28T09:05:00Z"}]
"#,
    )
    .unwrap();
    assert_eq!(hc.results[1].state, health_check::ProbeState::Anomalous);

    let sp: SecurityPolicyStatus = serde_yaml::from_str(
        r#"
rulesetHash: "sha256:0123"
hosts: {total: 40, applied: 39, drifted: 1, failed: 0}
drift: [{host: web-3, detectedAt: "2026-11-28T09:00:00Z", message: "table inet outrider changed outside Outrider"}]
"#,
    )
    .unwrap();
    assert_eq!(sp.hosts.map(|h| h.drifted), Some(1));

    let lp: LogPipelineStatus = serde_yaml::from_str(
        "configHash: \"sha256:0123\"\nnodes: {desired: 12, ready: 12, updated: 12}\n",
    )
    .unwrap();
    assert_eq!(lp.nodes.map(|n| n.ready), Some(12));
}

fn schema_of(crd: &CustomResourceDefinition) -> Value {
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

/// Checks the rules of a structural schema that the API server enforces, plus the
/// house rules (descriptions on spec fields, bounded lists), and returns the problems.
fn structural_problems(node: &Value, path: &str, in_spec: bool, problems: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        problems.push(format!("{path}: not an object"));
        return;
    };
    for forbidden in [
        "$ref",
        "$defs",
        "definitions",
        "oneOf",
        "anyOf",
        "allOf",
        "not",
        "$schema",
    ] {
        if obj.contains_key(forbidden) {
            problems.push(format!("{path}: has {forbidden}"));
        }
    }
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let ty = obj.get("type").and_then(Value::as_str);
    // Untyped is allowed for int-or-string and for opaque preserve-unknown-fields objects.
    let opaque = preserve && !obj.contains_key("properties");
    if ty.is_none() && !int_or_string && !opaque {
        problems.push(format!("{path}: no type"));
    }
    if in_spec && !obj.contains_key("description") && path.matches('.').count() > 1 {
        // Every field users write is documented for `kubectl explain` (list items and
        // map values inherit the description of their field).
        if !path.ends_with("[]") && !path.ends_with("{}") {
            problems.push(format!("{path}: no description"));
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        if obj.contains_key("additionalProperties") {
            problems.push(format!("{path}: both properties and additionalProperties"));
        }
        for (name, prop) in props {
            let child_in_spec = in_spec || (path.is_empty() && name == "spec");
            structural_problems(prop, &format!("{path}.{name}"), child_in_spec, problems);
        }
    }
    if let Some(additional) = obj.get("additionalProperties") {
        if additional.is_object() {
            structural_problems(additional, &format!("{path}{{}}"), in_spec, problems);
        }
        if in_spec && !obj.contains_key("maxProperties") && !path.ends_with("matchLabels") {
            problems.push(format!("{path}: map without maxProperties"));
        }
    }
    if ty == Some("array") {
        match obj.get("items") {
            Some(items) => structural_problems(items, &format!("{path}[]"), in_spec, problems),
            None => problems.push(format!("{path}: array without items")),
        }
        // LabelSelector's own lists are bounded by Kubernetes, not by us.
        if in_spec
            && !obj.contains_key("maxItems")
            && !path.contains("selector")
            && !path.contains("Selector")
        {
            problems.push(format!("{path}: list without maxItems"));
        }
        if obj.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
            let keys = obj
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let required = node
                .pointer("/items/required")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for key in keys {
                if !required.contains(&key) {
                    problems.push(format!("{path}: list-map key {key} is not required"));
                }
            }
        }
    }
}

#[test]
fn every_crd_has_its_scope_status_short_name_and_category() {
    let crds = crds();
    let kinds: Vec<&str> = crds.iter().map(|c| c.spec.names.kind.as_str()).collect();
    assert_eq!(kinds, KINDS);
    let shorts: BTreeMap<&str, &str> = [
        ("Inventory", "inv"),
        ("DeploymentPlan", "dp"),
        ("HealthCheck", "hc"),
        ("SecurityPolicy", "secpol"),
        ("LogPipeline", "lp"),
        ("ClusterLogPipeline", "clp"),
    ]
    .into_iter()
    .collect();
    for crd in &crds {
        let kind = crd.spec.names.kind.as_str();
        assert_eq!(crd.spec.group, GROUP);
        let scope = if kind.starts_with("Cluster") {
            "Cluster"
        } else {
            "Namespaced"
        };
        assert_eq!(crd.spec.scope, scope, "{kind}");
        assert_eq!(crd.spec.versions.len(), 1, "{kind}");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage, "{kind}");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{kind}: status subresource"
        );
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&[shorts[kind].to_string()][..]),
            "{kind}"
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["outrider".to_string()][..]),
            "{kind}"
        );
        let columns = version
            .additional_printer_columns
            .as_deref()
            .unwrap_or_default();
        assert!(
            columns.iter().any(|c| c.name == "Age"),
            "{kind}: Age column"
        );
        assert!(columns.len() >= 4, "{kind}: useful printer columns");

        let schema = schema_of(crd);
        let mut problems = Vec::new();
        structural_problems(&schema, "", false, &mut problems);
        assert!(
            problems.is_empty(),
            "{kind}: schema problems:\n{}",
            problems.join("\n")
        );
        let status = &schema["properties"]["status"];
        assert!(
            status["properties"]["conditions"].is_object(),
            "{kind}: status.conditions"
        );
        assert!(
            status["properties"]["observedGeneration"].is_object(),
            "{kind}: status.observedGeneration"
        );
        assert_eq!(
            status["properties"]["conditions"]["x-kubernetes-list-type"], "map",
            "{kind}"
        );
    }
    let yaml = crds_yaml().unwrap();
    assert_eq!(
        yaml.matches("kind: CustomResourceDefinition").count(),
        KINDS.len()
    );
    assert!(
        !yaml.contains("format: uint"),
        "formats the API server does not know"
    );
    // Well under the API server's request limit (3 MiB) and etcd's object limit (1.5 MiB).
    assert!(yaml.len() < 512 * 1024, "CRDs are {} bytes", yaml.len());
}

/// Every CEL rule with its location, e.g. `spec.stages[]: [has(self.script), ...]`.
fn cel_rules(node: &Value, path: &str, out: &mut Vec<(String, String)>) {
    let Some(obj) = node.as_object() else { return };
    if let Some(rules) = obj
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for rule in rules {
            assert!(
                rule.get("message").is_some(),
                "{path}: CEL rule without a message: {rule}"
            );
            out.push((
                path.to_string(),
                rule["rule"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            cel_rules(prop, format!("{path}.{name}").trim_start_matches('.'), out);
        }
    }
    if let Some(items) = obj.get("items") {
        cel_rules(items, &format!("{path}[]"), out);
    }
    if let Some(values) = obj.get("additionalProperties") {
        cel_rules(values, &format!("{path}{{}}"), out);
    }
}

#[test]
fn cross_field_rules_are_in_the_schema() {
    let mut rules = Vec::new();
    for crd in crds() {
        cel_rules(&schema_of(&crd), &crd.spec.names.kind, &mut rules);
    }
    let at = |path: &str| -> Vec<&str> {
        rules
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r.as_str())
            .collect()
    };
    assert_eq!(at("DeploymentPlan.spec.stages[]").len(), 1);
    assert_eq!(at("DeploymentPlan.spec.rollback[]").len(), 1);
    assert!(at("DeploymentPlan.spec")[0].contains("healthCheckRef"));
    assert_eq!(at("DeploymentPlan.spec.strategy.batchSize").len(), 1);
    assert_eq!(at("DeploymentPlan.spec.strategy.maxUnavailable").len(), 1);
    assert_eq!(at("HealthCheck.spec").len(), 3);
    assert_eq!(at("HealthCheck.spec.checks[]").len(), 1);
    assert_eq!(at("HealthCheck.spec.checks[].exec").len(), 1);
    assert_eq!(at("HealthCheck.spec.endpoints[]").len(), 1);
    assert!(at("SecurityPolicy.spec")[0].contains("self.zones"));
    assert_eq!(at("SecurityPolicy.spec.apply.batchSize").len(), 1);
    assert_eq!(at("LogPipeline.spec").len(), 2);
    assert_eq!(at("LogPipeline.spec.outputs[]").len(), 2);
    assert_eq!(at("LogPipeline.spec.filters[]").len(), 1);
    assert_eq!(at("ClusterLogPipeline.spec.inputs[]").len(), 2);
    assert_eq!(at("ClusterLogPipeline.spec.outputs[]").len(), 1);
    assert_eq!(at("ClusterLogPipeline.spec.filters[]").len(), 1);
}

/// Paths of the duration fields (schema nodes with [`common::DURATION_PATTERN`]) and the
/// messages of their rules, e.g. `HealthCheck.spec.interval: [interval must be at least 5s, ..]`.
fn duration_fields(node: &Value, path: &str, out: &mut BTreeMap<String, Vec<String>>) {
    let Some(obj) = node.as_object() else { return };
    if obj.get("pattern").and_then(Value::as_str) == Some(common::DURATION_PATTERN) {
        let messages = obj
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|r| r["message"].as_str().unwrap_or_default().to_string())
            .collect();
        out.insert(path.to_string(), messages);
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            duration_fields(prop, &format!("{path}.{name}"), out);
        }
    }
    if let Some(items) = obj.get("items") {
        duration_fields(items, &format!("{path}[]"), out);
    }
}

#[test]
fn every_duration_field_has_a_maximum_named_in_its_message() {
    let mut fields = BTreeMap::new();
    for crd in crds() {
        duration_fields(&schema_of(&crd), &crd.spec.names.kind, &mut fields);
    }
    let bounds: Vec<String> = fields
        .iter()
        .map(|(path, messages)| format!("{path}: {}", messages.join(", ")))
        .collect();
    assert_eq!(
        bounds,
        [
            "ClusterLogPipeline.spec.delivery.batch.maxWait: maxWait must be at most 5m",
            "ClusterLogPipeline.spec.inputs[].multiline.flushTimeout: flushTimeout must be at most 5m",
            "DeploymentPlan.spec.rollback[].timeout: timeout must be at most 24h",
            "DeploymentPlan.spec.stages[].timeout: timeout must be at most 24h",
            "DeploymentPlan.spec.strategy.pauseBetweenBatches: pauseBetweenBatches must be at most 24h",
            "HealthCheck.spec.checks[].timeout: timeout must be at most 5m",
            "HealthCheck.spec.endpoints[].http.maxLatency: maxLatency must be at most 5m",
            "HealthCheck.spec.endpoints[].timeout: timeout must be at most 5m",
            "HealthCheck.spec.endpoints[].tls.minValidFor: minValidFor must be at most 8760h",
            "HealthCheck.spec.interval: interval must be at least 5s, interval must be at most 24h",
            "HealthCheck.spec.remediation.cooldown: cooldown must be at most 24h",
            "Inventory.spec.probe.interval: interval must be at least 1s, interval must be at most 24h",
            "Inventory.spec.ssh.connectTimeout: connectTimeout must be at most 5m",
            "LogPipeline.spec.delivery.batch.maxWait: maxWait must be at most 5m",
            "LogPipeline.spec.multiline.flushTimeout: flushTimeout must be at most 5m",
            "SecurityPolicy.spec.apply.confirmTimeout: confirmTimeout must be at least 3s, confirmTimeout must be at most 1h",
            "SecurityPolicy.spec.driftCheckInterval: driftCheckInterval must be at least 10s, driftCheckInterval must be at most 24h",
        ]
    );
    // a field added later gets a maximum too, in a message that starts with its own name
    for (path, messages) in &fields {
        let field = path.rsplit('.').next().unwrap().trim_end_matches("[]");
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with(&format!("{field} must be at most "))),
            "{path}: {messages:?}"
        );
    }
}

#[test]
fn invalid_testdata_is_well_formed_and_covers_every_kind() {
    let files = yaml_files("e2e/testdata/invalid");
    assert!(files.len() >= 20, "{} invalid objects", files.len());
    let mut per_kind: BTreeMap<String, usize> = BTreeMap::new();
    for path in &files {
        let (text, doc) = load(path);
        let what = path.display().to_string();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect:"))
            .map(str::trim);
        let expect =
            expect.unwrap_or_else(|| panic!("{what}: first line must be `# expect: <substring>`"));
        assert!(
            expect.starts_with("spec."),
            "{what}: expectation must name the field: {expect:?}"
        );
        assert!(
            doc.pointer("/metadata/namespace").is_none(),
            "{what}: must not set a namespace"
        );
        assert!(
            KINDS.contains(&kind_of(&doc)),
            "{what}: kind {:?}",
            kind_of(&doc)
        );
        *per_kind.entry(kind_of(&doc).to_string()).or_default() += 1;
    }
    assert_eq!(per_kind.len(), KINDS.len(), "{per_kind:?}");
    assert!(per_kind.values().all(|n| *n >= 3), "{per_kind:?}");
}

#[test]
fn schema_defaults_match_serde_defaults() {
    // A minimal object gets the same defaults from serde as from the API server.
    let plan: DeploymentPlanSpec = serde_yaml::from_str(
        "targets: {inventoryRef: {name: web}}\nstages: [{name: a, script: \"true\"}]\n",
    )
    .unwrap();
    let crd = DeploymentPlan::crd();
    let schema = schema_of(&crd);
    let strategy_default = &schema["properties"]["spec"]["properties"]["strategy"]["default"];
    assert_eq!(
        &serde_json::to_value(&plan.strategy).unwrap(),
        strategy_default
    );
    assert_eq!(plan.stages[0].timeout.0, "30m");

    let policy: SecurityPolicySpec = serde_yaml::from_str(
        "targets: {inventoryRef: {name: web}}\ndefaultInput: drop\nfailsafe: {ports: [22]}\n",
    )
    .unwrap();
    assert_eq!(policy.backend, security_policy::Backend::Nftables);
    assert_eq!(policy.drift_policy, security_policy::DriftPolicy::Report);
    let crd = SecurityPolicy::crd();
    let apply_default = &schema_of(&crd)["properties"]["spec"]["properties"]["apply"]["default"];
    assert_eq!(&serde_json::to_value(&policy.apply).unwrap(), apply_default);

    let hc: HealthCheckSpec =
        serde_yaml::from_str("endpoints: [{name: db, tcp: {address: \"db:5432\"}}]\n").unwrap();
    assert_eq!(
        (
            hc.failure_threshold,
            hc.success_threshold,
            hc.interval.0.as_str()
        ),
        (3, 1, "30s")
    );

    let lp: ClusterLogPipelineSpec = serde_yaml::from_str(
        "inputs: [{name: app, paths: [/var/log/a.log]}]\noutputs: [{name: o, stdout: {}}]\n",
    )
    .unwrap();
    assert_eq!(lp.inputs[0].parser, cluster_log_pipeline::Parser::None);
    let crd = ClusterLogPipeline::crd();
    let delivery_default =
        &schema_of(&crd)["properties"]["spec"]["properties"]["delivery"]["default"];
    assert_eq!(
        &serde_json::to_value(&lp.delivery).unwrap(),
        delivery_default
    );
    assert!(lp.outputs[0].stdout.is_some());
}

#[test]
fn job_template_converts_to_a_pod_template() {
    let (_, doc) = load(&repo_path("examples/deployment-plan.yaml"));
    let plan: DeploymentPlan = serde_json::from_value(doc).unwrap();
    let job = plan
        .spec
        .stages
        .iter()
        .find_map(|s| s.job.as_ref())
        .unwrap();
    let template = job.pod_template().unwrap();
    let spec = template.spec.unwrap();
    assert_eq!(spec.containers[0].image.as_deref(), Some("shop/migrate:42"));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
}
