#!/usr/bin/env bash
# Create .venv and install kvgate with every extra CI and the demo need: mlx, testbed, bench, test.
# Idempotent; re-runs when pyproject changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STAMP=.venv/.kvgate-installed
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml && -x .venv/bin/kvgate ]]; then
  exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "kvgate needs Python >= 3.11 (found $("$PYTHON" --version))" >&2
  exit 1
fi
if ! "$PYTHON" -m venv --help >/dev/null 2>&1 || ! "$PYTHON" -c 'import ensurepip' 2>/dev/null; then
  echo "installing python3-venv with apt" >&2
  apt-get update -qq && apt-get install -y -qq python3-venv
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[mlx,testbed,bench,test]"
touch "$STAMP"
