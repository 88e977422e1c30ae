//! The policy as the compiler works on it: zones parsed into aggregated IPv4/IPv6 networks,
//! ports as sorted disjoint ranges, every reference checked. Both backends and the static
//! checks read this one model, so they cannot disagree about what a rule means.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{Finding, Severity};
use crate::api::security_policy::{DefaultAction, Protocol, RuleAction, SecurityPolicySpec, Zone};

/// Source networks of one family pair, aggregated (sorted, disjoint, adjacent ones merged),
/// so nftables interval sets never see overlapping elements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nets {
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
}

impl Nets {
    /// Every address of both families.
    pub fn any() -> Self {
        Self {
            v4: vec![Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).unwrap_or_default()],
            v6: vec![Ipv6Net::new(Ipv6Addr::UNSPECIFIED, 0).unwrap_or_default()],
        }
    }

    /// Parses CIDRs or single addresses; host bits are cleared with a warning, garbage is an
    /// error finding (the schema's pattern lets `999.1.1.1` through).
    fn parse<'a>(
        items: impl IntoIterator<Item = &'a String>,
        what: &str,
        rule: Option<&str>,
        findings: &mut Vec<Finding>,
    ) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for item in items {
            let parsed = item
                .parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from));
            let net = match parsed {
                Ok(n) => n,
                Err(_) => {
                    findings.push(Finding::new(
                        Severity::Error,
                        "InvalidNetwork",
                        rule,
                        format!("{what}: {item:?} is not an IPv4 or IPv6 address or CIDR"),
                    ));
                    continue;
                }
            };
            if net.trunc() != net {
                findings.push(Finding::new(
                    Severity::Warning,
                    "HostBitsSet",
                    rule,
                    format!("{what}: {item} has host bits set; read as {}", net.trunc()),
                ));
            }
            match net.trunc() {
                IpNet::V4(n) => v4.push(n),
                IpNet::V6(n) => v6.push(n),
            }
        }
        Self {
            v4: Ipv4Net::aggregate(&v4),
            v6: Ipv6Net::aggregate(&v6),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// [`Nets::parse`] for tests of other modules.
    #[cfg(test)]
    pub fn parse_for_test(items: &[String], findings: &mut Vec<Finding>) -> Self {
        Self::parse(items, "test", None, findings)
    }

    /// Every address of `other` is in `self`. Aggregation makes "inside one of self's
    /// networks" exact: a network covered by a union of aggregated blocks is inside one.
    /// Both lists are sorted and disjoint, so one merge walk decides it.
    pub fn covers(&self, other: &Nets) -> bool {
        ranges_cover(&v4_ranges(&self.v4), &v4_ranges(&other.v4))
            && ranges_cover(&v6_ranges(&self.v6), &v6_ranges(&other.v6))
    }

    /// The networks as sorted, disjoint inclusive address ranges (IPv4, IPv6), for callers
    /// that compare one zone with many.
    pub fn ranges(&self) -> Ranges {
        Ranges {
            v4: v4_ranges(&self.v4),
            v6: v6_ranges(&self.v6),
        }
    }

    /// Some address is in both (a merge walk over the sorted, disjoint lists).
    pub fn intersects(&self, other: &Nets) -> bool {
        ranges_meet(&v4_ranges(&self.v4), &v4_ranges(&other.v4))
            || ranges_meet(&v6_ranges(&self.v6), &v6_ranges(&other.v6))
    }

    /// A network both contain, for messages.
    pub fn common(&self, other: &Nets) -> Option<IpNet> {
        for m in &self.v4 {
            for n in &other.v4 {
                if m.contains(n) {
                    return Some(IpNet::V4(*n));
                }
                if n.contains(m) {
                    return Some(IpNet::V4(*m));
                }
            }
        }
        for m in &self.v6 {
            for n in &other.v6 {
                if m.contains(n) {
                    return Some(IpNet::V6(*n));
                }
                if n.contains(m) {
                    return Some(IpNet::V6(*m));
                }
            }
        }
        None
    }
}

/// [`Nets`] as address ranges; see [`Nets::ranges`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranges {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

