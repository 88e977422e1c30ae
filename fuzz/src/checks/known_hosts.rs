//! `known_hosts` (src/ssh/known_hosts.rs): the parser never panics; an error names the first
//! bad line, says what is wrong with it and never repeats its key; a file that parses gives
//! the same verdicts as a reference model whose host patterns are regexes and whose hashed
//! names are checked with HMAC-SHA1 directly (`@cert-authority` keys never vouch for a host
//! key); and the line recorded for a key accepted on first use trusts exactly that host,
//! port and key, whatever the host name holds.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::{KeyInit as _, Mac as _};
use outrider::ssh::known_hosts::{
    HostKeyVerdict, KnownHosts, KnownHostsError, fingerprint, known_hosts_line,
};
use russh::keys::PublicKey;

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAID8kWr5/8Cs3Y3jCi5dUSPz/PoY4sxXedQ+PfY336GDu";
const ED25519_B: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAWcXvh7iJ0Z4g9zc+ylqyVxT+WIMsiErsUgpBDhG8nn";
const P256: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBLTWHXLlVCpGGGp5x+328qL+hI5gQJUZ0UX4PxWCEZzEvC/sOOc4kLF631aBJSMJf1BANUP5K0MSZM+KvaztD/0=";

/// Key types the parser verifies (after mapping `rsa-sha2-*` to `ssh-rsa`).
const SUPPORTED: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
];

/// Bounds the work per input: queries are (hosts x keys) `verify` calls on both sides.
const MAX_HOSTS: usize = 24;
const MAX_KEYS: usize = 4;

const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

type HmacSha1 = hmac::Hmac<sha1::Sha1>;

pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match KnownHosts::parse(&text) {
        Ok(known) => agrees_with_reference(&text, &known),
        Err(e) => error_names_the_first_bad_line(&text, &e),
    }
    recorded_line_trusts_exactly_its_host(data, &text);
}

fn key(openssh: &str) -> PublicKey {
    PublicKey::from_openssh(openssh).expect("built-in test key")
}

/// The fields of a line as OpenSSH reads them, or `None` for a blank or comment line.
fn fields(raw: &str) -> Option<Vec<&str>> {
    let content = raw.trim_start_matches([' ', '\t']);
    if content.trim().is_empty() || content.starts_with('#') {
        return None;
    }
    Some(content.split_ascii_whitespace().collect())
}

fn error_names_the_first_bad_line(text: &str, e: &KnownHostsError) {
    let lines: Vec<&str> = text.lines().collect();
    let n = e.line();
    assert!(
        (1..=lines.len()).contains(&n),
        "{e}: line {n} of {}",
        lines.len()
    );
    // Every line before it was fine on its own.
    let before = lines[..n - 1].join("\n");
    if let Err(earlier) = KnownHosts::parse(&before) {
        panic!(
            "the error is reported on line {n}, but line {} is bad too: {earlier}",
            earlier.line()
        );
    }
    let line = lines[n - 1];
    let Some(mut f) = fields(line) else {
        panic!("{e}: line {n} is blank or a comment: {line:?}");
    };
    let marker = f.first().filter(|m| m.starts_with('@')).copied();
    if let Some(m) = marker
        && (m == "@revoked" || m == "@cert-authority")
    {
        f.remove(0);
    }
    match e {
        KnownHostsError::MissingFields { found, .. } => {
            assert!(*found < 3 && *found == f.len(), "{e}: fields {f:?}");
        }
        KnownHostsError::UnknownMarker { marker: m, .. } => {
            let first = marker.unwrap_or_default();
            assert_eq!(*m, first.chars().take(40).collect::<String>(), "{e}");
        }
        KnownHostsError::BadHashedHost { .. } => {
            assert!(f.first().is_some_and(|h| h.starts_with('|')), "{e}: {f:?}");
        }
        KnownHostsError::EmptyHostPattern { .. } => {
            let hosts = f.first().copied().unwrap_or_default();
            assert!(
                hosts.split(',').any(|p| p == "!") || hosts.split(',').all(str::is_empty),
                "{e}: {hosts:?}"
            );
        }
        KnownHostsError::BadKey { key_type, .. } => {
            // The message names the line and the type but never repeats the key itself.
            let b64 = f.get(2).copied().unwrap_or_default();
            let msg = e.to_string();
            assert!(
                b64.len() < 12 || key_type.contains(b64) || !msg.contains(b64),
                "the error repeats the key: {msg}"
            );
        }
    }
}

