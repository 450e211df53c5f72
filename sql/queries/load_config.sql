-- The whole config store as one document, with the version it is.
--
-- Run inside `BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY` ... `COMMIT`. One statement
-- already reads one snapshot; the transaction keeps any further reads of the same load on that
-- snapshot too. Writers are serialised and number their versions in commit order, so
-- `version_id` (the highest id visible) names exactly the rows this statement read. It is NULL
-- while nothing has ever been written.
--
-- `config` has the keys of the YAML model (`Config` and everything under it): deserialise it
-- with the same serde types as a file. A NULL column is an absent key (the model's default
-- applies). Lists come in `position` order. The `settings` rows become top-level sections as
-- stored, `${env:...}` references included.
--
-- `config_digest` fingerprints the document: equal digests, equal documents. A periodic resync
-- can skip compiling when neither it nor `version_id` moved.
WITH latest AS (
    SELECT id, author, comment, created_at, status
    FROM config_versions
    ORDER BY id DESC
    LIMIT 1
), document AS (
    SELECT
        jsonb_build_object('version', 1)
        || coalesce((SELECT jsonb_object_agg(setting.section, setting.value)
                     FROM settings AS setting), '{}'::jsonb)
        || jsonb_build_object(
            'upstreams', coalesce((
                SELECT jsonb_agg(
                    gatehouse_object(jsonb_build_object(
                        'name', upstream.name,
                        'targets', coalesce((
                            SELECT jsonb_agg(
                                gatehouse_object(jsonb_build_object(
                                    'address', target.address,
                                    'weight', target.weight))
                                || target.extra
                                ORDER BY target.position, target.id)
                            FROM targets AS target
                            WHERE target.upstream = upstream.name), '[]'::jsonb),
                        'balance', upstream.balance,
                        'hash_on', upstream.hash_on,
                        'protocol', upstream.protocol,
                        'tls', upstream.tls,
                        'timeouts', upstream.timeouts))
                    || upstream.extra
                    ORDER BY upstream.position, upstream.name)
                FROM upstreams AS upstream), '[]'::jsonb),
            'consumers', coalesce((
                SELECT jsonb_agg(
                    gatehouse_object(jsonb_build_object(
                        'id', consumer.id,
                        'username', consumer.username,
                        'tags', to_jsonb(consumer.tags),
                        'credentials', coalesce((
                            SELECT jsonb_agg(
                                gatehouse_object(jsonb_build_object(
                                    'type', credential.type,
                                    'hash', credential.hash,
                                    'disabled', credential.disabled,
                                    'expires_at', credential.expires_at,
                                    'issuer', credential.issuer,
                                    'subject', credential.subject))
                                || credential.extra
                                ORDER BY credential.position, credential.id)
                            FROM credentials AS credential
                            WHERE credential.consumer = consumer.id), '[]'::jsonb)))
                    || consumer.extra
                    ORDER BY consumer.position, consumer.id)
                FROM consumers AS consumer), '[]'::jsonb),
            'filters', coalesce((
                SELECT jsonb_agg(
                    gatehouse_object(jsonb_build_object(
                        'kind', filter.kind,
                        'config', filter.config))
                    || filter.extra
                    ORDER BY filter.position, filter.id)
                FROM filters AS filter
                WHERE filter.route IS NULL), '[]'::jsonb),
            'routes', coalesce((
                SELECT jsonb_agg(
                    gatehouse_object(jsonb_build_object(
                        'name', route.name,
                        'priority', route.priority,
                        'match', route.match,
                        'upstream', route.upstream,
                        'strip_prefix', route.strip_prefix,
                        'rewrite', route.rewrite,
                        'auth', route.auth,
                        'timeout', route.timeout,
                        'filters', coalesce((
                            SELECT jsonb_agg(
                                gatehouse_object(jsonb_build_object(
                                    'kind', filter.kind,
                                    'config', filter.config))
                                || filter.extra
                                ORDER BY filter.position, filter.id)
                            FROM filters AS filter
                            WHERE filter.route = route.name), '[]'::jsonb)))
                    || route.extra
                    ORDER BY route.position, route.name)
                FROM routes AS route), '[]'::jsonb)
        ) AS config
)
SELECT
    latest.id AS version_id,
    latest.author AS version_author,
    latest.comment AS version_comment,
    latest.created_at AS version_created_at,
    latest.status AS version_status,
    statement_timestamp() AS read_at,
    document.config,
    md5(document.config::text) AS config_digest
FROM document
LEFT JOIN latest ON true;
