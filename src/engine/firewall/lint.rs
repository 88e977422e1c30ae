//! Static checks run before anything is pushed: rules that can never match (shadowed by an
//! earlier rule, or from a zone without a network of their protocol's family), allow/deny
//! pairs that overlap (the first one wins where they do), deny rules the failsafe overrides,
//! zones no rule uses. All are warnings: the policy still means exactly what it says.

use std::collections::BTreeSet;

use super::model::{Nets, Policy, Proto, Rule, Source, ports_common, ports_cover};
use super::{Finding, Severity};

/// Findings per kind beyond which the rest are summed up in one.
const MAX_PER_KIND: usize = 20;

/// Runs every check over a parsed policy.
pub fn check(policy: &Policy) -> Vec<Finding> {
    let mut out = Vec::new();
    let any = Nets::any();
    let zone_ids: Vec<&String> = policy.zones.keys().collect();
    // zone relations computed once: rules compare zones by index
    let index = |s: &Source| match s {
        Source::Any => zone_ids.len(),
        Source::Zone(z) => zone_ids.binary_search(&z).unwrap_or(zone_ids.len()),
    };
    let mut all_nets: Vec<&Nets> = zone_ids.iter().map(|z| &policy.zones[*z]).collect();
    all_nets.push(&any);
    let n = all_nets.len();
    let mut covers = vec![false; n * n];
    let mut meets = vec![false; n * n];
    for a in 0..n {
        for b in 0..n {
            covers[a * n + b] = all_nets[a].covers(all_nets[b]);
            meets[a * n + b] = all_nets[a].intersects(all_nets[b]);
        }
    }
    let ids: Vec<usize> = policy.rules.iter().map(|r| index(&r.source)).collect();
    let mut counts = [0usize; 3];
    let mut extra = [0usize; 3];
    let mut push = |kind: usize, f: Finding, out: &mut Vec<Finding>| {
        if counts[kind] < MAX_PER_KIND {
            counts[kind] += 1;
            out.push(f);
        } else {
            extra[kind] += 1;
        }
    };

    for (j, b) in policy.rules.iter().enumerate() {
        let nets = all_nets[ids[j]];
        let fam_ok = (b.proto.v4() && !nets.v4.is_empty()) || (b.proto.v6() && !nets.v6.is_empty());
        if !fam_ok {
            let family = if b.proto == Proto::Icmp {
                "IPv4"
            } else {
                "IPv6"
            };
            push(
                0,
                Finding::new(
                    Severity::Warning,
                    "NeverMatches",
                    Some(&b.name),
                    format!(
                        "rule {} ({}) never matches: its zone has no {family} network",
                        b.name,
                        b.proto.as_str()
                    ),
                ),
                &mut out,
            );
            continue;
        }
        let mut reported_overlap = false;
        for (i, a) in policy.rules[..j].iter().enumerate() {
            if !a.proto.intersects(b.proto) || ports_common(&a.ports, &b.ports).is_none() {
                continue;
            }
            let (za, zb) = (ids[i], ids[j]);
            if !meets[za * n + zb] {
                continue;
            }
            if a.proto.covers(b.proto) && ports_cover(&a.ports, &b.ports) && covers[za * n + zb] {
                let why = if a.allow == b.allow {
                    format!(
                        "it is redundant: earlier rule {} ({}) already matches all of its traffic",
                        a.name,
                        a.verdict()
                    )
                } else {
                    format!(
                        "earlier rule {} ({}) matches all of its traffic first",
                        a.name,
                        a.verdict()
                    )
                };
                push(
                    0,
                    Finding::new(
                        Severity::Warning,
                        "Shadowed",
                        Some(&b.name),
                        format!(
                            "rule {} ({}) never takes effect: {why}",
                            b.name,
                            b.verdict()
                        ),
                    ),
                    &mut out,
                );
                break;
            }
            // an exception followed by the general rule (allow these, deny the rest) is
            // the idiom, not a mistake: only a later rule narrower somewhere is reported
            let b_covers_a =
                b.proto.covers(a.proto) && ports_cover(&b.ports, &a.ports) && covers[zb * n + za];
            if a.allow != b.allow && !reported_overlap && !b_covers_a {
                let net = all_nets[za]
                    .common(all_nets[zb])
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                push(
                    1,
                    Finding::new(
                        Severity::Warning,
                        "Overlap",
                        Some(&b.name),
                        format!(
                            "rules {} ({}) and {} ({}) overlap on {} from {net}: {} wins there",
                            a.name,
                            a.verdict(),
                            b.name,
                            b.verdict(),
                            traffic(a, b),
                            a.name
                        ),
                    ),
                    &mut out,
                );
                reported_overlap = true;
            }
        }
        if !b.allow
            && b.proto.intersects(Proto::Tcp)
            && let Some(port) = ports_common(&policy.failsafe_ports, &b.ports)
        {
            let fs = policy.failsafe_sources.as_ref().unwrap_or(&any);
            if let Some(net) = fs.common(nets) {
                push(
                    2,
                    Finding::new(
                        Severity::Warning,
                        "FailsafeCovered",
                        Some(&b.name),
                        format!(
                            "rule {} denies tcp/{port} from {net}, which the failsafe accepts first: the deny has no effect there",
                            b.name
                        ),
                    ),
                    &mut out,
                );
            }
        }
    }
    for (kind, code) in [(0, "Shadowed"), (1, "Overlap"), (2, "FailsafeCovered")] {
        if extra[kind] > 0 {
            out.push(Finding::new(
                Severity::Warning,
                code,
                None,
                format!("{} more findings like the above not listed", extra[kind]),
            ));
        }
    }
    let used: BTreeSet<&str> = policy
        .rules
        .iter()
        .filter_map(|r| match &r.source {
            Source::Zone(z) => Some(z.as_str()),
            Source::Any => None,
        })
        .collect();
    for z in policy.zones.keys() {
        if !used.contains(z.as_str()) {
            out.push(Finding::new(
                Severity::Warning,
                "UnusedZone",
                None,
                format!("zone {z} is not used by any rule"),
            ));
        }
    }
    out
}

/// "tcp/22" for the first traffic two rules share.
fn traffic(a: &Rule, b: &Rule) -> String {
    let proto = if a.proto == Proto::Any {
        b.proto
    } else {
        a.proto
    };
    match ports_common(&a.ports, &b.ports) {
        Some(p)
            if matches!(proto, Proto::Tcp | Proto::Udp)
                && !(a.ports.is_empty() && b.ports.is_empty()) =>
        {
            format!("{}/{p}", proto.as_str())
        }
        _ => proto.as_str().to_string(),
    }
}
