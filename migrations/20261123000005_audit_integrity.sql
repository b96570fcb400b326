-- Audit integrity: per-correlation hash chains, immutability enforced by the
-- database, legal holds, retention runs and the tombstones they leave.
-- docs/audit-integrity.md defines the chain for auditors.

-- Each event's link in its correlation id's chain, set by the write
-- transaction. NULL only in rows loaded around the service (the benchmarks'
-- bulk loads); verification reports such events as unverifiable.
ALTER TABLE audit_events
    ADD COLUMN chain_seq            bigint,
    -- NULL for the first event of a chain (hashed as 32 zero bytes).
    ADD COLUMN previous_event_hash  bytea,
    ADD COLUMN event_hash           bytea,
    -- 'sha256' or 'hmac-sha256'; the key id names the HMAC key.
    ADD COLUMN hash_algorithm       text,
    ADD COLUMN hash_key_id          text;

-- The head of every chain. Appending locks the row, so the appends of one
-- correlation id are serialised and a chain never forks; `length` also tells
-- verification whether events are missing at the end.
CREATE TABLE audit_chains (
    correlation_id  text PRIMARY KEY,
    length          bigint NOT NULL CHECK (length >= 0),
    head_hash       bytea
);

CREATE TABLE legal_holds (
    id              uuid PRIMARY KEY,
    correlation_id  text NOT NULL,
    reason          text NOT NULL CHECK (length(reason) > 0),
    placed_by       text NOT NULL,
    placed_at       timestamptz NOT NULL DEFAULT now(),
    released_at     timestamptz,
    released_by     text,
    release_reason  text,
    CHECK ((released_at IS NULL) = (released_by IS NULL) AND (released_at IS NULL) = (release_reason IS NULL))
);
-- At most one hold in force per correlation id; released ones stay as history.
CREATE UNIQUE INDEX legal_holds_in_force ON legal_holds (correlation_id) WHERE released_at IS NULL;
CREATE INDEX legal_holds_listing ON legal_holds (placed_at DESC, id DESC);

-- Every retention purge: what it was asked, what the policies allowed, and
-- what it removed or had to keep.
CREATE TABLE purge_runs (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id               text NOT NULL,
    requested_by         text NOT NULL,
    older_than           timestamptz NOT NULL,
    policies             jsonb NOT NULL,
    started_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz,
    events_purged        bigint NOT NULL DEFAULT 0,
    partitions_dropped   bigint NOT NULL DEFAULT 0,
    events_held          bigint,
    events_kept_by_policy bigint
);

