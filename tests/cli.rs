//! The `outrider` binary as a user runs it, no cluster needed.

use std::process::Command;

fn outrider(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_outrider"))
        .args(args)
        .output()
        .expect("run outrider")
}

#[test]
fn crd_subcommand_prints_all_six_crds_matching_both_checked_in_copies() {
    let out = outrider(&["crd"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("each document parses"))
        .collect();
    let mut names: Vec<&str> = docs
        .iter()
        .filter_map(|d| d["metadata"]["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "clusterlogpipelines.outrider.dev",
            "deploymentplans.outrider.dev",
            "healthchecks.outrider.dev",
            "inventories.outrider.dev",
            "logpipelines.outrider.dev",
            "securitypolicies.outrider.dev"
        ]
    );
    // both copies users install: `kubectl apply -f crds/` and the chart's crds/
    for copy in [
        "crds/outrider.dev.yaml",
        "charts/outrider/crds/outrider.dev.yaml",
    ] {
        let on_disk = std::fs::read_to_string(format!("{}/{copy}", env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("read {copy}: {e}"));
        assert!(text == on_disk, "{copy} is stale: run `make crds`");
    }
}

#[test]
fn unknown_subcommand_fails_with_usage() {
    let out = outrider(&["frobnicate"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}
