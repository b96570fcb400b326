#!/usr/bin/env bash
# Python virtualenv in <repo>/.cache/venv for tests/grpcurl_examples.py
# (a reflection-only gRPC client: grpcio + grpcio-reflection + protobuf) and
# for scripts/chart-check (kubernetes-validate: Kubernetes' JSON schemas, with
# jsonschema and PyYAML; dockerfile: the official BuildKit Dockerfile parser).
# Idempotent: a stamp file records the pinned set; when it matches, nothing runs.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${DATASTORAGE_VENV:-$root/.cache/venv}"
stamp="$venv/.datastorage-requirements"

# Pinned versions (binary wheels only: building grpcio from source takes ages).
requirements="grpcio==1.85.1
grpcio-reflection==1.85.1
protobuf==7.36.2
typing_extensions==4.16.0
kubernetes-validate==1.37.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
referencing==0.37.0
rpds-py==2026.9.1
attrs==26.1.0
importlib_resources==7.1.0
packaging==26.4
PyYAML==6.0.4
dockerfile==3.4.0"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$requirements" ]; then
  exit 0
fi

# Prefer Debian's python3 (install-deps.sh installs python3-venv for it).
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if /usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    python=/usr/bin/python3
  else
    python=python3
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  echo ">> creating $venv"
  "$python" -m venv "$venv"
fi
echo ">> installing $(echo "$requirements" | tr '\n' ' ')into $venv"
req_file="$(mktemp)"
trap 'rm -f "$req_file"' EXIT
echo "$requirements" >"$req_file"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: -r "$req_file"
"$venv/bin/python" -c 'import grpc, grpc_reflection.v1alpha.reflection_pb2, google.protobuf, kubernetes_validate, dockerfile' \
  || { echo "python-venv.sh: venv imports failed" >&2; exit 1; }
echo "$requirements" >"$stamp"
