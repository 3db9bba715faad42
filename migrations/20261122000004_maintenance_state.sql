-- Operator controls and the run log of the retention controller.
--
-- One row per task that has ever run or been paused: whether it is paused (obeyed by every
-- replica before each run) and how its last run went.
CREATE TABLE maintenance_tasks (
    task             text        PRIMARY KEY,
    paused           boolean     NOT NULL DEFAULT false,
    paused_at        timestamptz NULL,
    last_run_id      uuid        NULL,
    last_started_at  timestamptz NULL,
    last_finished_at timestamptz NULL,
    last_outcome     text        NULL,
    last_rows        bigint      NULL,
    last_success_at  timestamptz NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- One row per run, kept bounded by the controller (the newest runs per task, and nothing older
-- than their retention; see retention.runs.*).
CREATE TABLE maintenance_runs (
    run_id      uuid        PRIMARY KEY,
    task        text        NOT NULL,
    replica     text        NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NULL,
    rows        bigint      NULL,
    outcome     text        NULL
        CONSTRAINT maintenance_runs_outcome_known
        CHECK (outcome IN ('done', 'deadline reached', 'cancelled', 'failed')),
    error       text        NULL
);
CREATE INDEX maintenance_runs_task_started_idx ON maintenance_runs (task, started_at DESC);
