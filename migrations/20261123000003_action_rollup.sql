-- Action statistics over all data without reading every execution event.
--
-- Execution events are counted per (action type, status, duration bucket),
-- maintained by statement triggers in the transaction that inserts or deletes
-- the events, so the rollup is exactly as current as the events it counts.
-- Whole-partition drops (retention) bypass triggers: the purge subtracts the
-- partition's counts in the transaction that drops it.
--
-- Durations go into logarithmic buckets with 1% relative accuracy (DDSketch's
-- mapping: bucket i holds (gamma^(i-1), gamma^i], gamma = 1.01/0.99, and
-- stands for 2 gamma^i / (gamma + 1)), so a rollup has a few hundred buckets
-- per action type whatever the volume. Totals, outcomes and means stay exact;
-- p50/p95 are percentile_cont over the bucket values, within 1% of the exact
-- figure. Filtered statistics bucket the matching events the same way, so
-- filtered and unfiltered figures never disagree.

-- Zero (and anything not positive) has its own bucket, below every other.
-- The constants are float8: numeric ln/power made a statistics query 50x slower.
CREATE FUNCTION action_duration_bucket(duration_ms double precision) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN duration_ms IS NULL THEN NULL
        WHEN duration_ms <= 0 THEN -32768
        ELSE greatest(-32767, ceil(ln(duration_ms) / ln(1.01::float8 / 0.99::float8)))::integer
    END
$$;

CREATE FUNCTION action_duration_bucket_value(bucket integer) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN bucket = -32768 THEN 0
        ELSE 2 * power(1.01::float8 / 0.99::float8, bucket) / (1.01::float8 / 0.99::float8 + 1)
    END
$$;

CREATE TABLE action_duration_rollup (
    action_type       text NOT NULL,
    execution_status  smallint NOT NULL,
    -- NULL: executions that reported no duration (counted, not timed).
    duration_bucket   integer,
    executions        bigint NOT NULL CHECK (executions >= 0),
    duration_ms_sum   double precision NOT NULL,
    CONSTRAINT action_duration_rollup_key UNIQUE NULLS NOT DISTINCT (action_type, execution_status, duration_bucket)
);

-- Rows are taken in key order within a statement, so two writers adding to
-- the same buckets queue instead of deadlocking.
CREATE FUNCTION action_duration_rollup_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO action_duration_rollup AS r
        (action_type, execution_status, duration_bucket, executions, duration_ms_sum)
    SELECT coalesce(action_type, ''), coalesce(execution_status, 0), action_duration_bucket(duration_ms),
           count(*), coalesce(sum(duration_ms), 0)
    FROM inserted_events
    WHERE kind = 4
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT ON CONSTRAINT action_duration_rollup_key DO UPDATE
        SET executions = r.executions + excluded.executions,
            duration_ms_sum = r.duration_ms_sum + excluded.duration_ms_sum;
    RETURN NULL;
END;
$$;

CREATE FUNCTION action_duration_rollup_subtract() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE action_duration_rollup r
    SET executions = r.executions - d.executions,
        duration_ms_sum = r.duration_ms_sum - d.duration_ms_sum
    FROM (
        SELECT coalesce(action_type, '') AS action_type, coalesce(execution_status, 0) AS execution_status,
               action_duration_bucket(duration_ms) AS duration_bucket,
               count(*) AS executions, coalesce(sum(duration_ms), 0) AS duration_ms_sum
        FROM deleted_events
        WHERE kind = 4
        GROUP BY 1, 2, 3
    ) d
    WHERE r.action_type = d.action_type
      AND r.execution_status = d.execution_status
      AND r.duration_bucket IS NOT DISTINCT FROM d.duration_bucket;
    RETURN NULL;
END;
$$;

CREATE TRIGGER audit_events_rollup_insert AFTER INSERT ON audit_events
    REFERENCING NEW TABLE AS inserted_events
    FOR EACH STATEMENT EXECUTE FUNCTION action_duration_rollup_add();
CREATE TRIGGER audit_events_rollup_delete AFTER DELETE ON audit_events
    REFERENCING OLD TABLE AS deleted_events
    FOR EACH STATEMENT EXECUTE FUNCTION action_duration_rollup_subtract();

INSERT INTO action_duration_rollup (action_type, execution_status, duration_bucket, executions, duration_ms_sum)
SELECT coalesce(action_type, ''), coalesce(execution_status, 0), action_duration_bucket(duration_ms),
       count(*), coalesce(sum(duration_ms), 0)
FROM audit_events
WHERE kind = 4
GROUP BY 1, 2, 3;