impl Ranges {
    /// As [`Nets::covers`].
    pub fn covers(&self, other: &Ranges) -> bool {
        ranges_cover(&self.v4, &other.v4) && ranges_cover(&self.v6, &other.v6)
    }

    /// As [`Nets::intersects`].
    pub fn intersects(&self, other: &Ranges) -> bool {
        ranges_meet(&self.v4, &other.v4) || ranges_meet(&self.v6, &other.v6)
    }
}

fn v4_ranges(nets: &[Ipv4Net]) -> Vec<(u128, u128)> {
    nets.iter()
        .map(|n| {
            (
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            )
        })
        .collect()
}

fn v6_ranges(nets: &[Ipv6Net]) -> Vec<(u128, u128)> {
    nets.iter()
        .map(|n| (u128::from(n.network()), u128::from(n.broadcast())))
        .collect()
}

/// Sorted disjoint inclusive ranges: does any of `a` overlap any of `b`?
fn ranges_meet(a: &[(u128, u128)], b: &[(u128, u128)]) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].1 < b[j].0 {
            i += 1;
        } else if b[j].1 < a[i].0 {
            j += 1;
        } else {
            return true;
        }
    }
    false
}

/// Sorted disjoint inclusive ranges: is every range of `b` inside one range of `a`?
fn ranges_cover(a: &[(u128, u128)], b: &[(u128, u128)]) -> bool {
    let mut i = 0;
    for r in b {
        while i < a.len() && a[i].1 < r.0 {
            i += 1;
        }
        match a.get(i) {
            Some(s) if s.0 <= r.0 && r.1 <= s.1 => {}
            _ => return false,
        }
    }
    true
}

/// An inclusive destination port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        Self { lo: port, hi: port }
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// Sorted, merged ranges (adjacent and overlapping ones joined): one canonical form per
/// port set, so equal lists share one nftables set and comparisons are exact.
pub fn merge_ports(mut ranges: Vec<PortRange>) -> Vec<PortRange> {
    ranges.sort();
    let mut out: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => {
                last.hi = last.hi.max(r.hi);
            }
            _ => out.push(r),
        }
    }
    out
}

/// `a` ⊇ `b` for merged range lists; an empty list means every port.
pub fn ports_cover(a: &[PortRange], b: &[PortRange]) -> bool {
    if a.is_empty() {
        return true;
    }
    if b.is_empty() {
        return false;
    }
    b.iter()
        .all(|r| a.iter().any(|s| s.lo <= r.lo && r.hi <= s.hi))
}

/// The first port in both, if any; an empty list means every port.
pub fn ports_common(a: &[PortRange], b: &[PortRange]) -> Option<PortRange> {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Some(PortRange { lo: 1, hi: 65535 }),
        (true, false) => b.first().copied(),
        (false, true) => a.first().copied(),
        (false, false) => {
            for r in a {
                for s in b {
                    let lo = r.lo.max(s.lo);
                    let hi = r.hi.min(s.hi);
                    if lo <= hi {
                        return Some(PortRange { lo, hi });
                    }
                }
            }
            None
        }
    }
}

/// Where a rule's traffic comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Any,
    Zone(String),
}

/// Transport protocol; `Any` matches every packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Icmpv6 => "icmpv6",
        }
    }

    /// Matches IPv4 packets at all (ICMPv6 exists only over IPv6).
    pub fn v4(self) -> bool {
        self != Proto::Icmpv6
    }

    /// Matches IPv6 packets at all (ICMP for IPv4 exists only over IPv4).
    pub fn v6(self) -> bool {
        self != Proto::Icmp
    }

    /// Every packet `other` matches, `self` matches too.
    pub fn covers(self, other: Proto) -> bool {
        self == Proto::Any || self == other
    }

    pub fn intersects(self, other: Proto) -> bool {
        self == Proto::Any || other == Proto::Any || self == other
    }
}

impl From<Protocol> for Proto {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::Any => Proto::Any,
            Protocol::Tcp => Proto::Tcp,
            Protocol::Udp => Proto::Udp,
            Protocol::Icmp => Proto::Icmp,
            Protocol::Icmpv6 => Proto::Icmpv6,
        }
    }
}

