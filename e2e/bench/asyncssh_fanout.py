#!/usr/bin/env python3
"""One command on many hosts with asyncssh, the Python peer of `make bench-ssh`.

    PY=$(e2e/bench/asyncssh_install.sh)
    "$PY" e2e/bench/asyncssh_fanout.py --hosts HOSTS --port 2222 --user outrider-nosudo \
        --key id_ed25519 --known-hosts known_hosts --parallelism 50 -- uptime

HOSTS holds one host a line: `ADDRESS` or `NAME ADDRESS` (blank lines and `#` comments are
skipped). At most --parallelism hosts are in flight at once (an asyncio.Semaphore); each gets one
connection: connect, verify the host key, authenticate with the key, run the command, close.

What it does like the other tools of the bench: one private key, read once, no agent
(agent_path=None), no ~/.ssh/config (config=None); host keys checked strictly against the given
known_hosts (`[addr]:port` lines for a port other than 22), read once: an unknown or changed key
fails the host. The command is sent as it is given (arguments joined by blanks), like `ssh host
CMD`: the login shell runs it.

Output: one line a host, in completion order, tab-separated:
    NAME<TAB>ok<TAB>first stdout line
    NAME<TAB>failed<TAB>reason (exit status, or the connection/auth/host-key error)
and a summary on stderr. Exit status 0 when every host succeeded, 1 when any failed, 2 on a usage
error.
"""

import argparse
import asyncio
import sys
import time
import warnings

try:
    # cryptography warns about DSA when asyncssh imports it: noise on every run's stderr
    from cryptography.utils import CryptographyDeprecationWarning
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
except ImportError:
    pass

import asyncssh  # noqa: E402  (after the warning filter)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Run one command on many hosts with asyncssh (bounded parallelism).")
    p.add_argument("--hosts", required=True, help="file: `ADDRESS` or `NAME ADDRESS` a line")
    p.add_argument("--port", type=int, default=22)
    p.add_argument("--user", required=True)
    p.add_argument("--key", required=True, help="private key file (OpenSSH format)")
    p.add_argument("--known-hosts", required=True, help="known_hosts file, checked strictly")
    p.add_argument("--parallelism", type=int, default=50, help="hosts in flight at once")
    p.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds for TCP connect, key exchange and authentication")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per command")
    p.add_argument("--kex", help="comma-separated kex algorithms (default: asyncssh's)")
    p.add_argument("--cipher", help="comma-separated ciphers (default: asyncssh's)")
    p.add_argument("--host-key-alg",
                   help="comma-separated host key algorithms (default: from known_hosts)")
    p.add_argument("command", nargs="+", help="the command (after --)")
    args = p.parse_args(argv)
    if args.parallelism < 1:
        p.error("--parallelism must be at least 1")
    return args


def read_hosts(path):
    hosts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) == 1:
                hosts.append((fields[0], fields[0]))
            elif len(fields) == 2:
                hosts.append((fields[0], fields[1]))
            else:
                raise ValueError(f"{path}: expected `ADDRESS` or `NAME ADDRESS`, got {line!r}")
    return hosts


def one_line(text):
    return " ".join(str(text).split())


async def run_host(name, address, args, options, command, limit):
    async with limit:
        try:
            async with asyncssh.connect(address, options=options) as conn:
                result = await asyncio.wait_for(conn.run(command, check=False), args.timeout)
            first = (result.stdout or "").splitlines()
            first = first[0] if first else ""
            if result.exit_status == 0:
                return name, True, first
            if result.exit_signal:
                why = f"signal {result.exit_signal[0]}"
            else:
                why = f"exit code {result.exit_status}"
            err = one_line(result.stderr or "")
            return name, False, f"{why}: {err}" if err else why
        except asyncio.TimeoutError:
            return name, False, f"command took longer than {args.timeout:g}s"
        except (OSError, asyncssh.Error) as e:
            return name, False, one_line(f"{type(e).__name__}: {e}")


async def main(args):
    hosts = read_hosts(args.hosts)
    # Read once and shared, as outrider decodes its key and known_hosts once per run.
    key = asyncssh.read_private_key(args.key)
    known_hosts = asyncssh.read_known_hosts(args.known_hosts)
    extra = {}
    if args.kex:
        extra["kex_algs"] = args.kex.split(",")
    if args.cipher:
        extra["encryption_algs"] = args.cipher.split(",")
    if args.host_key_alg:
        extra["server_host_key_algs"] = args.host_key_alg.split(",")
    options = asyncssh.SSHClientConnectionOptions(
        port=args.port,
        username=args.user,
        client_keys=[key],
        known_hosts=known_hosts,
        agent_path=None,
        config=None,
        preferred_auth="publickey",
        connect_timeout=args.connect_timeout,
        login_timeout=args.connect_timeout,
        **extra,
    )
    command = " ".join(args.command)
    limit = asyncio.Semaphore(args.parallelism)
    started = time.monotonic()
    tasks = [asyncio.ensure_future(run_host(n, a, args, options, command, limit))
             for n, a in hosts]
    ok = failed = 0
    for done in asyncio.as_completed(tasks):
        name, success, text = await done
        if success:
            ok += 1
        else:
            failed += 1
        print(f"{name}\t{'ok' if success else 'failed'}\t{text}", flush=False)
    sys.stdout.flush()
    print(f"{ok} succeeded, {failed} failed ({len(hosts)} hosts, "
          f"{time.monotonic() - started:.1f}s)", file=sys.stderr)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
    except (OSError, ValueError, asyncssh.Error) as e:
        print(f"asyncssh_fanout: {e}", file=sys.stderr)
        sys.exit(2)
