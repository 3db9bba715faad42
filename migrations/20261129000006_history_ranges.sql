-- Run history as ranges: every instant from the start of the managed area on belongs to exactly
-- one attached partition pair of `tasks`/`task_events` (a day, a wider span, or the future), so a
-- range can be replaced by another covering the same instants (compaction, merging) without a
-- gap, and the default partition, which takes only what is older, is never scanned by ATTACH.
--
-- What this migration adds:
--   * retention_task_due(): the rule, in one place, used by every statement that deletes history;
--   * history_ranges / history_range_tenants: per range and per (range, tenant) facts that let a
--     run find what is due without probing every day for every tenant;
--   * history_changes: a log of writes into ranges outside their own live day, written by a row
--     trigger on every range (and of tenant rule changes), so the facts stay exact and a range
--     being rewritten loses no concurrent write;
--   * history_detached: the tables the engine detached itself, by OID: the only ones it drops;
--   * the conversion of an existing layout (see the DO block at the end).

-- The rule. A task is due when its tenant was deleted longer ago than `grace`, or when it is
-- final (succeeded, failed, cancelled) and its finish instant (else its insertion) is before its
-- live tenant's retention cutoff. `tenant_id` is the tenants row's id: NULL when the task's tenant
-- has no row, and such a task is named by no rule. NULL retention keeps forever. Queued and
-- running tasks of a live tenant are never due. Its events and queue items go with it.
CREATE FUNCTION retention_task_due(
    status text, finished_at timestamptz, inserted_at timestamptz,
    tenant_id uuid, retention interval, deleted_at timestamptz,
    now timestamptz, grace interval
) RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    RETURN coalesce(CASE
        WHEN tenant_id IS NULL THEN false
        WHEN deleted_at IS NOT NULL THEN deleted_at < now - grace
        ELSE status IN ('succeeded', 'failed', 'cancelled')
             AND coalesce(finished_at, inserted_at) < retention_cutoff(now, retention)
    END, false);

-- When the oldest finished task of a live tenant in a range becomes due under its retention
-- (NULL: never by time alone). Never later than the instant the rule first holds, so a run that
-- looks at pairs whose time has come misses nothing.
CREATE FUNCTION retention_next_due(oldest_final timestamptz, retention interval, deleted_at timestamptz)
    RETURNS timestamptz
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE WHEN deleted_at IS NULL AND retention < interval '1000 years' THEN oldest_final + retention END;

-- Deleted tenants are looked up at every run.
CREATE INDEX tenants_deleted_at_idx ON tenants (deleted_at) WHERE deleted_at IS NOT NULL;

-- One row per attached range. `lower` is '-infinity' for the default partition (which takes only
-- instants before the managed area, by its CHECK), `upper` is 'infinity' for the future range.
CREATE TABLE history_ranges (
    tasks_relid  oid         PRIMARY KEY,
    events_relid oid         NOT NULL UNIQUE,
    lower        timestamptz NOT NULL,
    upper        timestamptz NOT NULL,
    kind         text        NOT NULL CONSTRAINT history_ranges_kind_known CHECK (kind IN ('default', 'range', 'future')),
    -- Tasks in the range, as last counted (adjusted by known deletes and logged writes between).
    rows         bigint      NOT NULL DEFAULT 0,
    -- When the range's facts were last rebuilt from its rows (NULL: never, as for a range adopted
    -- from an earlier version). From then on every write into it is logged, except during its
    -- own live window [lower, upper): a range whose lower bound has passed needs its facts
    -- rebuilt once more after its upper bound has passed.
    settled_at   timestamptz NULL,
    -- Recorded once a rebuild is needed: the rebuild waits until every transaction older than
    -- this has finished, so that no write it could not see (and that was not logged) can still
    -- commit.
    settle_xid   xid8        NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT history_ranges_bounds CHECK (lower < upper)
);
CREATE UNIQUE INDEX history_ranges_lower_idx ON history_ranges (lower);

-- Per range and tenant: what the rules need to know without reading the rows.
CREATE TABLE history_range_tenants (
    tasks_relid  oid         NOT NULL,
    tenant_id    uuid        NOT NULL,
    rows         bigint      NOT NULL,
    -- Queued or running tasks.
    active       bigint      NOT NULL,
    -- Oldest and newest coalesce(finished_at, inserted_at) of its final tasks.
    oldest_final timestamptz NULL,
    newest_final timestamptz NULL,
    -- retention_next_due(oldest_final, ...) under the tenant's rules when last computed.
    next_due_at  timestamptz NULL,
    PRIMARY KEY (tasks_relid, tenant_id)
);
CREATE INDEX history_range_tenants_next_due_idx ON history_range_tenants (next_due_at) WHERE next_due_at IS NOT NULL;
CREATE INDEX history_range_tenants_tenant_idx ON history_range_tenants (tenant_id);

