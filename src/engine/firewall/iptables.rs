//! iptables output: `iptables-restore --noflush` / `ip6tables-restore --noflush` inputs that
//! declare (and so flush and refill, in one commit) only Outrider's chain `OUTRIDER-INPUT`;
//! every other chain and rule of the host stays as it is. The jump from `INPUT` is added by
//! the apply script when missing, never by flushing `INPUT`.
//!
//! Verdicts mirror the nftables backend, where an accept in Outrider's table does not end
//! the packet's way through the host's other tables: an allowed packet `RETURN`s to `INPUT`
//! (the host's own rules still apply), a denied one is `DROP`ped.

use std::fmt::Write as _;

use super::IPT_CHAIN;
use super::model::{Nets, Policy, PortRange, Proto, Rule, Source};

/// `multiport` takes at most 15 ports, a range counting as two.
const MULTIPORT_SLOTS: usize = 15;

/// The rule lines of both families (without the table header, tag and COMMIT).
pub fn render(policy: &Policy) -> (String, String) {
    (family(policy, 4), family(policy, 6))
}

/// A complete restore input for one family.
pub fn file(body: &str, tag: &str) -> String {
    let mut out = String::with_capacity(body.len() + 256);
    out.push_str("*filter\n");
    let _ = writeln!(out, ":{IPT_CHAIN} - [0:0]");
    let _ = writeln!(
        out,
        "-A {IPT_CHAIN} -m comment --comment \"{}\"",
        super::comment_text(tag)
    );
    out.push_str(body);
    out.push_str("COMMIT\n");
    out
}

fn family(policy: &Policy, fam: u8) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "-A {IPT_CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    );
    let _ = writeln!(out, "-A {IPT_CHAIN} -i lo -j RETURN");
    if fam == 6 {
        for t in [
            "neighbour-solicitation",
            "neighbour-advertisement",
            "router-solicitation",
            "router-advertisement",
        ] {
            let _ = writeln!(
                out,
                "-A {IPT_CHAIN} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN"
            );
        }
    }
    let failsafe = Rule {
        name: "failsafe".into(),
        allow: true,
        source: Source::Any,
        proto: Proto::Tcp,
        ports: policy.failsafe_ports.clone(),
    };
    let any = Nets::any();
    rule(
        &mut out,
        &failsafe,
        policy.failsafe_sources.as_ref().unwrap_or(&any),
        fam,
    );
    for r in &policy.rules {
        rule(&mut out, r, policy.nets(&r.source, &any), fam);
    }
    if policy.default_accept {
        let _ = writeln!(
            out,
            "-A {IPT_CHAIN} -m comment --comment \"defaultInput\" -j RETURN"
        );
    } else {
        let _ = writeln!(
            out,
            "-A {IPT_CHAIN} -m comment --comment \"defaultInput\" -j DROP"
        );
    }
    out
}

fn rule(out: &mut String, rule: &Rule, nets: &Nets, fam: u8) {
    let applies = if fam == 4 {
        rule.proto.v4()
    } else {
        rule.proto.v6()
    };
    if !applies {
        return;
    }
    let sources: Vec<String> = if fam == 4 {
        nets.v4.iter().map(|n| n.to_string()).collect()
    } else {
        nets.v6.iter().map(|n| n.to_string()).collect()
    };
    let target = if rule.allow { "RETURN" } else { "DROP" };
    let proto = match rule.proto {
        Proto::Any => String::new(),
        Proto::Icmp => " -p icmp".into(),
        Proto::Icmpv6 => " -p ipv6-icmp".into(),
        Proto::Tcp | Proto::Udp => format!(" -p {}", rule.proto.as_str()),
    };
    let ports = port_matches(&rule.ports);
    for src in &sources {
        let src = if src.ends_with("/0") {
            String::new()
        } else {
            format!(" -s {src}")
        };
        for p in &ports {
            let _ = writeln!(
                out,
                "-A {IPT_CHAIN}{src}{proto}{p} -m comment --comment \"{}\" -j {target}",
                super::comment_text(&rule.name)
            );
        }
    }
}

/// `--dport`/`multiport` matches covering `ports` (one empty match for every port).
fn port_matches(ports: &[PortRange]) -> Vec<String> {
    match ports {
        [] => vec![String::new()],
        [one] => vec![format!(" --dport {}", range(one))],
        _ => {
            let mut out = Vec::new();
            let mut chunk: Vec<String> = Vec::new();
            let mut slots = 0;
            for r in ports {
                let need = if r.lo == r.hi { 1 } else { 2 };
                if slots + need > MULTIPORT_SLOTS {
                    out.push(format!(" -m multiport --dports {}", chunk.join(",")));
                    chunk.clear();
                    slots = 0;
                }
                chunk.push(range(r));
                slots += need;
            }
            if !chunk.is_empty() {
                out.push(format!(" -m multiport --dports {}", chunk.join(",")));
            }
            out
        }
    }
}

fn range(r: &PortRange) -> String {
    if r.lo == r.hi {
        r.lo.to_string()
    } else {
        format!("{}:{}", r.lo, r.hi)
    }
}
