#!/usr/bin/env bash
# Lints, renders and validates the Helm chart (helm/datastorage) and checks the
# Dockerfile; `make chart-check` runs it and `make test` too. Fails on any
# error. What is checked, and how: scripts/chart-check/check.py.
#
# Tools, each pinned and installed idempotently under <repo>/.cache:
#   Helm v4.1.4            scripts/install-helm.sh (sha256-checked)
#   kubernetes-validate,   the Python venv (scripts/python-venv.sh)
#   jsonschema, dockerfile
#   @prometheus-io/lezer-promql  .cache/tools/promql, `npm ci` from
#                          scripts/chart-check/package-lock.json (integrity-checked)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${DATASTORAGE_CACHE:-$root/.cache}"
export DATASTORAGE_VENV="${DATASTORAGE_VENV:-$cache/venv}"

"$root/scripts/install-helm.sh"
"$root/scripts/python-venv.sh"

node_tools="$cache/tools/promql"
if ! cmp -s "$root/scripts/chart-check/package-lock.json" "$node_tools/package-lock.json" \
   || [ ! -d "$node_tools/node_modules/@prometheus-io/lezer-promql" ]; then
  command -v npm >/dev/null 2>&1 || { echo "chart-check.sh: npm is needed (scripts/install-helm.sh installs it)" >&2; exit 1; }
  echo ">> installing the PromQL parser into $node_tools"
  rm -rf "$node_tools"
  mkdir -p "$node_tools"
  cp "$root/scripts/chart-check/package.json" "$root/scripts/chart-check/package-lock.json" "$node_tools/"
  (cd "$node_tools" && npm ci --silent --ignore-scripts --no-audit --no-fund)
fi

# DATASTORAGE_SERVER_BIN: a datastorage binary built from this tree (`make test`
# passes the one cargo test built); each case's configuration is then loaded by
# the server's own loader too.
exec "$DATASTORAGE_VENV/bin/python" "$root/scripts/chart-check/check.py" \
  --helm "$cache/tools/helm" --node-tools "$node_tools" \
  ${DATASTORAGE_SERVER_BIN:+--server-bin "$DATASTORAGE_SERVER_BIN"}
