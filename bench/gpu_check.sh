#!/usr/bin/env bash
# The GPU check from a fresh clone on a GPU machine (see bench/gpu_check.py).
#   bash bench/gpu_check.sh [--wheels DIR] [gpu_check.py options: --out DIR, --dry-run, --only …]
# With network access it builds .venv-gpu from `.[gpu,dev]`; a machine without one installs from a
# folder of wheels (--wheels DIR, e.g. carried with the repository) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=""
if [[ "${1:-}" == "--wheels" ]]; then wheels=$2; shift 2; fi
for a in "$@"; do [[ "$a" == "--dry-run" ]] && exec python3 bench/gpu_check.py "$@"; done
if [[ ! -x .venv-gpu/bin/python ]]; then
    python3 -m venv .venv-gpu
    if [[ -n "$wheels" ]]; then
        .venv-gpu/bin/pip install -q --no-index --find-links "$wheels" -e '.[gpu,dev]'
    else
        .venv-gpu/bin/pip install -q -e '.[gpu,dev]'
    fi
fi
exec .venv-gpu/bin/python bench/gpu_check.py "$@"
