#!/usr/bin/env bash
# The benchmark virtualenv (<repo>/.cache/st-venv): matplotlib for the plot
# of scripts/bench-report.py. Kept apart from .cache/venv (the test venv,
# scripts/python-venv.sh) so that `make test` never installs it. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.cache/st-venv"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import matplotlib' >/dev/null 2>&1; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: matplotlib==3.11.2
