//! Compiler tests: golden files for both backends, static checks, and properties over random
//! policies checked by evaluating the *rendered* nftables text packet by packet (a small
//! interpreter of the subset the renderer writes), not the model it came from.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::model::Proto;
use super::*;
use crate::api::security_policy::{
    DefaultAction, Failsafe, FirewallRule, Protocol, RuleAction, SecurityPolicySpec, Zone,
};

const API_EXAMPLE: &str = r#"
targets: {inventoryRef: {name: web-fleet}}
backend: nftables
zones:
  trust: [10.0.0.0/8, 192.168.0.0/16]
  untrust: [0.0.0.0/0, "::/0"]
  admins: [10.9.0.0/16, "2001:db8:9::/48"]
defaultInput: drop
rules:
  - {name: block_external_ssh, action: deny, from: untrust, protocol: tcp, ports: [22]}
  - {name: allow_internal_ssh, action: allow, from: trust, protocol: tcp, ports: [22]}
  - {name: allow_web, action: allow, from: untrust, protocol: tcp, ports: [80, 443]}
  - {name: allow_admin_tools, action: allow, from: admins, protocol: tcp, ports: [3000, 8000, 8080, 9090, 9100, 9200]}
  - {name: allow_dns, action: allow, protocol: udp, ports: [53]}
  - {name: allow_ping, action: allow, protocol: icmp}
failsafe: {ports: [22], sources: [10.0.0.0/8]}
"#;

fn meta() -> Meta {
    Meta {
        policy: "prod/web-firewall".into(),
        generation: 3,
    }
}

fn spec(yaml: &str) -> SecurityPolicySpec {
    serde_yaml::from_str(yaml).unwrap()
}

/// Compares with `src/engine/firewall/golden/<name>`; `OUTRIDER_BLESS=1` rewrites it.
fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/engine/firewall/golden")
        .join(name);
    if std::env::var_os("OUTRIDER_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (OUTRIDER_BLESS=1 writes it)", path.display()));
    assert_eq!(
        actual, expected,
        "{name} differs from its golden file; if the change is intended, rerun with OUTRIDER_BLESS=1"
    );
}

#[test]
fn nftables_output_of_the_api_example_matches_its_golden_file() {
    let c = compile(&spec(API_EXAMPLE), &meta()).unwrap();
    golden("api_example.nft", &c.text());
    let Output::Nft(text) = &c.output else {
        panic!("nftables output expected")
    };
    // one transaction replacing only Outrider's table
    assert!(
        text.contains(
            "table inet outrider {}\ndelete table inet outrider\ntable inet outrider {\n"
        )
    );
    assert!(!text.contains("flush ruleset"));
    assert!(text.contains(&format!(
        "comment \"outrider prod/web-firewall g3 {}\"",
        c.short_hash()
    )));
    // failsafe before the first rule
    let failsafe = text.find("comment \"failsafe\"").unwrap();
    let first = text.find("comment \"block_external_ssh\"").unwrap();
    assert!(failsafe < first);
}

#[test]
fn iptables_output_of_the_api_example_matches_its_golden_file() {
    let c = compile_for(&spec(API_EXAMPLE), Backend::Iptables, &meta()).unwrap();
    golden("api_example.iptables", &c.text());
    let Output::Iptables { v4, v6 } = &c.output else {
        panic!("iptables output expected")
    };
    for text in [v4, v6] {
        // only Outrider's chain is declared: --noflush leaves every other chain alone
        let declared: Vec<&str> = text.lines().filter(|l| l.starts_with(':')).collect();
        assert_eq!(declared, vec![":OUTRIDER-INPUT - [0:0]"]);
        assert!(
            text.lines()
                .all(|l| !l.starts_with("-A ") || l.starts_with("-A OUTRIDER-INPUT "))
        );
        assert!(!text.contains("-F") && !text.contains("-X"));
    }
    assert!(!v4.contains("2001:db8") && v6.contains("2001:db8:9::/48"));
    assert!(v4.contains("-p icmp") && !v6.contains("-p icmp "));
}

