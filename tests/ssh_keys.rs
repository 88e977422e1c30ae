//! ECDSA keys from `ssh-keygen` whose private scalar starts with a zero byte, which OpenSSH
//! stores shortened and russh's decoder (ssh-key 0.7.0-rc) refuses for P-256 below 32 bytes
//! (see src/ssh/keys.rs): found by generating keys until one has such a scalar, then used to log
//! in to a real sshd (tests/support/sshd.rs) as `outrider-nosudo` and run `true`.
//! Run as root (CI is): sshd must switch users.

#[path = "support/sshd.rs"]
mod sshd;

use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use outrider::ssh::{ClientConfig, Command, Credentials, Endpoint, Fleet};

/// Keys generated before giving up. A P-256 scalar under 31 bytes after OpenSSH strips its
/// leading zeros comes about once in 512 keys: 8000 tries miss with probability ~2e-7.
const MAX_TRIES: usize = 8000;

/// A user key pair as ssh-keygen wrote it.
#[derive(Clone)]
struct KeyPair {
    private: String,
    /// `<type> <base64>`.
    public: String,
}

/// A key whose stored scalar is shorter than its curve's width, and how many keys it took.
#[derive(Clone)]
struct ShortKey {
    key: KeyPair,
    tries: usize,
    mpint_len: usize,
    elapsed: Duration,
}

fn ssh_keygen(args: &[&str]) {
    let out = Process::new("ssh-keygen")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen (install openssh-client: e2e/deps.sh)");
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_pair(path: &Path) -> KeyPair {
    let private = std::fs::read_to_string(path).expect("read private key");
    let public = std::fs::read_to_string(path.with_extension("pub")).expect("read public key");
    let public = public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    KeyPair { private, public }
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    head
}

fn u32_at(rest: &mut &[u8]) -> usize {
    u32::from_be_bytes(take(rest, 4).try_into().expect("4 bytes")) as usize
}

fn string<'a>(rest: &mut &'a [u8]) -> &'a [u8] {
    let n = u32_at(rest);
    take(rest, n)
}

/// Length of the private scalar's mpint in an unencrypted OpenSSH ECDSA key (PROTOCOL.key),
/// read independently of src/ssh/keys.rs.
fn scalar_mpint_len(private_key: &str) -> usize {
    let b64: String = private_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .expect("base64");
    let mut rest = blob
        .strip_prefix(b"openssh-key-v1\0".as_slice())
        .expect("openssh-key-v1");
    assert_eq!(string(&mut rest), b"none", "key must be unencrypted");
    string(&mut rest); // kdf
    string(&mut rest); // kdf options
    assert_eq!(u32_at(&mut rest), 1);
    string(&mut rest); // public key
    let mut private = string(&mut rest);
    take(&mut private, 8); // two check integers
    assert!(
        string(&mut private).starts_with(b"ecdsa-sha2-nistp"),
        "not ECDSA"
    );
    string(&mut private); // curve
    string(&mut private); // public point
    string(&mut private).len()
}

