//! OpenSSH `known_hosts` parsing and host-key verification, done here rather than with
//! russh's `check_known_hosts`, which ignores markers, wildcards and case.
//!
//! The text comes from a Kubernetes Secret and is parsed once into memory; nothing here
//! touches the file system or the network. Matching follows OpenSSH (`sshd(8)`,
//! "SSH_KNOWN_HOSTS FILE FORMAT"): a host on port 22 is looked up as `host`, on any other
//! port as `[host]:port`; names compare ASCII case-insensitively; hashed names are
//! HMAC-SHA1 of the lowercased lookup name.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{KeyInit as _, Mac as _};
use russh::keys::ssh_key::Certificate;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{Algorithm, HashAlg, PublicKey};

/// Standard base64, as OpenSSH writes it, also accepting a missing `=` padding.
const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

type HmacSha1 = hmac::Hmac<sha1::Sha1>;

/// SHA-1 output size: OpenSSH requires both salt and hash of a hashed entry to be this long.
const SHA1_LEN: usize = 20;

/// Key types we can verify. Others (DSA, FIDO `sk-*`, certificates) are skipped, not errors.
const SUPPORTED_KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
];

/// A `known_hosts` line we cannot use. The message names the line but never repeats its
/// key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KnownHostsError {
    #[error(
        "line {line}: expected `hostpatterns keytype base64-key [comment]`, found {found} field(s)"
    )]
    MissingFields { line: usize, found: usize },
    #[error("line {line}: unknown marker {marker:?} (expected @revoked or @cert-authority)")]
    UnknownMarker { line: usize, marker: String },
    #[error("line {line}: malformed hashed host entry (expected |1|base64-salt|base64-hash)")]
    BadHashedHost { line: usize },
    #[error("line {line}: empty host pattern")]
    EmptyHostPattern { line: usize },
    #[error("line {line}: invalid {key_type} key: {reason}")]
    BadKey {
        line: usize,
        key_type: String,
        reason: String,
    },
}

impl KnownHostsError {
    /// 1-based line number of the offending line.
    pub fn line(&self) -> usize {
        match self {
            Self::MissingFields { line, .. }
            | Self::UnknownMarker { line, .. }
            | Self::BadHashedHost { line }
            | Self::EmptyHostPattern { line }
            | Self::BadKey { line, .. } => *line,
        }
    }
}

/// Outcome of checking a server's key; only [`HostKeyVerdict::Trusted`] may connect
/// (plus [`HostKeyVerdict::Unknown`] when trust-on-first-use was asked for explicitly).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyVerdict {
    /// A (non-revoked) entry for this host lists exactly this key.
    Trusted,
    /// No usable entry names this host at all.
    Unknown,
    /// The host has entries, but none for this key: a reinstalled host or a man in the middle.
    Mismatch {
        /// `SHA256:…` fingerprints of the keys known for the host, in file order.
        expected: Vec<String>,
    },
    /// An `@revoked` entry for this host lists this key; wins over any trusting entry.
    Revoked,
}

/// Outcome of checking a host certificate against the `@cert-authority` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertVerdict {
    /// Signed by an authority trusted for this host, in its validity window, naming the
    /// host as a principal.
    Trusted,
    /// No `@cert-authority` line names this host.
    NoAuthority,
    /// An `@revoked` line lists the certificate's key or its authority.
    Revoked,
    /// Why the certificate cannot be trusted for this host.
    Invalid(String),
}

/// A line that parsed but is ignored, kept so callers can say why a host is still unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLine {
    pub line: usize,
    pub reason: String,
}

/// Parsed `known_hosts`: the usable entries, in file order.
#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
    skipped: Vec<SkippedLine>,
}

#[derive(Debug, Clone)]
struct Entry {
    revoked: bool,
    /// `@cert-authority`: `key` signs host certificates for these hosts.
    authority: bool,
    hosts: HostSpec,
    key: PublicKey,
}

#[derive(Debug, Clone)]
enum HostSpec {
    /// `|1|salt|hash`: stands for exactly one lookup name.
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
    /// Comma-separated patterns, lowercased.
    Patterns(Vec<Pattern>),
}

#[derive(Debug, Clone)]
struct Pattern {
    negated: bool,
    glob: Vec<char>,
}