-- Writes into ranges outside their live day, and tenant rule changes (relid 0). Consumed by the
-- runs (DELETE ... RETURNING, so each entry is handled once, and an entry committed late is
-- simply handled later); a range being rewritten replays its entries into the new partition.
CREATE TABLE history_changes (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relid            oid         NOT NULL,
    op               "char"      NOT NULL, -- 'I', 'U', 'D'; 'T' for a tenant change
    tenant_id        uuid        NOT NULL,
    task_id          uuid        NULL,
    task_inserted_at timestamptz NULL,
    event_id         bigint      NULL
);
CREATE INDEX history_changes_relid_idx ON history_changes (relid);

-- Bumped by every change to a tenant's rules: a rewrite that copied the kept rows under one
-- version does not swap them in under another.
CREATE TABLE retention_rules (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint  NOT NULL
);
INSERT INTO retention_rules (version) VALUES (1);

-- Tables the engine detached itself, recorded in the transaction that detached them. Only these
-- are ever dropped by the engine, by OID, and only while they still carry the recorded name.
CREATE TABLE history_detached (
    relid       oid         PRIMARY KEY,
    relname     text        NOT NULL,
    lower       timestamptz NOT NULL,
    upper       timestamptz NOT NULL,
    detached_at timestamptz NOT NULL DEFAULT now()
);

-- Measured costs of removing history, which choose between row deletes and a rewrite.
CREATE TABLE retention_costs (
    operation       text   PRIMARY KEY,
    seconds_per_row float8 NOT NULL,
    samples         bigint NOT NULL DEFAULT 0
);

CREATE FUNCTION history_log_task() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO history_changes (relid, op, tenant_id, task_id, task_inserted_at)
        VALUES (TG_RELID, 'D', OLD.tenant_id, OLD.id, OLD.inserted_at);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO history_changes (relid, op, tenant_id, task_id, task_inserted_at)
        VALUES (TG_RELID, 'I', NEW.tenant_id, NEW.id, NEW.inserted_at);
    ELSE
        INSERT INTO history_changes (relid, op, tenant_id, task_id, task_inserted_at)
        VALUES (TG_RELID, 'U', NEW.tenant_id, NEW.id, NEW.inserted_at);
        IF OLD.tenant_id IS DISTINCT FROM NEW.tenant_id OR OLD.id IS DISTINCT FROM NEW.id THEN
            INSERT INTO history_changes (relid, op, tenant_id, task_id, task_inserted_at)
            VALUES (TG_RELID, 'D', OLD.tenant_id, OLD.id, OLD.inserted_at);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION history_log_event() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r task_events;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    INSERT INTO history_changes (relid, op, tenant_id, task_id, task_inserted_at, event_id)
    VALUES (TG_RELID, left(TG_OP, 1)::"char", r.tenant_id, r.task_id, r.task_inserted_at, r.id);
    IF TG_OP = 'UPDATE' AND OLD.id IS DISTINCT FROM NEW.id THEN
        INSERT INTO history_changes (relid, op, tenant_id, task_id, task_inserted_at, event_id)
        VALUES (TG_RELID, 'D', OLD.tenant_id, OLD.task_id, OLD.task_inserted_at, OLD.id);
    END IF;
    RETURN NULL;
END
$$;

-- Installs the change-log triggers on a range's two partitions. A write is logged unless the
-- engine's own retention statements make it (they keep the facts themselves), and unless it
-- happens during the range's own live day [lower, upper) by the database's clock, where the bulk
-- of all writes goes: there only a task whose finish instant lies before the range (an anomaly
-- that could make it due early) is logged. A live range's facts are rebuilt once it has ended.
CREATE FUNCTION history_install_triggers(tasks_part regclass, events_part regclass, lower timestamptz, upper timestamptz)
    RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    engine_write constant text := $q$current_setting('engine.retention_write', true) IS DISTINCT FROM 'on'$q$;
    outside text := format('(clock_timestamp() < %L::timestamptz OR clock_timestamp() >= %L::timestamptz)', lower, upper);
    old record;
