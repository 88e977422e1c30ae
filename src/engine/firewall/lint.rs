//! Static checks run before anything is pushed: rules that can never match (shadowed by an
//! earlier rule, or from a zone without a network of their protocol's family), allow/deny
//! pairs that overlap (the first one wins where they do), deny rules the failsafe overrides,
//! zones no rule uses. All are warnings: the policy still means exactly what it says.

use std::collections::BTreeSet;

use super::model::{Nets, Policy, Proto, Rule, Source, ports_common, ports_cover};
use super::{Finding, Severity};

/// Findings per kind beyond which the rest are summed up in one.
const MAX_PER_KIND: usize = 20;

/// Port lists longer than this are indexed as "every port" (the comparisons stay exact).
const MAX_INDEXED_PORTS: u32 = 256;

/// The earlier rules a rule could meet, indexed by source zone, protocol and destination
/// port, so a 10,000-rule policy compares each rule only with the few earlier ones whose
/// zone meets its zone and that share a protocol and port — not with every earlier one
/// (50 million pairs), nor with every rule on a popular port.
#[derive(Default)]
struct Earlier {
    buckets: rustc_hash::FxHashMap<Bucket, Vec<usize>>,
}

/// One index bucket; `zone` is the rule's zone index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Bucket {
    /// Every rule of the zone.
    All { zone: usize },
    /// Rules of the zone with protocol any.
    AnyProto { zone: usize },
    /// Rules of the zone with this protocol.
    Proto { zone: usize, slot: usize },
    /// Rules of the zone with this protocol and every port.
    EveryPort { zone: usize, slot: usize },
    /// Rules of the zone with this protocol and this port.
    Port { zone: usize, slot: usize, port: u16 },
}

/// The zone index of the all-zones buckets.
const EVERY_ZONE: usize = usize::MAX;
/// A rule whose zone meets more zones than this looks in the all-zones buckets.
const WIDE_ZONES: usize = 8;

fn proto_slot(p: Proto) -> Option<usize> {
    match p {
        Proto::Any => None,
        Proto::Tcp => Some(0),
        Proto::Udp => Some(1),
        Proto::Icmp => Some(2),
        Proto::Icmpv6 => Some(3),
    }
}

fn port_count(r: &Rule) -> u32 {
    r.ports
        .iter()
        .map(|p| u32::from(p.hi) - u32::from(p.lo) + 1)
        .sum()
}

impl Earlier {
    fn put(&mut self, b: Bucket, i: usize) {
        self.buckets.entry(b).or_default().push(i);
    }

    fn add(&mut self, i: usize, r: &Rule, zone: usize) {
        self.add_to(i, r, zone);
        // and to the buckets of every zone, for rules whose zone meets most others
        self.add_to(i, r, EVERY_ZONE);
    }

    fn add_to(&mut self, i: usize, r: &Rule, zone: usize) {
        self.put(Bucket::All { zone }, i);
        let Some(slot) = proto_slot(r.proto) else {
            self.put(Bucket::AnyProto { zone }, i);
            return;
        };
        self.put(Bucket::Proto { zone, slot }, i);
        if r.ports.is_empty() || port_count(r) > MAX_INDEXED_PORTS {
            self.put(Bucket::EveryPort { zone, slot }, i);
            return;
        }
        for range in &r.ports {
            for port in range.lo..=range.hi {
                self.put(Bucket::Port { zone, slot, port }, i);
            }
        }
    }

