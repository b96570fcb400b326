#!/usr/bin/env bash
# A local PostgreSQL 15 (+ pgvector) cluster for development and tests.
#
#   scripts/pg.sh start  [DATADIR] [PORT]   initdb if needed, start, wait, ensure role/db/extension
#   scripts/pg.sh stop   [DATADIR]          fast shutdown (no-op when not running)
#   scripts/pg.sh status [DATADIR]          exit 0 when running, 3 when not
#   scripts/pg.sh replica PRIMARY_PORT DATADIR PORT
#                                          a streaming replica of the cluster on
#                                          PRIMARY_PORT (pg_basebackup -R), started
#                                          on PORT; later `start DATADIR PORT` restarts it
#
# Defaults: DATADIR=<repo>/.cache/pg/data, PORT=55432 (not 5432, so it never
# collides with a system cluster). Integration tests call it with a private
# DATADIR under /tmp and their own port to get a throwaway cluster.
#
# The cluster is a LOCAL DEVELOPMENT cluster: it listens on 127.0.0.1 only and
# uses trust authentication for 127.0.0.1/32, ::1 and its own unix socket.
# Never point it at a non-loopback address.
#
# PostgreSQL refuses to run as root: when invoked as root, the data directory
# is owned by the `postgres` OS user and every server command runs through
# `runuser -u postgres`.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
PGBIN="${PGBIN:-/usr/lib/postgresql/15/bin}"
START_TIMEOUT="${PG_START_TIMEOUT:-60}"

cmd="${1:-}"
datadir="${2:-$root/.cache/pg/data}"
port="${3:-55432}"

usage() {
  echo "usage: $0 start [DATADIR] [PORT] | stop [DATADIR] | status [DATADIR] | replica PRIMARY_PORT DATADIR PORT" >&2
  exit 2
}