#[test]
fn a_new_generation_with_the_same_rules_keeps_the_ruleset_hash() {
    let a = compile(&spec(API_EXAMPLE), &meta()).unwrap();
    let b = compile(
        &spec(API_EXAMPLE),
        &Meta {
            generation: 4,
            ..meta()
        },
    )
    .unwrap();
    assert_eq!(a.hash, b.hash);
    assert_ne!(a.text(), b.text());
    let changed = compile(&spec(&API_EXAMPLE.replace("[80, 443]", "[80]")), &meta()).unwrap();
    assert_ne!(a.hash, changed.hash);
}

#[test]
fn the_owner_tag_round_trips_and_fits_an_nft_comment() {
    let tag = owner_tag(&meta(), "sha256:0123456789abcdef0123456789abcdef0123456789");
    assert_eq!(
        parse_owner(&tag),
        Some(Owner {
            policy: "prod/web-firewall".into(),
            generation: 3,
            hash32: "0123456789abcdef0123456789abcdef".into()
        })
    );
    let long = Meta {
        policy: format!("{}/{}", "n".repeat(63), "p".repeat(253)),
        generation: i64::MAX,
    };
    assert!(owner_tag(&long, "sha256:00").len() <= 120);
    assert_eq!(parse_owner("someone else's table"), None);
}

#[test]
fn static_checks_find_shadowed_overlapping_and_failsafe_covered_rules() {
    let c = compile(&spec(API_EXAMPLE), &meta()).unwrap();
    let codes: Vec<(&str, Option<&str>)> = c
        .findings
        .iter()
        .map(|f| (f.code, f.rule.as_deref()))
        .collect();
    // untrust covers trust, and the deny comes first: the allow never takes effect
    assert!(
        codes.contains(&("Shadowed", Some("allow_internal_ssh"))),
        "{:#?}",
        c.findings
    );
    // the deny of tcp/22 from everywhere meets the failsafe's 10.0.0.0/8
    assert!(codes.contains(&("FailsafeCovered", Some("block_external_ssh"))));
    assert!(c.findings.iter().all(|f| f.severity == Severity::Warning));
    let msg = &c
        .findings
        .iter()
        .find(|f| f.code == "Shadowed")
        .unwrap()
        .message;
    assert!(msg.contains("block_external_ssh (deny)"), "{msg}");

    let overlap = compile(
        &spec(
            r#"
targets: {inventoryRef: {name: x}}
zones: {a: [10.0.0.0/8], b: [10.1.0.0/16, 172.16.0.0/12], unused: [1.2.3.4]}
defaultInput: accept
rules:
  - {name: deny_a, action: deny, from: a, protocol: tcp, ports: [80, 81]}
  - {name: allow_b, action: allow, from: b, protocol: tcp, ports: [81, 82]}
  - {name: ping6_from_a, action: allow, from: a, protocol: icmpv6}
failsafe: {ports: [22]}
"#,
        ),
        &meta(),
    )
    .unwrap();
    let f: Vec<(&str, &str)> = overlap
        .findings
        .iter()
        .map(|f| (f.code, f.message.as_str()))
        .collect();
    assert!(
        f.iter()
            .any(|(c, m)| *c == "Overlap" && m.contains("tcp/81") && m.contains("10.1.0.0/16")),
        "{f:#?}"
    );
    assert!(
        f.iter()
            .any(|(c, m)| *c == "NeverMatches" && m.contains("IPv6"))
    );
    assert!(
        f.iter()
            .any(|(c, m)| *c == "UnusedZone" && m.contains("unused"))
    );
}

#[test]
fn broken_references_and_networks_are_errors_naming_the_rule() {
    let bad = spec(
        r#"
targets: {inventoryRef: {name: x}}
zones: {a: ["10.0.0.300/8"]}
defaultInput: drop
rules:
  - {name: r1, action: allow, from: nope, protocol: tcp, ports: [1]}
  - {name: r2, action: allow, protocol: icmp, ports: [1]}
failsafe: {ports: [22]}
"#,
    );
    let err = compile(&bad, &meta()).unwrap_err();
    let codes: Vec<&str> = err.0.iter().map(|f| f.code).collect();
    assert!(codes.contains(&"InvalidNetwork"), "{codes:?}");
    assert!(codes.contains(&"UnknownZone"));
    assert!(codes.contains(&"PortsWithoutTransport"));
    assert!(err.to_string().contains("10.0.0.300/8"), "{err}");
    assert!(err.to_string().contains("more errors"), "{err}");
}

