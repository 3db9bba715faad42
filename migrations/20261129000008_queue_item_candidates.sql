-- Queue items that may have become due, so that `queue-items` finds them without walking the
-- whole table: a task with queue items that finished or was deleted is recorded here by a
-- statement trigger on `tasks` (one probe of `queue_items_task_idx` per finished or deleted
-- task). Items of deleted tenants are found through `queue_items_tenant_id_idx`; anything else
-- (an item added for a task already finished) by the periodic heap walk.
CREATE TABLE queue_item_candidates (
    task_id          uuid        NOT NULL,
    task_inserted_at timestamptz NOT NULL,
    logged_at        timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION queue_items_log_candidates() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO queue_item_candidates (task_id, task_inserted_at)
    SELECT DISTINCT t.id, t.inserted_at FROM changed t
    WHERE (TG_OP = 'DELETE' OR t.status IN ('succeeded', 'failed', 'cancelled'))
      AND EXISTS (SELECT 1 FROM queue_items q WHERE q.task_id = t.id AND q.task_inserted_at = t.inserted_at);
    RETURN NULL;
END
$$;

CREATE TRIGGER queue_items_candidates_on_update AFTER UPDATE ON tasks
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION queue_items_log_candidates();
CREATE TRIGGER queue_items_candidates_on_delete AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION queue_items_log_candidates();
