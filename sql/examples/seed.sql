-- An example config store: conf/examples/routing.yaml and conf/examples/auth.yaml in one
-- version, written by hand. Their entities do not overlap, so together they are one valid
-- config: the routing.yaml routes come first, then the auth.yaml ones.
--
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/migrations/0001_config_store.sql
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/examples/seed.sql
--
-- Rows are inserted without `position`, so each list keeps the order of the INSERTs. Keys the
-- YAML leaves out are left NULL, so the model's defaults apply.

BEGIN;

SELECT gatehouse_begin_version('seed', 'conf/examples/routing.yaml and auth.yaml');

-- Sections. `server` is owned by each node's local file; it is stored so that the document
-- read back is the whole file.
INSERT INTO settings (section, value) VALUES
    ('server', '{"listeners": [{"name": "public", "address": "127.0.0.1:8080"}]}'),
    ('redis', '{"url": "redis://127.0.0.1:6379", "command_timeout": "5ms"}'),
    ('auth', '{
        "anonymous": "guest",
        "api_key_secret": "${env:GATEHOUSE_API_KEY_SECRET}",
        "upstream_headers": {
            "consumer_id": "x-consumer-id",
            "consumer_username": "x-consumer-username",
            "subject": "x-authenticated-subject"
        }
    }');

INSERT INTO upstreams (name) VALUES ('users'), ('users-v2'), ('admin'), ('api'), ('web');
INSERT INTO targets (upstream, address) VALUES
    ('users', '127.0.0.1:9001'),
    ('users-v2', '127.0.0.1:9002'),
    ('admin', '127.0.0.1:9003'),
    ('api', '127.0.0.1:9001'),
    ('web', '127.0.0.1:9002');

INSERT INTO consumers (id, username, tags) VALUES ('acme', 'acme-corp', ARRAY['partner']);
INSERT INTO consumers (id) VALUES ('guest');
INSERT INTO credentials (consumer, type, hash, disabled, expires_at) VALUES
    ('acme', 'api_key',
     'sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08', NULL, NULL),
    ('acme', 'api_key',
     'sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae', true, NULL),
    ('acme', 'api_key',
     'sha256:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9', NULL,
     '2027-06-30T00:00:00Z');
INSERT INTO credentials (consumer, type, issuer, subject) VALUES
    ('acme', 'jwt', 'https://id.example.com', 'acme-service');

-- The global chain.
INSERT INTO filters (route, kind) VALUES (NULL, 'request_id');

-- routing.yaml
INSERT INTO routes (name, match, upstream, strip_prefix) VALUES
    ('users',
     '{"hosts": ["api.example.com", "*.api.example.com"],
       "paths": [{"prefix": "/users"}],
       "methods": ["GET", "POST"]}',
     'users', '/users');
INSERT INTO routes (name, match, upstream) VALUES
    ('users-v2-preview',
     '{"hosts": ["api.example.com"],
       "paths": [{"prefix": "/users"}],
       "headers": [{"name": "x-api-version", "equals": "2"}],
       "query": [{"name": "preview", "present": true}]}',
     'users-v2');
INSERT INTO routes (name, priority, match, upstream, rewrite) VALUES
    ('versioned', 10,
     '{"paths": [{"regex": "/v(?P<version>[0-9]+)/users/(?P<id>[^/]+)"}]}',
     'users-v2', '/u/${id}?version=${version}');
INSERT INTO routes (name, match, upstream, timeout) VALUES
    ('admin',
     '{"paths": [{"prefix": "/admin"}],
       "headers": [{"name": "x-admin-client", "regex": "^ops-[a-z]+$"}]}',
     'admin', '5s');

-- auth.yaml
INSERT INTO routes (name, match, upstream, auth) VALUES
    ('api', '{"paths": [{"prefix": "/api"}]}', 'api', 'required'),
    ('partner', '{"paths": [{"prefix": "/partner"}]}', 'api', 'required'),
    ('web', '{"paths": [{"prefix": "/"}]}', 'web', 'required'),
    ('catalog', '{"paths": [{"prefix": "/catalog"}]}', 'api', 'optional'),
    ('partner-limited', '{"paths": [{"prefix": "/partner/bulk"}]}', 'api', 'required');

INSERT INTO filters (route, kind, config) VALUES
    ('api', 'jwt', '{
        "issuer": "https://id.example.com",
        "jwks_url": "https://id.example.com/.well-known/jwks.json",
        "algorithms": ["RS256", "ES256"],
        "audiences": ["api"],
        "leeway": "30s",
        "require": [{"claim": "scope", "contains": "api:read"}]
    }'),
    ('api', 'api_key', '{"header": "x-api-key"}'),
    ('partner', 'oauth2', '{
        "introspection_url": "https://id.example.com/oauth2/introspect",
        "client_id": "gatehouse",
        "client_secret": "${env:GATEHOUSE_OAUTH_CLIENT_SECRET}",
        "required_scopes": ["partner"],
        "timeout": "500ms",
        "cache_ttl": "5m",
        "negative_cache_ttl": "10s"
    }'),
    ('web', 'oauth2', '{
        "mode": "login",
        "authorization_url": "https://id.example.com/oauth2/authorize",
        "token_url": "https://id.example.com/oauth2/token",
        "redirect_uri": "https://app.example.com/oauth2/callback",
        "client_id": "gatehouse-web",
        "client_secret": "${env:GATEHOUSE_OAUTH_CLIENT_SECRET}",
        "scopes": ["openid", "profile"],
        "session_ttl": "8h"
    }'),
    ('catalog', 'api_key', NULL),
    ('partner-limited', 'api_key', NULL),
    ('partner-limited', 'rate_limit', '{
        "policies": [
            {"name": "partner-burst", "key": ["consumer"], "capacity": 20,
             "refill": {"tokens": 5, "every": "1s"}},
            {"name": "partner-daily", "key": ["consumer"], "capacity": 10000,
             "refill": {"tokens": 10000, "every": "24h"}, "legacy_headers": true}
        ]
    }');

COMMIT;
