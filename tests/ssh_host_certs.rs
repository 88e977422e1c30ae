//! Host keys as OpenSSH users deploy them, against a real sshd: a host pinned by one key
//! type is asked for that type, and `@cert-authority` host certificates are verified (CA
//! signature, validity, principal = the address connected to) instead of skipped.
//! Run as root (CI is): sshd must switch users.

#[path = "support/sshd.rs"]
mod sshd;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use outrider::ssh::known_hosts::{CertVerdict, KnownHosts};
use outrider::ssh::{ClientConfig, Credentials, Endpoint, Error, HostKeyPolicy, Session};

const ADDR: &str = "127.0.0.1";
const USER: &str = "outrider-nosudo";

struct Setup {
    server: sshd::Sshd,
    dir: tempfile::TempDir,
    private_key: String,
}

fn setup() -> Setup {
    let server = sshd::Sshd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (private_key, public_key) = sshd::user_key(dir.path(), "ed25519", None, "openssh");
    server.authorize(USER, &public_key);
    Setup {
        server,
        dir,
        private_key,
    }
}

/// A CA key pair in `dir`: the private key's path and the public `<type> <base64>`.
fn ca(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(&path)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("CA public key");
    let public = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    (path, public)
}

impl Setup {
    fn name(&self) -> String {
        format!("[{ADDR}]:{}", self.server.port)
    }

    async fn connect(&self, known_hosts: &str) -> Result<Session, Error> {
        let mut config = ClientConfig::new(USER);
        // even trust on first use never trusts a certificate it cannot verify
        config.host_key_policy = HostKeyPolicy::AcceptNew;
        let creds =
            Arc::new(Credentials::new(&self.private_key, None, known_hosts).expect("credentials"));
        let endpoint = Endpoint::new("web-1", ADDR, self.server.port);
        Session::connect(Arc::new(config), creds, &endpoint, None).await
    }

    async fn runs(&self, known_hosts: &str) {
        let session = self
            .connect(known_hosts)
            .await
            .unwrap_or_else(|e| panic!("{e}\nknown_hosts:\n{known_hosts}\n{}", self.server.log()));
        assert!(
            session.accepted_host_key.is_none(),
            "trusted, not accepted as new"
        );
        let out = session
            .exec(&outrider::ssh::Command::argv(["true"]))
            .await
            .expect("exec");
        assert!(out.success());
    }
}

#[tokio::test]
async fn a_host_pinned_by_one_key_type_is_asked_for_that_type_not_refused_as_a_mismatch() {
    let s = setup();
    // sshd holds ed25519, ECDSA and RSA keys and prefers ed25519
    for key in s.server.host_public_keys() {
        let kind = key.split(' ').next().unwrap_or_default().to_string();
        s.runs(&format!("{} {key}\n", s.name())).await;
        eprintln!("pinned by {kind} only: connected");
    }
}

#[tokio::test]
async fn a_host_certificate_from_a_listed_authority_is_trusted_without_any_host_key_line() {
    let s = setup();
    let (ca_key, ca_public) = ca(s.dir.path(), "ca");
    s.server
        .present_host_certificate(&ca_key, &format!("{ADDR},web-1.example"), "-5m:+1h");
    let known = format!("@cert-authority {} {ca_public}\n", s.name());
    s.runs(&known).await;
    // the same, with the authority for a wildcard and a plain key line for another host
    let known = format!(
        "@cert-authority * {ca_public}\nother.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n"
    );
    s.runs(&known).await;
}

#[tokio::test]
async fn host_certificates_for_another_host_expired_revoked_or_from_another_authority_are_refused()
{
    let s = setup();
    let (ca_key, ca_public) = ca(s.dir.path(), "ca");
    let (_, other_public) = ca(s.dir.path(), "other-ca");
    let trusting = format!("@cert-authority {} {ca_public}\n", s.name());
    let refused = |err: Error, wants: &str| {
        assert!(
            matches!(err, Error::HostKeyMismatch { .. }),
            "{wants}: {err:?}"
        );
        assert!(err.to_string().contains(wants), "{wants}: {err}");
    };

    s.server
        .present_host_certificate(&ca_key, "10.9.9.9,db-1.example", "-5m:+1h");
    let err = s
        .connect(&trusting)
        .await
        .expect_err("another host's certificate");
    refused(err, "not for \"127.0.0.1\"");

    s.server.present_host_certificate(&ca_key, ADDR, "-2h:-1h");
    let err = s.connect(&trusting).await.expect_err("expired certificate");
    refused(err, "expired at");

    s.server.present_host_certificate(&ca_key, ADDR, "+1h:+2h");
    let err = s
        .connect(&trusting)
        .await
        .expect_err("not yet valid certificate");
    refused(err, "not valid before");

    s.server.present_host_certificate(&ca_key, ADDR, "-5m:+1h");
    let other = format!("@cert-authority {} {other_public}\n", s.name());
    let err = s.connect(&other).await.expect_err("another authority");
    refused(err, "not a @cert-authority for this host");

    let revoked = format!("{trusting}@revoked * {ca_public}\n");
    let err = s.connect(&revoked).await.expect_err("revoked authority");
    assert!(matches!(err, Error::HostKeyRevoked { .. }), "{err:?}");

    // and the valid one still works on this very server
    s.runs(&trusting).await;
}

#[test]
fn a_user_certificate_is_never_a_host_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca_key, ca_public) = ca(dir.path(), "ca");
    let user = dir.path().join("user");
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(&user)
        .status()
        .expect("ssh-keygen");
    assert!(status.success());
    // no -h: a user certificate naming the host as a principal
    let status = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&ca_key)
        .args(["-I", "user", "-n", ADDR, "-V", "-5m:+1h"])
        .arg(user.with_extension("pub"))
        .status()
        .expect("ssh-keygen -s");
    assert!(status.success());
    let text = std::fs::read_to_string(dir.path().join("user-cert.pub")).expect("cert");
    let cert = russh::keys::Certificate::from_openssh(text.trim()).expect("parse cert");
    let known = KnownHosts::parse(&format!("@cert-authority * {ca_public}\n")).expect("kh");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert_eq!(
        known.verify_certificate(ADDR, 22, &cert, now),
        CertVerdict::Invalid("a user certificate, not a host certificate".into())
    );
    // and no authority listed for the host at all
    let none = KnownHosts::parse("").expect("kh");
    assert_eq!(
        none.verify_certificate(ADDR, 22, &cert, now),
        CertVerdict::NoAuthority
    );
}
