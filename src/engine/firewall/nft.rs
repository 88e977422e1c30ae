//! nftables output: one `nft -f` file that replaces `table inet outrider` in one
//! transaction (`table … {}` makes the delete valid on a host without it) and touches no
//! other table.
//!
//! Shaped for the kernel as much as for readers: every zone with more than one network is
//! one named interval set per family, shared by every rule that uses it; a port list of up
//! to [`PORT_EXPAND`] ranges becomes one rule per range and a longer one a named set shared
//! by every rule with the same list. No anonymous set per rule: the kernel loads those
//! super-linearly (measured here: 10,000 rules with one anonymous port set each load in
//! 18.5 s, one named set each in 4.8 s, one rule per port in 1.2 s).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::NFT_TABLE;
use super::model::{Nets, Policy, PortRange, Proto, Rule, Source};

/// Port lists up to this many ranges are written as one rule per range.
pub const PORT_EXPAND: usize = 4;

/// The rendered table without its ownership comment (what the ruleset hash covers).
pub struct Body {
    sets: String,
    chain: String,
}

impl Body {
    pub fn render(policy: &Policy) -> Self {
        let mut r = Renderer::default();
        r.render(policy);
        Body {
            sets: r.sets,
            chain: r.chain,
        }
    }

    /// The sets and the chain: what the ruleset hash is computed over.
    pub fn rules(&self) -> String {
        format!("{}{}", self.sets, self.chain)
    }

    /// The whole file with the ownership tag as the table comment.
    pub fn file(&self, tag: &str) -> String {
        let mut out = String::with_capacity(self.sets.len() + self.chain.len() + 256);
        out.push_str("# Written by Outrider; replaces table inet outrider in one transaction.\n");
        let _ = writeln!(out, "table inet {NFT_TABLE} {{}}");
        let _ = writeln!(out, "delete table inet {NFT_TABLE}");
        let _ = writeln!(out, "table inet {NFT_TABLE} {{");
        let _ = writeln!(out, "\tcomment \"{}\"", super::comment_text(tag));
        out.push_str(&self.sets);
        out.push_str(&self.chain);
        out.push_str("}\n");
        out
    }
}

#[derive(Default)]
struct Renderer {
    sets: String,
    chain: String,
    /// Port lists already given a named set, by content.
    port_sets: BTreeMap<Vec<PortRange>, String>,
}

/// How a rule matches its source in one family.
enum Src {
    /// Every address of the family (`0.0.0.0/0`, `::/0`).
    Family,
    /// `ip saddr 10.0.0.0/8`.
    Net(String),
    /// `ip saddr @zone_trust_v4`.
    Set(String),
}

impl Renderer {
    fn render(&mut self, policy: &Policy) {
        for (name, nets) in &policy.zones {
            if nets.v4.len() > 1 {
                self.set(
                    &zone_set(name, 4),
                    "ipv4_addr",
                    nets.v4.iter().map(|n| n.to_string()),
                );
            }
            if nets.v6.len() > 1 {
                self.set(
                    &zone_set(name, 6),
                    "ipv6_addr",
                    nets.v6.iter().map(|n| n.to_string()),
                );
            }
        }
        if let Some(fs) = &policy.failsafe_sources {
            if fs.v4.len() > 1 {
                self.set(
                    "failsafe_v4",
                    "ipv4_addr",
                    fs.v4.iter().map(|n| n.to_string()),
                );
            }
            if fs.v6.len() > 1 {
                self.set(
                    "failsafe_v6",
                    "ipv6_addr",
                    fs.v6.iter().map(|n| n.to_string()),
                );
            }
        }
        let policy_word = if policy.default_accept {
            "accept"
        } else {
            "drop"
        };
        let mut c = String::new();
        c.push_str("\tchain input {\n");
        let _ = writeln!(
            c,
            "\t\ttype filter hook input priority filter; policy {policy_word};"
        );
        c.push_str("\t\tct state established,related accept\n");
        c.push_str("\t\tiif \"lo\" accept\n");
        // without neighbour discovery IPv6 stops working altogether under a drop policy
        c.push_str("\t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert } accept\n");
        self.chain = c;
        let failsafe = Rule {
            name: "failsafe".into(),
            allow: true,
            source: Source::Any,
            proto: Proto::Tcp,
            ports: policy.failsafe_ports.clone(),
        };
        match &policy.failsafe_sources {
            None => self.rule(&failsafe, None),
            Some(fs) => {
                let v4 = family_src(&fs.v4, "failsafe_v4");
                let v6 = family_src(&fs.v6, "failsafe_v6");
                self.rule_split(&failsafe, v4, v6);
            }
        }
        let any = Nets::any();
        for rule in &policy.rules {
            match &rule.source {
                Source::Any => self.rule(rule, None),
                Source::Zone(z) => {
                    let nets = policy.nets(&rule.source, &any);
                    let v4 = family_src(&nets.v4, &zone_set(z, 4));
                    let v6 = family_src(&nets.v6, &zone_set(z, 6));
                    self.rule_split(rule, v4, v6);
                }
            }
        }
        self.chain.push_str("\t}\n");
    }

