-- Archive before delete: a tenant's finished runs written to Parquet files in object storage,
-- each file confirmed by the store and recorded here before any of its rows may go.
--
-- The policy is the tenant's, like its windows: which final statuses are archived
-- (`archive_statuses`: NULL or empty, none, the default), how long the files are kept
-- (`archive_retention_period`: NULL, forever), and whether a deleted tenant's runs are archived
-- before its purge (`archive_deleted`, off by default: a deleted tenant's runs are not). A change
-- of any of them is a change of the rules: a delete in flight that did not see it fails its
-- commit check and runs again (see `repository::rule::confirm`).

ALTER TABLE tenants
    ADD COLUMN archive_statuses text[] NULL
        CONSTRAINT tenants_archive_statuses_final
        CHECK (archive_statuses <@ ARRAY['succeeded', 'failed', 'cancelled']::text[]),
    ADD COLUMN archive_retention_period interval NULL DEFAULT '1 year'
        CONSTRAINT tenants_archive_retention_period_at_least_1_day
        CHECK (archive_retention_period IS NULL OR archive_retention_period >= interval '1 day'),
    ADD COLUMN archive_deleted boolean NOT NULL DEFAULT false;

DROP TRIGGER history_rules_changed ON tenants;
CREATE TRIGGER history_rules_changed
    AFTER INSERT OR DELETE OR UPDATE OF id, data_retention_period, deleted_at,
        succeeded_retention_period, failed_retention_period, cancelled_retention_period,
        log_retention_period, archive_statuses, archive_deleted ON tenants
    FOR EACH ROW EXECUTE FUNCTION history_log_tenant();

-- The manifest: one row per archive file, committed only after the store confirmed the file's
-- size and checksum. A file's key is fixed before it is written (`writing`), so a run that died
-- mid-upload is finished by the next, under the same key; a `writing` row never lets a task go.
CREATE TABLE retention_archives (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    object_key     text        NOT NULL UNIQUE,
    tenant_id      uuid        NOT NULL,
    -- The days (of the tasks' inserted_at) the file's tasks come from, inclusive.
    first_day      date        NOT NULL,
    last_day       date        NOT NULL,
    run_id         uuid        NOT NULL,
    part           integer     NOT NULL,
    state          text        NOT NULL DEFAULT 'writing'
        CONSTRAINT retention_archives_state_known CHECK (state IN ('writing', 'written')),
    tasks          bigint      NOT NULL DEFAULT 0,
    events         bigint      NOT NULL DEFAULT 0,
    payloads       bigint      NOT NULL DEFAULT 0,
    logs           bigint      NOT NULL DEFAULT 0,
    -- Tasks by final status, e.g. {"failed": 12, "succeeded": 3}.
    statuses       jsonb       NOT NULL DEFAULT '{}',
    bytes          bigint      NULL,
    sha256         text        NULL,
    schema_version integer     NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    written_at     timestamptz NULL,
    -- NULL: kept forever.
    expires_at     timestamptz NULL,
    CONSTRAINT retention_archives_written_complete CHECK (
        state = 'writing' OR (bytes IS NOT NULL AND sha256 IS NOT NULL AND written_at IS NOT NULL))
);
CREATE INDEX retention_archives_tenant_idx ON retention_archives (tenant_id, first_day);
CREATE INDEX retention_archives_expires_idx ON retention_archives (expires_at) WHERE expires_at IS NOT NULL;

-- The tasks a written archive holds, until they are deleted: what lets an archiving tenant's
-- task go (the rule's archive check). Rows of tasks already gone are removed by task-history.
CREATE TABLE retention_archived_tasks (
    task_id          uuid        NOT NULL,
    task_inserted_at timestamptz NOT NULL,
    archive_id       bigint      NOT NULL REFERENCES retention_archives ON DELETE CASCADE,
    PRIMARY KEY (task_id, task_inserted_at)
);
CREATE INDEX retention_archived_tasks_archive_idx ON retention_archived_tasks (archive_id);

-- An archive committed makes its tasks due: a change of the rules, like a tenant's windows. A
-- rewrite that copied before it does not swap after it (the version moved), and the facts look
-- at the tenant's ranges again (a pair visited while its rows waited is visited again).
CREATE FUNCTION retention_log_archived() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(retention_rules_lock_key());
    UPDATE retention_rules SET version = version + 1 RETURNING version INTO changed;
    INSERT INTO history_changes (relid, op, tenant_id)
        SELECT DISTINCT 0, 'T', a.tenant_id FROM added n JOIN retention_archives a ON a.id = n.archive_id;
    INSERT INTO retention_rule_changes (version, tenant_id)
        SELECT DISTINCT changed, a.tenant_id FROM added n JOIN retention_archives a ON a.id = n.archive_id;
    RETURN NULL;
END
$$;
CREATE TRIGGER retention_archived_tasks_added AFTER INSERT ON retention_archived_tasks
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION retention_log_archived();

-- The archiving's walk: a tenant's tasks in (inserted_at, id) order from a cursor, so each chunk
-- reads only its own rows whatever the backlog.
CREATE INDEX tasks_tenant_archive_idx ON tasks (tenant_id, inserted_at, id);
