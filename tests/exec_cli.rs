//! `outrider exec` as a user runs it: an Inventory file, a directory laid out like the
//! Secret, a real sshd.

#[path = "support/sshd.rs"]
mod sshd;

use std::process::Command;

#[test]
fn exec_runs_on_every_selected_host_reports_each_and_fails_when_one_does() {
    let server = sshd::Sshd::start();
    let dir = tempfile::tempdir().expect("tmp");
    let (private, public) = sshd::user_key(dir.path(), "ed25519", None, "openssh");
    server.authorize("root", &public);
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).expect("mkdir");
    std::fs::write(secret.join("ssh-privatekey"), &private).expect("key");
    let addrs: Vec<String> = (1..=12).map(|i| format!("127.0.30.{i}")).collect();
    let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    std::fs::write(secret.join("known_hosts"), server.known_hosts_for(&refs)).expect("known_hosts");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut inv = format!(
        "apiVersion: outrider.dev/v1alpha1\nkind: Inventory\nmetadata: {{name: t}}\nspec:\n  ssh: {{user: root, port: {}, secretRef: {{name: s}}, connectTimeout: 5s}}\n  hosts:\n",
        server.port
    );
    for (i, a) in addrs.iter().enumerate() {
        let role = if i < 10 { "web" } else { "db" };
        inv.push_str(&format!(
            "    - {{name: h{i}, address: {a}, labels: {{role: {role}}}}}\n"
        ));
    }
    inv.push_str(&format!(
        "    - {{name: down, address: 127.0.0.1, port: {closed}, labels: {{role: web}}}}\n"
    ));
    let inv_path = dir.path().join("inv.yaml");
    std::fs::write(&inv_path, inv).expect("inventory");

    let run = |selector: &str| {
        Command::new(env!("CARGO_BIN_EXE_outrider"))
            .args([
                "exec",
                "--inventory",
                inv_path.to_str().expect("utf-8"),
                "--secret-dir",
            ])
            .arg(&secret)
            .args([
                "--selector",
                selector,
                "--",
                "sh",
                "-c",
                "echo $SSH_CONNECTION | cut -d' ' -f3",
            ])
            .output()
            .expect("run outrider exec")
    };
    let out = run("role=db");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    assert_eq!(lines, ["h10\tok\t127.0.30.11", "h11\tok\t127.0.30.12"]);

    let out = run("role=web");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "one host is down: {stdout}{stderr}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.contains("\tok\t")).count(),
        10,
        "{stdout}"
    );
    let down = stdout
        .lines()
        .find(|l| l.starts_with("down\t"))
        .expect("a line for the down host");
    assert!(
        down.starts_with("down\tfailed\tdown: unreachable"),
        "{down}"
    );
    assert!(stderr.contains("10 succeeded, 1 failed"), "{stderr}");
}