    /// A rule with a source per family (`None`: the zone has no network of that family).
    fn rule_split(&mut self, rule: &Rule, v4: Option<Src>, v6: Option<Src>) {
        if let Some(s) = v4
            && rule.proto.v4()
        {
            self.rule(rule, Some((4, s)));
        }
        if let Some(s) = v6
            && rule.proto.v6()
        {
            self.rule(rule, Some((6, s)));
        }
    }

    /// Writes `rule` matching the source `src` of family 4 or 6, or every source (`None`).
    fn rule(&mut self, rule: &Rule, src: Option<(u8, Src)>) {
        let src = match src {
            None => String::new(),
            Some((family, s)) => {
                let (ip, nfproto) = if family == 4 {
                    ("ip", "ipv4")
                } else {
                    ("ip6", "ipv6")
                };
                match s {
                    Src::Family => format!("meta nfproto {nfproto} "),
                    Src::Net(n) => format!("{ip} saddr {n} "),
                    Src::Set(set) => format!("{ip} saddr @{set} "),
                }
            }
        };
        let verdict = if rule.allow { "accept" } else { "drop" };
        let proto = rule.proto;
        let lines: Vec<String> = match proto {
            Proto::Any => vec![String::new()],
            Proto::Icmp => vec!["meta l4proto icmp ".into()],
            Proto::Icmpv6 => vec!["meta l4proto ipv6-icmp ".into()],
            Proto::Tcp | Proto::Udp => {
                let p = proto.as_str();
                if rule.ports.is_empty() {
                    vec![format!("meta l4proto {p} ")]
                } else if rule.ports.len() <= PORT_EXPAND {
                    rule.ports
                        .iter()
                        .map(|r| format!("{p} dport {r} "))
                        .collect()
                } else {
                    let set = self.port_set(&rule.ports);
                    vec![format!("{p} dport @{set} ")]
                }
            }
        };
        for m in lines {
            let _ = writeln!(
                self.chain,
                "\t\t{src}{m}{verdict} comment \"{}\"",
                super::comment_text(&rule.name)
            );
        }
    }

    fn port_set(&mut self, ports: &[PortRange]) -> String {
        if let Some(name) = self.port_sets.get(ports) {
            return name.clone();
        }
        let name = format!("ports_{}", self.port_sets.len() + 1);
        self.set(&name, "inet_service", ports.iter().map(|r| r.to_string()));
        self.port_sets.insert(ports.to_vec(), name.clone());
        name
    }

    fn set(&mut self, name: &str, ty: &str, elements: impl Iterator<Item = String>) {
        let elements: Vec<String> = elements.collect();
        let _ = write!(
            self.sets,
            "\tset {name} {{\n\t\ttype {ty}\n\t\tflags interval\n\t\telements = {{ {} }}\n\t}}\n",
            elements.join(", ")
        );
    }
}

/// The set name of a zone in one family.
fn zone_set(zone: &str, family: u8) -> String {
    format!("zone_{zone}_v{family}")
}

/// How to match one family of a source: none (no network of that family), the whole family,
/// inline (one network), or the named set (several).
fn family_src<T: ToString>(nets: &[T], set: &str) -> Option<Src> {
    match nets {
        [] => None,
        [one] => {
            let s = one.to_string();
            if s.ends_with("/0") {
                Some(Src::Family)
            } else {
                Some(Src::Net(s))
            }
        }
        _ => Some(Src::Set(set.to_string())),
    }
}