enum RefHosts {
    Hashed {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    /// (negated, regex over the lowercased lookup name, the pattern as written)
    Patterns(Vec<(bool, regex::Regex, String)>),
}

struct RefEntry {
    revoked: bool,
    hosts: RefHosts,
    key: PublicKey,
}

/// OpenSSH's `*` (any run) and `?` (one character) as an anchored regex.
fn glob_regex(glob: &str) -> regex::Regex {
    let mut re = String::from("(?s)^");
    for c in glob.chars() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            c => re.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
        }
    }
    re.push('$');
    regex::RegexBuilder::new(&re)
        .size_limit(1 << 26)
        .build()
        .expect("an escaped glob is a valid regex")
}

/// What the reference makes of a file the parser accepted.
struct Reference {
    /// Host key entries (`@revoked` ones included).
    entries: Vec<RefEntry>,
    /// Lines skipped for their key type, `@cert-authority` lines left out.
    skipped: Vec<usize>,
    /// `@cert-authority` lines: never a host key, skipped or kept as authorities.
    authorities: Vec<usize>,
}

/// The entries of a file the parser accepted, and the lines it must have skipped.
fn reference(text: &str) -> Reference {
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    let mut authorities = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let Some(mut f) = fields(raw) else { continue };
        let mut revoked = false;
        match f.first().copied() {
            Some("@revoked") => {
                revoked = true;
                f.remove(0);
            }
            Some("@cert-authority") => {
                authorities.push(i + 1);
                continue;
            }
            _ => {}
        }
        let [hosts, key_type, b64, ..] = f[..] else {
            panic!("line {} has too few fields but the file parsed", i + 1);
        };
        let key_type = match key_type {
            "rsa-sha2-256" | "rsa-sha2-512" => "ssh-rsa",
            t => t,
        };
        if !SUPPORTED.contains(&key_type) {
            skipped.push(i + 1);
            continue;
        }
        let key = B64
            .decode(b64)
            .ok()
            .and_then(|blob| PublicKey::from_bytes(&blob).ok())
            .unwrap_or_else(|| {
                panic!(
                    "line {}: the parser accepted a key that does not decode",
                    i + 1
                )
            });
        let hosts = if let Some(rest) = hosts.strip_prefix("|1|") {
            let (salt, hash) = rest
                .split_once('|')
                .and_then(|(s, h)| Some((B64.decode(s).ok()?, B64.decode(h).ok()?)))
                .unwrap_or_else(|| panic!("line {}: accepted a bad hashed host", i + 1));
            RefHosts::Hashed { salt, hash }
        } else {
            let patterns = hosts
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (neg, glob) = p.strip_prefix('!').map_or((false, p), |g| (true, g));
                    let glob = glob.to_ascii_lowercase();
                    (neg, glob_regex(&glob), glob)
                })
                .collect();
            RefHosts::Patterns(patterns)
        };
        entries.push(RefEntry {
            revoked,
            hosts,
            key,
        });
    }
    Reference {
        entries,
        skipped,
        authorities,
    }
}

fn names(host: &str, port: u16) -> Vec<String> {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        vec![host.clone(), format!("[{host}]:22")]
    } else {
        vec![format!("[{host}]:{port}")]
    }
}

fn ref_matches(hosts: &RefHosts, names: &[String]) -> bool {
    match hosts {
        RefHosts::Hashed { salt, hash } => names.iter().any(|n| {
            let mut mac = HmacSha1::new_from_slice(salt).expect("HMAC takes any key");
            mac.update(n.as_bytes());
            mac.finalize().into_bytes().as_slice() == hash.as_slice()
        }),
        RefHosts::Patterns(ps) => {
            let hit = |re: &regex::Regex| names.iter().any(|n| re.is_match(n));
            !ps.iter().any(|(neg, re, _)| *neg && hit(re))
                && ps.iter().any(|(neg, re, _)| !*neg && hit(re))
        }
    }
}

fn ref_verify(entries: &[RefEntry], host: &str, port: u16, key: &PublicKey) -> HostKeyVerdict {
    let names = names(host, port);
    let matching: Vec<&RefEntry> = entries
        .iter()
        .filter(|e| ref_matches(&e.hosts, &names))
        .collect();
    let same = |e: &&RefEntry| e.key.key_data() == key.key_data();
    if matching.iter().any(|e| e.revoked && same(e)) {
        return HostKeyVerdict::Revoked;
    }
    if matching.iter().any(|e| !e.revoked && same(e)) {
        return HostKeyVerdict::Trusted;
    }
    let mut expected: Vec<String> = Vec::new();
    for e in matching.iter().filter(|e| !e.revoked) {
        let fp = fingerprint(&e.key);
        if !expected.contains(&fp) {
            expected.push(fp);
        }
    }
    if expected.is_empty() {
        HostKeyVerdict::Unknown
    } else {
        HostKeyVerdict::Mismatch { expected }
    }
}

