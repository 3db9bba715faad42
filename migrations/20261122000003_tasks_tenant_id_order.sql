-- Tasks by tenant, then id: a deleted tenant's history is purged by walking this index from a
-- cursor, so no batch re-reads what earlier batches deleted. It also serves everything the
-- (tenant_id) index did (the per-day skip scan over tenants present), which it replaces.
CREATE INDEX tasks_tenant_id_id_idx ON tasks (tenant_id, id);
DROP INDEX tasks_tenant_id_idx;