BEGIN
    FOR old IN SELECT tgrelid::regclass AS rel, tgname FROM pg_trigger
               WHERE tgrelid IN (tasks_part, events_part) AND tgname IN ('history_log_write', 'history_log_delete', 'history_log') LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', old.tgname, old.rel);
    END LOOP;
    EXECUTE format(
        'CREATE TRIGGER history_log_write AFTER INSERT OR UPDATE ON %s FOR EACH ROW
         WHEN (%s AND (%s OR coalesce(NEW.finished_at, NEW.inserted_at) < %L::timestamptz))
         EXECUTE FUNCTION history_log_task()', tasks_part, engine_write, outside, lower);
    EXECUTE format(
        'CREATE TRIGGER history_log_delete AFTER DELETE ON %s FOR EACH ROW
         WHEN (%s AND %s) EXECUTE FUNCTION history_log_task()', tasks_part, engine_write, outside);
    EXECUTE format(
        'CREATE TRIGGER history_log AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW
         WHEN (%s AND %s) EXECUTE FUNCTION history_log_event()', events_part, engine_write, outside);
END
$$;

-- The name of a range's partition of `parent`: `_pYYYYMMDD` for one UTC day, `_pYYYYMMDD_YYYYMMDD`
-- for whole UTC days (the upper day excluded), `_future`, `_default`, and
-- `_rYYYYMMDDHHMMSS_YYYYMMDDHHMMSS` for other bounds. Names are for people: the engine identifies
-- partitions by OID and reads their bounds from the catalog.
CREATE FUNCTION history_range_name(parent text, lower timestamptz, upper timestamptz) RETURNS text
    LANGUAGE sql STABLE
    RETURN parent || '_' || CASE
        WHEN upper = 'infinity' THEN 'future'
        WHEN lower = '-infinity' THEN 'default'
        WHEN lower = date_trunc('day', lower, 'UTC') AND upper = date_trunc('day', upper, 'UTC') THEN
            'p' || to_char(lower AT TIME ZONE 'UTC', 'YYYYMMDD')
                || CASE WHEN upper = lower + interval '1 day' THEN '' ELSE '_' || to_char(upper AT TIME ZONE 'UTC', 'YYYYMMDD') END
        ELSE 'r' || to_char(lower AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISS') || '_' || to_char(upper AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISS')
    END;

-- Creates (unattached) the two tables of a range [lower, upper), named by history_range_name
-- plus `suffix`: the parents' columns, defaults, constraints and indexes, a CHECK of the range (so
-- ATTACH need not scan it, and the bounds stay readable after a detach), and the change-log
-- triggers. Returns their OIDs.
CREATE FUNCTION history_create_range_tables(lower timestamptz, upper timestamptz, suffix text,
                                            OUT tasks_relid oid, OUT events_relid oid)
    LANGUAGE plpgsql AS $$
DECLARE
    tasks_name text := history_range_name('tasks', lower, upper) || suffix;
    events_name text := history_range_name('task_events', lower, upper) || suffix;
    low text := CASE WHEN lower = '-infinity' THEN 'true' ELSE format('%%s >= %L::timestamptz', lower) END;
    high text := CASE WHEN upper = 'infinity' THEN 'true' ELSE format('%%s < %L::timestamptz', upper) END;
BEGIN
    EXECUTE format('CREATE TABLE %I (LIKE tasks INCLUDING ALL EXCLUDING IDENTITY)', tasks_name);
    EXECUTE format('CREATE TABLE %I (LIKE task_events INCLUDING ALL EXCLUDING IDENTITY)', events_name);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT history_range CHECK (%s AND %s)', tasks_name,
                   format(low, 'inserted_at'), format(high, 'inserted_at'));
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT history_range CHECK (%s AND %s)', events_name,
                   format(low, 'task_inserted_at'), format(high, 'task_inserted_at'));
    tasks_relid := to_regclass(quote_ident(tasks_name))::oid;
    events_relid := to_regclass(quote_ident(events_name))::oid;
    PERFORM history_install_triggers(tasks_relid::regclass, events_relid::regclass, lower, upper);
END
$$;

-- Tenant rule changes: logged for the facts, and they move the rules' version.
CREATE FUNCTION history_log_tenant() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE retention_rules SET version = version + 1;
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO history_changes (relid, op, tenant_id) VALUES (0, 'T', OLD.id);
    END IF;
    IF TG_OP <> 'DELETE' AND (TG_OP = 'INSERT' OR NEW.id IS DISTINCT FROM OLD.id) THEN
        INSERT INTO history_changes (relid, op, tenant_id) VALUES (0, 'T', NEW.id);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER history_rules_changed AFTER INSERT OR DELETE OR UPDATE OF id, data_retention_period, deleted_at ON tenants
    FOR EACH ROW EXECUTE FUNCTION history_log_tenant();

-- Conversion of the layout in place. A new database: the default partition takes what is before
-- today (UTC), a future range takes everything from today on, and the partitions task carves days
-- out of it. A database of an earlier version (day partitions, possibly with gaps where days were
-- dropped, and a default partition holding any date): the managed area starts at its oldest day;
-- rows of the default partition from there on move into partitions for the gaps and the future
-- (nothing moves into the default); the default gets its CHECK. This reads the default partition
-- once, under the locks of this migration.
DO $convert$
DECLARE
    part record;
    bound text[];
    low timestamptz;
    high timestamptz;
    previous timestamptz;
    created record;
