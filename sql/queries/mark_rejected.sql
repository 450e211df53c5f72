-- Version $1 failed to compile with the error text $2, on node $3, whose operations listener is
-- at $4 (NULL without one); the node keeps serving the version it had.
-- The node's own row in config_nodes records the refusal and why. The first node to decide a
-- version sets its status in config_versions. Pending versions older than $1 were never loaded
-- on their own: they become `superseded`.
WITH node AS (
    INSERT INTO config_nodes (node, rejected_version, rejected_error, rejected_at, ops_address,
                              seen_at)
    VALUES ($3, $1, $2, now(), $4, now())
    ON CONFLICT (node) DO UPDATE
    SET rejected_version = EXCLUDED.rejected_version,
        rejected_error = EXCLUDED.rejected_error,
        rejected_at = EXCLUDED.rejected_at,
        ops_address = EXCLUDED.ops_address,
        seen_at = EXCLUDED.seen_at
)
UPDATE config_versions
SET status = CASE WHEN id = $1 THEN 'rejected' ELSE 'superseded' END,
    error = CASE WHEN id = $1 THEN $2 END,
    decided_at = now(),
    decided_by = $3
WHERE status = 'pending' AND id <= $1;
