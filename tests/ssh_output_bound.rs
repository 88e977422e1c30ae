//! A command that prints far more than we keep must not grow the client: alone in its own
//! test binary so the process's peak RSS belongs to this test only.

#[path = "support/sshd.rs"]
mod sshd;

use std::sync::Arc;
use std::time::Duration;

use outrider::ssh::{ClientConfig, Command, Credentials, Endpoint, Session};

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

#[tokio::test]
async fn fifty_megabytes_of_output_are_captured_within_the_caps_and_bounded_memory() {
    let server = sshd::Sshd::start();
    let keys = tempfile::tempdir().expect("tmp");
    let (private, public) = sshd::user_key(keys.path(), "ed25519", None, "openssh");
    server.authorize("root", &public);
    let creds = Arc::new(
        Credentials::new(&private, None, &server.known_hosts_for(&["127.0.10.1"])).expect("creds"),
    );
    let endpoint = Endpoint::new("h", "127.0.10.1", server.port);
    let session = Session::connect(Arc::new(ClientConfig::new("root")), creds, &endpoint, None)
        .await
        .expect("connect");

    let before = peak_rss_kib();
    let cmd = Command::script(
        "echo FIRST; head -c 50000000 /dev/zero | tr '\\0' x; echo; echo LAST; echo E >&2",
    )
    .timeout(Duration::from_secs(120))
    .capture(4096, 4096);
    let out = session.exec(&cmd).await.expect("exec");
    let grown_mib = (peak_rss_kib().saturating_sub(before)) / 1024;

    assert!(out.success());
    assert_eq!(
        out.stdout.total,
        50_000_000 + "FIRST\n".len() as u64 + "\nLAST\n".len() as u64
    );
    assert!(out.stdout.truncated);
    assert!(out.stdout.head.len() <= 4096 && out.stdout.tail.len() <= 4096);
    assert!(out.stdout.head.starts_with(b"FIRST\nxxxx"));
    assert!(out.stdout.tail.ends_with(b"xxx\nLAST\n"));
    assert_eq!(out.stderr.to_string_lossy(), "E\n");
    assert!(
        grown_mib < 32,
        "client peak RSS grew by {grown_mib} MiB while streaming 50 MB"
    );
}
