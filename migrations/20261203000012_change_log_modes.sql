-- The change log's triggers no longer read the database's clock.
--
-- Until now a range's triggers skipped the writes made during its own live window, judged by
-- `clock_timestamp()`: a database clock stepped back into a settled range's window let writes to
-- it skip the log, and the facts missed them. Now each range's triggers are in a mode the engine
-- sets, recorded in `history_ranges.log_mode`:
--
--   * `live`: the range is being filled (today, the days made ahead, a range adopted from an
--     operator). Only a task whose finish instant lies before the range is logged (it could be
--     due early); the range's facts are not trusted, it is probed. Once its end has passed by the
--     engine's checked clock, the engine switches it to `all` (DDL that waits for the writers in
--     flight, so every unlogged write has committed) and rebuilds its facts from its rows.
--   * `all`: every write is logged except the engine's own (`engine.retention_write`), which keep
--     the facts themselves. Past ranges, the default range, the future range.
--   * `rewrite`: every write is logged, the engine's row deletes too: the range is being rewritten
--     and its rewrite replays them all.

ALTER TABLE history_ranges
    ADD COLUMN log_mode text NOT NULL DEFAULT 'all'
        CONSTRAINT history_ranges_log_mode_known CHECK (log_mode IN ('live', 'all', 'rewrite'));

-- The ranges whose writes were not all logged: those whose window has not passed since their facts
-- were last rebuilt (or never were).
UPDATE history_ranges SET log_mode = 'live'
WHERE kind = 'range' AND (settled_at IS NULL OR settled_at < upper);

-- A future range whose start passed while the engine did not run had writes go unlogged: its facts
-- are rebuilt before they are trusted again.
UPDATE history_ranges SET settled_at = NULL WHERE kind = 'future' AND lower <= now();

-- The wait for older transactions before a rebuild is replaced by the switch's lock.
ALTER TABLE history_ranges DROP COLUMN settle_xid;

DROP FUNCTION history_create_range_tables(timestamptz, timestamptz, text);
DROP FUNCTION history_install_triggers(regclass, regclass, timestamptz, timestamptz);

CREATE FUNCTION history_install_triggers(tasks_part regclass, events_part regclass, lower timestamptz, mode text)
    RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    not_engine constant text := $q$current_setting('engine.retention_write', true) IS DISTINCT FROM 'on'$q$;
    old record;
BEGIN
    IF mode NOT IN ('live', 'all', 'rewrite') THEN
        RAISE EXCEPTION 'unknown change-log mode %: allowed: live, all, rewrite', mode;
    END IF;
    FOR old IN SELECT tgrelid::regclass AS rel, tgname FROM pg_trigger
               WHERE tgrelid IN (tasks_part, events_part) AND tgname IN ('history_log_write', 'history_log_delete', 'history_log') LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', old.tgname, old.rel);
    END LOOP;
    IF mode = 'live' THEN
        EXECUTE format(
            'CREATE TRIGGER history_log_write AFTER INSERT OR UPDATE ON %s FOR EACH ROW
             WHEN (%s AND coalesce(NEW.finished_at, NEW.inserted_at) < %L::timestamptz)
             EXECUTE FUNCTION history_log_task()', tasks_part, not_engine, lower);
    ELSE
        EXECUTE format(
            'CREATE TRIGGER history_log_write AFTER INSERT OR UPDATE ON %s FOR EACH ROW %s EXECUTE FUNCTION history_log_task()',
            tasks_part, CASE WHEN mode = 'all' THEN format('WHEN (%s)', not_engine) ELSE '' END);
        EXECUTE format(
            'CREATE TRIGGER history_log_delete AFTER DELETE ON %s FOR EACH ROW %s EXECUTE FUNCTION history_log_task()',
            tasks_part, CASE WHEN mode = 'all' THEN format('WHEN (%s)', not_engine) ELSE '' END);
        EXECUTE format(
            'CREATE TRIGGER history_log AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW %s EXECUTE FUNCTION history_log_event()',
            events_part, CASE WHEN mode = 'all' THEN format('WHEN (%s)', not_engine) ELSE '' END);
    END IF;
END
$$;

-- As before, with the change log's mode to start in.
CREATE FUNCTION history_create_range_tables(lower timestamptz, upper timestamptz, suffix text, mode text,
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
    PERFORM history_install_triggers(tasks_relid::regclass, events_relid::regclass, lower, mode);
END
$$;

-- Every attached range's triggers, in its mode.
DO $modes$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM history_ranges LOOP
        PERFORM history_install_triggers(r.tasks_relid::regclass, r.events_relid::regclass, r.lower, r.log_mode);
    END LOOP;
END
$modes$;
