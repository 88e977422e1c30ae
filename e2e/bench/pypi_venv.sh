#!/usr/bin/env bash
# Installs one pinned PyPI package, a peer of a benchmark, into its own venv under the tool cache
# and prints the python to run it with. Idempotent: does nothing when the venv already has the
# pinned version and the module imports. Only stdout is the path.
#
#   e2e/bench/pypi_venv.sh PACKAGE VERSION MODULE     (MODULE: what must import, e.g. aerleon.api)
#
# PYTHON picks the interpreter the venv is made from (default python3; needs >= 3.10).
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 PACKAGE VERSION MODULE" >&2; exit 2; }
package=$1 version=$2 module=$3
venv="${OUTRIDER_CACHE:-$HOME/.cache/outrider}/$package-venv"
py="$venv/bin/python"
python="${PYTHON:-python3}"

installed() {
  [ -x "$py" ] && "$py" - "$package" "$version" "$module" <<'PYEOF' >/dev/null 2>&1
import importlib
import sys
from importlib.metadata import version
importlib.import_module(sys.argv[3])  # the package imports, not only its metadata
sys.exit(version(sys.argv[1]) != sys.argv[2])
PYEOF
}

if ! installed; then
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "pypi_venv: $python is missing or older than 3.10 (set PYTHON=...)" >&2
    exit 1
  fi
  if [ ! -x "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
    echo "[$package] creating venv $venv" >&2
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    if ! "$python" -m venv "$venv" >&2; then
      rm -rf "$venv"
      echo "pypi_venv: '$python -m venv' failed; run e2e/bench/deps.sh (installs python3-venv)" >&2
      exit 1
    fi
  fi
  echo "[$package] installing $package==$version" >&2
  "$py" -m pip install --quiet --disable-pip-version-check "$package==$version" >&2
  installed || { echo "pypi_venv: $package $version does not import as $module in $venv" >&2; exit 1; }
fi
echo "$py"