#[test]
fn long_port_lists_share_one_named_set_and_short_ones_expand() {
    let c = compile(&spec(API_EXAMPLE), &meta()).unwrap();
    let text = c.text();
    // six ports: one named set; two ports: a rule each (per family), no anonymous set anywhere
    assert_eq!(text.matches("set ports_").count(), 1, "{text}");
    assert_eq!(
        text.matches("tcp dport 80 accept comment \"allow_web\"")
            .count(),
        2
    ); // IPv4 and IPv6
    assert_eq!(
        text.matches("tcp dport 443 accept comment \"allow_web\"")
            .count(),
        2
    ); // IPv4 and IPv6
    for line in text.lines().filter(|l| l.contains(" comment \"")) {
        assert!(
            !line.contains('{') || line.contains("icmpv6 type"),
            "anonymous set in {line}"
        );
    }
}

// ---- properties over random policies, checked on the rendered text ----

/// A tiny interpreter of the nftables subset the renderer writes.
struct NftEval {
    sets: BTreeMap<String, Vec<String>>,
    rules: Vec<String>,
    default_accept: bool,
}

/// A new inbound packet (never established, never from lo).
#[derive(Clone, Copy, Debug)]
struct Packet {
    src: IpAddr,
    proto: Proto,
    port: u16,
}

impl NftEval {
    fn parse(text: &str) -> Self {
        let mut sets = BTreeMap::new();
        let mut rules = Vec::new();
        let mut default_accept = false;
        let mut lines = text.lines().map(str::trim).peekable();
        while let Some(line) = lines.next() {
            if let Some(rest) = line.strip_prefix("set ") {
                let name = rest.trim_end_matches(" {").to_string();
                for l in lines.by_ref() {
                    if let Some(e) = l.trim().strip_prefix("elements = { ") {
                        let e = e.trim_end_matches(" }");
                        sets.insert(name.clone(), e.split(", ").map(str::to_string).collect());
                        break;
                    }
                }
            } else if line.starts_with("type filter hook input") {
                default_accept = line.contains("policy accept;");
            } else if line.ends_with('"') && line.contains(" comment \"") {
                rules.push(line.to_string());
            }
        }
        Self {
            sets,
            rules,
            default_accept,
        }
    }

    fn accepts(&self, p: Packet) -> bool {
        for r in &self.rules {
            if let Some(verdict) = self.matches(r, p) {
                return verdict;
            }
        }
        self.default_accept
    }

    /// Some(accept?) when `rule` matches `p`.
    fn matches(&self, rule: &str, p: Packet) -> Option<bool> {
        let body = &rule[..rule.find(" comment \"").unwrap()];
        let mut words: Vec<&str> = body.split(' ').collect();
        let verdict = words.pop().unwrap() == "accept";
        let mut i = 0;
        while i < words.len() {
            let (key, val) = (words[i], words.get(i + 1).copied().unwrap_or(""));
            let ok = match key {
                "ip" | "ip6" => {
                    // "ip saddr X"
                    let v = words[i + 2];
                    i += 1;
                    let fam_ok = (key == "ip") == p.src.is_ipv4();
                    fam_ok && self.addr_in(v, p.src)
                }
                "meta" if val == "nfproto" => {
                    let v = words[i + 2];
                    i += 1;
                    (v == "ipv4") == p.src.is_ipv4()
                }
                "meta" if val == "l4proto" => {
                    let v = words[i + 2];
                    i += 1;
                    match v {
                        "tcp" => p.proto == Proto::Tcp,
                        "udp" => p.proto == Proto::Udp,
                        "icmp" => p.proto == Proto::Icmp && p.src.is_ipv4(),
                        "ipv6-icmp" => p.proto == Proto::Icmpv6 && p.src.is_ipv6(),
                        other => panic!("unknown l4proto {other}"),
                    }
                }
                "tcp" | "udp" => {
                    // "tcp dport X"
                    let v = words[i + 2];
                    i += 1;
                    let proto = if key == "tcp" { Proto::Tcp } else { Proto::Udp };
                    p.proto == proto && self.port_in(v, p.port)
                }
                other => panic!("unexpected word {other:?} in {rule}"),
            };
            if !ok {
                return None;
            }
            i += 2;
        }
        Some(verdict)
    }

