-- Indexes and state for run-history retention. Every retention query reads an index range whose
-- size is the rows it deletes (or one probe per tenant), never a whole table.

-- Finished tasks by tenant and the instant their retention counts from, for row-level deletes
-- (a walk from the oldest) and the partition-drop check (one max() probe per tenant).
CREATE INDEX tasks_finished_due_idx ON tasks (tenant_id, (coalesce(finished_at, inserted_at)))
    WHERE status IN ('succeeded', 'failed', 'cancelled');
-- Queued and running tasks by tenant: these are never deleted for a live tenant, and their
-- presence keeps a day's partition.
CREATE INDEX tasks_active_idx ON tasks (tenant_id) WHERE status IN ('queued', 'running');

-- Recent events keep their day's partition (orphans are deleted only after an hour).
CREATE INDEX task_events_created_at_idx ON task_events (created_at);

-- Queue items of a deleted tenant, and of a dropped day.
CREATE INDEX queue_items_tenant_id_idx ON queue_items (tenant_id);
CREATE INDEX queue_items_task_inserted_at_idx ON queue_items (task_inserted_at);

-- How far a task has checked an ever-growing sequence (the orphan-events check walks event ids),
-- so a run reads only what arrived since the last one.
CREATE TABLE retention_watermarks (
    name       text        PRIMARY KEY,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The instant before which a tenant's finished history is due: now - period. Periods of 1000
-- years or more (only settable by hand in SQL) mean "keep", instead of overflowing the
-- timestamp range.
CREATE FUNCTION retention_cutoff(now timestamptz, period interval) RETURNS timestamptz
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN CASE WHEN period >= interval '1000 years' THEN '-infinity'::timestamptz ELSE now - period END;