BEGIN
    CREATE TEMPORARY TABLE history_adopted (tasks_relid oid, events_relid oid, lower timestamptz, upper timestamptz) ON COMMIT DROP;
    FOR part IN
        SELECT c.oid, c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'tasks'::regclass
    LOOP
        CONTINUE WHEN part.bound = 'DEFAULT';
        bound := regexp_match(part.bound, $re$^FOR VALUES FROM \('([^']+)'\) TO \('([^']+)'\)$$re$);
        IF bound IS NULL THEN
            RAISE EXCEPTION 'partition % of tasks has bounds (%) that cannot be adopted; only ranges between two instants can', part.name, part.bound;
        END IF;
        INSERT INTO history_adopted
        SELECT part.oid, c.oid, bound[1]::timestamptz, bound[2]::timestamptz
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'task_events'::regclass AND pg_get_expr(c.relpartbound, c.oid) = part.bound;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'partition % of tasks (%) has no partition of task_events with the same bounds', part.name, part.bound;
        END IF;
    END LOOP;
    IF (SELECT count(*) FROM pg_inherits WHERE inhparent = 'task_events'::regclass)
       <> (SELECT count(*) FROM history_adopted) + 1 THEN
        RAISE EXCEPTION 'task_events has partitions whose bounds no partition of tasks has';
    END IF;

    low := coalesce((SELECT min(lower) FROM history_adopted), date_trunc('day', now(), 'UTC'));
    high := coalesce((SELECT max(upper) FROM history_adopted), low);

    CREATE TEMPORARY TABLE history_moved_tasks ON COMMIT DROP AS
        WITH moved AS (DELETE FROM tasks_default WHERE inserted_at >= low RETURNING *) SELECT * FROM moved;
    CREATE TEMPORARY TABLE history_moved_events ON COMMIT DROP AS
        WITH moved AS (DELETE FROM task_events_default WHERE task_inserted_at >= low RETURNING *) SELECT * FROM moved;
    EXECUTE format('ALTER TABLE tasks_default ADD CONSTRAINT history_range CHECK (inserted_at < %L::timestamptz)', low);
    EXECUTE format('ALTER TABLE task_events_default ADD CONSTRAINT history_range CHECK (task_inserted_at < %L::timestamptz)', low);

    -- The gaps between adopted ranges, then the future.
    previous := low;
    FOR part IN SELECT * FROM history_adopted ORDER BY lower LOOP
        IF part.lower < previous THEN
            RAISE EXCEPTION 'partitions of tasks overlap at %', part.lower;
        END IF;
        IF part.lower > previous THEN
            created := history_create_range_tables(previous, part.lower, '');
            EXECUTE format('ALTER TABLE tasks ATTACH PARTITION %s FOR VALUES FROM (%L) TO (%L)', created.tasks_relid::regclass, previous, part.lower);
            EXECUTE format('ALTER TABLE task_events ATTACH PARTITION %s FOR VALUES FROM (%L) TO (%L)', created.events_relid::regclass, previous, part.lower);
            INSERT INTO history_ranges (tasks_relid, events_relid, lower, upper, kind)
            VALUES (created.tasks_relid, created.events_relid, previous, part.lower, 'range');
        END IF;
        PERFORM history_install_triggers(part.tasks_relid::regclass, part.events_relid::regclass, part.lower, part.upper);
        INSERT INTO history_ranges (tasks_relid, events_relid, lower, upper, kind)
        VALUES (part.tasks_relid, part.events_relid, part.lower, part.upper, 'range');
        previous := part.upper;
    END LOOP;
    created := history_create_range_tables(high, 'infinity', '');
    EXECUTE format('ALTER TABLE tasks ATTACH PARTITION tasks_future FOR VALUES FROM (%L) TO (MAXVALUE)', high);
    EXECUTE format('ALTER TABLE task_events ATTACH PARTITION task_events_future FOR VALUES FROM (%L) TO (MAXVALUE)', high);
    INSERT INTO history_ranges (tasks_relid, events_relid, lower, upper, kind, settled_at)
    VALUES (created.tasks_relid, created.events_relid, high, 'infinity', 'future', now());

    PERFORM history_install_triggers('tasks_default'::regclass, 'task_events_default'::regclass, '-infinity', low);
    INSERT INTO history_ranges (tasks_relid, events_relid, lower, upper, kind)
    VALUES ('tasks_default'::regclass, 'task_events_default'::regclass, '-infinity', low, 'default');

    -- The moved rows find their partitions through the parents; the engine's own write, unlogged.
    PERFORM set_config('engine.retention_write', 'on', true);
    INSERT INTO tasks SELECT * FROM history_moved_tasks;
    INSERT INTO task_events OVERRIDING SYSTEM VALUE SELECT * FROM history_moved_events;
    PERFORM set_config('engine.retention_write', '', true);
END
$convert$;