impl KnownHosts {
    /// Parses `known_hosts` text. Blank lines and `#` comments are ignored; lines with an
    /// unsupported key type are skipped (see [`KnownHosts::skipped`]);
    /// any other malformed line is an error naming its line number, so a typo cannot
    /// silently turn a pinned host into an unknown one.
    pub fn parse(text: &str) -> Result<KnownHosts, KnownHostsError> {
        let mut known = KnownHosts::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let content = raw.trim_start_matches([' ', '\t']);
            if content.trim().is_empty() || content.starts_with('#') {
                continue;
            }
            let mut fields: Vec<&str> = content.split_ascii_whitespace().collect();

            let mut revoked = false;
            let mut authority = false;
            if let Some(marker) = fields.first().filter(|f| f.starts_with('@')) {
                match *marker {
                    "@revoked" => revoked = true,
                    "@cert-authority" => authority = true,
                    other => {
                        return Err(KnownHostsError::UnknownMarker {
                            line,
                            marker: other.chars().take(40).collect(),
                        });
                    }
                }
                fields.remove(0);
            }
            let [hosts, key_type, key_b64, ..] = fields[..] else {
                return Err(KnownHostsError::MissingFields {
                    line,
                    found: fields.len(),
                });
            };

            // rsa-sha2-* name signature algorithms, but some tools write them for ssh-rsa keys.
            let key_type = match key_type {
                "rsa-sha2-256" | "rsa-sha2-512" => "ssh-rsa",
                other => other,
            };
            if !SUPPORTED_KEY_TYPES.contains(&key_type) {
                known.skipped.push(SkippedLine {
                    line,
                    reason: format!(
                        "key type {:?} is not supported",
                        key_type.chars().take(60).collect::<String>()
                    ),
                });
                continue;
            }

            let hosts = parse_hosts(hosts, line)?;
            let key = parse_key(key_type, key_b64, line)?;
            known.entries.push(Entry {
                revoked,
                authority,
                hosts,
                key,
            });
        }
        Ok(known)
    }

    /// Checks the key `host:port` presented. `host` is the name or address we connected to,
    /// as written in the inventory (not a resolved address).
    pub fn verify(&self, host: &str, port: u16, key: &PublicKey) -> HostKeyVerdict {
        let names = lookup_names(host, port);
        let mut trusted = false;
        let mut expected: Vec<String> = Vec::new();
        // an authority's key is not a host key: it only signs certificates
        for entry in self
            .entries
            .iter()
            .filter(|e| !e.authority && e.hosts.matches(&names))
        {
            let same = entry.key.key_data() == key.key_data();
            if entry.revoked {
                if same {
                    return HostKeyVerdict::Revoked;
                }
            } else if same {
                trusted = true;
            } else {
                let fp = fingerprint(&entry.key);
                if !expected.contains(&fp) {
                    expected.push(fp);
                }
            }
        }
        if trusted {
            HostKeyVerdict::Trusted
        } else if expected.is_empty() {
            HostKeyVerdict::Unknown
        } else {
            HostKeyVerdict::Mismatch { expected }
        }
    }

    /// Checks a host certificate `host:port` presented at `now` (Unix seconds): signed by
    /// a `@cert-authority` key listed for the host, a host certificate, inside its validity
    /// window, naming `host` (as written in the inventory) among its principals, with no
    /// critical options; neither its key nor its authority `@revoked`.
    pub fn verify_certificate(
        &self,
        host: &str,
        port: u16,
        cert: &Certificate,
        now: u64,
    ) -> CertVerdict {
        let names = lookup_names(host, port);
        let matching: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.hosts.matches(&names))
            .collect();
        if matching.iter().any(|e| {
            e.revoked
                && (e.key.key_data() == cert.public_key()
                    || e.key.key_data() == cert.signature_key())
        }) {
            return CertVerdict::Revoked;
        }
        let authorities: Vec<_> = matching
            .iter()
            .filter(|e| e.authority && !e.revoked)
            .map(|e| e.key.fingerprint(HashAlg::Sha256))
            .collect();
        if authorities.is_empty() {
            return CertVerdict::NoAuthority;
        }
        let signer = cert.signature_key().fingerprint(HashAlg::Sha256);
        if !authorities.contains(&signer) {
            return CertVerdict::Invalid(format!(
                "signed by {signer}, which is not a @cert-authority for this host"
            ));
        }
        if cert.cert_type() != CertType::Host {
            return CertVerdict::Invalid("a user certificate, not a host certificate".into());
        }
        if now < cert.valid_after() {
            return CertVerdict::Invalid(format!(
                "not valid before {} (Unix time; now {now})",
                cert.valid_after()
            ));
        }
        if now >= cert.valid_before() {
            return CertVerdict::Invalid(format!(
                "expired at {} (Unix time; now {now})",
                cert.valid_before()
            ));
        }
        if let Err(e) = cert.validate_at(now, authorities.iter()) {
            return CertVerdict::Invalid(format!("its signature does not verify: {e}"));
        }
        if !cert
            .valid_principals()
            .iter()
            .any(|p| p.eq_ignore_ascii_case(host))
        {
            let listed: Vec<String> = cert
                .valid_principals()
                .iter()
                .take(8)
                .map(|p| crate::text::head(p, 64).to_string())
                .collect();
            return CertVerdict::Invalid(format!("issued for {listed:?}, not for {host:?}"));
        }
        if !cert.critical_options().is_empty() {
            return CertVerdict::Invalid(
                "carries critical options, which no host certificate may".into(),
            );
        }
        CertVerdict::Trusted
    }

    /// The key algorithms of the plain keys known for `host:port`, in file order, so the
    /// key exchange asks the server for one of those (as OpenSSH orders its
    /// HostKeyAlgorithms) instead of whatever it prefers.
    pub fn known_algorithms(&self, host: &str, port: u16) -> Vec<Algorithm> {
        let names = lookup_names(host, port);
        let mut out: Vec<Algorithm> = Vec::new();
        for e in self
            .entries
            .iter()
            .filter(|e| !e.revoked && !e.authority && e.hosts.matches(&names))
        {
            let algorithm = e.key.algorithm();
            if !out.contains(&algorithm) {
                out.push(algorithm);
            }
        }
        out
    }

    /// Does a `@cert-authority` line name `host:port`? Then its certificate is asked for.
    pub fn has_authority(&self, host: &str, port: u16) -> bool {
        let names = lookup_names(host, port);
        self.entries
            .iter()
            .any(|e| e.authority && !e.revoked && e.hosts.matches(&names))
    }

    /// Number of usable entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no line can trust any host.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Lines that were ignored and why (unsupported key types).
    pub fn skipped(&self) -> &[SkippedLine] {
        &self.skipped
    }
}

