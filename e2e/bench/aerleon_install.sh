#!/usr/bin/env bash
# Installs Aerleon (the maintained Capirca successor), the peer compiler of the firewall benchmark,
# into its own venv and prints the python to run e2e/bench/aerleon_compile.py with:
#
#   PY=$(e2e/bench/aerleon_install.sh)
#   "$PY" e2e/bench/aerleon_compile.py POLICY.yaml
#
# Idempotent: does nothing when the venv already has the pinned version. Only stdout is the path.
# PYTHON picks the interpreter the venv is made from (default python3; Aerleon needs >= 3.10).
set -euo pipefail
AERLEON_VERSION=1.18.0
venv="${OUTRIDER_CACHE:-$HOME/.cache/outrider}/aerleon-venv"
py="$venv/bin/python"
python="${PYTHON:-python3}"

installed() {
  [ -x "$py" ] && "$py" - "$AERLEON_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import aerleon.api  # noqa: F401  (the package imports, not only its metadata)
sys.exit(version("aerleon") != sys.argv[1])
EOF
}

if ! installed; then
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "aerleon_install: $python is missing or older than 3.10 (set PYTHON=...)" >&2
    exit 1
  fi
  if [ ! -x "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
    echo "[aerleon] creating venv $venv" >&2
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if ! "$python" -m venv "$venv" >&2; then
      rm -rf "$venv"
      echo "aerleon_install: '$python -m venv' failed; run e2e/bench/deps.sh (installs python3-venv)" >&2
      exit 1
    fi
  fi
  echo "[aerleon] installing aerleon==$AERLEON_VERSION" >&2
  "$py" -m pip install --quiet --disable-pip-version-check "aerleon==$AERLEON_VERSION" >&2
  installed || { echo "aerleon_install: aerleon $AERLEON_VERSION does not import in $venv" >&2; exit 1; }
fi
echo "$py"
