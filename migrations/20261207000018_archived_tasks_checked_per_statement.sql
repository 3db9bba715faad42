-- The link of an archived task's record to its archive is checked once per statement instead of
-- once per row. The foreign key's per-row check was half of what recording a file's runs cost
-- (100,000 records: 764 ms with it, 432 ms without; `bench history --archive`). The guarantee
-- stays, both ways:
-- * a record names an archive that is written: checked after each statement that records
--   (the trigger that already logs them);
-- * an archive is never deleted while a record names it: checked after each statement that
--   deletes archives. Records are written in the transaction that marks their archive
--   `written` (after that update, whose row lock makes a concurrent delete of the archive wait,
--   and then see the records).
ALTER TABLE retention_archived_tasks DROP CONSTRAINT retention_archived_tasks_archive_id_fkey;

CREATE OR REPLACE FUNCTION retention_log_archived() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing bigint;
BEGIN
    SELECT n.archive_id INTO missing FROM added n
     WHERE NOT EXISTS (SELECT 1 FROM retention_archives a WHERE a.id = n.archive_id AND a.state = 'written')
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'an archived task''s record names archive %, which is not a written archive', missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    INSERT INTO history_changes (relid, op, tenant_id)
        SELECT DISTINCT 0, 'T', a.tenant_id FROM added n JOIN retention_archives a ON a.id = n.archive_id;
    RETURN NULL;
END
$$;

CREATE FUNCTION retention_archives_check_unreferenced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    named bigint;
BEGIN
    SELECT g.id INTO named FROM gone g
     WHERE EXISTS (SELECT 1 FROM retention_archived_tasks ra WHERE ra.archive_id = g.id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'archive % is still named by archived tasks'' records: it cannot be deleted', named
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER retention_archives_unreferenced AFTER DELETE ON retention_archives
    REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION retention_archives_check_unreferenced();

-- The foreign key also refused a TRUNCATE of the archives while records named them.
CREATE FUNCTION retention_archives_check_not_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM retention_archived_tasks) THEN
        RAISE EXCEPTION 'retention_archives cannot be truncated while archived tasks'' records name its archives'
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER retention_archives_not_truncated BEFORE TRUNCATE ON retention_archives
    FOR EACH STATEMENT EXECUTE FUNCTION retention_archives_check_not_truncated();
