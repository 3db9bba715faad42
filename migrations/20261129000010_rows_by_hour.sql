-- Rows deleted per task and hour, for the status page's charts (the last 24 hours, the last 30
-- days): the run log keeps 500 runs per task, under two days of `queue-items` at its 5-minute
-- interval. A run's rows count in the hour it finished. Written with the run's end (one upsert),
-- trimmed to 31 days at the same time: at most 4 tasks x 744 hours of rows.
CREATE TABLE maintenance_rows_by_hour (
    task   text        NOT NULL,
    hour   timestamptz NOT NULL,
    rows   bigint      NOT NULL DEFAULT 0,
    runs   integer     NOT NULL DEFAULT 0,
    failed integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (task, hour)
);
CREATE INDEX maintenance_rows_by_hour_hour_idx ON maintenance_rows_by_hour (hour);
