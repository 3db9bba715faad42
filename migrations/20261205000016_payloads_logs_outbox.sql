-- Task payloads and logs, and the outbox of stored objects to delete.
--
-- Payloads (a task's input and output) and log lines belong to a task: they leave with it, in the
-- statement that deletes it, on every path (see `repository::history::dependents`). Both tables
-- are partitioned by the task's `inserted_at`, one partition a day created ahead by `partitions`,
-- and a default partition for any other date, so that an insert succeeds at any date. Their
-- partitions are their own (a rewrite of `tasks` never copies a payload: a kept task keeps its
-- key, so its payload stays where it is).
--
-- A payload is stored inline (bytea) or in object storage (`external_key`). The outbox
-- (`object_deletions`) records, in the transaction that deletes a payload row, that its object is
-- to be deleted: written by a trigger, so that no path can delete a row and forget its object.
-- The `blobs` task deletes the objects after those transactions committed, and removes an entry
-- only once the store confirmed.

CREATE TABLE task_payloads (
    id               bigint      GENERATED ALWAYS AS IDENTITY,
    tenant_id        uuid        NOT NULL,
    task_id          uuid        NOT NULL,
    task_inserted_at timestamptz NOT NULL,
    kind             text        NOT NULL
        CONSTRAINT task_payloads_kind_known CHECK (kind IN ('input', 'output')),
    location         text        NOT NULL
        CONSTRAINT task_payloads_location_known CHECK (location IN ('inline', 'external')),
    inline_content   bytea       NULL,
    external_key     text        NULL,
    size_bytes       bigint      NOT NULL CONSTRAINT task_payloads_size_not_negative CHECK (size_bytes >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT task_payloads_location_matches CHECK (
        (location = 'inline' AND inline_content IS NOT NULL AND external_key IS NULL)
        OR (location = 'external' AND external_key IS NOT NULL AND inline_content IS NULL)),
    PRIMARY KEY (id, task_inserted_at)
) PARTITION BY RANGE (task_inserted_at);
CREATE TABLE task_payloads_default PARTITION OF task_payloads DEFAULT;
CREATE INDEX task_payloads_task_idx ON task_payloads (task_id, task_inserted_at);
CREATE INDEX task_payloads_key_idx ON task_payloads (external_key) WHERE external_key IS NOT NULL;

CREATE TABLE task_logs (
    id               bigint      GENERATED ALWAYS AS IDENTITY,
    tenant_id        uuid        NOT NULL,
    task_id          uuid        NOT NULL,
    task_inserted_at timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    level            text        NOT NULL,
    line             text        NOT NULL,
    PRIMARY KEY (id, task_inserted_at)
) PARTITION BY RANGE (task_inserted_at);
CREATE TABLE task_logs_default PARTITION OF task_logs DEFAULT;
CREATE INDEX task_logs_task_idx ON task_logs (task_id, task_inserted_at);
-- The log window's walk, tenant by tenant, oldest first.
CREATE INDEX task_logs_due_idx ON task_logs (tenant_id, created_at);

-- A tenant's own log window (NULL: `retention.task_logs.max_age`). A change of it is a change of
-- the rules, like the other windows.
ALTER TABLE tenants ADD COLUMN log_retention_period interval NULL
    CONSTRAINT tenants_log_retention_period_positive CHECK (log_retention_period > interval '0');
DROP TRIGGER history_rules_changed ON tenants;
CREATE TRIGGER history_rules_changed
    AFTER INSERT OR DELETE OR UPDATE OF id, data_retention_period, deleted_at,
        succeeded_retention_period, failed_retention_period, cancelled_retention_period,
        log_retention_period ON tenants
    FOR EACH ROW EXECUTE FUNCTION history_log_tenant();

-- The outbox: objects whose payload row is gone (committed), to be deleted from the store.
CREATE TABLE object_deletions (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    object_key       text        NOT NULL,
    tenant_id        uuid        NOT NULL,
    payload_id       bigint      NOT NULL,
    task_inserted_at timestamptz NOT NULL,
    size_bytes       bigint      NOT NULL,
    enqueued_at      timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 0,
    -- Not before this instant (backoff after a failure).
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text        NULL
);
CREATE INDEX object_deletions_next_idx ON object_deletions (next_attempt_at, id);
CREATE INDEX object_deletions_key_idx ON object_deletions (object_key);

-- A payload row whose object is no longer referenced by it (deleted, or its key changed): its
-- object goes to the outbox in the same transaction.
CREATE FUNCTION task_payloads_release_object() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO object_deletions (object_key, tenant_id, payload_id, task_inserted_at, size_bytes)
    VALUES (OLD.external_key, OLD.tenant_id, OLD.id, OLD.task_inserted_at, OLD.size_bytes);
    RETURN NULL;
END
$$;
CREATE TRIGGER task_payloads_deleted AFTER DELETE ON task_payloads
    FOR EACH ROW WHEN (OLD.external_key IS NOT NULL)
    EXECUTE FUNCTION task_payloads_release_object();
CREATE TRIGGER task_payloads_key_changed AFTER UPDATE OF external_key, location ON task_payloads
    FOR EACH ROW WHEN (OLD.external_key IS NOT NULL AND OLD.external_key IS DISTINCT FROM NEW.external_key)
    EXECUTE FUNCTION task_payloads_release_object();

-- Receipts count payloads, log lines and the objects given to the outbox.
ALTER TABLE retention_receipts
    ADD COLUMN payloads bigint NOT NULL DEFAULT 0,
    ADD COLUMN logs     bigint NOT NULL DEFAULT 0,
    ADD COLUMN objects  bigint NOT NULL DEFAULT 0;
