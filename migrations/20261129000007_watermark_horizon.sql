-- A walk of ids may only pass ids whose inserting transactions have all ended: an id taken by a
-- transaction that commits late would otherwise fall behind the watermark and never be seen.
-- `pending_position` is the sequence's last value as read once, `pending_snapshot` a snapshot
-- taken just after: once every transaction in progress in it has ended, every id up to
-- `pending_position` is settled.
ALTER TABLE retention_watermarks
    ADD COLUMN pending_position bigint,
    ADD COLUMN pending_snapshot pg_snapshot;