/// Runs `ssh-keygen -t ecdsa -b BITS` (on every core) until a key's scalar mpint is shorter
/// than `width`: its leading zero byte was stripped and the next byte has its top bit clear.
fn find_short_key(bits: u32, width: usize) -> ShortKey {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let tries = AtomicUsize::new(0);
    let found: OnceLock<(KeyPair, usize)> = OnceLock::new();
    let done = AtomicBool::new(false);
    let workers = std::thread::available_parallelism().map_or(4, |n| n.get().min(16));
    std::thread::scope(|s| {
        for w in 0..workers {
            let (dir, tries, found, done) = (dir.path(), &tries, &found, &done);
            s.spawn(move || {
                let path: PathBuf = dir.join(format!("id_ecdsa_{bits}_{w}"));
                let path_text = path.to_str().expect("utf-8 path");
                while !done.load(Ordering::Relaxed) {
                    if tries.fetch_add(1, Ordering::Relaxed) >= MAX_TRIES {
                        done.store(true, Ordering::Relaxed);
                        break;
                    }
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(path.with_extension("pub"));
                    let bits = bits.to_string();
                    ssh_keygen(&[
                        "-q", "-t", "ecdsa", "-b", &bits, "-N", "", "-C", "", "-f", path_text,
                    ]);
                    let pair = read_pair(&path);
                    let len = scalar_mpint_len(&pair.private);
                    if len < width {
                        let _ = found.set((pair, len));
                        done.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let tries = tries.load(Ordering::Relaxed).min(MAX_TRIES);
    let (key, mpint_len) = found.into_inner().unwrap_or_else(|| {
        panic!(
            "no P-{bits} key with a scalar mpint under {width} bytes in {tries} ssh-keygen runs \
             (expected about one in {}): is ssh-keygen writing mpints unstripped now?",
            if width == 66 { 4 } else { 512 }
        )
    });
    let found = ShortKey {
        key,
        tries,
        mpint_len,
        elapsed: started.elapsed(),
    };
    eprintln!(
        "P-{bits}: a {mpint_len}-byte scalar mpint (full width {width}) after {} ssh-keygen \
         runs in {:?} (all runs, counted over {workers} workers)",
        found.tries, found.elapsed
    );
    found
}

/// The short-scalar P-256 key every P-256 test uses (found once per test process).
fn short_p256() -> &'static ShortKey {
    static KEY: OnceLock<ShortKey> = OnceLock::new();
    KEY.get_or_init(|| find_short_key(256, 32))
}

/// Rewrites `key` with `ssh-keygen -p` plus `args` (e.g. a new passphrase, `-m PEM`).
fn rewrite(key: &str, old_passphrase: &str, args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("key");
    std::fs::write(&path, key).expect("write key");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod key");
    let path_text = path.to_str().expect("utf-8 path");
    let mut all = vec!["-q", "-p", "-P", old_passphrase, "-f", path_text];
    all.extend_from_slice(args);
    ssh_keygen(&all);
    std::fs::read_to_string(&path).expect("read rewritten key")
}

/// Logs in to a fresh sshd as `outrider-nosudo` with `private_key` and runs `true`.
async fn authenticates(public: &str, private_key: &str, passphrase: Option<&str>, addr: &str) {
    let server = sshd::Sshd::start();
    server.authorize("outrider-nosudo", public);
    let credentials = Credentials::new(private_key, passphrase, &server.known_hosts_for(&[addr]))
        .unwrap_or_else(|e| panic!("Credentials::new refused the key: {e}"));
    let fleet = Fleet::new(ClientConfig::new("outrider-nosudo"), credentials);
    let endpoint = Endpoint::new(format!("host-{addr}"), addr, server.port);
    let session = fleet
        .connect(&endpoint)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\nsshd log:\n{}", server.log()));
    let out = session
        .exec(&Command::argv(["true"]))
        .await
        .expect("exec true");
    out.check(&endpoint.name).expect("true succeeds");
    assert!(
        server
            .log()
            .contains("Accepted publickey for outrider-nosudo"),
        "sshd did not log a public-key login:\n{}",
        server.log()
    );
}

#[tokio::test]
async fn p256_keys_whose_scalar_has_a_leading_zero_authenticate() {
    let short = short_p256();
    assert!(short.mpint_len < 32);
    // the bug: the SSH library alone refuses the key
    let err = russh::keys::decode_secret_key(&short.key.private, None)
        .expect_err("russh refuses a P-256 scalar stored in under 32 bytes");
    eprintln!("russh alone: {err}");
    authenticates(&short.key.public, &short.key.private, None, "127.0.11.1").await;
}

#[tokio::test]
async fn p384_keys_whose_scalar_has_a_leading_zero_authenticate() {
    let short = tokio::task::spawn_blocking(|| find_short_key(384, 48))
        .await
        .expect("keygen");
    assert!(short.mpint_len < 48);
    authenticates(&short.key.public, &short.key.private, None, "127.0.11.2").await;
}

#[tokio::test]
async fn p521_keys_whose_scalar_has_a_leading_zero_authenticate() {
    // a P-521 scalar has 521 bits: its top byte is 0 or 1, and the mpint is 65 bytes or less
    // whenever it is 0 and the next byte is below 0x80
    let short = tokio::task::spawn_blocking(|| find_short_key(521, 66))
        .await
        .expect("keygen");
    assert!(short.mpint_len < 66);
    authenticates(&short.key.public, &short.key.private, None, "127.0.11.3").await;
}

#[tokio::test]
async fn encrypted_p256_keys_whose_scalar_has_a_leading_zero_authenticate_with_their_passphrase() {
    let short = short_p256();
    for (cipher, addr) in [
        ("aes256-ctr", "127.0.11.4"), // ssh-keygen's default
        ("chacha20-poly1305@openssh.com", "127.0.11.5"),
    ] {
        let encrypted = rewrite(&short.key.private, "", &["-N", "passphrase", "-Z", cipher]);
        assert!(encrypted.contains("BEGIN OPENSSH PRIVATE KEY"));
        // the library decrypts it and then refuses the scalar, as for an unencrypted key
        assert!(
            russh::keys::decode_secret_key(&encrypted, Some("passphrase")).is_err(),
            "{cipher}: russh alone was expected to refuse it"
        );

        let err = Credentials::new(&encrypted, None, "").expect_err("no passphrase");
        assert_eq!(
            err.to_string(),
            "the private key cannot be used: it is encrypted and no passphrase was given"
        );
        let err = Credentials::new(&encrypted, Some("wrong"), "").expect_err("wrong passphrase");
        assert_eq!(err.reason(), "SecretInvalid", "{err}");

        authenticates(&short.key.public, &encrypted, Some("passphrase"), addr).await;
    }
}

#[test]
fn re_saving_a_short_scalar_key_with_ssh_keygen_keeps_the_scalar_short() {
    // why the error advice is `ssh-keygen -p -m PEM`, not a plain `ssh-keygen -p`: OpenSSH writes
    // the shortened scalar again
    let short = short_p256();
    let encrypted = rewrite(&short.key.private, "", &["-N", "passphrase"]);
    let resaved = rewrite(&encrypted, "passphrase", &["-N", ""]);
    assert_eq!(scalar_mpint_len(&resaved), short.mpint_len);
}

#[tokio::test]
async fn pem_and_pkcs8_forms_of_a_p256_key_whose_scalar_has_a_leading_zero_authenticate() {
    // SEC1 and PKCS#8 store the scalar at full width (OpenSSL pads it), and russh reads a short
    // one too: these never needed the repair
    let short = short_p256();
    for (args, passphrase, header, addr) in [
        (
            &["-N", "", "-m", "PEM"][..],
            None,
            "-----BEGIN EC PRIVATE KEY-----",
            "127.0.11.6",
        ),
        (
            &["-N", "", "-m", "PKCS8"][..],
            None,
            "-----BEGIN PRIVATE KEY-----",
            "127.0.11.7",
        ),
        (
            &["-N", "passphrase", "-m", "PKCS8"][..],
            Some("passphrase"),
            "-----BEGIN ENCRYPTED PRIVATE KEY-----",
            "127.0.11.8",
        ),
    ] {
        let converted = rewrite(&short.key.private, "", args);
        assert!(converted.starts_with(header), "{args:?}: {converted:.40}");
        russh::keys::decode_secret_key(&converted, passphrase)
            .unwrap_or_else(|e| panic!("{args:?}: russh alone reads it: {e}"));
        authenticates(&short.key.public, &converted, passphrase, addr).await;
    }
}

#[tokio::test]
async fn a_passphrase_protected_pem_ec_key_is_refused_with_a_conversion_that_works() {
    // russh decrypts legacy PEM encryption for RSA keys only: every such EC key fails, whatever
    // its scalar. The error says to convert it; doing so gives a key that logs in.
    let short = short_p256();
    let pem = rewrite(&short.key.private, "", &["-N", "passphrase", "-m", "PEM"]);
    assert!(pem.contains("Proc-Type: 4,ENCRYPTED"), "{pem:.80}");
    let err = Credentials::new(&pem, Some("passphrase"), "").expect_err("encrypted PEM EC");
    let msg = err.to_string();
    assert!(msg.contains("passphrase-protected PEM EC key"), "{msg}");
    assert!(msg.contains("`ssh-keygen -p -f KEY`"), "{msg}");

    let converted = rewrite(&pem, "passphrase", &["-N", "passphrase"]);
    assert!(converted.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    authenticates(
        &short.key.public,
        &converted,
        Some("passphrase"),
        "127.0.11.9",
    )
    .await;
}
