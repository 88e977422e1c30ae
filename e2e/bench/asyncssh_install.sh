#!/usr/bin/env bash
# Installs asyncssh (PyPI), the Python peer of `make bench-ssh`, into its own venv and prints the
# python to run e2e/bench/asyncssh_fanout.py with:
#
#   PY=$(e2e/bench/asyncssh_install.sh)
#   "$PY" e2e/bench/asyncssh_fanout.py --help
exec "$(dirname "$0")/pypi_venv.sh" asyncssh 2.24.1 asyncssh
