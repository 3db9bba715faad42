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
    -- Empty: archives nothing (the default). Never NULL: one way to say "off".
    ADD COLUMN archive_statuses text[] NOT NULL DEFAULT '{}'
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

-- The manifest: one row per archive file, `written` only after the store confirmed the file's
-- size and checksum. A file's key is fixed before it is written (`writing`, committed before the
-- upload: no object without its row), so a run that died mid-upload is finished by the next,
-- under the same key and with the same tasks: those of `tenant_id` and `status` whose
-- (coalesce(finished_at, inserted_at), id) lies from `first_at`/`first_task` to
-- `last_at`/`last_task`, in that order. A `writing` row never lets a task go.
CREATE TABLE retention_archives (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    object_key     text        NOT NULL,
    -- The store the object is in (`storage.url` when it was written, without credentials): a
    -- changed `storage.url` does not make another store's archives look missing or expired here.
    store          text        NOT NULL,
    tenant_id      uuid        NOT NULL,
    -- The one final status of the file's tasks.
    status         text        NOT NULL
        CONSTRAINT retention_archives_status_final CHECK (status IN ('succeeded', 'failed', 'cancelled')),
    first_at       timestamptz NOT NULL,
    first_task     uuid        NOT NULL,
    last_at        timestamptz NOT NULL,
    last_task      uuid        NOT NULL,
    -- The days of first_at and last_at (UTC), for listing.
    first_day      date        GENERATED ALWAYS AS ((first_at AT TIME ZONE 'UTC')::date) STORED,
    last_day       date        GENERATED ALWAYS AS ((last_at AT TIME ZONE 'UTC')::date) STORED,
    run_id         uuid        NOT NULL,
    part           integer     NOT NULL,
    state          text        NOT NULL DEFAULT 'writing'
        CONSTRAINT retention_archives_state_known CHECK (state IN ('writing', 'written')),
    tasks          bigint      NOT NULL,
    events         bigint      NOT NULL DEFAULT 0,
    payloads       bigint      NOT NULL DEFAULT 0,
    logs           bigint      NOT NULL DEFAULT 0,
    bytes          bigint      NULL,
    sha256         text        NULL,
    schema_version integer     NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    written_at     timestamptz NULL,
    -- When the file goes (written_at + the tenant's archive_retention_period, moved when that
    -- changes); NULL: kept forever.
    expires_at     timestamptz NULL,
    CONSTRAINT retention_archives_key_unique UNIQUE (object_key, store),
    CONSTRAINT retention_archives_written_complete CHECK (
        state = 'writing' OR (bytes IS NOT NULL AND sha256 IS NOT NULL AND written_at IS NOT NULL))
);
CREATE INDEX retention_archives_tenant_idx ON retention_archives (tenant_id, first_day);
CREATE INDEX retention_archives_expires_idx ON retention_archives (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX retention_archives_writing_idx ON retention_archives (id) WHERE state = 'writing';

-- The tasks a written archive holds, as the file holds them, until the task is deleted: what
-- lets an archiving tenant's task go (the rule's archive check). The task must still be as
-- recorded (status, finish, number of events, payloads and log lines): one changed since (a late
-- event, a retry) waits for a new archive. Rows of tasks gone are removed by task-history.
CREATE TABLE retention_archived_tasks (
    task_inserted_at timestamptz NOT NULL,
    task_id          uuid        NOT NULL,
    archive_id       bigint      NOT NULL REFERENCES retention_archives,
    status           text        NOT NULL,
    finished_at      timestamptz NULL,
    events           integer     NOT NULL,
    payloads         integer     NOT NULL,
    logs             integer     NOT NULL,
    -- The highest id of each in the file (NULL: none): a row of the run with a higher id was
    -- written after the archive read it, and is in no archive (kept by the orphan rules once its
    -- run is gone; see `Rule::orphan_of_archived`).
    max_event_id     bigint      NULL,
    max_payload_id   bigint      NULL,
    max_log_id       bigint      NULL,
    PRIMARY KEY (task_inserted_at, task_id)
);
CREATE INDEX retention_archived_tasks_archive_idx ON retention_archived_tasks (archive_id);

-- An archive committed makes its tasks due: the facts look at the tenant's ranges again (a pair
-- visited while its rows waited is visited again). It does not move the rules' version: an
-- archive only makes rows due, so a delete or a rewrite that read the rules before it deletes
-- less, never more (a rewrite's count asks whether a task left the live tables), and a long
-- merge is never failed by archives committed while it copies.
CREATE FUNCTION retention_log_archived() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO history_changes (relid, op, tenant_id)
        SELECT DISTINCT 0, 'T', a.tenant_id FROM added n JOIN retention_archives a ON a.id = n.archive_id;
    RETURN NULL;
END
$$;
CREATE TRIGGER retention_archived_tasks_added AFTER INSERT ON retention_archived_tasks
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION retention_log_archived();
-- A task archived again (it changed after its first archive) is recorded again in place.
CREATE TRIGGER retention_archived_tasks_updated AFTER UPDATE ON retention_archived_tasks
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION retention_log_archived();

-- Archive files leave through the outbox, like payload objects: a manifest row deleted (expired,
-- or a begun file that holds nothing now) gives its object to `object_deletions` in the same
-- transaction, and the blobs task deletes it exactly once.
ALTER TABLE object_deletions
    ALTER COLUMN payload_id DROP NOT NULL,
    ALTER COLUMN task_inserted_at DROP NOT NULL,
    ADD COLUMN archive_id bigint NULL,
    ADD CONSTRAINT object_deletions_one_source CHECK ((payload_id IS NULL) <> (archive_id IS NULL));

CREATE FUNCTION retention_archives_release_object() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO object_deletions (object_key, tenant_id, archive_id, size_bytes)
    VALUES (OLD.object_key, OLD.tenant_id, OLD.id, coalesce(OLD.bytes, 0));
    RETURN NULL;
END
$$;
CREATE TRIGGER retention_archives_deleted AFTER DELETE ON retention_archives
    FOR EACH ROW EXECUTE FUNCTION retention_archives_release_object();

-- Receipts name the archive files a run wrote (rule `archive`) or let expire (`archive-expired`).
ALTER TABLE retention_receipts ADD COLUMN archive_keys text[] NOT NULL DEFAULT '{}';