/// `SHA256:<base64 without padding>`, the form `ssh-keygen -lf` and `ssh` print.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The line to append to `known_hosts` when a key is accepted on first use.
///
/// A host made only of `[A-Za-z0-9._:-]` is written in the clear (lowercased, `[host]:port`
/// off port 22), like `ssh` does. Anything else is written as a hashed entry: a name with
/// a space, newline, comma, `*` or `!` written in the clear could add or widen entries.
pub fn known_hosts_line(host: &str, port: u16, key: &PublicKey) -> String {
    let Ok(blob) = key.to_bytes() else {
        // Unreachable for a key we decoded from the wire; a comment line is harmless.
        return format!(
            "# outrider: cannot encode the host key of {}",
            B64.encode(host)
        );
    };
    let key_part = format!("{} {}", key.algorithm().as_str(), B64.encode(blob));
    let host = host.to_ascii_lowercase();
    let plain = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    let name = lookup_name(&host, port);
    if plain {
        return format!("{name} {key_part}");
    }
    let mut salt = [0u8; SHA1_LEN];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
    let hash = hmac_sha1(&salt, &name);
    format!("|1|{}|{} {key_part}", B64.encode(salt), B64.encode(hash))
}

/// `host` on port 22, `[host]:port` otherwise (how OpenSSH names a host in the file).
fn lookup_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Names an entry may use for this host. On port 22 `[host]:22` is accepted too, because
/// people write it although `ssh` never does; it names the same endpoint.
fn lookup_names(host: &str, port: u16) -> Vec<String> {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        vec![host.clone(), format!("[{host}]:22")]
    } else {
        vec![lookup_name(&host, port)]
    }
}

fn hmac_sha1(salt: &[u8], name: &str) -> Vec<u8> {
    match HmacSha1::new_from_slice(salt) {
        Ok(mut mac) => {
            mac.update(name.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        // HMAC takes keys of any length; an empty hash never matches.
        Err(_) => Vec::new(),
    }
}

impl HostSpec {
    fn matches(&self, names: &[String]) -> bool {
        match self {
            HostSpec::Hashed { salt, hash } => names.iter().any(|name| {
                HmacSha1::new_from_slice(salt).is_ok_and(|mut mac| {
                    mac.update(name.as_bytes());
                    mac.verify_slice(hash).is_ok()
                })
            }),
            HostSpec::Patterns(patterns) => {
                let names: Vec<Vec<char>> = names.iter().map(|n| n.chars().collect()).collect();
                let hit = |p: &Pattern| names.iter().any(|n| glob_match(&p.glob, n));
                // One matching negation rules the line out, whatever else matches (OpenSSH).
                !patterns.iter().any(|p| p.negated && hit(p))
                    && patterns.iter().any(|p| !p.negated && hit(p))
            }
        }
    }
}

fn parse_hosts(field: &str, line: usize) -> Result<HostSpec, KnownHostsError> {
    if let Some(rest) = field.strip_prefix('|') {
        let bad = || KnownHostsError::BadHashedHost { line };
        let rest = rest.strip_prefix("1|").ok_or_else(bad)?;
        let (salt, hash) = rest.split_once('|').ok_or_else(bad)?;
        let salt = B64.decode(salt).map_err(|_| bad())?;
        let hash = B64.decode(hash).map_err(|_| bad())?;
        if salt.len() != SHA1_LEN || hash.len() != SHA1_LEN {
            return Err(bad());
        }
        return Ok(HostSpec::Hashed { salt, hash });
    }
    let mut patterns = Vec::new();
    for raw in field.split(',').filter(|p| !p.is_empty()) {
        let (negated, glob) = match raw.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, raw),
        };
        if glob.is_empty() {
            return Err(KnownHostsError::EmptyHostPattern { line });
        }
        patterns.push(Pattern {
            negated,
            glob: glob.to_ascii_lowercase().chars().collect(),
        });
    }
    if patterns.is_empty() {
        return Err(KnownHostsError::EmptyHostPattern { line });
    }
    Ok(HostSpec::Patterns(patterns))
}

