-- The incident projection's label helpers, unchanged in what they return,
-- move from LANGUAGE sql to plpgsql.
--
-- PostgreSQL cannot inline these SQL functions (they aggregate, or call
-- to_char, which is not immutable), so every statement that called them
-- parsed and planned their bodies again: in a profile of single-event
-- WriteAudit calls, 7% of the machine was in fmgr_sql and its parsing and
-- planning (docs/performance.md). A plpgsql function plans its statements
-- once per connection and keeps the plans.
CREATE OR REPLACE FUNCTION fact_stamp_key(stamp fact_stamp) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN to_char((stamp).occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '/' || (stamp).event_id::text;
END;
$$;

CREATE OR REPLACE FUNCTION incident_label_facts(labels jsonb, stamp fact_stamp) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    stamp_key text := fact_stamp_key(stamp);
BEGIN
    RETURN (SELECT coalesce(jsonb_object_agg(key, jsonb_build_object('v', value, 'at', stamp_key)), '{}')
            FROM jsonb_each(labels));
END;
$$;

CREATE OR REPLACE FUNCTION merge_incident_label_facts(current jsonb, incoming jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
BEGIN
    RETURN (SELECT coalesce(jsonb_object_agg(key, fact), '{}')
            FROM (SELECT DISTINCT ON (key) key, fact
                  FROM (SELECT key, value AS fact FROM jsonb_each(current)
                        UNION ALL
                        SELECT key, value FROM jsonb_each(incoming)) AS candidates
                  ORDER BY key, fact->>'at' DESC) AS newest);
END;
$$;
