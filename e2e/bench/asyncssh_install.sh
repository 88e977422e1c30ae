#!/usr/bin/env bash
# Installs asyncssh (PyPI), the Python peer of `make bench-ssh`, into its own venv and prints the
# python to run e2e/bench/asyncssh_fanout.py with:
#
#   PY=$(e2e/bench/asyncssh_install.sh)
#   "$PY" e2e/bench/asyncssh_fanout.py --help
#
# Idempotent: does nothing when the venv already has the pinned version. Only stdout is the path.
# PYTHON picks the interpreter the venv is made from (default python3; asyncssh needs >= 3.10).
set -euo pipefail
ASYNCSSH_VERSION=2.24.1
venv="${OUTRIDER_CACHE:-$HOME/.cache/outrider}/asyncssh-venv"
py="$venv/bin/python"
python="${PYTHON:-python3}"

installed() {
  [ -x "$py" ] && "$py" - "$ASYNCSSH_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
import asyncssh  # noqa: F401  (the package imports, not only its metadata)
sys.exit(version("asyncssh") != sys.argv[1])
PYEOF
}

if ! installed; then
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "asyncssh_install: $python is missing or older than 3.10 (set PYTHON=...)" >&2
    exit 1
  fi
  if [ ! -x "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
    echo "[asyncssh] creating venv $venv" >&2
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if ! "$python" -m venv "$venv" >&2; then
      rm -rf "$venv"
      echo "asyncssh_install: '$python -m venv' failed; run e2e/bench/deps.sh (installs python3-venv)" >&2
      exit 1
    fi
  fi
  echo "[asyncssh] installing asyncssh==$ASYNCSSH_VERSION" >&2
  "$py" -m pip install --quiet --disable-pip-version-check "asyncssh==$ASYNCSSH_VERSION" >&2
  installed || { echo "asyncssh_install: asyncssh $ASYNCSSH_VERSION does not import in $venv" >&2; exit 1; }
fi
echo "$py"
