use super::*;
use crate::engine::health::Outcome;

fn checks(yaml: &str) -> HostChecks {
    let specs: Vec<Check> = serde_yaml::from_str(yaml).expect("checks yaml");
    HostChecks::new(&specs).expect("compiles")
}

/// Runs the round's script in the machine's real `sh` (dash here), as sshd would.
fn run_locally(hc: &HostChecks) -> Vec<Observation> {
    use std::io::Write;
    let nonce = "t3st";
    let mut child = std::process::Command::new("sh")
        .arg("-s")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sh");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(hc.script(nonce).as_bytes())
        .expect("write script");
    let out = child.wait_with_output().expect("sh ran");
    hc.parse(nonce, &String::from_utf8_lossy(&out.stdout), Duration::ZERO)
}

#[test]
fn df_lines_parse_including_spaces_tiny_tmpfs_and_pseudo_filesystems() {
    let real = "Filesystem     1024-blocks     Used Available Capacity Mounted on\n\
                /dev/vda         264212084 13705032  81796232      15% /\n";
    let (p, m) = parse_df(real).expect("parses");
    assert!((p - 14.35).abs() < 0.01, "{p}");
    assert_eq!(m, "/");
    // reserved blocks: used / (used + avail), not used / size
    let tiny = "Filesystem 1024-blocks Used Available Capacity Mounted on\n\
                tmpfs 1024 1000 24 98% /mnt/tiny dir\n";
    let (p, m) = parse_df(tiny).expect("parses");
    assert!((p - 97.66).abs() < 0.01, "{p}");
    assert_eq!(m, "/mnt/tiny dir");
    let spaced = "Filesystem 1024-blocks Used Available Capacity Mounted on\n\
                  //nas/share name 100 50 50 50% /mnt/nas\n";
    assert_eq!(parse_df(spaced).map(|x| x.0), Some(50.0));
    let pseudo = "Filesystem 1024-blocks Used Available Capacity Mounted on\nproc 0 0 0 - /proc\n";
    assert_eq!(parse_df(pseudo).map(|x| x.0), Some(0.0));
    assert_eq!(parse_df("df: /nope: No such file or directory\n"), None);
    assert_eq!(parse_df(""), None);
    assert_eq!(
        parse_df("a b c d e f\nx 18446744073709551615 18446744073709551615 1 9% /\n"),
        None
    );
}

#[test]
fn meminfo_uses_mem_available_and_estimates_without_it() {
    let real = "MemTotal:       24683772 kB\nMemFree:        21502364 kB\n\
                MemAvailable:   24065492 kB\nBuffers:           47344 kB\nCached:          2629048 kB\n";
    assert_eq!(parse_meminfo(real), Some((24683772, 24065492, false)));
    // kernel 3.10 (no MemAvailable)
    let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\n";
    assert_eq!(parse_meminfo(old), Some((1000, 400, true)));
    // an lxcfs container reporting more available than total is clamped
    let lxc = "MemTotal: 1000 kB\nMemFree: 900 kB\nMemAvailable: 5000 kB\n";
    assert_eq!(parse_meminfo(lxc), Some((1000, 1000, false)));
    assert_eq!(parse_meminfo("MemTotal: 0 kB\n"), None);
    assert_eq!(parse_meminfo("garbage"), None);
}

#[test]
fn loadavg_parses_with_many_cpus_and_reports_a_missing_core_count() {
    assert_eq!(
        parse_load("2.31 0.93 0.35 5/137 8848\ncores 2\n"),
        Ok((2.31, 2))
    );
    assert_eq!(
        parse_load("97.20 80.00 60.00 300/9000 1\ncores 192\n"),
        Ok((97.2, 192))
    );
    assert!(parse_load("2.31 0.93 0.35 5/137 8848\ncores \n").is_err());
    assert!(parse_load("nan 1 1\ncores 2\n").is_err());
    assert!(parse_load("-1 1 1\ncores 2\n").is_err());
    assert!(parse_load("").is_err());
}

#[test]
fn thresholds_state_the_value_and_the_limit() {
    let hc = checks("- {name: root, disk: {path: /, maxUsedPercent: 10}}");
    let body =
        "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/vda 100 93 7 93% /\n";
    let out = format!("@@n 0 begin\n{body}\n@@n 0 end 0\n");
    let obs = &hc.parse("n", &out, Duration::ZERO)[0];
    assert_eq!(obs.outcome, Outcome::Fail);
    assert_eq!(obs.message, "/ is 93% used (limit 10%)");
    assert_eq!((obs.value, obs.threshold), (Some(93.0), Some(10.0)));
}

#[test]
fn a_check_cannot_forge_another_checks_result_and_missing_sections_are_unknown() {
    let hc = checks(
        "- {name: a, exec: {command: [echo]}}\n- {name: b, disk: {path: /, maxUsedPercent: 90}}\n- {name: c, memory: {maxUsedPercent: 90}}",
    );
    // check 0 prints a marker with a guessed nonce; check 1 never ends; check 2 never starts
    let out =
        "@@real 0 begin\n@@guess 1 end 0\nhello\n@@real 0 end 0\n@@real 1 begin\nFilesystem\n";
    let obs = hc.parse("real", out, Duration::ZERO);
    assert_eq!(obs[0].outcome, Outcome::Pass, "{:?}", obs[0]);
    assert_eq!(obs[1].outcome, Outcome::Unknown);
    assert!(
        obs[1].message.contains("did not finish"),
        "{}",
        obs[1].message
    );
    assert_eq!(obs[2].outcome, Outcome::Unknown);
    assert!(
        obs[2].message.contains("stopped before"),
        "{}",
        obs[2].message
    );
}

