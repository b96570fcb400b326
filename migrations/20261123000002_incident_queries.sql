-- Read paths of IncidentQuery: indexes for every filter and order, and the
-- bookkeeping that lets paginated listings hold still while events arrive.

-- Orders (last_event_at | first_seen_at, id) and the time-range filter.
CREATE INDEX incidents_last_event ON incidents (last_event_at, id);
CREATE INDEX incidents_first_seen ON incidents (first_seen_at, id);
-- Equality filters, each with the default order so a filter plus the first
-- page is one index range; combinations are bitmap-ANDed.
CREATE INDEX incidents_alert_name ON incidents (alert_name, last_event_at);
CREATE INDEX incidents_namespace ON incidents (namespace, last_event_at);
CREATE INDEX incidents_cluster ON incidents (cluster, last_event_at);
CREATE INDEX incidents_action_type ON incidents (action_type, last_event_at);
CREATE INDEX incidents_severity ON incidents (severity, last_event_at);
CREATE INDEX incidents_phase ON incidents (phase, last_event_at);
CREATE INDEX incidents_labels ON incidents USING gin (labels jsonb_path_ops);
CREATE INDEX incidents_updated_xact ON incidents (updated_xact);

-- Execution facts per incident, covering what action statistics read.
CREATE INDEX audit_events_executions ON audit_events (incident_id)
    INCLUDE (action_type, execution_status, duration_ms) WHERE kind = 4;

-- A listing pins the PostgreSQL snapshot of its first page (pg_snapshot) in
-- its page token. An incident changed by a transaction that snapshot did not
-- see is listed at the position its sort keys had then: the keys it had
-- before each change are kept here, so later pages neither repeat nor skip
-- it, and an incident created by such a transaction is not listed. Rows
-- older than the page-token lifetime are no longer needed and are pruned.
--
-- Changes of one incident are serialised by its row lock, so the sequence
-- orders them as they committed; transaction ids would not.
CREATE SEQUENCE incident_change_seq;

CREATE TABLE incident_sort_history (
    incident_id      uuid NOT NULL,
    -- Orders the changes of one incident.
    superseded_seq   bigint NOT NULL,
    -- The transaction that replaced these keys.
    superseded_xact  xid8 NOT NULL,
    last_event_at    timestamptz NOT NULL,
    first_seen_at    timestamptz NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (incident_id, superseded_seq)
);
CREATE INDEX incident_sort_history_recorded ON incident_sort_history (recorded_at);

CREATE FUNCTION incidents_track_changes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_xact := pg_current_xact_id();
    IF TG_OP = 'INSERT' THEN
        NEW.created_xact := NEW.updated_xact;
        RETURN NEW;
    END IF;
    NEW.created_xact := OLD.created_xact;
    IF (NEW.last_event_at, NEW.first_seen_at) IS DISTINCT FROM (OLD.last_event_at, OLD.first_seen_at) THEN
        INSERT INTO incident_sort_history (incident_id, superseded_seq, superseded_xact, last_event_at, first_seen_at)
        VALUES (OLD.id, nextval('incident_change_seq'), NEW.updated_xact, OLD.last_event_at, OLD.first_seen_at);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER incidents_track_changes BEFORE INSERT OR UPDATE ON incidents
    FOR EACH ROW EXECUTE FUNCTION incidents_track_changes();