-- A purged event's place in its chain, so that verification can still check
-- the link of the event after it and tell a purge from a deletion.
CREATE TABLE audit_tombstones (
    event_id        uuid PRIMARY KEY,
    correlation_id  text NOT NULL,
    chain_seq       bigint,
    event_hash      bytea,
    occurred_at     timestamptz NOT NULL,
    purge_run_id    bigint NOT NULL REFERENCES purge_runs (id),
    purged_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_tombstones_chain ON audit_tombstones (correlation_id, chain_seq);

CREATE FUNCTION audit_event_is_held(correlation text) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT EXISTS (SELECT 1 FROM legal_holds WHERE correlation_id = correlation AND released_at IS NULL)
$$;

-- Only the embedding state may change (the backfill completes deferred
-- embeddings); every other column is the evidence. (search_tsv is generated
-- from search_text, and a BEFORE trigger does not see its new value.)
CREATE FUNCTION audit_events_refuse_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (to_jsonb(NEW) - 'embedding_state' - 'search_tsv') IS DISTINCT FROM (to_jsonb(OLD) - 'embedding_state' - 'search_tsv') THEN
        RAISE EXCEPTION 'audit events are immutable'
            USING ERRCODE = 'insufficient_privilege', DETAIL = 'event ' || OLD.id || ' cannot be changed';
    END IF;
    RETURN NEW;
END;
$$;

-- Deletes come only from a retention purge, which names its run in the
-- transaction (SET LOCAL datastorage.purge_run), and never touch held events.
-- Each deleted event leaves a tombstone.
CREATE FUNCTION audit_events_guard_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    run bigint := nullif(current_setting('datastorage.purge_run', true), '')::bigint;
BEGIN
    IF run IS NULL THEN
        RAISE EXCEPTION 'audit events are immutable; only a retention purge deletes them'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF audit_event_is_held(OLD.correlation_id) THEN
        RAISE EXCEPTION 'event % is under legal hold', OLD.id USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO audit_tombstones (event_id, correlation_id, chain_seq, event_hash, occurred_at, purge_run_id)
    VALUES (OLD.id, OLD.correlation_id, OLD.chain_seq, OLD.event_hash, OLD.occurred_at, run);
    RETURN OLD;
END;
$$;

CREATE FUNCTION audit_events_refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are immutable; only a retention purge deletes them'
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

-- Row triggers on the partitioned table are cloned onto every partition,
-- present and future, so each month is guarded from the moment it exists.
CREATE TRIGGER audit_events_immutable BEFORE UPDATE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_update();
CREATE TRIGGER audit_events_guarded_delete BEFORE DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_guard_delete();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_refuse_truncate();

-- A month can be dropped whole only when it holds no held event; the purge
-- deletes the rest of such a month row by row. Holds placed meanwhile wait
-- for this transaction (SHARE conflicts with their INSERT), so a hold cannot
-- slip in between the check and the drop. Returns the events dropped, or
-- NULL when the month holds held events and was left alone.
DROP FUNCTION drop_audit_month(timestamptz);
CREATE FUNCTION drop_audit_month(month_start timestamptz, purge_run bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    first_day  timestamptz := date_trunc('month', month_start);
    next_month timestamptz := date_trunc('month', month_start) + interval '1 month';
    suffix     text := to_char(date_trunc('month', month_start), 'YYYY_MM');
    events     bigint;
BEGIN
    IF to_regclass('audit_events_' || suffix) IS NULL THEN
        RETURN 0;
    END IF;
    LOCK TABLE legal_holds IN SHARE MODE;
    IF EXISTS (SELECT 1 FROM audit_events e
               WHERE e.occurred_at >= first_day AND e.occurred_at < next_month
                 AND audit_event_is_held(e.correlation_id)) THEN
        RETURN NULL;
    END IF;
    -- Dropping a partition fires no delete trigger: take its executions out
    -- of the action rollup and leave its tombstones here.
    UPDATE action_duration_rollup r
    SET executions = r.executions - d.executions,
        duration_ms_sum = r.duration_ms_sum - d.duration_ms_sum
    FROM (
        SELECT coalesce(action_type, '') AS action_type, coalesce(execution_status, 0) AS execution_status,
               action_duration_bucket(duration_ms) AS duration_bucket,
               count(*) AS executions, coalesce(sum(duration_ms), 0) AS duration_ms_sum
        FROM audit_events
        WHERE occurred_at >= first_day AND occurred_at < next_month AND kind = 4
        GROUP BY 1, 2, 3
    ) d
    WHERE r.action_type = d.action_type
      AND r.execution_status = d.execution_status
      AND r.duration_bucket IS NOT DISTINCT FROM d.duration_bucket;
    INSERT INTO audit_tombstones (event_id, correlation_id, chain_seq, event_hash, occurred_at, purge_run_id)
    SELECT id, correlation_id, chain_seq, event_hash, occurred_at, purge_run
    FROM audit_events WHERE occurred_at >= first_day AND occurred_at < next_month;
    GET DIAGNOSTICS events = ROW_COUNT;
    DELETE FROM pending_embeddings WHERE occurred_at >= first_day AND occurred_at < next_month;
    EXECUTE format('DROP TABLE IF EXISTS %I', 'audit_embeddings_' || suffix);
    EXECUTE format('DROP TABLE IF EXISTS %I', 'audit_events_' || suffix);
    RETURN events;
END;
$$;
