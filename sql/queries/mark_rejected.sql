-- Version $1 failed to compile with the error text $2, on node $3; the node keeps serving the
-- version it had. The first node to decide a version sets its status. Pending versions older
-- than $1 were never loaded on their own: they become `superseded`.
UPDATE config_versions
SET status = CASE WHEN id = $1 THEN 'rejected' ELSE 'superseded' END,
    error = CASE WHEN id = $1 THEN $2 END,
    decided_at = now(),
    decided_by = $3
WHERE status = 'pending' AND id <= $1;
