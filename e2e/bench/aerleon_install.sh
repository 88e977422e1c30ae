#!/usr/bin/env bash
# Installs Aerleon (the maintained Capirca successor), the peer compiler of the firewall benchmark,
# into its own venv and prints the python to run e2e/bench/aerleon_compile.py with:
#
#   PY=$(e2e/bench/aerleon_install.sh)
#   "$PY" e2e/bench/aerleon_compile.py POLICY.yaml
exec "$(dirname "$0")/pypi_venv.sh" aerleon 1.18.0 aerleon.api
