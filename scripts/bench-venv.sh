#!/usr/bin/env bash
# The benchmark virtualenv (<repo>/.cache/st-venv), kept apart from the test
# venv (.cache/venv, scripts/python-venv.sh) so that `make test` never
# installs it. Idempotent.
#
#   scripts/bench-venv.sh              matplotlib, for the plot of scripts/bench-report.py
#   scripts/bench-venv.sh --reference  also torch and sentence-transformers: the
#                                      PyTorch reference of the embedding bench
#                                      (~6 GB: the PyPI Linux torch wheel brings
#                                      its CUDA libraries even for CPU use)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.cache/st-venv"
packages="matplotlib==3.11.2"
imports="import matplotlib"
if [ "${1:-}" = --reference ]; then
  packages="$packages torch==2.15.0 sentence-transformers==6.3.0"
  imports="$imports, torch, sentence_transformers"
fi
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$imports" >/dev/null 2>&1; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
echo ">> installing $packages into $venv"
# shellcheck disable=SC2086 # one word per package
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: $packages
