-- Queue items that may have become due, so that `queue-items` finds them without walking the
-- whole table: a task with queue items that finishes, or that something other than the engine's
-- own purge deletes, is recorded here by a row trigger on `tasks`. The triggers' WHEN clauses
-- keep every other write free of them: an update that does not finish a task, and the engine's
-- purge batches (which delete queue items with their tasks) never call the function. Items of
-- deleted tenants are found through `queue_items_tenant_id_idx`; anything else (an item added
-- for a task already finished) by the periodic heap walk.
CREATE TABLE queue_item_candidates (
    task_id          uuid        NOT NULL,
    task_inserted_at timestamptz NOT NULL,
    logged_at        timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION queue_items_log_candidate() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    task tasks%ROWTYPE := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
BEGIN
    IF EXISTS (SELECT 1 FROM queue_items q WHERE q.task_id = task.id AND q.task_inserted_at = task.inserted_at) THEN
        INSERT INTO queue_item_candidates (task_id, task_inserted_at) VALUES (task.id, task.inserted_at);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER queue_items_candidate_on_finish AFTER UPDATE OF status ON tasks FOR EACH ROW
    WHEN (NEW.status IN ('succeeded', 'failed', 'cancelled') AND OLD.status NOT IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION queue_items_log_candidate();
CREATE TRIGGER queue_items_candidate_on_delete AFTER DELETE ON tasks FOR EACH ROW
    WHEN (current_setting('engine.retention_write', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION queue_items_log_candidate();
