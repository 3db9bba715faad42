-- The rules' check reads the current version in a fresh snapshot, which only READ COMMITTED
-- takes per statement: under REPEATABLE READ (an operator's `default_transaction_isolation`, say)
-- it would read the transaction's first snapshot, and a hold committed after that would pass
-- unseen. The engine's deleting transactions say READ COMMITTED explicitly; the check now also
-- refuses to run under any other level, so that no path can get this wrong quietly.
CREATE OR REPLACE FUNCTION retention_rules_unchanged(seen bigint) RETURNS void LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    current_version bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'retention_rules_unchanged needs READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'a deleting transaction must begin with ISOLATION LEVEL READ COMMITTED';
    END IF;
    IF NOT pg_try_advisory_xact_lock_shared(retention_rules_lock_key()) THEN
        RAISE EXCEPTION 'a change of retention rules (a window, a deleted tenant, a hold) is being committed'
            USING ERRCODE = 'serialization_failure', HINT = 'run the batch again';
    END IF;
    SELECT version INTO current_version FROM retention_rules;
    IF current_version IS DISTINCT FROM seen THEN
        RAISE EXCEPTION 'retention rules changed (version % became %) while the batch ran', seen, current_version
            USING ERRCODE = 'serialization_failure', HINT = 'run the batch again';
    END IF;
END
$$;
