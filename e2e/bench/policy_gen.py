#!/usr/bin/env python3
"""Writes a deterministic synthetic SecurityPolicy for the firewall-compiler benchmark.

    e2e/bench/policy_gen.py --rules 10000 --zones 200 --seed 1 --out /tmp/bench-policy.yaml

The same arguments always give the same bytes (Python's `random.Random(seed)`, no other input).
Only the standard library is used: it runs with any python3.

Shape (see src/api/security_policy.rs):
- zones `z001`..: 1-8 IPv4 CIDRs each, no two overlapping inside a zone; 10% of the zones (rounded)
  also hold 1-2 IPv6 prefixes under 2001:db8::/32. No network touches 198.18.0.0/15 (the
  failsafe/bench source range), 127.0.0.0/8, 0.0.0.0/8 or 224.0.0.0/3.
- rules `r00001`..: ~80% allow / ~20% deny, ~85% tcp / ~15% udp, 1-4 distinct ports, and about
  `--any-source-pct` percent (default 5) without `from` (any source, so they also match
  198.18.x.y: a bench that needs its own traffic governed only by its own rules should put them
  first or use ports no rule here names; `--any-source-pct 0` removes them).
- failsafe {ports: [22], sources: [198.18.0.0/15]}, defaultInput drop, backend nftables.

The CRD caps zones at 32 and rules at 256; this file is for the compiler benchmark and goes past
both on purpose (it is never applied to a cluster).
"""

import argparse
import ipaddress
import random
import sys

RESERVED = [
    ipaddress.ip_network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "198.18.0.0/15", "224.0.0.0/3")
]
# Common service ports first, so that port lists repeat the way real policies do.
COMMON_PORTS = [
    21, 25, 53, 80, 110, 123, 143, 161, 389, 443, 445, 465, 514, 587, 636, 993, 995,
    1433, 1521, 2049, 2379, 3000, 3306, 3389, 5432, 5672, 6379, 6443, 8080, 8443, 9090,
    9093, 9100, 9200, 10250, 11211, 27017,
]
PREFIX_WEIGHTS = [(8, 1), (12, 1), (16, 4), (20, 3), (24, 10), (27, 3), (28, 3), (32, 8)]


def pick_prefixlen(rng):
    total = sum(w for _, w in PREFIX_WEIGHTS)
    x = rng.randrange(total)
    for plen, w in PREFIX_WEIGHTS:
        if x < w:
            return plen
        x -= w
    raise AssertionError("unreachable")


def random_v4(rng):
    while True:
        plen = pick_prefixlen(rng)
        addr = rng.randrange(1 << 32)
        net = ipaddress.IPv4Network((addr, plen), strict=False)
        if not any(net.overlaps(r) for r in RESERVED):
            return net


def random_v6(rng):
    # 2001:db8::/32 sub-prefixes: /48, /56 or /64.
    plen = rng.choice([48, 56, 64])
    bits = rng.randrange(1 << (plen - 32))
    base = int(ipaddress.IPv6Address("2001:db8::")) | (bits << (128 - plen))
    return ipaddress.IPv6Network((base, plen))


def make_zone(rng, v6):
    nets = []
    want = rng.randint(1, 8)
    while len(nets) < want:
        n = random_v4(rng)
        if not any(n.overlaps(m) for m in nets):
            nets.append(n)
    if v6:
        want6 = rng.randint(1, 2)
        got6 = []
        while len(got6) < want6:
            n = random_v6(rng)
            if not any(n.overlaps(m) for m in got6):
                got6.append(n)
        nets.extend(got6)
    return [str(n) for n in nets]


def make_ports(rng):
    want = rng.choices([1, 2, 3, 4], weights=[50, 25, 15, 10])[0]
    ports = set()
    while len(ports) < want:
        if rng.random() < 0.6:
            ports.add(rng.choice(COMMON_PORTS))
        else:
            ports.add(rng.randint(1024, 65535))
    return sorted(ports)


def generate(rules, zones, seed, any_source_pct):
    rng = random.Random(seed)
    zw = max(3, len(str(zones)))
    rw = max(5, len(str(rules)))
    zone_names = [f"z{i:0{zw}d}" for i in range(1, zones + 1)]
    # Exactly 10% (rounded) of the zones are dual-stack.
    v6_zones = set(rng.sample(zone_names, round(zones * 0.10)))
    zone_map = {name: make_zone(rng, v6=name in v6_zones) for name in zone_names}
    rule_list = []
    for i in range(1, rules + 1):
        r = {"name": f"r{i:0{rw}d}"}
        r["action"] = "allow" if rng.random() < 0.80 else "deny"
        if zones and rng.random() >= any_source_pct / 100.0:
            r["from"] = rng.choice(zone_names)
        r["protocol"] = "tcp" if rng.random() < 0.85 else "udp"
        r["ports"] = make_ports(rng)
        rule_list.append(r)
    return zone_map, rule_list


def render(zone_map, rule_list):
    out = [
        "apiVersion: outrider.dev/v1alpha1",
        "kind: SecurityPolicy",
        "metadata:",
        "  name: bench",
        "  namespace: default",
        "spec:",
        "  targets:",
        "    inventoryRef:",
        "      name: bench",
        "  backend: nftables",
    ]
    if zone_map:
        out.append("  zones:")
        for name, nets in zone_map.items():
            out.append(f"    {name}: [{', '.join(f'{chr(34)}{n}{chr(34)}' for n in nets)}]")
    out.append("  defaultInput: drop")
    if rule_list:
        out.append("  rules:")
        for r in rule_list:
            parts = [f"name: {r['name']}", f"action: {r['action']}"]
            if "from" in r:
                parts.append(f"from: {r['from']}")
            parts.append(f"protocol: {r['protocol']}")
            parts.append(f"ports: [{', '.join(str(p) for p in r['ports'])}]")
            out.append(f"    - {{{', '.join(parts)}}}")
    out += [
        "  failsafe:",
        "    ports: [22]",
        '    sources: ["198.18.0.0/15"]',
    ]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rules", type=int, default=10000)
    ap.add_argument("--zones", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--any-source-pct", type=float, default=5.0,
                    help="percent of rules without `from` (default 5)")
    ap.add_argument("--out", default="-", help="output file (default: stdout)")
    a = ap.parse_args()
    if a.rules < 0 or a.zones < 0 or not 0 <= a.any_source_pct <= 100:
        ap.error("--rules and --zones must be >= 0, --any-source-pct within 0..100")
    if a.rules > 0 and a.zones == 0 and a.any_source_pct < 100:
        print("policy_gen: no zones: every rule is any-source", file=sys.stderr)
    text = render(*generate(a.rules, a.zones, a.seed, a.any_source_pct))
    if a.out == "-":
        sys.stdout.write(text)
    else:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
