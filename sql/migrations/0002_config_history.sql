-- 0002_config_history: the whole config document of every version, for diff and rollback.
--
-- `config_versions` records who changed the config, when and why; `config_snapshots` keeps
-- what the config was at each version. A deferred trigger fills it at COMMIT, while the
-- transaction still holds the writer lock and sees all of its own writes, so every version gets
-- its document however it was written: `gatehouse config push`, the admin API, or plain SQL.
--
-- Like 0001: applied with the simple query protocol inside one transaction, every statement
-- can run again, and no name is schema-qualified.

-- The config document as the tables hold it now: the `document` part of
-- sql/queries/load_config.sql (a test checks that the two agree on every example config).
CREATE OR REPLACE FUNCTION gatehouse_config_document() RETURNS jsonb
LANGUAGE sql STABLE AS $$
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
    )
$$;

-- One row per version: the document the version's transaction committed.
CREATE TABLE IF NOT EXISTS config_snapshots (
    version_id  bigint PRIMARY KEY REFERENCES config_versions (id) ON DELETE CASCADE,
    document    jsonb NOT NULL,
    taken_at    timestamptz NOT NULL DEFAULT now()
);

-- At COMMIT of a transaction that made a version: its document.
CREATE OR REPLACE FUNCTION gatehouse_snapshot_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO config_snapshots (version_id, document)
    VALUES (NEW.id, gatehouse_config_document())
    ON CONFLICT (version_id) DO UPDATE SET document = EXCLUDED.document, taken_at = now();
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS gatehouse_snapshot ON config_versions;
CREATE CONSTRAINT TRIGGER gatehouse_snapshot AFTER INSERT ON config_versions
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION gatehouse_snapshot_version();

-- A store written before this migration: its latest version gets the document it serves now
-- (the documents of older versions were never kept).
INSERT INTO config_snapshots (version_id, document)
SELECT id, gatehouse_config_document()
FROM config_versions
ORDER BY id DESC
LIMIT 1
ON CONFLICT (version_id) DO NOTHING;
