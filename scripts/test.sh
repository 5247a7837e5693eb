#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy kvkernel kvtok kvproto filters gateway mlxd testbed kvbench kvreport
.venv/bin/python -m pytest -q "$@"
