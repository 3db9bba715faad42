-- Retention policies beyond one window per tenant:
--   * a window per final status (succeeded, failed, cancelled), each defaulting to the tenant's
--     data_retention_period;
--   * holds: a tenant, or one task of it, that nothing deletes until the hold is removed or ends;
--   * receipts: what each run deleted, per tenant and rule, for auditors.

-- Windows per final status. NULL: as data_retention_period. A window of 1000 years or more means
-- forever (retention_cutoff's convention), which is how an override of "forever" is stored when
-- the tenant's default is finite.
ALTER TABLE tenants
    ADD COLUMN succeeded_retention_period interval NULL,
    ADD COLUMN failed_retention_period interval NULL,
    ADD COLUMN cancelled_retention_period interval NULL,
    ADD CONSTRAINT tenants_status_retention_at_least_1_hour CHECK (
        (succeeded_retention_period IS NULL OR succeeded_retention_period >= interval '1 hour')
        AND (failed_retention_period IS NULL OR failed_retention_period >= interval '1 hour')
        AND (cancelled_retention_period IS NULL OR cancelled_retention_period >= interval '1 hour')),
    -- The shortest window of any final status (NULL: every one keeps forever). Facts use it to know
    -- when a (range, tenant) pair may first hold a due task: never later than the rule says.
    ADD COLUMN shortest_retention_period interval GENERATED ALWAYS AS (
        least(coalesce(succeeded_retention_period, data_retention_period),
              coalesce(failed_retention_period, data_retention_period),
              coalesce(cancelled_retention_period, data_retention_period))) STORED;

-- The window of a task with `status` under a tenant's settings (NULL: forever). Inlined by the planner.
CREATE FUNCTION retention_period_for(
    status text, data_retention_period interval,
    succeeded interval, failed interval, cancelled interval
) RETURNS interval
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN coalesce(CASE status WHEN 'succeeded' THEN succeeded WHEN 'failed' THEN failed WHEN 'cancelled' THEN cancelled END,
                    data_retention_period);

-- Rule changes reach the facts and stop a rewrite's swap, as before.
DROP TRIGGER history_rules_changed ON tenants;
CREATE TRIGGER history_rules_changed
    AFTER INSERT OR DELETE OR UPDATE OF id, data_retention_period, deleted_at,
        succeeded_retention_period, failed_retention_period, cancelled_retention_period ON tenants
    FOR EACH ROW EXECUTE FUNCTION history_log_tenant();

-- Holds. A hold with task_id NULL holds every task of the tenant (and their events and queue
-- items, and the tenant's orphan events); else the tasks with that id. It holds while removed_at
-- is NULL and `until` (if any) has not passed. Rows are never deleted: who added and removed a
-- hold, when and why, stays on record.
CREATE TABLE retention_holds (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      uuid        NOT NULL REFERENCES tenants (id),
    task_id        uuid        NULL,
    reason         text        NOT NULL CONSTRAINT retention_holds_reason_given CHECK (btrim(reason) <> ''),
    until          timestamptz NULL,
    created_by     text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    removed_by     text        NULL,
    removed_at     timestamptz NULL,
    removed_reason text        NULL,
    CONSTRAINT retention_holds_removal_recorded CHECK ((removed_at IS NULL) = (removed_by IS NULL))
);
-- Every deleting statement checks it (`repository::history::held`, inline: a SQL function with a
-- subquery would not be inlined, and would cost a call per row).
CREATE INDEX retention_holds_active_idx ON retention_holds (tenant_id) WHERE removed_at IS NULL;

-- A hold added or removed changes the rules, like a tenant's window: the facts of the tenant are
-- recomputed and a rewrite that copied under the old rules does not swap.
CREATE FUNCTION retention_log_hold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE retention_rules SET version = version + 1;
    INSERT INTO history_changes (relid, op, tenant_id) VALUES (0, 'T', NEW.tenant_id);
    RETURN NULL;
END
$$;
CREATE TRIGGER retention_holds_changed AFTER INSERT OR UPDATE ON retention_holds
    FOR EACH ROW EXECUTE FUNCTION retention_log_hold();

-- Receipts: per run, tenant and rule, what was deleted. `oldest`/`newest`: the earliest and latest
-- instant the rule counted from (a task's finish, else its insertion) among the tasks deleted.
-- Written in the transaction of the deletes they describe. Kept `retention.receipts.keep`
-- (default 400 days), not counted in any tenant's data.
CREATE TABLE retention_receipts (
    run_id      uuid        NOT NULL,
    tenant_id   uuid        NOT NULL,
    rule        text        NOT NULL,
    task        text        NOT NULL,
    tasks       bigint      NOT NULL DEFAULT 0,
    events      bigint      NOT NULL DEFAULT 0,
    queue_items bigint      NOT NULL DEFAULT 0,
    oldest      timestamptz NULL,
    newest      timestamptz NULL,
    first_at    timestamptz NOT NULL DEFAULT now(),
    last_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, tenant_id, rule)
);
-- Indexed on what never changes once written, so that a run adding to its receipts batch after
-- batch updates them in place (HOT), without new index entries.
CREATE INDEX retention_receipts_tenant_idx ON retention_receipts (tenant_id, first_at);
CREATE INDEX retention_receipts_first_at_idx ON retention_receipts (first_at);