fn parse_key(key_type: &str, b64: &str, line: usize) -> Result<PublicKey, KnownHostsError> {
    let bad = |reason: String| KnownHostsError::BadKey {
        line,
        key_type: key_type.to_owned(),
        reason,
    };
    let blob = B64
        .decode(b64)
        .map_err(|_| bad("the key is not valid base64".to_owned()))?;
    let key = PublicKey::from_bytes(&blob)
        .map_err(|e| bad(format!("not a valid SSH public key ({e})")))?;
    let actual = key.algorithm();
    if actual.as_str() != key_type {
        return Err(bad(format!("the key data is a {} key", actual.as_str())));
    }
    Ok(key)
}

/// OpenSSH `match_pattern`: `*` is any run of characters, `?` exactly one.
fn glob_match(pattern: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and how much text it has swallowed so far.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keys made with ssh-keygen; fingerprints are what `ssh-keygen -lf` printed for them.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAID8kWr5/8Cs3Y3jCi5dUSPz/PoY4sxXedQ+PfY336GDu";
    const ED25519_FP: &str = "SHA256:Lia9FZu/XfZC/2MGoLnweFlm/wwB9rR3avupKm6znOk";
    const ED25519_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAWcXvh7iJ0Z4g9zc+ylqyVxT+WIMsiErsUgpBDhG8nn";
    const ED25519_B_FP: &str = "SHA256:Yo8VCjpBFyKS1YHlEifu1ud8TANlMtjl2Njtt8zk054";
    const P256: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBLTWHXLlVCpGGGp5x+328qL+hI5gQJUZ0UX4PxWCEZzEvC/sOOc4kLF631aBJSMJf1BANUP5K0MSZM+KvaztD/0=";
    const P256_FP: &str = "SHA256:lO3P6SMmygnYy0n+sR/YV3laQrA/SB4EtFLAwYB1H6s";
    const P384: &str = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBOt17o5T/HkVyNGIEuYxZbFack/AgeeEjxAwvbNw9JwmmmeOrkiP6HHAKY0Z8CmS/VD4LQvKvkw5ufr6mBOGyyYiQxu2Ry4TjgaG3KtX1QjSWYa99+HntEMAS0AstjCw8Q==";
    const P384_FP: &str = "SHA256:R7E0X9MN4nGjPgiH/h/5gVFAO0Op++Q83x+7/H5NxhI";
    const P521: &str = "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBAGtZgNkgOPVLOD063QXehN9JPUBkY1vFBi7poktY/7ChXg1r6RkG6/knPAmHvh9vGoXN4DHkiXCYucPdwsOnbqF7ACElS4WRFjsJKkC5HfE1K/hE9PqfrB7a4iNNZmxkutrHMXfHNmJng8DNJRmKFzMpEZDwLE7QKfN/CM1h8sg9ostvw==";
    const P521_FP: &str = "SHA256:KcJdCMzl19rrvZOqVCS8k2WKtY/ZRt84/tPPEjUP+M0";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCpKJZ83gOUezAIaRNtkoyQUkxKhe9n+wZDTWi4l0qggxOYKJIPvHU3drlBuyNwp+pLyazC0gvc2Fim0xA5mNoVuCuORqvBuizx0iBudmPko73kvrYtd/Q5XicNEEOtZl3sbER9S0uxAykUIDM97EgZ6UspFRog1cJr3F61KIJuo3RItkPYNfm+o5OEVcAWwtCabckCzFpwVBLCsj61heAtlac943Us37sbSBwiuafnKjm0kFwC1vS381pAgejTQq5PP+b2MNxdVm8Vs1k9NCRpm+hePe7zjPLpgOe6yKoqUbHJ0NkigQgg9Dl5Ugv++nbub5dwaXL7nASpPJoqLrKR";
    const RSA_FP: &str = "SHA256:ZcHVRKjD0PF3s1LeW4cA7iGlc/5qdVQmGknpbv4GQ14";

    /// `ssh-keygen -H` output for `web1.example.com`, `[db.example.com]:2222` and
    /// `MiXeD.Example.COM` (which ssh-keygen lowercases before hashing), all with ED25519.
    const HASHED: &str = "\
|1|XG2bSDEvCDO9H7PAzHSyredXETc=|exsFiSumNnpx6H4Iyc5H8zP1EJc= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAID8kWr5/8Cs3Y3jCi5dUSPz/PoY4sxXedQ+PfY336GDu
|1|BfmcwIWIPYtN0NsMqKV8YDyRX20=|sh9w7HvZn4r6R9yYADcGayhiHgI= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAID8kWr5/8Cs3Y3jCi5dUSPz/PoY4sxXedQ+PfY336GDu
|1|8PN9NGsAgDN/kwW/UC8IGM/cQDA=|4KIrOs/ATpEep3CrU5nCelWaWpI= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAID8kWr5/8Cs3Y3jCi5dUSPz/PoY4sxXedQ+PfY336GDu
";

    fn key(openssh: &str) -> PublicKey {
        PublicKey::from_openssh(openssh).unwrap()
    }

    fn kh(text: &str) -> KnownHosts {
        KnownHosts::parse(text).unwrap()
    }

    fn mismatch(fps: &[&str]) -> HostKeyVerdict {
        HostKeyVerdict::Mismatch {
            expected: fps.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn fingerprints_match_ssh_keygen() {
        for (k, fp) in [
            (ED25519, ED25519_FP),
            (ED25519_B, ED25519_B_FP),
            (P256, P256_FP),
            (P384, P384_FP),
            (P521, P521_FP),
            (RSA, RSA_FP),
        ] {
            assert_eq!(fingerprint(&key(k)), fp);
        }
    }

    #[test]
    fn every_supported_key_type_is_trusted() {
        for k in [ED25519, P256, P384, P521, RSA] {
            let known = kh(&format!("host.example.com {k} a comment\n"));
            assert_eq!(known.len(), 1);
            assert_eq!(
                known.verify("host.example.com", 22, &key(k)),
                HostKeyVerdict::Trusted
            );
        }
    }

    #[test]
    fn empty_file_knows_nobody() {
        let known = kh("\n# only a comment\n   \n\t# indented comment\n");
        assert!(known.is_empty());
        assert_eq!(
            known.verify("a", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            KnownHosts::default().verify("a", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn plain_host_means_port_22_only() {
        let known = kh(&format!("web1 {ED25519}\n"));
        assert_eq!(
            known.verify("web1", 22, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("web1", 2222, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("web2", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn bracketed_host_names_a_port() {
        let known = kh(&format!(
            "[web1]:2222 {ED25519}\n[10.0.0.5]:2200,[::1]:2200 {P256}\n"
        ));
        assert_eq!(
            known.verify("web1", 2222, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("web1", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("web1", 2223, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("10.0.0.5", 2200, &key(P256)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("::1", 2200, &key(P256)),
            HostKeyVerdict::Trusted
        );
    }

    #[test]
    fn explicit_port_22_matches_port_22() {
        let known = kh(&format!("[web1]:22 {ED25519}\n"));
        assert_eq!(
            known.verify("web1", 22, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("web1", 2222, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn hashed_entries_from_ssh_keygen() {
        let known = kh(HASHED);
        let k = key(ED25519);
        assert_eq!(
            known.verify("web1.example.com", 22, &k),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("WEB1.example.COM", 22, &k),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("db.example.com", 2222, &k),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("mixed.example.com", 22, &k),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("MiXeD.Example.COM", 22, &k),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("db.example.com", 22, &k),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("web1.example.com", 2222, &k),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("web2.example.com", 22, &k),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("web1.example.com", 22, &key(ED25519_B)),
            mismatch(&[ED25519_FP])
        );
    }

    #[test]
    fn host_names_are_case_insensitive() {
        let known = kh(&format!(
            "Web1.EXAMPLE.com,[DB.example.com]:2222 {ED25519}\n"
        ));
        assert_eq!(
            known.verify("web1.example.com", 22, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("WEB1.example.COM", 22, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("db.EXAMPLE.com", 2222, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
    }

    #[test]
    fn comma_separated_patterns() {
        let known = kh(&format!("a.example.com,b.example.com,10.1.2.3 {ED25519}\n"));
        for host in ["a.example.com", "b.example.com", "10.1.2.3"] {
            assert_eq!(
                known.verify(host, 22, &key(ED25519)),
                HostKeyVerdict::Trusted,
                "{host}"
            );
        }
        assert_eq!(
            known.verify("c.example.com", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn wildcards() {
        let known = kh(&format!(
            "*.prod.example.com {ED25519}\nweb?.test {P256}\n[*.lab]:2222 {P384}\n"
        ));
        assert_eq!(
            known.verify("a.prod.example.com", 22, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("x.y.prod.example.com", 22, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("prod.example.com", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("web1.test", 22, &key(P256)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("web12.test", 22, &key(P256)),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("web.test", 22, &key(P256)),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("n1.lab", 2222, &key(P384)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("n1.lab", 22, &key(P384)),
            HostKeyVerdict::Unknown
        );
    }

    #[test]
    fn negated_pattern_excludes_a_host() {
        let known = kh(&format!("*.example.com,!bad.example.com {ED25519}\n"));
        assert_eq!(
            known.verify("good.example.com", 22, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("bad.example.com", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("BAD.example.com", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
        // Negation alone never matches anything.
        let known = kh(&format!("!bad.example.com {ED25519}\n"));
        assert_eq!(
            known.verify("good.example.com", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
        // Order inside the list does not matter.
        let known = kh(&format!("!bad.example.com,* {ED25519}\n"));
        assert_eq!(
            known.verify("bad.example.com", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("x", 22, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
    }

    #[test]
    fn other_key_for_known_host_is_a_mismatch() {
        let known = kh(&format!(
            "web1 {ED25519}\nweb1 {P256}\nweb1 {ED25519}\nother {RSA}\n"
        ));
        assert_eq!(
            known.verify("web1", 22, &key(ED25519_B)),
            mismatch(&[ED25519_FP, P256_FP])
        );
        // Even a key type the host has no entry for: never silently "unknown".
        assert_eq!(
            known.verify("web1", 22, &key(RSA)),
            mismatch(&[ED25519_FP, P256_FP])
        );
    }

    #[test]
    fn any_matching_entry_trusts() {
        let known = kh(&format!("web1 {ED25519}\n* {P256}\nweb1 {RSA}\n"));
        for k in [ED25519, P256, RSA] {
            assert_eq!(known.verify("web1", 22, &key(k)), HostKeyVerdict::Trusted);
        }
        assert_eq!(
            known.verify("web2", 22, &key(ED25519)),
            mismatch(&[P256_FP])
        );
    }

    #[test]
    fn revoked_wins_over_trust_in_any_order() {
        for text in [
            format!("web1 {ED25519}\n@revoked web1 {ED25519}\n"),
            format!("@revoked * {ED25519}\nweb1 {ED25519}\n"),
            format!("@revoked\tweb1,web2   {ED25519} compromised\n* {ED25519}\n"),
        ] {
            let known = kh(&text);
            assert_eq!(
                known.verify("web1", 22, &key(ED25519)),
                HostKeyVerdict::Revoked,
                "{text}"
            );
        }
    }

    #[test]
    fn revoked_entry_applies_to_its_hosts_and_key_only() {
        let known = kh(&format!(
            "@revoked web1 {ED25519_B}\nweb1 {ED25519}\nweb2 {ED25519_B}\n"
        ));
        assert_eq!(
            known.verify("web1", 22, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("web1", 22, &key(ED25519_B)),
            HostKeyVerdict::Revoked
        );
        // Host patterns scope a revocation, as in OpenSSH.
        assert_eq!(
            known.verify("web2", 22, &key(ED25519_B)),
            HostKeyVerdict::Trusted
        );
        // A revocation alone is not an entry that pins a key.
        let known = kh(&format!("@revoked web1 {ED25519_B}\n"));
        assert_eq!(
            known.verify("web1", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
        assert_eq!(
            known.verify("web1", 22, &key(ED25519_B)),
            HostKeyVerdict::Revoked
        );
    }

    #[test]
    fn cert_authority_keys_trust_no_plain_key_and_mark_the_hosts_that_want_certificates() {
        let known = kh(&format!(
            "@cert-authority *.example.com {ED25519}\nweb1 {P256}\n"
        ));
        assert_eq!(known.len(), 2);
        assert!(known.skipped().is_empty());
        // the authority's key is no host key of the hosts it signs for
        assert_eq!(
            known.verify("a.example.com", 22, &key(ED25519)),
            HostKeyVerdict::Unknown
        );
        assert!(known.has_authority("a.example.com", 22));
        assert!(!known.has_authority("web1", 22));
        assert_eq!(
            known.known_algorithms("web1", 22),
            vec![key(P256).algorithm()]
        );
        assert!(known.known_algorithms("a.example.com", 22).is_empty());
        // a CA line is checked like any other: a typo is an error, not a silent skip
        assert!(matches!(
            KnownHosts::parse("@cert-authority * ssh-ed25519 !!!notbase64\n"),
            Err(KnownHostsError::BadKey { line: 1, .. })
        ));
    }

    #[test]
    fn unsupported_key_types_are_skipped() {
        let text = format!(
            "web1 ssh-dss AAAAB3NzaC1kc3MAAACBAP\n\
             web1 sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t\n\
             web1 ssh-ed25519-cert-v01@openssh.com AAAAIHNzaC1lZDI1NTE5LWNlcnQ\n\
             web1 {ED25519}\n"
        );
        let known = kh(&text);
        assert_eq!(known.len(), 1);
        let lines: Vec<usize> = known.skipped().iter().map(|s| s.line).collect();
        assert_eq!(lines, [1, 2, 3]);
        assert!(known.skipped()[0].reason.contains("ssh-dss"));
        assert_eq!(
            known.verify("web1", 22, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
    }

    #[test]
    fn rsa_sha2_names_are_read_as_ssh_rsa() {
        let b64 = RSA.split_once(' ').unwrap().1;
        for alias in ["rsa-sha2-256", "rsa-sha2-512"] {
            let known = kh(&format!("web1 {alias} {b64}\n"));
            assert_eq!(known.verify("web1", 22, &key(RSA)), HostKeyVerdict::Trusted);
        }
    }

    #[test]
    fn comment_of_presented_key_is_irrelevant() {
        let known = kh(&format!("web1 {ED25519} root@web1\n"));
        let mut k = key(ED25519);
        k.set_comment("something else");
        assert_eq!(known.verify("web1", 22, &k), HostKeyVerdict::Trusted);
    }

    #[test]
    fn tolerates_crlf_tabs_and_indentation() {
        let text = format!("# header\r\n\r\n  web1\t{ED25519}\t comment \r\n\tweb2  {P256}\r\n");
        let known = kh(&text);
        assert_eq!(
            known.verify("web1", 22, &key(ED25519)),
            HostKeyVerdict::Trusted
        );
        assert_eq!(
            known.verify("web2", 22, &key(P256)),
            HostKeyVerdict::Trusted
        );
    }

    #[test]
    fn errors_name_the_line() {
        let ed_b64 = ED25519.split_once(' ').unwrap().1;
        let cases: Vec<(String, KnownHostsError)> = vec![
            (
                "web1 ssh-ed25519\n".to_owned(),
                KnownHostsError::MissingFields { line: 1, found: 2 },
            ),
            (
                format!("# c\nweb1 {ED25519}\n\njustonefield\n"),
                KnownHostsError::MissingFields { line: 4, found: 1 },
            ),
            (
                "@revoked web1\n".to_owned(),
                KnownHostsError::MissingFields { line: 1, found: 1 },
            ),
            (
                format!("@trusted web1 {ED25519}\n"),
                KnownHostsError::UnknownMarker {
                    line: 1,
                    marker: "@trusted".to_owned(),
                },
            ),
            (
                format!("|1|notbase64!|AAAA {ED25519}\n"),
                KnownHostsError::BadHashedHost { line: 1 },
            ),
            (
                // Salt and hash must be 20 bytes each.
                format!("|1|AAAA|AAAA {ED25519}\n"),
                KnownHostsError::BadHashedHost { line: 1 },
            ),
            (
                format!("|2|XG2bSDEvCDO9H7PAzHSyredXETc=|exsFiSumNnpx6H4Iyc5H8zP1EJc= {ED25519}\n"),
                KnownHostsError::BadHashedHost { line: 1 },
            ),
            (
                format!("|1|XG2bSDEvCDO9H7PAzHSyredXETc= {ED25519}\n"),
                KnownHostsError::BadHashedHost { line: 1 },
            ),
            (
                format!(", {ED25519}\n"),
                KnownHostsError::EmptyHostPattern { line: 1 },
            ),
            (
                format!("web1,! {ED25519}\n"),
                KnownHostsError::EmptyHostPattern { line: 1 },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(KnownHosts::parse(&text).unwrap_err(), want, "{text:?}");
        }

        let err =
            KnownHosts::parse(&format!("web1 {ED25519}\nweb2 ssh-ed25519 @@@@\n")).unwrap_err();
        assert!(
            matches!(err, KnownHostsError::BadKey { line: 2, .. }),
            "{err:?}"
        );
        assert_eq!(err.line(), 2);
        assert!(
            err.to_string()
                .starts_with("line 2: invalid ssh-ed25519 key"),
            "{err}"
        );

        // Base64 that decodes, but to garbage.
        let err = KnownHosts::parse("web1 ssh-ed25519 AAAA\n").unwrap_err();
        assert!(
            matches!(err, KnownHostsError::BadKey { line: 1, .. }),
            "{err:?}"
        );

        // The label says RSA, the key data is Ed25519: refuse rather than guess.
        let err = KnownHosts::parse(&format!("web1 ssh-rsa {ed_b64}\n")).unwrap_err();
        assert_eq!(
            err,
            KnownHostsError::BadKey {
                line: 1,
                key_type: "ssh-rsa".to_owned(),
                reason: "the key data is a ssh-ed25519 key".to_owned(),
            }
        );
        // And the message does not echo key material.
        assert!(!err.to_string().contains(ed_b64));
    }

    #[test]
    fn missing_padding_is_accepted() {
        let p256 = P256.trim_end_matches('=');
        let known = kh(&format!("web1 {p256}\n"));
        assert_eq!(
            known.verify("web1", 22, &key(P256)),
            HostKeyVerdict::Trusted
        );
    }

    #[test]
    fn known_hosts_line_matches_openssh_format() {
        assert_eq!(
            known_hosts_line("web1.example.com", 22, &key(ED25519)),
            format!("web1.example.com {ED25519}")
        );
        assert_eq!(
            known_hosts_line("Web1", 2222, &key(P521)),
            format!("[web1]:2222 {P521}")
        );
        assert_eq!(
            known_hosts_line("127.0.10.7", 2200, &key(RSA)),
            format!("[127.0.10.7]:2200 {RSA}")
        );
        assert_eq!(
            known_hosts_line("fe80::1", 22, &key(P384)),
            format!("fe80::1 {P384}")
        );
        // The comment of the presented key is not recorded.
        let mut k = key(ED25519);
        k.set_comment("evil\n* ssh-ed25519 AAAA");
        assert_eq!(known_hosts_line("web1", 22, &k), format!("web1 {ED25519}"));
    }

    #[test]
    fn recorded_line_round_trips() {
        for (host, port) in [
            ("web1", 22),
            ("WEB1", 2222),
            ("10.0.0.1", 22),
            ("::1", 2200),
        ] {
            let line = known_hosts_line(host, port, &key(ED25519));
            let known = kh(&line);
            assert_eq!(
                known.verify(host, port, &key(ED25519)),
                HostKeyVerdict::Trusted,
                "{line}"
            );
            assert_eq!(
                known.verify(host, port, &key(P256)),
                mismatch(&[ED25519_FP])
            );
            assert_eq!(
                known.verify("elsewhere", port, &key(ED25519)),
                HostKeyVerdict::Unknown
            );
        }
    }

    #[test]
    fn unusual_host_names_are_recorded_hashed() {
        for host in [
            "*",
            "!web1",
            "a,b",
            "web1 ssh-ed25519 AAAA",
            "evil\n* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAWcXvh7iJ0Z4g9zc+ylqyVxT+WIMsiErsUgpBDhG8nn",
            "#comment",
            "@revoked",
            "[x]:22",
            "|1|x|y",
            "",
            "höst",
        ] {
            let line = known_hosts_line(host, 22, &key(ED25519));
            assert!(line.starts_with("|1|"), "{line}");
            assert_eq!(line.lines().count(), 1, "{line:?}");
            let known = kh(&line);
            assert_eq!(known.len(), 1);
            assert_eq!(
                known.verify(host, 22, &key(ED25519)),
                HostKeyVerdict::Trusted,
                "{host:?}"
            );
            for other in ["web1", "a", "b", "z", "anything"] {
                assert_eq!(
                    known.verify(other, 22, &key(ED25519)),
                    HostKeyVerdict::Unknown
                );
                assert_eq!(
                    known.verify(other, 22, &key(ED25519_B)),
                    HostKeyVerdict::Unknown
                );
            }
        }
    }

    #[test]
    fn glob_matching() {
        let g = |p: &str, t: &str| {
            glob_match(
                &p.chars().collect::<Vec<_>>(),
                &t.chars().collect::<Vec<_>>(),
            )
        };
        assert!(g("*", ""));
        assert!(g("*", "anything"));
        assert!(g("a*", "a"));
        assert!(g("a*c", "abbbc"));
        assert!(g("a*c", "acbc"));
        assert!(g("*.example.com", "x.example.com"));
        assert!(!g("*.example.com", "example.com"));
        assert!(g("?", "x"));
        assert!(!g("?", ""));
        assert!(!g("?", "xy"));
        assert!(g("a?c*", "abcdef"));
        assert!(g("**a**", "xxaxx"));
        assert!(!g("abc", "abcd"));
        assert!(!g("abcd", "abc"));
        assert!(g("[*]:2222", "[h]:2222"));
        assert!(!g("[*]:2222", "[h]:22"));
        assert!(!g("a*b*c", "aXbXd"));
        assert!(g("", ""));
        assert!(!g("", "a"));
    }
}
