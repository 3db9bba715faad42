-- Changes of what is due bind every delete that commits after them (`repository::rule::confirm`).
--
-- Every change of a tenant's rules (windows, deleted_at, the tenant added or removed) and of a
-- hold takes the rules' lock (a transaction-scoped advisory lock) exclusively in its trigger,
-- moves `retention_rules.version`, and records which tenant it concerns in
-- `retention_rule_changes` (a rewrite that copied under older rules copies that tenant again).
-- A deleting transaction reads the version in its deleting statements and, right before its
-- commit, calls `retention_rules_unchanged(version)`, which takes the lock shared without waiting
-- and fails (SQLSTATE 40001: run the batch again) when the version moved or a change is in
-- progress. So a change either committed before a delete's check (which then sees it), or waits
-- for that delete's commit.

-- Which tenant each version of the rules changed.
CREATE TABLE retention_rule_changes (
    version    bigint      NOT NULL,
    tenant_id  uuid        NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX retention_rule_changes_version_idx ON retention_rule_changes (version);

-- The lock's key: "engineRL".
CREATE FUNCTION retention_rules_lock_key() RETURNS bigint LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN 7308892947790254668;

CREATE OR REPLACE FUNCTION history_log_tenant() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(retention_rules_lock_key());
    UPDATE retention_rules SET version = version + 1 RETURNING version INTO changed;
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO history_changes (relid, op, tenant_id) VALUES (0, 'T', OLD.id);
        INSERT INTO retention_rule_changes (version, tenant_id) VALUES (changed, OLD.id);
    END IF;
    IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.id IS DISTINCT FROM OLD.id) THEN
        INSERT INTO history_changes (relid, op, tenant_id) VALUES (0, 'T', NEW.id);
        INSERT INTO retention_rule_changes (version, tenant_id) VALUES (changed, NEW.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION retention_log_hold() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    changed bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(retention_rules_lock_key());
    UPDATE retention_rules SET version = version + 1 RETURNING version INTO changed;
    INSERT INTO history_changes (relid, op, tenant_id) VALUES (0, 'T', NEW.tenant_id);
    INSERT INTO retention_rule_changes (version, tenant_id) VALUES (changed, NEW.tenant_id);
    RETURN NULL;
END
$$;

-- Called by a deleting transaction right before its commit, with the version its deleting
-- statements read. Never waits. VOLATILE: its read of the version takes a fresh snapshot, after
-- the lock is held.
CREATE FUNCTION retention_rules_unchanged(seen bigint) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    current_version bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(retention_rules_lock_key()) THEN
        RAISE EXCEPTION 'a change of retention rules (a window, a deleted tenant, a hold) is being committed'
            USING ERRCODE = 'serialization_failure', HINT = 'run the batch again';
    END IF;
    SELECT version INTO current_version FROM retention_rules;
    IF current_version IS DISTINCT FROM seen THEN
        RAISE EXCEPTION 'retention rules changed (version % became %) while the batch ran', seen, current_version
            USING ERRCODE = 'serialization_failure', HINT = 'run the batch again';
    END IF;
END
$$;

-- The rule is written in one place, `repository::rule`, which every statement takes it from;
-- its earlier spellings in SQL go, so that no second one can drift from it.
DROP FUNCTION retention_task_due(text, timestamptz, timestamptz, uuid, interval, timestamptz, timestamptz, interval);
DROP FUNCTION retention_next_due(timestamptz, interval, timestamptz);
DROP FUNCTION retention_period_for(text, interval, interval, interval, interval);
DROP FUNCTION retention_cutoff(timestamptz, interval);
