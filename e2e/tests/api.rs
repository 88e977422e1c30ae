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
        assert!(line.contains("true"), "{kind} must be namespaced: {line}");
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
        5,
        "invalid objects must cover all five kinds, got {kinds:?}"
    );
}
