#!/usr/bin/env python3
"""Compiles a SecurityPolicy with Aerleon (nftables and iptables generators) and times it.

Run it with the venv python that e2e/bench/aerleon_install.sh prints:

    PY=$(e2e/bench/aerleon_install.sh)
    "$PY" e2e/bench/aerleon_compile.py /tmp/bench-policy.yaml [--out-dir DIR] [--via api|cli]

It translates the SecurityPolicy YAML into Aerleon inputs, written under --out-dir (default:
`<policy>.aerleon/` beside the policy) so that `aclgen` can be run on them by hand:

    defs/NETWORKS.yaml   one network token per zone (`z001` -> `Z001`), plus FAILSAFE_SOURCES
    defs/SERVICES.yaml   one service token per distinct protocol + port list (`TCP_80_443`),
                         plus FAILSAFE_PORTS
    policies/pol/bench_nft.yaml        header `nftables: mixed input` (table inet, input hook,
                                       priority 0, policy drop: Aerleon's default)
    policies/pol/bench_iptables.yaml   header `iptables: INPUT DROP` (IPv4, filter INPUT)
    policies/pol/bench_ip6tables.yaml  header `iptables: INPUT DROP inet6` (IPv6, filter INPUT)

Terms, in order: `loopback` (source-interface lo, accept) and `failsafe` (failsafe sources and
ports, tcp, accept), which stand for what Outrider always puts before the rules (leave them out
with --rules-only), then one term per rule: source-address <zone token> (none for a rule without
`from`), protocol, destination-port <service token>, action accept|deny.

Then it compiles each policy with Aerleon and prints one JSON line on stdout. Only the compile is
timed: parsing the definitions into a Naming plus api.Generate() for --via api (the default),
or the whole `aclgen --policy_file ...` process for --via cli. With --via api a 1-term policy is
compiled first for each generator so that Aerleon's one-time plugin loading is not counted.
`--repeat N` keeps the fastest of N compiles.

The outputs, out/bench.nft, out/bench.iptables and out/bench.ip6tables, are Aerleon's text
unchanged. The nftables file is one `table inet filtering_policies { ... }` block with one chain
per term and a base chain `root0` that jumps to each: `nft -f` loads it as-is into a ruleset that
has no such table yet (a second load would add the rules again: flush the ruleset or delete the
table in between). The iptables files are lists of `iptables`/`ip6tables` arguments (`-P INPUT
DROP`, `-N I_r00001`, `-A INPUT -j I_r00001`, ...), one command per line, as Aerleon writes them.

What Aerleon 1.18.0 does with this input (seen in its source and output):
- nftables `mixed` writes every statement twice (`ip saddr {..} tcp dport 80 ct state new accept`
  on two identical lines; the same for `ip6 saddr` and for any-source rules): harmless for the
  verdicts, but it doubles the rules and anonymous sets the kernel loads. Every rule with more
  than one address or port gets anonymous sets of its own (`{ a, b }`); there are no named sets.
- The `inet6` nftables header is not an alternative: a term whose zone has no IPv6 prefix loses
  its source match there and becomes any-source. `mixed` keeps IPv4-only zones IPv4-only.
- Accept terms carry `ct state new`; the base chain accepts `established,related` first.
- iptables: IPv4 and IPv6 are separate filters (inet / inet6); a term whose zone has no address
  of the filter's family is left out of it; one `-A` line per source network (no ipset).
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import yaml

try:
    from importlib.metadata import version as _pkg_version
except ImportError:  # pragma: no cover
    _pkg_version = None

from absl import logging as absl_logging
from aerleon import api
from aerleon.lib import naming

GENERATORS = {
    # key: (policy filename, Aerleon target, header options, output name)
    "nft": ("bench_nft", "nftables", "mixed input", "bench.nft"),
    "iptables": ("bench_iptables", "iptables", "INPUT DROP", "bench.iptables"),
    "ip6tables": ("bench_ip6tables", "iptables", "INPUT DROP inet6", "bench.ip6tables"),
}


def token(name):
    # Aerleon tokens: [-_A-Z0-9]+; zone names are [-_a-z0-9]+.
    return name.upper()


def translate(spec, rules_only):
    """SecurityPolicy spec -> (definitions dict, list of terms)."""
    networks = {}
    services = {}
    for zone, cidrs in (spec.get("zones") or {}).items():
        networks[token(zone)] = {"values": [{"address": c} for c in cidrs]}

    def service(proto, ports):
        name = f"{proto.upper()}_{'_'.join(str(p) for p in ports)}"
        services.setdefault(name, [{"port": p, "protocol": proto} for p in ports])
        return name

    terms = []
    if not rules_only:
        terms.append({"name": "loopback", "source-interface": "lo", "action": "accept"})
        fs = spec.get("failsafe") or {}
        t = {"name": "failsafe", "protocol": "tcp"}
        if fs.get("sources"):
            networks["FAILSAFE_SOURCES"] = {"values": [{"address": c} for c in fs["sources"]]}
            t["source-address"] = "FAILSAFE_SOURCES"
        services["FAILSAFE_PORTS"] = [{"port": p, "protocol": "tcp"} for p in fs.get("ports", [22])]
        t["destination-port"] = "FAILSAFE_PORTS"
        t["action"] = "accept"
        terms.append(t)

    for r in spec.get("rules") or []:
        t = {"name": r["name"]}
        if r.get("from"):
            t["source-address"] = token(r["from"])
        proto = r.get("protocol", "any")
        if proto != "any":
            t["protocol"] = proto
        if r.get("ports"):
            if proto not in ("tcp", "udp"):
                raise SystemExit(f"rule {r['name']}: ports need protocol tcp or udp")
            t["destination-port"] = service(proto, r["ports"])
        t["action"] = {"allow": "accept", "deny": "deny"}[r["action"]]
        terms.append(t)
    return {"networks": networks, "services": services}, terms


def policy_dict(key, terms):
    filename, target, options, _ = GENERATORS[key]
    return {
        "filename": filename,
        "filters": [{"header": {"targets": {target: options}}, "terms": terms}],
    }


def write_inputs(out_dir, defs, terms):
    (out_dir / "defs").mkdir(parents=True, exist_ok=True)
    (out_dir / "policies" / "pol").mkdir(parents=True, exist_ok=True)
    (out_dir / "out").mkdir(parents=True, exist_ok=True)
    dump = lambda obj, path: path.write_text(
        yaml.safe_dump(obj, sort_keys=False, default_flow_style=None, width=1 << 20)
    )
    dump({"networks": defs["networks"]}, out_dir / "defs" / "NETWORKS.yaml")
    dump({"services": defs["services"]}, out_dir / "defs" / "SERVICES.yaml")
    for key in GENERATORS:
        pol = policy_dict(key, terms)
        dump({"filters": pol["filters"]}, out_dir / "policies" / "pol" / f"{pol['filename']}.yaml")


def compile_api(key, defs, terms, repeat):
    pol = policy_dict(key, terms)
    best = None
    text = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        definitions = naming.Naming()
        definitions.ParseDefinitionsObject(defs, "bench-definitions")
        configs = api.Generate([pol], definitions)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
        if len(configs) != 1:
            raise SystemExit(f"{key}: Aerleon produced {sorted(configs)}, expected one file")
        text = next(iter(configs.values()))
    return best, text


def compile_cli(key, out_dir, repeat, debug):
    filename = GENERATORS[key][0]
    aclgen = shutil.which("aclgen", path=os.path.dirname(sys.executable)) or "aclgen"
    gen_dir = out_dir / "aclgen-out"
    cmd = [
        aclgen,
        "--base_directory", str(out_dir / "policies"),
        "--definitions_directory", str(out_dir / "defs"),
        "--policy_file", str(out_dir / "policies" / "pol" / f"{filename}.yaml"),
        "--output_directory", str(gen_dir),
    ]
    best = None
    for _ in range(repeat):
        shutil.rmtree(gen_dir, ignore_errors=True)
        gen_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        dt = time.perf_counter() - t0
        if done.returncode != 0 or debug:
            sys.stderr.write(done.stderr)
        if done.returncode != 0:
            raise SystemExit(f"{key}: aclgen exited {done.returncode}")
        best = dt if best is None else min(best, dt)
    produced = [p for p in gen_dir.rglob("*") if p.is_file()]
    if len(produced) != 1:
        raise SystemExit(f"{key}: aclgen produced {produced}, expected one file")
    return best, produced[0].read_text()


def warm_up():
    # Aerleon loads its generator plugins on the first Generate(); keep that out of the timing.
    defs = {"networks": {"W": {"values": [{"address": "192.0.2.0/24"}]}},
            "services": {"WS": [{"port": 80, "protocol": "tcp"}]}}
    terms = [{"name": "w", "source-address": "W", "protocol": "tcp",
              "destination-port": "WS", "action": "accept"}]
    for key in GENERATORS:
        compile_api(key, defs, terms, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("policy", help="SecurityPolicy YAML (e2e/bench/policy_gen.py output)")
    ap.add_argument("--out-dir", help="where inputs and outputs go (default: <policy>.aerleon)")
    ap.add_argument("--via", choices=["api", "cli"], default="api")
    ap.add_argument("--repeat", type=int, default=1, help="compile N times, keep the fastest")
    ap.add_argument("--rules-only", action="store_true",
                    help="no loopback/failsafe terms: exactly one term per rule")
    ap.add_argument("--debug", action="store_true", help="keep Aerleon's warnings on stderr")
    a = ap.parse_args()
    if a.repeat < 1:
        ap.error("--repeat must be >= 1")
    if not a.debug:
        # One warning per term skipped by the IPv6 filter (zones without IPv6) would flood stderr.
        absl_logging.set_verbosity(absl_logging.ERROR)

    doc = yaml.safe_load(pathlib.Path(a.policy).read_text())
    if doc.get("kind") != "SecurityPolicy":
        raise SystemExit(f"{a.policy}: not a SecurityPolicy")
    spec = doc["spec"]
    if spec.get("defaultInput", "drop") != "drop":
        raise SystemExit("only defaultInput: drop is translated (the headers say DROP)")
    out_dir = pathlib.Path(a.out_dir or f"{a.policy}.aerleon").resolve()

    defs, terms = translate(spec, a.rules_only)
    write_inputs(out_dir, defs, terms)

    if a.via == "api":
        warm_up()
    result = {"aerleon_version": _pkg_version("aerleon") if _pkg_version else "unknown",
              "via": a.via}
    for key in GENERATORS:
        if a.via == "api":
            seconds, text = compile_api(key, defs, terms, a.repeat)
        else:
            seconds, text = compile_cli(key, out_dir, a.repeat, a.debug)
        out_file = out_dir / "out" / GENERATORS[key][3]
        out_file.write_text(text)
        result[f"{key}_seconds"] = round(seconds, 4)
        result[f"{key}_bytes"] = len(text.encode())
        result[f"{key}_file"] = str(out_file)
    result["terms"] = len(terms)
    result["rule_terms"] = len(spec.get("rules") or [])
    result["networks"] = len(defs["networks"])
    result["services"] = len(defs["services"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
