-- Creating a month's partitions takes ACCESS EXCLUSIVE locks on both
-- parents. It took audit_events first, while a search holds a share lock on
-- audit_embeddings and then waits for audit_events: a deadlock, which
-- PostgreSQL broke by failing whichever side ran its check first, often the
-- search. Now the locks are taken in the order searches take them,
-- audit_embeddings first, and every lock wait is bounded well below
-- deadlock_timeout (1 s), so that against any other order the partition
-- creation gives up first; the service retries it
-- (storage::ensure_partitions), and no reader pays for a new month.
CREATE OR REPLACE FUNCTION ensure_audit_partitions(at timestamptz) RETURNS void
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
    PERFORM set_config('lock_timeout', '100ms', true);
    LOCK TABLE audit_embeddings IN ACCESS EXCLUSIVE MODE;
    LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF audit_events FOR VALUES FROM (%L) TO (%L)',
                   'audit_events_' || suffix, month_start, month_end);
    EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF audit_embeddings FOR VALUES FROM (%L) TO (%L)',
                   'audit_embeddings_' || suffix, month_start, month_end);
END;
$$;