    fn addr_in(&self, v: &str, a: IpAddr) -> bool {
        let items: Vec<String> = match v.strip_prefix('@') {
            Some(set) => self.sets[set].clone(),
            None => vec![v.to_string()],
        };
        items.iter().any(|n| net(n).contains(&a))
    }

    fn port_in(&self, v: &str, port: u16) -> bool {
        let items: Vec<String> = match v.strip_prefix('@') {
            Some(set) => self.sets[set].clone(),
            None => vec![v.to_string()],
        };
        items.iter().any(|r| match r.split_once('-') {
            Some((lo, hi)) => (lo.parse().unwrap()..=hi.parse().unwrap()).contains(&port),
            None => r.parse::<u16>().unwrap() == port,
        })
    }
}

/// A CIDR or a bare address, host bits cleared.
fn net(s: &str) -> IpNet {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .unwrap()
        .trunc()
}

/// First-match semantics straight from the spec, as a user reads it.
fn spec_accepts(s: &SecurityPolicySpec, p: Packet) -> bool {
    let in_nets = |items: &[String]| items.iter().any(|n| net(n).contains(&p.src));
    let fs_src = s.failsafe.sources.is_empty() || in_nets(&s.failsafe.sources);
    if p.proto == Proto::Tcp && s.failsafe.ports.contains(&p.port) && fs_src {
        return true;
    }
    for r in &s.rules {
        let src = match &r.from {
            None => true,
            Some(z) => in_nets(&s.zones[z].0),
        };
        let proto = match r.protocol {
            Protocol::Any => true,
            Protocol::Tcp => p.proto == Proto::Tcp,
            Protocol::Udp => p.proto == Proto::Udp,
            Protocol::Icmp => p.proto == Proto::Icmp && p.src.is_ipv4(),
            Protocol::Icmpv6 => p.proto == Proto::Icmpv6 && p.src.is_ipv6(),
        };
        let ports = r.ports.as_ref().is_none_or(|ps| ps.contains(&p.port));
        if src && proto && ports {
            return r.action == RuleAction::Allow;
        }
    }
    s.default_input == DefaultAction::Accept
}

const NETS: [&str; 10] = [
    "10.0.0.0/8",
    "10.1.0.0/16",
    "10.1.2.0/24",
    "192.168.0.0/16",
    "172.16.0.0/12",
    "0.0.0.0/0",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "::/0",
    "198.18.0.7",
];
const PORTS: [u16; 8] = [22, 53, 80, 443, 8080, 8081, 9000, 65535];

fn random_spec(rng: &mut StdRng) -> SecurityPolicySpec {
    let mut zones = BTreeMap::new();
    for z in 0..rng.random_range(1..5) {
        let n = rng.random_range(1..4);
        let items = (0..n)
            .map(|_| NETS[rng.random_range(0..NETS.len())].to_string())
            .collect();
        zones.insert(format!("z{z}"), Zone(items));
    }
    let names: Vec<String> = zones.keys().cloned().collect();
    let rules = (0..rng.random_range(0..12))
        .map(|i| {
            let protocol = [
                Protocol::Any,
                Protocol::Tcp,
                Protocol::Tcp,
                Protocol::Udp,
                Protocol::Icmp,
                Protocol::Icmpv6,
            ][rng.random_range(0..6)];
            let ports = matches!(protocol, Protocol::Tcp | Protocol::Udp)
                .then(|| rng.random_bool(0.8))
                .unwrap_or(false)
                .then(|| {
                    (0..rng.random_range(1..8))
                        .map(|_| PORTS[rng.random_range(0..PORTS.len())])
                        .collect()
                });
            FirewallRule {
                name: format!("r{i}"),
                action: if rng.random_bool(0.5) {
                    RuleAction::Allow
                } else {
                    RuleAction::Deny
                },
                from: rng
                    .random_bool(0.8)
                    .then(|| names[rng.random_range(0..names.len())].clone()),
                protocol,
                ports,
            }
        })
        .collect();
    let failsafe_sources = if rng.random_bool(0.5) {
        Vec::new()
    } else {
        vec![NETS[rng.random_range(0..NETS.len())].to_string()]
    };
    SecurityPolicySpec {
        targets: serde_yaml::from_str("{inventoryRef: {name: x}}").unwrap(),
        backend: Backend::Nftables,
        zones,
        default_input: if rng.random_bool(0.5) {
            DefaultAction::Accept
        } else {
            DefaultAction::Drop
        },
        rules,
        failsafe: Failsafe {
            ports: vec![PORTS[rng.random_range(0..4)]],
            sources: failsafe_sources,
        },
        apply: Default::default(),
        drift_check_interval: crate::api::common::DurationString("5m".into()),
        drift_policy: Default::default(),
    }
}