/// One rule, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub allow: bool,
    pub source: Source,
    pub proto: Proto,
    /// Merged destination ranges; empty means every port (and is the only value for
    /// protocols without ports).
    pub ports: Vec<PortRange>,
}

impl Rule {
    pub fn verdict(&self) -> &'static str {
        if self.allow { "allow" } else { "deny" }
    }
}

/// A policy ready to render: every zone parsed, every reference resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub zones: BTreeMap<String, Nets>,
    pub rules: Vec<Rule>,
    pub default_accept: bool,
    /// TCP ports accepted before every rule (merged).
    pub failsafe_ports: Vec<PortRange>,
    /// Sources of the failsafe; `None` means any source.
    pub failsafe_sources: Option<Nets>,
}

impl Policy {
    /// Checks and converts a spec. Error findings mean the policy must not be pushed; the
    /// warnings are returned either way.
    pub fn from_spec(spec: &SecurityPolicySpec) -> (Option<Policy>, Vec<Finding>) {
        let mut findings = Vec::new();
        let mut zones = BTreeMap::new();
        for (name, Zone(items)) in &spec.zones {
            let nets = Nets::parse(items, &format!("zone {name}"), None, &mut findings);
            if nets.is_empty() && !items.is_empty() {
                // every entry was invalid: already an error each
            } else if nets.is_empty() {
                findings.push(Finding::new(
                    Severity::Warning,
                    "EmptyZone",
                    None,
                    format!("zone {name} has no networks: rules from it match nothing"),
                ));
            }
            zones.insert(name.clone(), nets);
        }
        let mut rules = Vec::with_capacity(spec.rules.len());
        let mut names = std::collections::HashSet::new();
        for r in &spec.rules {
            let rule = Some(r.name.as_str());
            if !names.insert(r.name.as_str()) {
                findings.push(Finding::new(
                    Severity::Error,
                    "DuplicateRule",
                    rule,
                    format!("rule name {} is used twice", r.name),
                ));
            }
            let source = match &r.from {
                None => Source::Any,
                Some(z) if zones.contains_key(z) => Source::Zone(z.clone()),
                Some(z) => {
                    findings.push(Finding::new(
                        Severity::Error,
                        "UnknownZone",
                        rule,
                        format!("rule {}: from {z:?} is not a key of spec.zones", r.name),
                    ));
                    continue;
                }
            };
            let proto = Proto::from(r.protocol);
            let ports = r.ports.as_deref().unwrap_or_default();
            if !ports.is_empty() && !matches!(proto, Proto::Tcp | Proto::Udp) {
                findings.push(Finding::new(
                    Severity::Error,
                    "PortsWithoutTransport",
                    rule,
                    format!(
                        "rule {}: ports need protocol tcp or udp, not {}",
                        r.name,
                        proto.as_str()
                    ),
                ));
                continue;
            }
            if ports.contains(&0) {
                findings.push(Finding::new(
                    Severity::Error,
                    "InvalidPort",
                    rule,
                    format!("rule {}: port 0 is not a destination port", r.name),
                ));
                continue;
            }
            rules.push(Rule {
                name: r.name.clone(),
                allow: r.action == RuleAction::Allow,
                source,
                proto,
                ports: merge_ports(ports.iter().map(|p| PortRange::single(*p)).collect()),
            });
        }
        let failsafe_sources = if spec.failsafe.sources.is_empty() {
            None
        } else {
            Some(Nets::parse(
                &spec.failsafe.sources,
                "failsafe.sources",
                None,
                &mut findings,
            ))
        };
        if spec.failsafe.ports.is_empty() || spec.failsafe.ports.contains(&0) {
            findings.push(Finding::new(
                Severity::Error,
                "InvalidFailsafe",
                None,
                "failsafe.ports needs at least one port between 1 and 65535 (the SSH port Outrider uses)",
            ));
        }
        let policy = Policy {
            zones,
            rules,
            default_accept: spec.default_input == DefaultAction::Accept,
            failsafe_ports: merge_ports(
                spec.failsafe
                    .ports
                    .iter()
                    .filter(|p| **p != 0)
                    .map(|p| PortRange::single(*p))
                    .collect(),
            ),
            failsafe_sources,
        };
        let ok = !findings.iter().any(|f| f.severity == Severity::Error);
        (ok.then_some(policy), findings)
    }