#[test]
fn bad_specs_are_errors_naming_the_field() {
    let specs: Vec<Check> =
        serde_yaml::from_str("- {name: q, exec: {command: [grep], expectOutput: '(unclosed'}}")
            .expect("yaml");
    let err = HostChecks::new(&specs).expect_err("bad regex");
    assert_eq!(err.field, "spec.checks[q].exec.expectOutput");
    let specs: Vec<Check> = serde_yaml::from_str(
        "- {name: t, memory: {maxUsedPercent: 90}, timeout: 9999999999999999h}",
    )
    .expect("yaml");
    let err = HostChecks::new(&specs).expect_err("overflowing timeout");
    assert_eq!(err.field, "spec.checks[t].timeout");
}

#[test]
fn the_script_runs_in_a_real_shell_and_every_check_kind_parses() {
    let dir = tempfile::tempdir().expect("tmp");
    let live = dir.path().join("live.pid");
    std::fs::write(&live, format!("{}\n", std::process::id())).expect("pidfile");
    let stale = dir.path().join("stale.pid");
    std::fs::write(&stale, "999999999\n").expect("pidfile");
    let yaml = format!(
        "- {{name: root, disk: {{path: /, maxUsedPercent: 100}}}}
- {{name: nodisk, disk: {{path: /no/such/dir, maxUsedPercent: 90}}}}
- {{name: mem, memory: {{maxUsedPercent: 100}}}}
- {{name: load, load: {{maxPerCore: 1000}}}}
- {{name: me, process: {{name: sh}}}}
- {{name: ghost, process: {{name: no-such-proc}}}}
- {{name: live, process: {{pidfile: {live}}}}}
- {{name: stale, process: {{pidfile: {stale}}}}}
- {{name: nopid, process: {{pidfile: /no/such.pid}}}}
- {{name: ok, exec: {{command: [sh, -c, 'echo ready; exit 3'], expectExitCode: 3, expectOutput: '^ready'}}}}
- {{name: quoted, exec: {{command: [printf, '%s', \"x=';id;'\"], expectOutput: \"^x=';id;'$\"}}}}
- {{name: missing, exec: {{command: [no-such-tool-outrider]}}}}
- {{name: script, exec: {{script: \"test $(echo 2) -lt 1\"}}}}
- {{name: loud, exec: {{script: \"yes | head -c 1000000; exit 0\"}}}}
- {{name: slow, exec: {{command: [sleep, '30']}}, timeout: 1s}}
- {{name: after, memory: {{maxUsedPercent: 100}}}}",
        live = live.display(),
        stale = stale.display()
    );
    let hc = checks(&yaml);
    let started = std::time::Instant::now();
    let obs = run_locally(&hc);
    let by = |name: &str| {
        let i = hc
            .checks
            .iter()
            .position(|c| c.name == name)
            .expect("check");
        &obs[i]
    };
    assert_eq!(by("root").outcome, Outcome::Pass, "{:?}", by("root"));
    assert!(by("root").value.is_some());
    assert_eq!(by("nodisk").outcome, Outcome::Unknown, "{:?}", by("nodisk"));
    assert!(
        by("nodisk").message.contains("/no/such/dir"),
        "{}",
        by("nodisk").message
    );
    assert_eq!(by("mem").outcome, Outcome::Pass, "{:?}", by("mem"));
    assert_eq!(by("load").outcome, Outcome::Pass, "{:?}", by("load"));
    assert_eq!(by("me").outcome, Outcome::Pass, "{:?}", by("me"));
    assert_eq!(by("ghost").outcome, Outcome::Fail, "{:?}", by("ghost"));
    assert_eq!(by("live").outcome, Outcome::Pass, "{:?}", by("live"));
    assert_eq!(by("stale").outcome, Outcome::Fail, "{:?}", by("stale"));
    assert!(by("stale").message.contains("stale pidfile"));
    assert_eq!(by("nopid").outcome, Outcome::Fail, "{:?}", by("nopid"));
    assert_eq!(by("ok").outcome, Outcome::Pass, "{:?}", by("ok"));
    // the hostile argument reached printf as one literal word: nothing ran `id`
    assert_eq!(by("quoted").outcome, Outcome::Pass, "{:?}", by("quoted"));
    assert_eq!(
        by("missing").outcome,
        Outcome::Unknown,
        "{:?}",
        by("missing")
    );
    assert!(
        by("missing").message.contains("could not be run"),
        "{}",
        by("missing").message
    );
    assert_eq!(by("script").outcome, Outcome::Fail, "{:?}", by("script"));
    assert_eq!(
        by("loud").outcome,
        Outcome::Pass,
        "a loud command is not killed: {:?}",
        by("loud")
    );
    assert_eq!(by("slow").outcome, Outcome::Fail, "{:?}", by("slow"));
    assert!(
        by("slow").message.contains("timed out"),
        "{}",
        by("slow").message
    );
    assert_eq!(
        by("after").outcome,
        Outcome::Pass,
        "checks after a timeout still run"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the 1s timeout bounded the sleep"
    );
}
