-- A node now serves version $1; $2 names the node (e.g. its host name).
-- The first node to decide a version sets its status; later nodes change nothing. Pending
-- versions older than $1 were never loaded on their own: they become `superseded`.
UPDATE config_versions
SET status = CASE WHEN id = $1 THEN 'applied' ELSE 'superseded' END,
    decided_at = now(),
    decided_by = $2
WHERE status = 'pending' AND id <= $1;