if [ "$cmd" = replica ]; then
  [ $# -eq 4 ] || usage
  primary_port="$2"
  datadir="$3"
  port="$4"
fi

[ -x "$PGBIN/pg_ctl" ] || { echo "pg.sh: $PGBIN/pg_ctl not found; run scripts/install-deps.sh (make deps)" >&2; exit 1; }

# Absolute path (the directory may not exist yet).
case "$datadir" in
  /*) ;;
  *) datadir="$PWD/$datadir" ;;
esac
datadir="${datadir%/}"
logfile="$datadir/server.log"
# Server binaries run as postgres, which may not be allowed into the caller's
# working directory (initdb fails there); every path here is absolute.
cd /

if [ "$(id -u)" = 0 ]; then
  pg_user=postgres
  as_pg() { runuser -u postgres -- "$@"; }
else
  pg_user="$(id -un)"
  as_pg() { "$@"; }
fi

is_running() { as_pg "$PGBIN/pg_ctl" -D "$datadir" status >/dev/null 2>&1; }

log_tail() {
  if [ -f "$logfile" ]; then
    echo "---- last lines of $logfile ----" >&2
    tail -n 40 "$logfile" >&2 || true
    echo "--------------------------------" >&2
  fi
}

# Port the running postmaster listens on (line 4 of postmaster.pid).
running_port() { sed -n 4p "$datadir/postmaster.pid" 2>/dev/null; }

# Let the postgres user reach DATADIR: every ancestor gets o+x (traverse only,
# not list). Needed for e.g. a 0700 temp dir created by root.
make_traversable() {
  [ "$(id -u)" = 0 ] || return 0
  local d
  d="$(dirname "$datadir")"
  while [ "$d" != "/" ] && [ -n "$d" ]; do
    if ! runuser -u postgres -- test -x "$d" 2>/dev/null; then
      chmod o+x "$d"
    fi
    d="$(dirname "$d")"
  done
}

init_cluster() {
  mkdir -p "$datadir"
  if [ "$(id -u)" = 0 ]; then
    make_traversable
    chown -R postgres:postgres "$datadir"
  fi
  chmod 700 "$datadir"
  local out
  if ! out="$(as_pg "$PGBIN/initdb" -D "$datadir" -U postgres -E UTF8 --locale=C \
      --auth=trust --no-sync 2>&1)"; then
    echo "pg.sh: initdb failed in $datadir:" >&2
    echo "$out" >&2
    exit 1
  fi
  # Local dev cluster: trust on loopback and on the private unix socket only.
  as_pg tee "$datadir/pg_hba.conf" >/dev/null <<'HBA'
# Local development cluster written by scripts/pg.sh: trust auth, loopback only.
local   all  all                 trust
host    all  all  127.0.0.1/32   trust
host    all  all  ::1/128        trust
host    replication  all  127.0.0.1/32  trust
HBA
  echo "include_if_exists = 'datastorage.conf'" | as_pg tee -a "$datadir/postgresql.conf" >/dev/null
}

# shared_buffers: the model's HNSW graph (about 2 KB per vector) should fit.
# Inserting into a 1.1 GB graph from 256 MB of buffers, where every step
# reads pages back from the OS cache, was 2.7x slower (docs/performance.md).
# Memory is only taken as pages are used.
write_conf() {
  # Unix socket in the cluster dir (never /var/run). Socket paths are limited
  # to ~107 bytes; with a very deep DATADIR, go TCP-only.
  local sockdir="$datadir"
  if [ $(( ${#datadir} + 20 )) -gt 100 ]; then sockdir=""; fi
  as_pg tee "$datadir/datastorage.conf" >/dev/null <<CONF
# Written by scripts/pg.sh on every start; edit the script, not this file.
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sockdir'
max_connections = 400
shared_buffers = ${PG_SHARED_BUFFERS:-2GB}
logging_collector = off
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
CONF
}

psql_admin() {
  local db="$1"; shift
  PGOPTIONS="-c client_min_messages=warning" \
    "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$(running_port)" -U postgres -d "$db" "$@"
}

ensure_objects() {
  # vector in template1 first, so databases created later (datastorage,
  # per-test ds_test_* databases) have it from the start.
  psql_admin template1 -c "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null
  psql_admin postgres >/dev/null <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'datastorage') THEN
    CREATE ROLE datastorage LOGIN SUPERUSER PASSWORD 'datastorage';
  END IF;
END
$$;
SELECT 'CREATE DATABASE datastorage OWNER datastorage'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'datastorage') \gexec
SQL
  psql_admin datastorage -c "CREATE EXTENSION IF NOT EXISTS vector" >/dev/null
}

wait_ready() {
  local p deadline
  deadline=$(( SECONDS + START_TIMEOUT ))
  while :; do
    p="$(running_port)"
    if [ -n "$p" ] && "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$p" -t 2; then
      return 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "pg.sh: PostgreSQL in $datadir not ready after ${START_TIMEOUT}s" >&2
      log_tail
      exit 1
    fi
    sleep 0.2
  done
}

start() {
  if [ ! -f "$datadir/PG_VERSION" ]; then
    if [ -d "$datadir" ] && [ -n "$(ls -A "$datadir" 2>/dev/null)" ]; then
      echo "pg.sh: $datadir exists, is not empty and is not a PostgreSQL cluster" >&2
      exit 1
    fi
    init_cluster
  elif [ "$(id -u)" = 0 ]; then
    make_traversable
  fi

  if is_running; then
    wait_ready
  else
    write_conf
    if ! as_pg "$PGBIN/pg_ctl" -D "$datadir" -l "$logfile" -o "-p $port" \
        -w -t "$START_TIMEOUT" start >/dev/null 2>&1; then
      echo "pg.sh: PostgreSQL failed to start in $datadir on port $port" >&2
      log_tail
      exit 1
    fi
    wait_ready
  fi
  # A standby is read-only: its role, database and extension come from the primary.
  if [ ! -f "$datadir/standby.signal" ] && ! ensure_objects; then
    echo "pg.sh: could not create role/database/extension" >&2
    log_tail
    exit 1
  fi
  echo "postgres: running on 127.0.0.1:$(running_port) (data: $datadir)"
}

replica() {
  if [ -f "$datadir/PG_VERSION" ]; then
    echo "pg.sh: $datadir already holds a cluster; use start to run it" >&2
    exit 1
  fi
  mkdir -p "$datadir"
  if [ "$(id -u)" = 0 ]; then
    make_traversable
    chown postgres:postgres "$datadir"
  fi
  chmod 700 "$datadir"
  # -R writes standby.signal and primary_conninfo; -X stream copies the WAL
  # written meanwhile, so the copy is consistent without archiving.
  local out
  if ! out="$(as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres \
      -D "$datadir" -R -X stream --checkpoint=fast --no-sync 2>&1)"; then
    echo "pg.sh: pg_basebackup from 127.0.0.1:$primary_port failed:" >&2
    echo "$out" >&2
    exit 1
  fi
  start
  echo "postgres: replica of 127.0.0.1:$primary_port streaming (data: $datadir)"
}

stop() {
  if [ ! -f "$datadir/PG_VERSION" ] || ! is_running; then
    echo "postgres: not running (data: $datadir)"
    return 0
  fi
  if ! as_pg "$PGBIN/pg_ctl" -D "$datadir" -m fast -w -t "$START_TIMEOUT" stop >/dev/null 2>&1; then
    echo "pg.sh: PostgreSQL in $datadir did not stop" >&2
    log_tail
    exit 1
  fi
  echo "postgres: stopped (data: $datadir)"
}

status() {
  if [ -f "$datadir/PG_VERSION" ] && is_running; then
    echo "postgres: running on 127.0.0.1:$(running_port) (data: $datadir, user: $pg_user)"
    return 0
  fi
  echo "postgres: not running (data: $datadir)"
  return 3
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  replica) replica ;;
  *) usage ;;
esac
