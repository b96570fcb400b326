-- The audit trail, its incident projection and its embeddings.
--
-- Audit events and embeddings are range-partitioned by month on occurred_at:
-- retention drops whole partitions, so old data never leaves through row
-- deletes and HNSW vacuum (pgvector 0.8.0, which Debian trixie ships, has an
-- HNSW-vacuum corruption bug fixed in later 0.8.x releases).
CREATE EXTENSION IF NOT EXISTS vector;

-- Models whose embeddings are stored. Each gets a partial HNSW index on its
-- own rows with its own dimension, so models of different sizes coexist in one table.
CREATE TABLE embedding_models (
    id          smallint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 255),
    dimensions  integer NOT NULL CHECK (dimensions BETWEEN 1 AND 2000),
    provider    text NOT NULL,
    -- The model searches use by default; exactly one once any is registered.
    active      boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX embedding_models_one_active ON embedding_models (active) WHERE active;

CREATE TABLE audit_events (
    id                      uuid NOT NULL,
    occurred_at             timestamptz NOT NULL,
    incident_id             uuid NOT NULL,
    correlation_id          text NOT NULL,
    remediation_request_id  text NOT NULL,
    namespace               text NOT NULL,
    cluster                 text,
    kind                    smallint NOT NULL CHECK (kind BETWEEN 1 AND 5),
    labels                  jsonb NOT NULL DEFAULT '{}',
    parent_event_id         uuid,
    -- The validated event's payload (one of the five kinds), as written.
    payload                 jsonb NOT NULL,
    -- What was embedded, and what full-text search ranks.
    search_text             text,
    search_tsv              tsvector GENERATED ALWAYS AS (to_tsvector('english', coalesce(search_text, ''))) STORED,
    received_at             timestamptz NOT NULL DEFAULT now(),
    source                  text NOT NULL,
    trace_id                text,
    embedding_state         smallint NOT NULL,
    -- Execution events only: typed copies of payload fields that action
    -- statistics aggregate, so SQL never parses JSON per row.
    action_type             text,
    execution_status        smallint,
    duration_ms             double precision,
    PRIMARY KEY (id, occurred_at)
) PARTITION BY RANGE (occurred_at);

CREATE INDEX audit_events_incident ON audit_events (incident_id, occurred_at);
CREATE INDEX audit_events_correlation ON audit_events (correlation_id, occurred_at);
CREATE INDEX audit_events_remediation_request ON audit_events (remediation_request_id, occurred_at);
CREATE INDEX audit_events_search_tsv ON audit_events USING gin (search_tsv);

CREATE TABLE audit_embeddings (
    event_id     uuid NOT NULL,
    occurred_at  timestamptz NOT NULL,
    model_id     smallint NOT NULL REFERENCES embedding_models (id),
    -- No fixed dimension here: each model's index casts to its own.
    embedding    vector NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, model_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

-- Events whose embedding could not be generated at write time (policy "defer").
-- The backfill job's to-do list: a row here is removed in the same transaction
-- that stores the embedding.
CREATE TABLE pending_embeddings (
    event_id     uuid NOT NULL,
    occurred_at  timestamptz NOT NULL,
    model_id     smallint NOT NULL REFERENCES embedding_models (id),
    reason       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, model_id)
);

-- Which event set a fact of the incident projection, and when it happened.
-- Composite values compare field by field, so "newer" is (occurred_at, then
-- event id): ties between events with the same occurred_at are settled the
-- same way whatever order they arrive in.
CREATE TYPE fact_stamp AS (occurred_at timestamptz, event_id uuid);

-- A label's stamp as text that sorts like the stamp (UTC, fixed width).
CREATE FUNCTION fact_stamp_key(stamp fact_stamp) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char((stamp).occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '/' || (stamp).event_id::text
$$;

-- An event's labels as label facts: {"key": {"v": value, "at": stamp key}}.
CREATE FUNCTION incident_label_facts(labels jsonb, stamp fact_stamp) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(key, jsonb_build_object('v', value, 'at', fact_stamp_key(stamp))), '{}')
    FROM jsonb_each(labels)
$$;

-- Merges two sets of label facts keeping, per key, the newer one. Commutative
-- and associative, so the merged labels do not depend on arrival order.
CREATE FUNCTION merge_incident_label_facts(current jsonb, incoming jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(key, fact), '{}')
    FROM (SELECT DISTINCT ON (key) key, fact
          FROM (SELECT key, value AS fact FROM jsonb_each(current)
                UNION ALL
                SELECT key, value FROM jsonb_each(incoming)) AS candidates
          ORDER BY key, fact->>'at' DESC) AS newest
$$;

-- The plain {"key": "value"} labels of a set of label facts.
CREATE FUNCTION incident_label_values(facts jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(key, value->'v'), '{}') FROM jsonb_each(facts)
$$;

