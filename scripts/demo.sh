#!/usr/bin/env bash
# Set up (if needed), then run the whole local stack on a sample workload and summarise routing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvgate demo "$@"
