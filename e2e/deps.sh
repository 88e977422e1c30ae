#!/usr/bin/env bash
# Installs the Debian packages the tests and demo need, only when something is missing.
set -euo pipefail
# command -> package
declare -A need=(
  [openssl]=openssl
  [ip]=iproute2
  [curl]=curl
  [setsid]=util-linux
  [python3]=python3
  [jq]=jq
  [/usr/sbin/sshd]=openssh-server
  [ssh]=openssh-client
  [ssh-keygen]=openssh-client
  [sudo]=sudo
  [nft]=nftables
  [iptables-restore]=iptables
  [ip6tables-restore]=iptables
  [nsenter]=util-linux
  [unshare]=util-linux         # e2e/tests/image.rs: the image run as a container
  [capsh]=libcap2-bin          # e2e/tests/image.rs: chroot + uid 65532 + no capabilities
  [readelf]=binutils           # make dist: the static check
  [redis-server]=redis-server  # e2e/argocd.sh: Argo CD's cache
)
missing=()
for cmd in "${!need[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    case " ${missing[*]} " in *" ${need[$cmd]} "*) ;; *) missing+=("${need[$cmd]}") ;; esac
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${missing[*]} — install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "[deps] installing ${missing[*]}" >&2
  # The tests start their own sshd on a free port: the package must not start the system one.
  # policy-rc.d exit 101 tells invoke-rc.d "don't start services"; add one only for this install.
  policy_added=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    policy_added=1
  fi
  if [ -n "$policy_added" ]; then trap 'rm -f /usr/sbin/policy-rc.d' EXIT; fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  if [ -n "$policy_added" ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

# --- SSH test hosts (tests/support/sshd.rs): local users and no system sshd -----------------
if [ "$(id -u)" = 0 ]; then
  # No system sshd: the package enables (and, where it can, starts) the ssh service. Disable it
  # for systemd and sysvinit alike, stop it if it runs.
  if command -v systemctl >/dev/null 2>&1; then
    for unit in ssh.service ssh.socket; do
      if systemctl is-enabled --quiet "$unit" 2>/dev/null; then
        echo "[deps] disabling $unit (the tests run their own sshd)" >&2
        systemctl disable "$unit" >/dev/null 2>&1 || true
      fi
      if [ -d /run/systemd/system ] && systemctl is-active --quiet "$unit" 2>/dev/null; then
        echo "[deps] stopping $unit" >&2
        systemctl stop "$unit" >/dev/null 2>&1 || true
      fi
    done
  fi
  if [ -x /etc/init.d/ssh ]; then
    if command -v update-rc.d >/dev/null 2>&1 && ls /etc/rc[2345].d/S*ssh >/dev/null 2>&1; then
      echo "[deps] disabling the ssh init script" >&2
      update-rc.d ssh disable >/dev/null 2>&1 || true
    fi
    if command -v service >/dev/null 2>&1 && service ssh status >/dev/null 2>&1; then
      echo "[deps] stopping the ssh service" >&2
      service ssh stop >/dev/null 2>&1 || true
    fi
  fi
  if [ -s /run/sshd.pid ]; then
    pid=$(cat /run/sshd.pid)
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q sshd; then
      echo "[deps] killing the system sshd (pid $pid)" >&2
      kill "$pid" 2>/dev/null || true
    fi
    rm -f /run/sshd.pid
  fi
  # Any other sshd on port 22 (started without the pid file) goes too.
  if command -v ss >/dev/null 2>&1; then
    for pid in $(ss -Hltnp 'sport = :22' 2>/dev/null | grep -o '"sshd",pid=[0-9]*' | cut -d= -f2 | sort -u); do
      echo "[deps] killing the sshd listening on port 22 (pid $pid)" >&2
      kill "$pid" 2>/dev/null || true
    done
  fi
  # sshd refuses to start without its privilege separation directory.
  install -d -m 0755 /run/sshd
  # Two login users for the SSH tests: one with passwordless sudo, one without any sudo rights.
  # Locked passwords ('*'): public key login works, password login can't.
  for user in outrider-sudo outrider-nosudo; do
    if ! id -u "$user" >/dev/null 2>&1; then
      echo "[deps] creating test user $user" >&2
      useradd --create-home --shell /bin/sh "$user"
    fi
    if [ "$(getent shadow "$user" | cut -d: -f2)" != '*' ]; then
      usermod -p '*' "$user"
    fi
  done
  sudoers=/etc/sudoers.d/outrider-test
  want='outrider-sudo ALL=(ALL:ALL) NOPASSWD: ALL'
  if [ ! -f "$sudoers" ] || [ "$(cat "$sudoers")" != "$want" ] || [ "$(stat -c %a "$sudoers")" != 440 ]; then
    echo "[deps] writing $sudoers" >&2
    tmp=$(mktemp)
    printf '%s\n' "$want" >"$tmp"
    chmod 0440 "$tmp"
    visudo -cf "$tmp" >/dev/null
    mv "$tmp" "$sudoers"
  fi
  visudo -cf "$sudoers" >/dev/null
elif ! id -u outrider-sudo >/dev/null 2>&1 || ! id -u outrider-nosudo >/dev/null 2>&1; then
  echo "[deps] warning: SSH test users outrider-sudo/outrider-nosudo are missing; the SSH tests need them (and root): run e2e/deps.sh as root" >&2
fi
command -v go >/dev/null || { echo "Go (1.24+) is required to build the test control plane: apt-get install golang-go or see go.dev/dl" >&2; exit 1; }
command -v cargo >/dev/null || { echo "Rust (cargo) is required: see rustup.rs" >&2; exit 1; }
