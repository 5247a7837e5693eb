#!/usr/bin/env bash
# Install the peer routers `kvgate bench routing` compares against, each in its own venv
# under .peers/ (outside the project venv): sglang-router and vllm-router.
# Idempotent: a router whose venv already runs its --help is left alone.
# Prints one line per router: NAME PATH-TO-EXECUTABLE, or NAME SKIPPED: reason.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

install_router() {  # name pip-spec executable
  local name="$1" spec="$2" exe_name="$3" venv=".peers/$1"
  local exe="$venv/bin/$exe_name"
  if [[ ! -x "$exe" ]] || ! "$exe" --help >/dev/null 2>&1; then
    rm -rf "$venv"
    "$PY" -m venv "$venv" >&2 || { echo "$name SKIPPED: venv failed"; return; }
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q "$spec" >&2 || { echo "$name SKIPPED: pip install $spec failed"; return; }
  fi
  if "$exe" --help >/dev/null 2>&1; then
    echo "$name $(realpath "$exe")"
  else
    echo "$name SKIPPED: $exe --help does not run"
  fi
}

install_router sglang-router "sglang-router==0.3.2" sglang-router
install_router vllm-router "vllm-router==0.1.17" vllm-router
