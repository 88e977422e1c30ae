//! SecurityPolicy: abstract allow/deny rules compiled to a host firewall, pushed with a
//! self-arming restore, read back for drift. Pure compilation lives here (no I/O: the
//! controller, `outrider policy render` and the benchmarks share it); [`apply`] is the
//! per-host protocol over SSH.
//!
//! Outrider owns one thing on a host and nothing else: `table inet outrider` (nftables) or
//! the chain `OUTRIDER-INPUT` jumped to from `INPUT` (iptables). Its verdicts only ever veto:
//! an accept in Outrider's table does not bypass the host's other tables.

pub mod apply;
pub mod drift;
pub mod iptables;
pub mod lint;
pub mod model;
pub mod nft;
pub mod rollout;

use sha2::{Digest, Sha256};

use crate::api::security_policy::{Backend, SecurityPolicySpec};

/// The nftables table Outrider owns on every host.
pub const NFT_TABLE: &str = "outrider";
/// The iptables chain Outrider owns (jumped to from `INPUT`).
pub const IPT_CHAIN: &str = "OUTRIDER-INPUT";

/// How bad a static-check finding is: errors stop the push, warnings are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "Error",
            Severity::Warning => "Warning",
        }
    }
}

/// One result of the static checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// CamelCase kind: Shadowed, Overlap, FailsafeCovered, UnknownZone, ...
    pub code: &'static str,
    /// The rule it is about, if one.
    pub rule: Option<String>,
    pub message: String,
}

impl Finding {
    pub fn new(
        severity: Severity,
        code: &'static str,
        rule: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity,
            code,
            rule: rule.map(str::to_string),
            message: message.into(),
        }
    }
}

/// Who a ruleset belongs to, written into it (the table comment) so a host tells which
/// policy and generation it runs, and a second policy cannot silently take it over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// `<namespace>/<name>` of the SecurityPolicy.
    pub policy: String,
    pub generation: i64,
}

/// The rendered files for one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// One `nft -f` file replacing `table inet outrider` in one transaction.
    Nft(String),
    /// `iptables-restore --noflush` and `ip6tables-restore --noflush` inputs.
    Iptables { v4: String, v6: String },
}

/// A compiled policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    pub backend: Backend,
    pub output: Output,
    /// `sha256:<hex>` of the rules (not of the ownership comment: a new generation with the
    /// same rules is not a new ruleset).
    pub hash: String,
    pub findings: Vec<Finding>,
}

impl Compiled {
    /// Everything as one text, as `outrider policy render` prints it.
    pub fn text(&self) -> String {
        match &self.output {
            Output::Nft(s) => s.clone(),
            Output::Iptables { v4, v6 } => {
                format!("# iptables-restore --noflush\n{v4}# ip6tables-restore --noflush\n{v6}")
            }
        }
    }

    /// The first 32 hex digits of the hash, as written on hosts.
    pub fn short_hash(&self) -> &str {
        short_hash(&self.hash)
    }
}

/// The first 32 hex digits of a `sha256:<hex>` hash (128 bits: the host-side tag).
pub fn short_hash(hash: &str) -> &str {
    let hex = hash.strip_prefix("sha256:").unwrap_or(hash);
    crate::text::head(hex, 32)
}

/// Characters of `<namespace>/<name>` kept in the ownership tag: fixed, so every generation
/// of a policy writes (and recognises) the same name.
pub const OWNER_NAME_MAX: usize = 56;

/// The policy name as the ownership tag carries it.
pub fn owner_name(policy: &str) -> &str {
    crate::text::head(policy, OWNER_NAME_MAX)
}

/// The ownership tag written on hosts: `outrider <ns>/<name> g<generation> <hash32>`,
/// at most 120 bytes (nftables comments hold 128).
pub fn owner_tag(meta: &Meta, hash: &str) -> String {
    format!(
        "outrider {} g{} {}",
        owner_name(&meta.policy),
        meta.generation,
        short_hash(hash)
    )
}

/// The parts of an owner tag read back from a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub policy: String,
    pub generation: i64,
    pub hash32: String,
}

/// Parses [`owner_tag`]'s output; `None` for anything else.
pub fn parse_owner(tag: &str) -> Option<Owner> {
    let rest = tag.trim().strip_prefix("outrider ")?;
    let mut parts = rest.rsplitn(3, ' ');
    let hash32 = parts.next()?.to_string();
    let generation = parts.next()?.strip_prefix('g')?.parse().ok()?;
    let policy = parts.next()?.to_string();
    if hash32.len() != 32 || !hash32.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(Owner {
        policy,
        generation,
        hash32,
    })
}

/// Why a policy cannot be compiled: error findings (warnings ride along).
#[derive(Debug, thiserror::Error)]
#[error("{}", first_error(.0))]
pub struct CompileError(pub Vec<Finding>);

fn first_error(findings: &[Finding]) -> String {
    let errors: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .collect();
    match errors.as_slice() {
        [] => "invalid policy".into(),
        [one] => one.message.clone(),
        [one, rest @ ..] => format!("{} (and {} more errors)", one.message, rest.len()),
    }
}

/// Compiles a spec for its backend, with the static checks. Deterministic: the same spec and
/// meta give byte-identical output.
pub fn compile(spec: &SecurityPolicySpec, meta: &Meta) -> Result<Compiled, CompileError> {
    compile_for(spec, spec.backend, meta)
}

/// [`compile`] for another backend than the spec's (`outrider policy render --backend`).
pub fn compile_for(
    spec: &SecurityPolicySpec,
    backend: Backend,
    meta: &Meta,
) -> Result<Compiled, CompileError> {
    let (policy, mut findings) = model::Policy::from_spec(spec);
    let Some(policy) = policy else {
        return Err(CompileError(findings));
    };
    findings.extend(lint::check(&policy));
    let output = match backend {
        Backend::Nftables => {
            let body = nft::Body::render(&policy);
            let hash = sha256(body.rules().as_bytes());
            let text = body.file(&owner_tag(meta, &hash));
            return Ok(Compiled {
                backend,
                output: Output::Nft(text),
                hash,
                findings,
            });
        }
        Backend::Iptables => iptables::render(&policy),
    };
    let (v4, v6) = &output;
    let hash = sha256(format!("{v4}\0{v6}").as_bytes());
    let tag = owner_tag(meta, &hash);
    Ok(Compiled {
        backend,
        output: Output::Iptables {
            v4: iptables::file(v4, &tag),
            v6: iptables::file(v6, &tag),
        },
        hash,
        findings,
    })
}

/// Text for a firewall comment: only characters both tools take inside quotes as they are.
fn comment_text(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " ./:_-@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `sha256:<hex>`.
pub fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests;
