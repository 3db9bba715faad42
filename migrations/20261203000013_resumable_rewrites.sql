-- Rewrites (compaction and merges of run-history ranges) in bounded steps that survive restarts.
--
-- A rewrite used to be one transaction whose copy was one INSERT ... SELECT per table: past
-- `statement_timeout` it failed, every run, and a merge of a month kept forever never completed.
-- Now each step is a short transaction of its own, recorded here, so a rewrite resumes where it
-- stopped (a deadline, a restart, a crash):
--
--   copy-tasks, copy-events  the sources' pages in block ranges, each chunk copying what the rule
--                            keeps into the new range's tables (unattached);
--   catch-up                 the writes the sources logged meanwhile replayed, and the tenants
--                            whose rules changed copied again; then the swap, under the history
--                            tables' lock for milliseconds;
--   count-tasks, count-events  the detached sources counted against the rules recorded at the
--                            swap: the receipts (and the queue items of the tasks that went),
--                            each chunk in one transaction with its receipts;
--   and then the detached tables are dropped and the record deleted.
--
-- While a range is a source (`history_ranges.rewrite_id`), its change log records every write,
-- the engine's row deletes included (`log_mode = 'rewrite'`), and facts refreshes leave its
-- entries to the rewrite.

CREATE TABLE history_rewrites (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The task that started it (`task-history`: compaction, `partitions`: a merge) and its run,
    -- under which its receipts are written.
    task             text        NOT NULL,
    run_id           uuid        NOT NULL,
    lower            timestamptz NOT NULL,
    upper            timestamptz NOT NULL,
    -- The new range's tables, by OID, and the names they were created with.
    new_tasks_relid  oid         NOT NULL,
    new_events_relid oid         NOT NULL,
    new_tasks_name   text        NOT NULL,
    new_events_name  text        NOT NULL,
    -- The instant the rule is evaluated at, for the whole rewrite, and the deleted tenants' grace.
    rule_now         timestamptz NOT NULL,
    grace            interval    NOT NULL,
    -- The rules (`retention_rules.version`) every row copied so far was decided under, for every
    -- tenant that did not change since: the swap happens only under these.
    rules_version    bigint      NOT NULL,
    phase            text        NOT NULL
        CONSTRAINT history_rewrites_phase_known
        CHECK (phase IN ('copy-tasks', 'copy-events', 'catch-up', 'count-tasks', 'count-events')),
    -- Where the phase's walk is: the source (its position) and the next page of its table.
    source           int         NOT NULL DEFAULT 0,
    block            bigint      NOT NULL DEFAULT 0,
    -- The holds in force at `rule_now`, recorded at the swap (the count evaluates the rule under them).
    held_tenants     uuid[]      NULL,
    held_tasks       uuid[]      NULL,
    rows_read        bigint      NOT NULL DEFAULT 0,
    tasks_kept       bigint      NOT NULL DEFAULT 0,
    -- Time spent in its steps (for the measured costs), and how long the swap held the lock.
    seconds          float8      NOT NULL DEFAULT 0,
    lock_ms          float8      NULL,
    failures         int         NOT NULL DEFAULT 0,
    last_error       text        NULL,
    started_at       timestamptz NOT NULL DEFAULT now(),
    swapped_at       timestamptz NULL
);

-- The ranges it replaces, oldest first.
CREATE TABLE history_rewrite_sources (
    rewrite_id   bigint      NOT NULL REFERENCES history_rewrites ON DELETE CASCADE,
    position     int         NOT NULL,
    tasks_relid  oid         NOT NULL,
    events_relid oid         NOT NULL,
    lower        timestamptz NOT NULL,
    upper        timestamptz NOT NULL,
    PRIMARY KEY (rewrite_id, position)
);

-- Every tenant with rows in the sources, and, once recorded (at the latest in the swap), its
-- rules as of `recorded_version`, in the columns the rule reads of `tenants` (`id` NULL: the
-- tenant has no row).
CREATE TABLE history_rewrite_tenants (
    rewrite_id                 bigint      NOT NULL REFERENCES history_rewrites ON DELETE CASCADE,
    tenant_id                  uuid        NOT NULL,
    recorded_version           bigint      NULL,
    id                         uuid        NULL,
    deleted_at                 timestamptz NULL,
    data_retention_period      interval    NULL,
    succeeded_retention_period interval    NULL,
    failed_retention_period    interval    NULL,
    cancelled_retention_period interval    NULL,
    PRIMARY KEY (rewrite_id, tenant_id)
);

-- Events of the sources whose task was not there when last looked at (orphans), kept or not:
-- a tenant whose hold changes has its orphans decided again.
CREATE TABLE history_rewrite_orphans (
    rewrite_id       bigint      NOT NULL REFERENCES history_rewrites ON DELETE CASCADE,
    event_id         bigint      NOT NULL,
    task_inserted_at timestamptz NOT NULL,
    tenant_id        uuid        NOT NULL,
    PRIMARY KEY (rewrite_id, event_id, task_inserted_at)
);
CREATE INDEX history_rewrite_orphans_tenant_idx ON history_rewrite_orphans (rewrite_id, tenant_id);

ALTER TABLE history_ranges ADD COLUMN rewrite_id bigint NULL REFERENCES history_rewrites ON DELETE SET NULL;
ALTER TABLE history_detached ADD COLUMN rewrite_id bigint NULL REFERENCES history_rewrites ON DELETE SET NULL;
