#!/usr/bin/env bash
# Installs the peers `make bench-ssh` measures against, only when something is missing:
# parallel-ssh (pssh), ansible (ansible-core), GNU time (time), which measures every client, and
# rsyslog, the peer of `make bench-agent`, and Nagios' check_by_ssh (monitoring-plugins-basic),
# the peer of `make bench-health`, and python3-venv, for the venvs e2e/bench/aerleon_install.sh and
# e2e/bench/asyncssh_install.sh make for Aerleon, the peer of the firewall-compiler bench, and
# asyncssh, the Python peer of `make bench-ssh` (the bench installs it from PyPI itself).
set -euo pipefail
# command -> package
declare -A need=(
  [parallel-ssh]=pssh
  [ansible]=ansible-core
  [/usr/bin/time]=time
  [rsyslogd]=rsyslog
  [/usr/lib/nagios/plugins/check_by_ssh]=monitoring-plugins-basic
)
missing=()
for cmd in "${!need[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    case " ${missing[*]} " in *" ${need[$cmd]} "*) ;; *) missing+=("${need[$cmd]}") ;; esac
  fi
done
# `python3 -m venv` needs ensurepip, which Debian ships in python3-venv (not a command of its own).
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${missing[*]} — install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "[bench-deps] installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