-- The projection of all events sharing a remediation_request_id. Each group
-- of fields remembers the stamp of the event that set it, and is replaced
-- only by a newer one, so the projection does not depend on arrival order.
CREATE TABLE incidents (
    id                      uuid PRIMARY KEY,
    remediation_request_id  text NOT NULL UNIQUE,
    -- From the earliest event.
    correlation_id          text NOT NULL,
    namespace               text NOT NULL,
    first_stamp             fact_stamp NOT NULL,
    -- From the earliest event that names a cluster.
    cluster                 text,
    cluster_stamp           fact_stamp,
    -- Per key, the value of the newest event that set it: {"key": {"v": value, "at": stamp}}.
    label_facts             jsonb NOT NULL DEFAULT '{}',
    labels                  jsonb NOT NULL GENERATED ALWAYS AS (incident_label_values(label_facts)) STORED,
    first_seen_at           timestamptz NOT NULL,
    last_event_at           timestamptz NOT NULL,
    event_count             bigint NOT NULL,
    -- From the latest remediation event.
    alert_name              text,
    severity                smallint,
    signal_type             text,
    target_kind             text,
    target_name             text,
    target_namespace        text,
    phase                   smallint,
    resolved_at             timestamptz,
    remediation_stamp       fact_stamp,
    -- From the latest AI analysis.
    root_cause              text,
    analysis_stamp          fact_stamp,
    -- From the latest execution.
    action_type             text,
    execution_status        smallint,
    execution_stamp         fact_stamp,
    -- The transactions that created the row and last changed it, so that a
    -- listing can tell which changes its snapshot saw (set by a trigger).
    created_xact            xid8 NOT NULL,
    updated_xact            xid8 NOT NULL
);

-- Idempotency keys are scoped to the caller that used them.
CREATE TABLE idempotency_keys (
    source           text NOT NULL,
    request_id       text NOT NULL,
    request_hash     bytea NOT NULL,
    event_id         uuid NOT NULL,
    incident_id      uuid NOT NULL,
    embedding_state  smallint NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, request_id)
);

-- Creates the month's partitions of audit_events and audit_embeddings if they
-- do not exist. Called before a write transaction opens (DDL inside it would
-- hold locks on the parent until commit and serialise every writer).
CREATE FUNCTION ensure_audit_partitions(at timestamptz) RETURNS void
LANGUAGE plpgsql SET timezone = 'UTC' AS $$
DECLARE
    month_start timestamptz := date_trunc('month', at);
    month_end   timestamptz := date_trunc('month', at) + interval '1 month';
    suffix      text := to_char(date_trunc('month', at), 'YYYY_MM');
BEGIN
    IF to_regclass('audit_events_' || suffix) IS NOT NULL
       AND to_regclass('audit_embeddings_' || suffix) IS NOT NULL THEN
        RETURN;
    END IF;
    -- Two writers creating the same month must not race.
    PERFORM pg_advisory_xact_lock(hashtext('datastorage.ensure_audit_partitions'));
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF audit_events FOR VALUES FROM (%L) TO (%L)',
                   'audit_events_' || suffix, month_start, month_end);
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF audit_embeddings FOR VALUES FROM (%L) TO (%L)',
                   'audit_embeddings_' || suffix, month_start, month_end);
END;
$$;

-- Registers a model (idempotent) and gives it a partial HNSW cosine index on
-- its own rows, cast to its dimension. Returns the model's id.
CREATE FUNCTION register_embedding_model(model_name text, model_dimensions integer, model_provider text)
RETURNS smallint LANGUAGE plpgsql AS $$
DECLARE
    model_id smallint;
    existing integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('datastorage.register_embedding_model'));
    SELECT id, dimensions INTO model_id, existing FROM embedding_models WHERE name = model_name;
    IF model_id IS NULL THEN
        INSERT INTO embedding_models (name, dimensions, provider, active)
        VALUES (model_name, model_dimensions, model_provider,
                NOT EXISTS (SELECT 1 FROM embedding_models WHERE active))
        RETURNING id INTO model_id;
    ELSIF existing <> model_dimensions THEN
        RAISE EXCEPTION 'embedding model % is registered with % dimensions, not %',
            model_name, existing, model_dimensions USING ERRCODE = 'data_exception';
    END IF;
    EXECUTE format(
        'CREATE INDEX IF NOT EXISTS %I ON audit_embeddings USING hnsw ((embedding::vector(%s)) vector_cosine_ops) WHERE model_id = %s',
        'audit_embeddings_hnsw_model_' || model_id, model_dimensions, model_id);
    RETURN model_id;
END;
$$;

-- Whether a fact stamped `candidate` replaces one stamped `current` in the
-- incident projection: the newest stamp wins, whatever the arrival order.
CREATE FUNCTION incident_fact_is_newer(candidate fact_stamp, current fact_stamp) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT candidate IS NOT NULL AND (current IS NULL OR candidate > current)
$$;
