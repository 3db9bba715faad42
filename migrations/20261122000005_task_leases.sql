-- One runner per task across every replica: a lease in `maintenance_tasks`, taken with a
-- conditional upsert, renewed by its holder every third of its time to live, released when the
-- run ends. A holder that dies (or hangs, or loses the network) stops renewing, and its lease
-- expires by the database's clock. Replaces the session-level advisory locks of earlier
-- versions, which a hung holder kept and a transaction-pooling proxy (PgBouncer) breaks.
ALTER TABLE maintenance_tasks
    ADD COLUMN lease_run_id     uuid        NULL,
    ADD COLUMN lease_holder     text        NULL,
    ADD COLUMN lease_expires_at timestamptz NULL;