    /// Earlier rules from `zones` (those meeting `r`'s zone) whose protocol and ports can
    /// meet `r`'s, ascending.
    fn candidates(&self, r: &Rule, zones: &[usize]) -> Vec<usize> {
        let every = [EVERY_ZONE];
        // an any-source rule meets every zone: one look in the all-zones buckets
        let zones = if zones.len() > WIDE_ZONES {
            &every[..]
        } else {
            zones
        };
        let mut out = Vec::new();
        let mut take = |b: Bucket| {
            if let Some(v) = self.buckets.get(&b) {
                out.extend_from_slice(v);
            }
        };
        for &zone in zones {
            let Some(slot) = proto_slot(r.proto) else {
                take(Bucket::All { zone });
                continue;
            };
            take(Bucket::AnyProto { zone });
            if r.ports.is_empty() || port_count(r) > MAX_INDEXED_PORTS {
                take(Bucket::Proto { zone, slot });
            } else {
                take(Bucket::EveryPort { zone, slot });
                for range in &r.ports {
                    for port in range.lo..=range.hi {
                        take(Bucket::Port { zone, slot, port });
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Runs every check over a parsed policy.
pub fn check(policy: &Policy) -> Vec<Finding> {
    check_with(policy, true)
}

/// [`check`], comparing with every earlier rule when `indexed` is false (the reference the
/// index is tested against).
fn check_with(policy: &Policy, indexed: bool) -> Vec<Finding> {
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
    // zone relations, computed the first time a pair of rules needs them: most pairs of
    // zones never meet in a candidate pair
    let ranges: Vec<_> = all_nets.iter().map(|z| z.ranges()).collect();
    let mut relation: Vec<u8> = vec![0; n * n];
    let mut rel = |a: usize, b: usize, need_cover: bool| -> (bool, bool) {
        const MEETS_KNOWN: u8 = 1;
        const MEETS: u8 = 2;
        const COVERS_KNOWN: u8 = 4;
        const COVERS: u8 = 8;
        let slot = &mut relation[a * n + b];
        if *slot & MEETS_KNOWN == 0 {
            *slot |= MEETS_KNOWN;
            if ranges[a].intersects(&ranges[b]) {
                *slot |= MEETS;
            }
        }
        if need_cover && *slot & COVERS_KNOWN == 0 {
            *slot |= COVERS_KNOWN;
            if ranges[a].covers(&ranges[b]) {
                *slot |= COVERS;
            }
        }
        (*slot & COVERS != 0, *slot & MEETS != 0)
    };
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

    let mut earlier = Earlier::default();
    // per zone, the zones it meets (computed when first needed)
    let mut meeting: Vec<Option<Vec<usize>>> = vec![None; n];
    for (j, b) in policy.rules.iter().enumerate() {
        if j > 0 {
            earlier.add(j - 1, &policy.rules[j - 1], ids[j - 1]);
        }
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
        let candidates: Vec<usize> = if indexed {
            let zb = ids[j];
            if meeting[zb].is_none() {
                meeting[zb] = Some((0..n).filter(|&z| rel(z, zb, false).1).collect());
            }
            earlier.candidates(b, meeting[zb].as_deref().unwrap_or_default())
        } else {
            (0..j).collect()
        };
        for i in candidates {
            let a = &policy.rules[i];
            if !a.proto.intersects(b.proto) || ports_common(&a.ports, &b.ports).is_none() {
                continue;
            }
            let (za, zb) = (ids[i], ids[j]);
            if !rel(za, zb, false).1 {
                continue;
            }
            if a.proto.covers(b.proto) && ports_cover(&a.ports, &b.ports) && rel(za, zb, true).0 {
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
                b.proto.covers(a.proto) && ports_cover(&b.ports, &a.ports) && rel(zb, za, true).0;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::firewall::model::PortRange;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    #[test]
    fn the_port_index_finds_exactly_what_comparing_every_pair_finds() {
        let mut rng = StdRng::seed_from_u64(0x11e7);
        let nets = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "0.0.0.0/0",
            "192.168.0.0/16",
            "::/0",
            "2001:db8::/32",
        ];
        let protos = [
            Proto::Any,
            Proto::Tcp,
            Proto::Tcp,
            Proto::Udp,
            Proto::Icmp,
            Proto::Icmpv6,
        ];
        for case in 0..300 {
            let mut zones = BTreeMap::new();
            for z in 0..4 {
                let items: Vec<String> = (0..rng.random_range(1..3))
                    .map(|_| nets[rng.random_range(0..nets.len())].to_string())
                    .collect();
                let mut f = Vec::new();
                zones.insert(
                    format!("z{z}"),
                    super::super::model::Nets::parse_for_test(&items, &mut f),
                );
            }
            let rules: Vec<Rule> = (0..rng.random_range(0..40))
                .map(|i| {
                    let proto = protos[rng.random_range(0..protos.len())];
                    let ports = if matches!(proto, Proto::Tcp | Proto::Udp) && rng.random_bool(0.8)
                    {
                        crate::engine::firewall::model::merge_ports(
                            (0..rng.random_range(1..4))
                                .map(|_| {
                                    let lo = rng.random_range(20..30u16);
                                    PortRange {
                                        lo,
                                        hi: lo + rng.random_range(0..3u16),
                                    }
                                })
                                .collect(),
                        )
                    } else {
                        Vec::new()
                    };
                    Rule {
                        name: format!("r{i}"),
                        allow: rng.random_bool(0.5),
                        source: if rng.random_bool(0.8) {
                            Source::Zone(format!("z{}", rng.random_range(0..4)))
                        } else {
                            Source::Any
                        },
                        proto,
                        ports,
                    }
                })
                .collect();
            let policy = Policy {
                zones,
                rules,
                default_accept: false,
                failsafe_ports: vec![PortRange::single(22)],
                failsafe_sources: None,
            };
            assert_eq!(
                check_with(&policy, true),
                check_with(&policy, false),
                "case {case}"
            );
        }
    }
}