/// `[host]:port` as written in a pattern, else the name on port 22.
fn as_query(name: &str) -> (String, u16) {
    if let Some(inner) = name.strip_prefix('[')
        && let Some((host, port)) = inner.rsplit_once("]:")
        && let Ok(port) = port.parse::<u16>()
    {
        return (host.to_owned(), port);
    }
    (name.to_owned(), 22)
}

fn agrees_with_reference(text: &str, known: &KnownHosts) {
    let Reference {
        entries,
        skipped,
        authorities,
    } = reference(text);
    // `@cert-authority` lines are either skipped or kept as authorities (whose keys are
    // not host keys): only the other lines are compared one for one.
    let kept_authorities = known.len().checked_sub(entries.len());
    assert!(
        kept_authorities.is_some_and(|n| n <= authorities.len()),
        "{} usable entries, the reference has {} and {} authority lines",
        known.len(),
        entries.len(),
        authorities.len()
    );
    let got: Vec<usize> = known
        .skipped()
        .iter()
        .map(|s| s.line)
        .filter(|l| !authorities.contains(l))
        .collect();
    assert_eq!(got, skipped, "skipped lines");

    // Hosts the patterns name (wildcards filled in several ways), plus a few others.
    let mut hosts: Vec<(String, u16)> =
        vec![("web1".into(), 22), ("".into(), 22), ("x".into(), 2222)];
    for e in &entries {
        let RefHosts::Patterns(ps) = &e.hosts else {
            continue;
        };
        for (_, _, glob) in ps {
            for fill in ["", "x", "a.b"] {
                let name: String = glob
                    .chars()
                    .flat_map(|c| match c {
                        '*' => fill.chars().collect::<Vec<_>>(),
                        '?' => vec!['q'],
                        c => vec![c],
                    })
                    .collect();
                let q = as_query(&name);
                if !hosts.contains(&q) {
                    hosts.push(q);
                }
            }
        }
    }
    hosts.truncate(MAX_HOSTS);
    let mut keys = vec![key(ED25519_B)];
    for e in &entries {
        if keys.len() < MAX_KEYS && !keys.iter().any(|k| k.key_data() == e.key.key_data()) {
            keys.push(e.key.clone());
        }
    }
    for (host, port) in &hosts {
        for k in &keys {
            assert_eq!(
                known.verify(host, *port, k),
                ref_verify(&entries, host, *port, k),
                "verify({host:?}, {port}, {})",
                fingerprint(k)
            );
        }
    }
}

fn recorded_line_trusts_exactly_its_host(data: &[u8], text: &str) {
    let host: String = text.chars().take(48).collect();
    let port = match data {
        [.., a, b] => u16::from_le_bytes([*a, *b]),
        _ => 22,
    };
    let (k, other) = if data.len().is_multiple_of(2) {
        (key(ED25519), key(P256))
    } else {
        (key(P256), key(ED25519))
    };
    let line = known_hosts_line(&host, port, &k);
    assert!(
        !line.contains('\n'),
        "{host:?}: the recorded line spans lines: {line:?}"
    );
    let known = KnownHosts::parse(&line).unwrap_or_else(|e| {
        panic!("{host:?}:{port}: the recorded line {line:?} does not parse: {e}")
    });
    assert_eq!((known.len(), known.skipped().len()), (1, 0), "{line:?}");
    let why = format!("{host:?}:{port} recorded as {line:?}");
    assert_eq!(
        known.verify(&host, port, &k),
        HostKeyVerdict::Trusted,
        "{why}"
    );
    assert_eq!(
        known.verify(&host.to_ascii_uppercase(), port, &k),
        HostKeyVerdict::Trusted,
        "{why}"
    );
    assert_eq!(
        known.verify(&host, port, &other),
        HostKeyVerdict::Mismatch {
            expected: vec![fingerprint(&k)]
        },
        "{why}"
    );
    for (h, p) in [
        (format!("{host}x"), port),
        (format!("x{host}"), port),
        (host.clone(), if port == 22 { 2222 } else { 22 }),
        ("*".to_owned(), port),
    ] {
        if h.eq_ignore_ascii_case(&host) && p == port {
            continue;
        }
        assert_eq!(
            known.verify(&h, p, &k),
            HostKeyVerdict::Unknown,
            "{why}: also trusts {h:?}:{p}"
        );
    }
}
