-- The engine's data model: tenants, users and their sessions, and run history (tasks, their
-- events and queue items). Every column beyond the documented contract has a default, so inserts
-- that name only the contract's columns work.

CREATE TABLE tenants (
    id                    uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    slug                  text        NOT NULL UNIQUE,
    name                  text        NOT NULL,
    -- How long this tenant's finished run history is kept. NULL keeps it forever.
    data_retention_period interval    NULL DEFAULT '30 days',
    deleted_at            timestamptz NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenants_data_retention_period_at_least_1_hour
        CHECK (data_retention_period IS NULL OR data_retention_period >= interval '1 hour')
);

CREATE TABLE users (
    id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    email      text        NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE user_sessions (
    id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid        NULL REFERENCES users ON DELETE CASCADE,
    data       jsonb       NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
-- The sessions task walks each rule's index in key order with a cursor, so a batch reads only
-- the rows it deletes: expired sessions by expiry, anonymous ones by age.
CREATE INDEX user_sessions_expires_at_idx ON user_sessions (expires_at, id);
CREATE INDEX user_sessions_anonymous_created_at_idx ON user_sessions (created_at, id) WHERE user_id IS NULL;
-- Deleting a user cascades to its sessions.
CREATE INDEX user_sessions_user_id_idx ON user_sessions (user_id) WHERE user_id IS NOT NULL;

-- Run history is partitioned by the task's insertion time, so that whole days can be dropped
-- instead of deleted row by row. The default partitions take rows at any date that no other
-- partition covers, so an insert never fails for want of a partition.
CREATE TABLE tasks (
    id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    tenant_id   uuid        NOT NULL,
    status      text        NOT NULL
        CONSTRAINT tasks_status_known CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    inserted_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz NULL,
    payload     jsonb       NULL,
    PRIMARY KEY (id, inserted_at)
) PARTITION BY RANGE (inserted_at);
CREATE TABLE tasks_default PARTITION OF tasks DEFAULT;
CREATE INDEX tasks_tenant_id_idx ON tasks (tenant_id);

-- Events are partitioned like their task (on the task's inserted_at), so a day's tasks and their
-- events leave together. No foreign key to tasks: referential cleanup is the controller's job.
CREATE TABLE task_events (
    id               bigint      GENERATED ALWAYS AS IDENTITY,
    tenant_id        uuid        NOT NULL,
    task_id          uuid        NOT NULL,
    task_inserted_at timestamptz NOT NULL,
    event_type       text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    data             jsonb       NULL,
    PRIMARY KEY (id, task_inserted_at)
) PARTITION BY RANGE (task_inserted_at);
CREATE TABLE task_events_default PARTITION OF task_events DEFAULT;
CREATE INDEX task_events_task_idx ON task_events (task_id, task_inserted_at);

CREATE TABLE queue_items (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id        uuid        NOT NULL,
    task_id          uuid        NOT NULL,
    task_inserted_at timestamptz NOT NULL,
    queue            text        NOT NULL DEFAULT 'default',
    priority         int         NOT NULL DEFAULT 0,
    inserted_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX queue_items_task_idx ON queue_items (task_id, task_inserted_at);
