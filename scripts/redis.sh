#!/usr/bin/env bash
# A local Redis for development and tests (job status store).
#
#   scripts/redis.sh start [DIR] [PORT]   daemonize, wait for PING (no-op when already up)
#   scripts/redis.sh stop  [DIR] [PORT]   shut down (no-op when not running)
#   scripts/redis.sh status [DIR] [PORT]  exit 0 when it answers PING
#
# Defaults: DIR=<repo>/.cache/redis, PORT=56379 (not 6379, so it never collides
# with a system Redis). Bound to 127.0.0.1 only, append-only file on; the
# pidfile, log and data files live in DIR.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
START_TIMEOUT="${REDIS_START_TIMEOUT:-30}"

cmd="${1:-}"
dir="${2:-$root/.cache/redis}"
port="${3:-56379}"

case "$dir" in
  /*) ;;
  *) dir="$PWD/$dir" ;;
esac
dir="${dir%/}"
pidfile="$dir/redis.pid"
logfile="$dir/redis.log"

command -v redis-server >/dev/null || { echo "redis.sh: redis-server not found; run scripts/install-deps.sh (make deps)" >&2; exit 1; }

ping() { [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = "PONG" ]; }

pid_alive() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

log_tail() {
  if [ -f "$logfile" ]; then
    echo "---- last lines of $logfile ----" >&2
    tail -n 30 "$logfile" >&2 || true
    echo "--------------------------------" >&2
  fi
}

start() {
  if ping; then
    echo "redis: running on 127.0.0.1:$port"
    return 0
  fi
  mkdir -p "$dir"
  if ! redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --protected-mode yes \
      --dir "$dir" --appendonly yes --pidfile "$pidfile" --logfile "$logfile" \
      --save "" >/dev/null 2>&1; then
    echo "redis.sh: redis-server failed to start" >&2
    log_tail
    exit 1
  fi
  local deadline=$(( SECONDS + START_TIMEOUT ))
  until ping; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "redis.sh: Redis on port $port not answering PING after ${START_TIMEOUT}s" >&2
      log_tail
      exit 1
    fi
    sleep 0.1
  done
  echo "redis: running on 127.0.0.1:$port (dir: $dir)"
}

stop() {
  if ping; then
    redis-cli -h 127.0.0.1 -p "$port" shutdown >/dev/null 2>&1 || true
  elif pid_alive; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
  else
    echo "redis: not running on 127.0.0.1:$port"
    return 0
  fi
  local deadline=$(( SECONDS + START_TIMEOUT ))
  while ping || pid_alive; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "redis.sh: Redis on port $port did not stop" >&2
      log_tail
      exit 1
    fi
    sleep 0.1
  done
  echo "redis: stopped"
}

status() {
  if ping; then
    echo "redis: running on 127.0.0.1:$port"
    return 0
  fi
  echo "redis: not running on 127.0.0.1:$port"
  return 3
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status [DIR] [PORT]" >&2; exit 2 ;;
esac
