#!/usr/bin/env bash
# The demo fleet: three Linux hosts on this machine for `make demo` (e2e/demo.sh) and for trying the
# CLI (`outrider plan run`, `outrider check run`, `outrider policy apply`) by hand.
#
# usage: e2e/fleet.sh up|down|status        (root: network namespaces, bridges, mounts, sshd)
#        e2e/fleet.sh exec HOST COMMAND...   run COMMAND as root inside HOST (its network and mounts)
#   up      create the fleet, or repair what is missing of it; idempotent (keys and host keys are kept)
#   down    kill every process in the hosts, delete the namespaces, veths and bridge, the log dir and
#           the state dir (KEEP_STATE=1 keeps the state dir, e.g. to read the logs); idempotent
#   status  one line per host; exit 0 only if every host answers SSH and its listener runs
#   exec    e.g. `e2e/fleet.sh exec web-1 ls -l /srv/shop`, `e2e/fleet.sh exec web-1 nft list ruleset`
#
# The hosts: web-1, web-2, db-1 at 198.19.S.11, .12, .13 (S = OUTRIDER_DEMO_SLOT, default 0), each a
# network namespace `ordemo-<host>` (`ordemo<S>-<host>` for S > 0) with
#   - its own OpenSSH sshd on port 22 (logins as outrider-sudo, passwordless sudo, and outrider-nosudo,
#     both created by e2e/deps.sh; from 127.0.0.0/8 and the fleet's /24 only);
#   - "the shop": python3's http.server on :8080 serving /srv/shop/current (a symlink to
#     releases/41 at first), started by /srv/shop/bin/start (idempotent; pidfile /srv/shop/run/http.pid),
#     request log /srv/shop/log/access.log.
# A veth per host links it to the bridge `ordemo<S>` in the root namespace, which has 198.19.S.1/24:
# the address the controller (and anything else on this machine) connects from. The hosts have no
# default route: they reach their /24 and nothing else. The root namespace gets the route
# `unreachable 198.18.0.0/15` if missing (as the tests' netns hosts do), so nothing for the range
# ever leaves through the default route; the bridge's /24 is more specific.
#
# Each host sees a few directories of its own (sshd runs under `ip netns exec`, which gives it a
# private mount namespace; its sessions and the listener share it):
#   /etc/ssh            bind of <state>/hosts/<host>/ssh: sshd_config, host keys, authorized_keys/<user>
#   /srv                a 64 MiB tmpfs, the host's data disk, filled at start from
#                       <state>/hosts/<host>/srv.seed: the shop's bin/start, releases/41, current, run/
#   /srv/shop/log       bind of /var/log/outrider-demo[-S]/<host>: its logs, where this machine's
#                       log agent (the demo's LogPipeline) reads them
#   /var/lib/outrider   a tmpfs: the SecurityPolicy's state dir on the host
# Everything else (/, /tmp, the process table) is this machine's, shared by all hosts. A host that
# is restarted (sshd gone: `up` repairs it) starts from the seed again: release 41.
#
# Outputs, in the state dir <state> = ${OUTRIDER_DEMO_DIR:-${OUTRIDER_CLUSTER_DIR:-e2e/.cluster}}/fleet:
#   id_ed25519(.pub)    the user key every host accepts
#   known_hosts         the hosts' real host keys, one line per address and key
#   secret/             ssh-privatekey + known_hosts: `outrider ... --secret-dir <state>/secret`
#   ssh-secret.yaml     Secret `fleet-ssh` (no namespace) with both, for the Inventory's secretRef
#   hosts/<host>/       per host: ssh/ srv.seed/ sshd.log start.log
#
# Environment:
#   OUTRIDER_DEMO_SLOT  0-250: picks 198.19.S.0/24 and the names above (default 0), so a second
#                       fleet (the e2e test of the demo) can run next to a user's
#   OUTRIDER_DEMO_DIR   parent of the state dir (default: OUTRIDER_CLUSTER_DIR, else e2e/.cluster)
#   KEEP_STATE=1        `down` keeps the state dir
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SLOT=${OUTRIDER_DEMO_SLOT:-0}
[[ $SLOT =~ ^[0-9]+$ ]] && [ "$SLOT" -le 250 ] || { echo "[fleet] OUTRIDER_DEMO_SLOT must be 0-250, not '$SLOT'" >&2; exit 2; }
SLOT=$((10#$SLOT))
PARENT=${OUTRIDER_DEMO_DIR:-${OUTRIDER_CLUSTER_DIR:-$here/.cluster}}
case $PARENT in /*) ;; *) PARENT="$PWD/$PARENT" ;; esac
STATE="${PARENT%/}/fleet"

NET=198.19.$SLOT
GATEWAY=$NET.1
FENCE=198.18.0.0/15
if [ "$SLOT" = 0 ]; then PREFIX=ordemo; LOGROOT=/var/log/outrider-demo; else PREFIX=ordemo$SLOT; LOGROOT=/var/log/outrider-demo-$SLOT; fi
BRIDGE=ordemo$SLOT
HOSTS=(web-1 web-2 db-1)
declare -A OCTET=([web-1]=11 [web-2]=12 [db-1]=13)
USERS=(outrider-sudo outrider-nosudo)
SSHD=/usr/sbin/sshd
# The bridge's alias names the state dir that owns it: another state dir may not take the slot.
ALIAS="outrider-demo-fleet $STATE"

log() { printf '[fleet %3ss] %s\n' "$SECONDS" "$*" >&2; }
die() { printf '[fleet] ERROR: %s\n' "$*" >&2; exit 1; }

netns_of() { echo "$PREFIX-$1"; }
veth_of() { echo "od$SLOT-$1"; }
addr_of() { echo "$NET.${OCTET[$1]}"; }
# (no `| grep -q` under pipefail: grep quitting early can fail the writer with SIGPIPE)
has_netns() { [[ $'\n'$(ip netns list 2>/dev/null | cut -d' ' -f1)$'\n' == *$'\n'"$1"$'\n'* ]]; }

preflight() {
  [ "$(id -u)" = 0 ] || die "the demo fleet needs root (network namespaces, a bridge, mounts, sshd): run as root"
  local c missing=()
  for c in ip nsenter setsid python3 curl ssh-keygen timeout flock; do command -v "$c" >/dev/null || missing+=("$c"); done
  [ -x "$SSHD" ] || missing+=("$SSHD")
  [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]}: run e2e/deps.sh as root"
  for c in "${USERS[@]}"; do id -u "$c" >/dev/null 2>&1 || die "user $c is missing: run e2e/deps.sh as root"; done
  [ -d /run/sshd ] || die "/run/sshd (sshd's privilege separation dir) is missing: run e2e/deps.sh as root"
}

sshd_at_least() { # sshd_at_least MAJOR MINOR
  local v
  v=$("$SSHD" -V 2>&1 || true)
  v=${v#*OpenSSH_}
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%[!0-9]*}
  [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || return 1
  [ "$major" -gt "$1" ] || { [ "$major" -eq "$1" ] && [ "$minor" -ge "$2" ]; }
}

# ---------------------------------------------------------------- processes in a host

# kill_netns NS: kill every process in the namespace (frozen first, round after round, so none
# forks away unseen): sshd, its sessions, the listener
kill_netns() {
  local ns=$1 pids n=0
  while [ $n -lt 100 ]; do
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [ -z "$pids" ] && return 0
    # shellcheck disable=SC2086
    kill -STOP $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.02
    n=$((n + 1))
  done
  log "processes left in $ns: $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
}

# sshd_pid HOST: the pid of the host's sshd listener, if it runs (found in its namespace by its config)
sshd_pid() {
  local ns pid cmdline
  ns=$(netns_of "$1")
  for pid in $(ip netns pids "$ns" 2>/dev/null); do
    # sshd retitles itself "sshd: <argv> [listener] ..."; the sh that execs it does not count
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || continue
    if [[ $cmdline == "$SSHD -D -e -f /etc/ssh/sshd_config"* || $cmdline == "sshd: $SSHD -D -e -f /etc/ssh/sshd_config"* ]]; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

banner_ok() { # banner_ok ADDR: sshd answers on ADDR:22
  local banner
  banner=$(timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/22" && head -c 8 <&3' _ "$1" 2>/dev/null) || return 1
  [ "$banner" = SSH-2.0- ]
}

listener_ok() { # listener_ok ADDR: the shop answers on ADDR:8080
  curl -fsS --max-time 2 -o /dev/null "http://$1:8080/healthz" 2>/dev/null
}

# ---------------------------------------------------------------- up

fence_and_bridge() {
  if [[ $'\n'$(ip route show type unreachable) != *$'\n'"unreachable $FENCE"* ]]; then
    ip route add unreachable "$FENCE" 2>/dev/null || [[ $'\n'$(ip route show type unreachable) == *$'\n'"unreachable $FENCE"* ]] \
      || die "could not add the route 'unreachable $FENCE'"
    log "route unreachable $FENCE added (nothing for the range leaves through the default route)"
  fi
  if [ -d "/sys/class/net/$BRIDGE" ]; then
    local alias
    alias=$(cat "/sys/class/net/$BRIDGE/ifalias" 2>/dev/null || true)
    [ "$alias" = "$ALIAS" ] || die "bridge $BRIDGE exists but belongs to '${alias:-something else}', not to $STATE: pick another OUTRIDER_DEMO_SLOT, or take it down with that state dir"
  else
    ip link add "$BRIDGE" type bridge
    ip link set "$BRIDGE" alias "$ALIAS"
  fi
  ip addr replace "$GATEWAY/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

user_key() {
  mkdir -p "$STATE"
  chmod 0700 "$STATE"
  if [ ! -s "$STATE/id_ed25519" ]; then
    rm -f "$STATE/id_ed25519" "$STATE/id_ed25519.pub"
    ssh-keygen -q -t ed25519 -N '' -C "outrider-demo-fleet" -f "$STATE/id_ed25519"
  fi
}

# host_files HOST: host keys, sshd_config, authorized keys, the shop's files (kept when present)
host_files() {
  local h=$1 dir="$STATE/hosts/$1" kind
  local seed="$dir/srv.seed"
  mkdir -p "$dir/ssh/authorized_keys" "$seed/shop/bin" "$seed/shop/run" "$seed/shop/log" \
    "$seed/shop/releases/41" "$LOGROOT/$h"
  # sshd reads authorized_keys as the user logging in: every directory on the way (from the
  # bind mount at /etc/ssh on) must be traversable
  chmod 0755 "$dir" "$dir/ssh" "$dir/ssh/authorized_keys" "$LOGROOT" "$LOGROOT/$h"
  for kind in ed25519 ecdsa; do
    [ -s "$dir/ssh/ssh_host_${kind}_key" ] && continue
    rm -f "$dir/ssh/ssh_host_${kind}_key" "$dir/ssh/ssh_host_${kind}_key.pub"
    ssh-keygen -q -t "$kind" -N '' -C "$h" -f "$dir/ssh/ssh_host_${kind}_key"
  done
  [ -f /etc/ssh/moduli ] && [ ! -f "$dir/ssh/moduli" ] && cp /etc/ssh/moduli "$dir/ssh/moduli"
  local u
  for u in "${USERS[@]}"; do
    install -m 0644 "$STATE/id_ed25519.pub" "$dir/ssh/authorized_keys/$u"
  done
  {
    echo "# Generated by e2e/fleet.sh for $h ($(addr_of "$h")); this directory is the host's /etc/ssh"
    echo "ListenAddress 0.0.0.0"
    echo "Port 22"
    echo "HostKey /etc/ssh/ssh_host_ed25519_key"
    echo "HostKey /etc/ssh/ssh_host_ecdsa_key"
    echo "PidFile /etc/ssh/sshd.pid"
    echo "LogLevel VERBOSE"
    echo "MaxStartups 100:30:200"
    echo "MaxSessions 100"
    echo "UsePAM no"
    echo "StrictModes no"
    echo "PasswordAuthentication no"
    echo "KbdInteractiveAuthentication no"
    echo "PubkeyAuthentication yes"
    echo "PermitRootLogin no"
    echo "AuthorizedKeysFile /etc/ssh/authorized_keys/%u"
    echo "UseDNS no"
    echo "PrintMotd no"
    echo "PrintLastLog no"
    echo "Subsystem sftp internal-sftp"
    if sshd_at_least 9 8; then
      echo "PerSourcePenalties no" # (9.8+) a burst of failed logins must not lock the controller out
    fi
    echo "# logins only from this machine and the fleet's own network"
    echo "Match Address *,!127.0.0.0/8,!$NET.0/24"
    echo "    DenyUsers *"
  } >"$dir/ssh/sshd_config"

  # the shop: release 41 is live; a DeploymentPlan rolls 42 out
  printf 'shop release 41 on %s\n' "$h" >"$seed/shop/releases/41/index.html"
  printf 'ok\n' >"$seed/shop/releases/41/healthz"
  ln -sfn releases/41 "$seed/shop/current"
  {
    echo '#!/bin/sh'
    echo '# Starts the shop (python3'"'"'s http.server on :8080, serving /srv/shop/current) unless it runs.'
    echo '# Idempotent: a DeploymentPlan stage and e2e/fleet.sh both call it. Written by e2e/fleet.sh.'
    echo "host=$h"
  } >"$seed/shop/bin/start"
  cat >>"$seed/shop/bin/start" <<'EOF'
set -eu
pidfile=/srv/shop/run/http.pid
running() {
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'http.server 8080'
}
if ! running; then
    cd /srv/shop
    # a first line of its own: log files that start alike look like copies of each other to a
    # log agent watching for copytruncate rotation
    printf '%s shop starting on %s\n' "$(date -u +%FT%T.%NZ)" "$host" >>/srv/shop/log/access.log
    setsid nohup python3 -m http.server 8080 --bind 0.0.0.0 --directory /srv/shop/current \
        >>/srv/shop/log/access.log 2>&1 </dev/null &
    echo $! >"$pidfile"
fi
# (not `running` here: until setsid, nohup and python3 have exec'd, the pid shows this script)
pid=$(cat "$pidfile")
i=0
while [ $i -lt 200 ]; do
    curl -fsS --max-time 1 -o /dev/null http://127.0.0.1:8080/healthz 2>/dev/null && exit 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
    i=$((i + 1))
done
echo "the shop does not answer on :8080; see /srv/shop/log/access.log" >&2
exit 1
EOF
  chmod 0755 "$seed/shop/bin/start"
}

# start_sshd HOST: sshd in the host's namespace, with its private mounts (see the header)
start_sshd() {
  local h=$1 dir="$STATE/hosts/$1" ns addr pid deadline
  ns=$(netns_of "$h")
  addr=$(addr_of "$h")
  # `ip netns exec` gives sh a mount namespace of its own (`/` made rslave): the mounts below are
  # seen by this sshd, its sessions and the listener only
  local script='set -e
mkdir -p /var/lib/outrider /srv
mount -t tmpfs -o mode=0755 tmpfs /var/lib/outrider
mount --bind "$1/ssh" /etc/ssh
mount -t tmpfs -o size=64m,mode=0755 tmpfs /srv
cp -a "$1/srv.seed/." /srv/
mount --bind "$2" /srv/shop/log
exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config'
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [[ $fd =~ ^[0-9]+$ ]] && [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    exec setsid ip netns exec "$ns" sh -c "$script" "outrider-demo-$h" "$dir" "$LOGROOT/$h" \
      </dev/null >>"$dir/sshd.log" 2>&1
  ) &
  deadline=$((SECONDS + 20))
  until banner_ok "$addr"; do
    if [ $SECONDS -ge $deadline ] || ! kill -0 $! 2>/dev/null; then
      tail -n 20 "$dir/sshd.log" >&2 || true
      die "sshd of $h does not answer on $addr:22 (log: $dir/sshd.log)"
    fi
    sleep 0.05
  done
  pid=$(sshd_pid "$h") || die "sshd of $h answers but is not found in $ns"
  echo "$pid" >"$dir/sshd.pid"
}

# host_up HOST: namespace, veth on the bridge, address, sshd, listener; what runs already is kept
host_up() {
  local h=$1 ns veth addr pid
  ns=$(netns_of "$h")
  veth=$(veth_of "$h")
  addr=$(addr_of "$h")
  host_files "$h"
  if ! has_netns "$ns"; then
    ip netns add "$ns"
  fi
  if [ ! -d "/sys/class/net/$veth" ]; then
    # a leftover eth0 in the namespace (its peer gone) goes first
    ip -n "$ns" link del eth0 2>/dev/null || true
    ip link add "$veth" type veth peer name eth0 netns "$ns"
  fi
  ip link set "$veth" master "$BRIDGE"
  ip link set "$veth" up
  ip -n "$ns" addr replace "$addr/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  if pid=$(sshd_pid "$h") && banner_ok "$addr"; then
    echo "$pid" >"$STATE/hosts/$h/sshd.pid"
  else
    # a half-dead host (sshd gone, or not answering): everything in it goes, then a fresh start
    kill_netns "$ns"
    start_sshd "$h"
    pid=$(cat "$STATE/hosts/$h/sshd.pid")
  fi
  # the listener, in the sshd's namespaces (net + mounts): as a plan stage would start it
  # (fd 9, the lock, is not for the listener to keep)
  nsenter -t "$pid" -n -m -- /srv/shop/bin/start </dev/null >>"$STATE/hosts/$h/start.log" 2>&1 9>&- \
    || die "the shop on $h did not start: $(tail -n 5 "$STATE/hosts/$h/start.log")"
  listener_ok "$addr" || die "the shop on $h does not answer on $addr:8080"
}

outputs() {
  local h kind known=""
  for h in "${HOSTS[@]}"; do
    for kind in ed25519 ecdsa; do
      known+="$(addr_of "$h") $(cut -d' ' -f1-2 "$STATE/hosts/$h/ssh/ssh_host_${kind}_key.pub")"$'\n'
    done
  done
  printf '%s' "$known" >"$STATE/known_hosts"
  mkdir -p "$STATE/secret"
  chmod 0700 "$STATE/secret"
  install -m 0600 "$STATE/id_ed25519" "$STATE/secret/ssh-privatekey"
  install -m 0644 "$STATE/known_hosts" "$STATE/secret/known_hosts"
  {
    echo "# The demo fleet's SSH credentials (written by e2e/fleet.sh up): the user key every host"
    echo "# accepts and the hosts' real host keys. Apply into the Inventory's namespace."
    echo "apiVersion: v1"
    echo "kind: Secret"
    echo "metadata:"
    echo "  name: fleet-ssh"
    echo "  labels: {app.kubernetes.io/part-of: outrider-demo}"
    echo "type: Opaque"
    echo "stringData:"
    echo "  ssh-privatekey: |"
    sed 's/^/    /' "$STATE/id_ed25519"
    echo "  known_hosts: |"
    sed 's/^/    /' "$STATE/known_hosts"
  } >"$STATE/ssh-secret.yaml"
  chmod 0600 "$STATE/ssh-secret.yaml"
}

up() {
  preflight
  mkdir -p "$STATE" "$LOGROOT"
  fence_and_bridge
  user_key
  local h
  for h in "${HOSTS[@]}"; do host_up "$h"; done
  outputs
  log "up: ${HOSTS[*]} at $NET.{11,12,13} (bridge $BRIDGE $GATEWAY/24); Secret manifest $STATE/ssh-secret.yaml"
}

# ---------------------------------------------------------------- down

down() {
  preflight
  local h ns
  for h in "${HOSTS[@]}"; do
    ns=$(netns_of "$h")
    if has_netns "$ns"; then
      kill_netns "$ns"
      ip -n "$ns" link del eth0 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    fi
    ip link del "$(veth_of "$h")" 2>/dev/null || true
  done
  if [ -d "/sys/class/net/$BRIDGE" ]; then
    local alias
    alias=$(cat "/sys/class/net/$BRIDGE/ifalias" 2>/dev/null || true)
    if [ "$alias" = "$ALIAS" ]; then
      ip link del "$BRIDGE"
    else
      log "bridge $BRIDGE belongs to '${alias:-something else}': left alone"
    fi
  fi
  rm -rf -- "$LOGROOT"
  if [ "${KEEP_STATE:-0}" = 1 ]; then
    log "down (state kept in $STATE)"
  else
    rm -rf -- "$STATE"
    log "down"
  fi
}

# ---------------------------------------------------------------- status

status() {
  local h ok=0 pid sshd listener
  for h in "${HOSTS[@]}"; do
    sshd=down listener=down
    if pid=$(sshd_pid "$h" 2>/dev/null) && banner_ok "$(addr_of "$h")"; then sshd="up (pid $pid)"; fi
    if listener_ok "$(addr_of "$h")"; then listener=up; fi
    [ "$sshd" != down ] && [ "$listener" = up ] || ok=1
    printf '%-6s %-14s netns %-16s sshd %-16s shop :8080 %s\n' "$h" "$(addr_of "$h")" "$(netns_of "$h")" "$sshd" "$listener"
  done
  return $ok
}

cmd=${1:-}
case $cmd in
  up | down)
    # one up/down at a time on this machine (each takes a second or two): one lock file for all slots
    exec 9>/tmp/outrider-fleet.lock
    flock 9
    "$cmd"
    ;;
  status) status ;;
  exec)
    shift
    [ $# -ge 2 ] || { echo "usage: $0 exec HOST COMMAND..." >&2; exit 2; }
    [ -n "${OCTET[$1]:-}" ] || die "no host $1 (hosts: ${HOSTS[*]})"
    pid=$(sshd_pid "$1") || die "$1 is not running: e2e/fleet.sh up"
    shift
    exec nsenter -t "$pid" -n -m -- "$@"
    ;;
  *) echo "usage: $0 up|down|status|exec HOST COMMAND..." >&2; exit 2 ;;
esac