    /// The networks a rule's source stands for.
    pub fn nets<'a>(&'a self, source: &Source, any: &'a Nets) -> &'a Nets {
        match source {
            Source::Any => any,
            Source::Zone(z) => self.zones.get(z).unwrap_or(any),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(items: &[&str]) -> Nets {
        let items: Vec<String> = items.iter().map(|s| s.to_string()).collect();
        let mut f = Vec::new();
        let n = Nets::parse(&items, "t", None, &mut f);
        assert!(f.iter().all(|f| f.severity != Severity::Error), "{f:?}");
        n
    }

    #[test]
    fn zones_are_aggregated_so_sets_never_overlap() {
        let n = nets(&[
            "10.1.0.0/16",
            "10.0.0.0/8",
            "192.168.0.0/25",
            "192.168.0.128/25",
        ]);
        assert_eq!(
            n.v4,
            vec![
                "10.0.0.0/8".parse::<Ipv4Net>().unwrap(),
                "192.168.0.0/24".parse().unwrap()
            ]
        );
        assert!(n.covers(&nets(&["10.9.9.9", "192.168.0.7/32"])));
        assert!(!n.covers(&nets(&["11.0.0.0/8"])));
        assert!(n.intersects(&nets(&["0.0.0.0/0"])));
        assert!(!n.intersects(&nets(&["::/0"])));
        assert!(n.intersects(&nets(&["9.0.0.0/8", "192.168.0.128/30"])));
        assert!(!n.intersects(&nets(&["9.0.0.0/8", "11.0.0.0/8", "192.169.0.0/16"])));
        assert!(!n.covers(&nets(&["10.9.9.9", "11.0.0.1"])));
        assert!(nets(&["::/0"]).covers(&nets(&["2001:db8::/32"])));
        assert!(nets(&["2001:db8::/32"]).intersects(&nets(&["2001:db8:1::/48"])));
    }

    #[test]
    fn host_bits_are_cleared_with_a_warning_and_garbage_is_an_error() {
        let mut f = Vec::new();
        let items = vec!["10.0.0.1/8".to_string(), "999.1.1.1".to_string()];
        let n = Nets::parse(&items, "zone a", None, &mut f);
        assert_eq!(n.v4, vec!["10.0.0.0/8".parse::<Ipv4Net>().unwrap()]);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].code, "HostBitsSet");
        assert!(
            f[0].message.contains("read as 10.0.0.0/8"),
            "{}",
            f[0].message
        );
        assert_eq!(f[1].severity, Severity::Error);
        assert!(f[1].message.contains("999.1.1.1"), "{}", f[1].message);
    }

    #[test]
    fn ports_merge_and_cover() {
        let p = |v: &[(u16, u16)]| -> Vec<PortRange> {
            merge_ports(
                v.iter()
                    .map(|(lo, hi)| PortRange { lo: *lo, hi: *hi })
                    .collect(),
            )
        };
        assert_eq!(
            p(&[(80, 80), (81, 81), (443, 443), (79, 79)]),
            p(&[(79, 81), (443, 443)])
        );
        assert_eq!(p(&[(65535, 65535), (65534, 65535)]), p(&[(65534, 65535)]));
        assert!(ports_cover(&[], &p(&[(22, 22)])));
        assert!(!ports_cover(&p(&[(22, 22)]), &[]));
        assert!(ports_cover(&p(&[(20, 30)]), &p(&[(22, 22), (25, 30)])));
        assert!(!ports_cover(&p(&[(20, 30)]), &p(&[(22, 31)])));
        assert_eq!(
            ports_common(&p(&[(20, 30)]), &p(&[(25, 40)])),
            Some(PortRange { lo: 25, hi: 30 })
        );
        assert_eq!(ports_common(&p(&[(20, 30)]), &p(&[(31, 40)])), None);
    }
}
