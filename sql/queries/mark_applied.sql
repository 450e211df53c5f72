-- A node now serves version $1; $2 names the node (e.g. its host name), $3 is the address of
-- its operations listener (NULL without one).
-- The node's own row in config_nodes says what it serves; a refusal of an older version is no
-- longer news and is cleared. The first node to decide a version sets its status in
-- config_versions; later nodes change nothing there. Pending versions older than $1 were never
-- loaded on their own: they become `superseded`.
WITH node AS (
    INSERT INTO config_nodes (node, applied_version, applied_at, ops_address, seen_at)
    VALUES ($2, $1, now(), $3, now())
    ON CONFLICT (node) DO UPDATE
    SET applied_version = EXCLUDED.applied_version,
        applied_at = EXCLUDED.applied_at,
        ops_address = EXCLUDED.ops_address,
        seen_at = EXCLUDED.seen_at,
        rejected_version = CASE WHEN config_nodes.rejected_version > EXCLUDED.applied_version
                                THEN config_nodes.rejected_version END,
        rejected_error = CASE WHEN config_nodes.rejected_version > EXCLUDED.applied_version
                              THEN config_nodes.rejected_error END,
        rejected_at = CASE WHEN config_nodes.rejected_version > EXCLUDED.applied_version
                           THEN config_nodes.rejected_at END
)
UPDATE config_versions
SET status = CASE WHEN id = $1 THEN 'applied' ELSE 'superseded' END,
    decided_at = now(),
    decided_by = $2
WHERE status = 'pending' AND id <= $1;
