-- Facts per final status, and facts rebuilt in bounded steps.
--
-- Under windows per status (succeeded 7 days, failed 90 days, say) the facts knew only the oldest
-- final task of a (range, tenant) pair: a pair whose oldest failed task was kept by its 90 days
-- was planned every run by the 7 days, and each walk read every kept failed task older than 7
-- days. Now the facts keep the oldest and newest finish instant per status, a pair is planned
-- when one status's oldest task is due under that status's window, and the walk goes status by
-- status along an index that has the status: steady state costs what is due.
--
-- UPGRADE: the index is built on every partition of `tasks`, which blocks writes to `tasks` while
-- it is built (about 10 s per 10M tasks on the benchmark machine). To avoid that, build it first
-- by hand, one partition at a time with CREATE INDEX CONCURRENTLY, and attach each to an index on
-- the parent made with CREATE INDEX ... ON ONLY tasks (docs/operations.md, "Upgrading"): this
-- migration then finds it and builds nothing.

CREATE INDEX IF NOT EXISTS tasks_due_idx ON tasks (tenant_id, status, (coalesce(finished_at, inserted_at)))
    WHERE status IN ('succeeded', 'failed', 'cancelled');
DROP INDEX IF EXISTS tasks_finished_due_idx;

-- The facts so far knew one oldest and newest instant for every final status: each status starts
-- from them (never later than the truth, so nothing due is planned late); the first walk or
-- probe of a pair makes them exact.
ALTER TABLE history_range_tenants
    ADD COLUMN oldest_succeeded timestamptz NULL,
    ADD COLUMN newest_succeeded timestamptz NULL,
    ADD COLUMN oldest_failed    timestamptz NULL,
    ADD COLUMN newest_failed    timestamptz NULL,
    ADD COLUMN oldest_cancelled timestamptz NULL,
    ADD COLUMN newest_cancelled timestamptz NULL;
UPDATE history_range_tenants
SET oldest_succeeded = oldest_final, newest_succeeded = newest_final,
    oldest_failed = oldest_final, newest_failed = newest_final,
    oldest_cancelled = oldest_final, newest_cancelled = newest_final;
ALTER TABLE history_range_tenants DROP COLUMN oldest_final, DROP COLUMN newest_final;

-- A rebuild of a range's facts reads its rows in block ranges, each a short transaction adding
-- up what it read in `history_range_rebuilds`, its place kept in `history_range_rebuild_state`
-- (whose row its steps lock, so one runner rebuilds a range at a time; the range's own row is
-- left alone, so that row deletes there go on meanwhile). Once every page is read, the facts are
-- replaced in one transaction. Writes during the rebuild are in the change log, applied after it.
CREATE TABLE history_range_rebuild_state (
    tasks_relid oid    PRIMARY KEY,
    block       bigint NOT NULL
);
CREATE TABLE history_range_rebuilds (
    tasks_relid      oid         NOT NULL,
    tenant_id        uuid        NOT NULL,
    rows             bigint      NOT NULL,
    active           bigint      NOT NULL,
    oldest_succeeded timestamptz NULL,
    newest_succeeded timestamptz NULL,
    oldest_failed    timestamptz NULL,
    newest_failed    timestamptz NULL,
    oldest_cancelled timestamptz NULL,
    newest_cancelled timestamptz NULL,
    PRIMARY KEY (tasks_relid, tenant_id)
);
