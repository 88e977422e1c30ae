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
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${missing[*]} — install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "[deps] installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
command -v go >/dev/null || { echo "Go (1.24+) is required to build the test control plane: apt-get install golang-go or see go.dev/dl" >&2; exit 1; }
command -v cargo >/dev/null || { echo "Rust (cargo) is required: see rustup.rs" >&2; exit 1; }