fn random_packet(rng: &mut StdRng) -> Packet {
    let src: IpAddr = match rng.random_range(0..8) {
        0 => "10.1.2.3".parse().unwrap(),
        1 => "10.9.9.9".parse().unwrap(),
        2 => "192.168.4.4".parse().unwrap(),
        3 => "172.20.0.1".parse().unwrap(),
        4 => "8.8.4.4".parse().unwrap(),
        5 => "2001:db8:1::5".parse().unwrap(),
        6 => "2001:db9::1".parse().unwrap(),
        _ => "198.18.0.7".parse().unwrap(),
    };
    let proto = [
        Proto::Tcp,
        Proto::Tcp,
        Proto::Udp,
        Proto::Icmp,
        Proto::Icmpv6,
    ][rng.random_range(0..5)];
    Packet {
        src,
        proto,
        port: PORTS[rng.random_range(0..PORTS.len())],
    }
}

#[test]
fn rendering_random_policies_is_deterministic_and_keeps_their_meaning() {
    let mut rng = StdRng::seed_from_u64(0x5ec0);
    for case in 0..400 {
        let s = random_spec(&mut rng);
        let a = compile(&s, &meta()).unwrap();
        let b = compile(&s.clone(), &meta()).unwrap();
        assert_eq!(a.text(), b.text(), "case {case}: not deterministic");
        let ipt1 = compile_for(&s, Backend::Iptables, &meta()).unwrap();
        let ipt2 = compile_for(&s, Backend::Iptables, &meta()).unwrap();
        assert_eq!(ipt1.text(), ipt2.text());
        let eval = NftEval::parse(&a.text());
        for _ in 0..60 {
            let p = random_packet(&mut rng);
            assert_eq!(
                eval.accepts(p),
                spec_accepts(&s, p),
                "case {case}: {p:?}\n{s:#?}\n{}",
                a.text()
            );
        }
    }
}

#[test]
fn every_failsafe_port_stays_reachable_from_every_failsafe_source() {
    let mut rng = StdRng::seed_from_u64(0xfa15);
    for case in 0..400 {
        let mut s = random_spec(&mut rng);
        // the hostile case: every rule denies everything first
        s.rules.insert(
            0,
            FirewallRule {
                name: "deny_all".into(),
                action: RuleAction::Deny,
                from: None,
                protocol: Protocol::Any,
                ports: None,
            },
        );
        s.default_input = DefaultAction::Drop;
        let c = compile(&s, &meta()).unwrap();
        let eval = NftEval::parse(&c.text());
        let sources: Vec<IpAddr> = if s.failsafe.sources.is_empty() {
            vec!["8.8.4.4".parse().unwrap(), "2001:db9::1".parse().unwrap()]
        } else {
            s.failsafe
                .sources
                .iter()
                .map(|n| {
                    let net = net(n);
                    net.hosts().next().unwrap_or(net.addr())
                })
                .collect()
        };
        for src in sources {
            for &port in &s.failsafe.ports {
                let p = Packet {
                    src,
                    proto: Proto::Tcp,
                    port,
                };
                assert!(
                    eval.accepts(p),
                    "case {case}: failsafe {p:?} dropped\n{}",
                    c.text()
                );
            }
        }
        // and nothing else gets through the deny-all
        let other = Packet {
            src: "8.8.4.4".parse().unwrap(),
            proto: Proto::Udp,
            port: 53,
        };
        assert!(!eval.accepts(other), "case {case}");
    }
}
