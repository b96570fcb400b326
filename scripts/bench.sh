#!/usr/bin/env bash
# make bench | bench-quick | soak: runs the scenario benches against the local
# PostgreSQL + pgvector and Redis (make dev-up starts them), then writes
# bench/results/<date>[-quick|-soak].md and a latency plot next to it
# (scripts/bench-report.py). Each bench prints its own figures beside the
# baseline it measured in the same run; nothing here asserts a timing.
#
#   scripts/bench.sh full    every scenario at full size (~1 h)
#   scripts/bench.sh quick   the same scenarios, small and short (~2 min once built)
#   scripts/bench.sh soak    30 min: 300 writes/s + 50 searches/s + 50 queries/s,
#                            PostgreSQL restarted at 10 min, Redis at 20 min
#
# Environment: DATASTORAGE_BENCH_DATABASE_URL, DATASTORAGE_BENCH_MODEL_DIR,
# DATASTORAGE_BENCH_PSQL, DATASTORAGE_BENCH_REDIS_URL (the Makefile sets them),
# and every BENCH_* knob of the benches (Makefile comments), which win over
# the sizes chosen here.
set -euo pipefail

mode="${1:-full}"
root="$(cd "$(dirname "$0")/.." && pwd)"
day="$(date -u +%F)"
case "$mode" in
  full) suffix="" ;;
  quick) suffix="-quick" ;;
  soak) suffix="-soak" ;;
  *) echo "usage: $0 full|quick|soak" >&2; exit 2 ;;
esac
run_dir="$root/.cache/bench/run-$mode"
rm -rf "$run_dir"
mkdir -p "$run_dir" "$root/bench/results"
export BENCH_RESULTS_DIR="$run_dir"

# Defaults for this mode; a knob already set in the environment wins.
defaults() {
  local pair name
  for pair in "$@"; do
    name="${pair%%=*}"
    if [ -z "${!name:-}" ]; then
      export "$pair"
    fi
  done
}

case "$mode" in
  full)
    benches="write ingest steady incidents search jobs embedding"
    defaults BENCH_STEADY_SECONDS=300 BENCH_STEADY_WRITES=500 BENCH_STEADY_BUCKET=30 BENCH_BREAKDOWN=1
    ;;
  quick)
    benches="write ingest steady incidents search jobs embedding"
    defaults BENCH_EMBEDDING_TEXTS=128 BENCH_SECONDS=2 BENCH_OVERHEAD_ROUNDS=1 BENCH_INGEST_SECONDS=2 BENCH_INGEST_SUSTAINED_SECONDS=4 \
      BENCH_STEADY_SECONDS=12 BENCH_STEADY_WRITES=500 BENCH_STEADY_BUCKET=4 \
      BENCH_EVENTS=50000 BENCH_INCIDENTS=5000 BENCH_ITERATIONS=30 BENCH_STATS_ITERATIONS=10 \
      BENCH_SEARCH_EVENTS=5000 BENCH_SEARCH_QUERIES=20 BENCH_JOBS_WRITES=100 BENCH_JOBS_EVENTS=100 \
      BENCH_INGEST_HNSW_M=16 BENCH_INGEST_HNSW_EF_CONSTRUCTION=64
    ;;
  soak)
    benches="steady"
    defaults BENCH_STEADY_NAME=soak BENCH_STEADY_SECONDS=1800 BENCH_STEADY_WRITES=300 \
      BENCH_STEADY_SEARCHES=50 BENCH_STEADY_QUERIES=50 BENCH_STEADY_RESTARTS=1 BENCH_STEADY_BUCKET=60
    ;;
esac

# Every bench binary first, in one cargo call: the benches compile in
# parallel, and compiling is not part of the run's time.
build_started=$(date +%s)
targets=()
for bench in $benches; do targets+=(--bench "$bench"); done
if ! cargo bench --quiet --no-run "${targets[@]}" 2>"$run_dir/build.log"; then
  cat "$run_dir/build.log" >&2
  exit 1
fi
echo "== built in $(( $(date +%s) - build_started )) s" >&2

started=$(date +%s)
for bench in $benches; do
  echo "== bench: $bench" >&2
  bench_started=$(date +%s)
  # The write bench's all-on server logs JSON to stdout, as deployed; those
  # lines stay in $bench.stdout, out of the report.
  cargo bench --quiet --bench "$bench" 2>"$run_dir/$bench.log" \
    | tee "$run_dir/$bench.stdout" | { grep --line-buffered -v '^{"' || true; } | tee "$run_dir/$bench.md"
  echo $(( $(date +%s) - bench_started )) >"$run_dir/$bench.seconds"
done
elapsed=$(( $(date +%s) - started ))

python="$root/.cache/st-venv/bin/python"
[ -x "$python" ] || python=python3
"$python" "$root/scripts/bench-report.py" --mode "$mode" --elapsed "$elapsed" --benches "$benches" \
  "$run_dir" "$root/bench/results/$day$suffix"
