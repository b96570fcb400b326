-- Retention: a purge drops whole months and deletes the rest in batches.

-- Drops the month starting at month_start (its event and embedding
-- partitions) and its pending markers. Dropping a partition fires no delete
-- trigger, so its executions are taken out of the action rollup here, in the
-- same transaction. Returns how many events the month held.
CREATE FUNCTION drop_audit_month(month_start timestamptz) RETURNS bigint
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
    SELECT count(*) INTO events FROM audit_events WHERE occurred_at >= first_day AND occurred_at < next_month;
    DELETE FROM pending_embeddings WHERE occurred_at >= first_day AND occurred_at < next_month;
    EXECUTE format('DROP TABLE IF EXISTS %I', 'audit_embeddings_' || suffix);
    EXECUTE format('DROP TABLE IF EXISTS %I', 'audit_events_' || suffix);
    RETURN events;
END;
$$;

-- The months that end at or before cutoff, oldest first.
CREATE FUNCTION audit_months_before(cutoff timestamptz) RETURNS SETOF timestamptz
LANGUAGE sql STABLE AS $$
    SELECT bounds[1]::timestamptz
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid,
    LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''([^'']+)''\) TO \(''([^'']+)''\)') AS bounds
    WHERE i.inhparent = 'audit_events'::regclass AND bounds[2]::timestamptz <= cutoff
    ORDER BY 1
$$;
