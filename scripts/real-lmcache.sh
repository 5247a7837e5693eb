#!/usr/bin/env bash
# Install the real LMCache controller (0.5.6, CPU) into .real-lmcache/ and print its executable.
# Used by CI so the contract tests run against the real thing as well as the mock.
# Large (torch CPU + lmcache); takes a few minutes on first run, nothing afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.real-lmcache
EXE="$VENV/bin/lmcache_controller"
if [[ ! -x "$EXE" ]]; then
  "${PYTHON:-python3}" -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" >&2  # the CPU build
  "$VENV/bin/python" -m pip install -q "lmcache==0.5.6" >&2
fi
"$EXE" --help >/dev/null 2>&1 || { echo "lmcache_controller does not run" >&2; exit 1; }
realpath "$EXE"
