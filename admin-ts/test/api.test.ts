// The admin API against a real PostgreSQL, with the service run as a real process.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { after, before, describe, it } from 'node:test';
import { bootstrapToken, call, createDatabase, startAdmin, type Admin, type TestDatabase } from './support.ts';

let db: TestDatabase;
let admin: Admin;
let token: string;
const api = (method: string, path: string, options: Parameters<typeof call>[3] = {}) =>
  call(admin.url, method, `/api/v1${path}`, { token, ...options });

async function makeToken(role: string, expiresIn = '1h'): Promise<string> {
  const made = await api('POST', '/tokens', { body: { name: `${role}-test`, role, expires_in: expiresIn } });
  assert.equal(made.status, 201, made.text);
  return made.body.token as string;
}

const baseConfig = {
  version: 1,
  upstreams: [{ name: 'users', targets: [{ address: '127.0.0.1:9001' }] }],
  routes: [{ name: 'users', match: { paths: [{ prefix: '/users' }] }, upstream: 'users' }],
};

before(async () => {
  db = await createDatabase();
  token = bootstrapToken(db.url);
  admin = await startAdmin(db.url, { GATEHOUSE_ADMIN_BODY_LIMIT: '65536' });
  const current = await api('GET', '/config');
  const put = await api('PUT', '/config', { body: baseConfig, headers: { 'if-match': current.headers.get('etag') as string } });
  assert.equal(put.status, 200, put.text);
});

after(async () => {
  await admin?.stop();
  await db?.drop();
});

describe('authorization', () => {
  it('refuses a request without a token with 401 problem+json', async () => {
    const answer = await call(admin.url, 'GET', '/api/v1/config');
    assert.equal(answer.status, 401);
    assert.match(answer.headers.get('content-type') ?? '', /^application\/problem\+json/);
    assert.match(answer.headers.get('www-authenticate') ?? '', /^Bearer/);
    assert.equal(answer.body.status, 401);
  });

  it('refuses an unknown token, an expired token and a revoked token with 401', async () => {
    assert.equal((await call(admin.url, 'GET', '/api/v1/config', { token: 'ghadm_not-a-token' })).status, 401);
    const expiring = await makeToken('read');
    assert.equal((await call(admin.url, 'GET', '/api/v1/routes', { token: expiring })).status, 200);
    await db.sql`UPDATE admin_tokens SET expires_at = now() - interval '1 second' WHERE name = 'read-test'`;
    const expired = await call(admin.url, 'GET', '/api/v1/routes', { token: expiring });
    assert.equal(expired.status, 401);
    assert.match(expired.body.detail, /expired/);
    const revoked = await makeToken('write');
    const list = await api('GET', '/tokens');
    const id = list.body.items.find((item: { name: string; revoked_at: string | null }) => item.name === 'write-test' && !item.revoked_at).id;
    assert.equal((await api('DELETE', `/tokens/${id}`)).status, 204);
    const after = await call(admin.url, 'GET', '/api/v1/routes', { token: revoked });
    assert.equal(after.status, 401);
    assert.match(after.body.detail, /revoked/);
  });

  it('gives a read token 403 on a write, and a write token 403 on tokens and audit', async () => {
    const read = await makeToken('read');
    const write = await makeToken('write');
    const refused = await call(admin.url, 'POST', '/api/v1/upstreams', { token: read, body: { name: 'x', targets: [] } });
    assert.equal(refused.status, 403);
    assert.match(refused.body.detail, /write token/);
    assert.equal((await call(admin.url, 'GET', '/api/v1/tokens', { token: write })).status, 403);
    assert.equal((await call(admin.url, 'GET', '/api/v1/audit', { token: write })).status, 403);
    assert.equal((await call(admin.url, 'GET', '/api/v1/versions', { token: read })).status, 200);
  });

  it('stores tokens only as hashes and never shows or logs them', async () => {
    const made = await api('POST', '/tokens', { body: { name: 'secret-test', role: 'read' } });
    const value = made.body.token as string;
    assert.match(value, /^ghadm_[A-Za-z0-9_-]{43}$/);
    await call(admin.url, 'GET', '/api/v1/routes', { token: value });
    await call(admin.url, 'GET', `/api/v1/routes?cursor=${value}`, { token: value });
    const listed = await api('GET', '/tokens');
    assert.ok(!listed.text.includes(value));
    assert.ok(!listed.text.includes('sha256:'));
    const rows = await db.sql`SELECT * FROM admin_tokens`;
    assert.ok(!JSON.stringify(rows, (_key, item) => (typeof item === 'bigint' ? String(item) : item)).includes(value));
    assert.ok(rows.every((row) => /^sha256:[0-9a-f]{64}$/.test(row.hash as string)));
    assert.ok(!admin.logs().includes(value), 'a token appeared in the service log');
    assert.ok(!admin.logs().includes(token), 'the admin token appeared in the service log');
  });

  it('lets the bootstrap make the first token only', () => {
    const again = spawnSync('npx', ['--prefix', '.', 'gatehousectl', 'token', 'create', '--bootstrap', '--role', 'admin'], {
      env: { ...process.env, GATEHOUSE_DATABASE_URL: db.url },
      encoding: 'utf8',
    });
    assert.equal(again.status, 1);
    assert.equal(again.stdout, '');
    assert.match(again.stderr, /only while no token exists/);
  });
});

describe('the whole document', () => {
  it('needs If-Match to replace it: 428 without, 412 when stale', async () => {
    const current = await api('GET', '/config');
    assert.match(current.headers.get('etag') ?? '', /^"v\d+"$/);
    const without = await api('PUT', '/config', { body: current.body });
    assert.equal(without.status, 428);
    const stale = await api('PUT', '/config', { body: current.body, headers: { 'if-match': '"v0"' } });
    assert.equal(stale.status, 412);
    assert.equal(stale.headers.get('etag'), current.headers.get('etag'));
  });

  it('lets exactly one of two PUTs with the same ETag through, and loses no update', async () => {
    const current = await api('GET', '/config');
    const etag = current.headers.get('etag') as string;
    const versionsBefore = (await db.sql`SELECT count(*)::int AS n FROM config_versions`)[0]?.n as number;
    const variant = (marker: string) => ({
      ...current.body,
      upstreams: [...current.body.upstreams, { name: `race-${marker}`, targets: [{ address: '127.0.0.1:9100' }] }],
    });
    const answers = await Promise.all(
      ['a', 'b'].map((marker) => api('PUT', '/config', { body: variant(marker), headers: { 'if-match': etag } })),
    );
    const statuses = answers.map((answer) => answer.status).sort();
    assert.deepEqual(statuses, [200, 412]);
    const winner = answers.find((answer) => answer.status === 200) as { body: { upstreams: { name: string }[] } };
    const stored = await api('GET', '/config');
    assert.deepEqual(stored.body.upstreams.map((u: { name: string }) => u.name), winner.body.upstreams.map((u) => u.name));
    const versionsAfter = (await db.sql`SELECT count(*)::int AS n FROM config_versions`)[0]?.n as number;
    assert.equal(versionsAfter, versionsBefore + 1);
    // The loser retries on the new ETag and both changes are kept.
    const loser = answers.find((answer) => answer.status === 412) as unknown;
    assert.ok(loser);
    const next = await api('GET', '/config');
    const both = { ...next.body, upstreams: [...next.body.upstreams, { name: 'race-retry', targets: [{ address: '127.0.0.1:9400' }] }] };
    assert.equal((await api('PUT', '/config', { body: both, headers: { 'if-match': next.headers.get('etag') as string } })).status, 200);
    const names = (await api('GET', '/config')).body.upstreams.map((u: { name: string }) => u.name);
    assert.ok(names.includes('race-retry') && names.some((name: string) => name.startsWith('race-') && name !== 'race-retry'));
  });

  it('refuses an invalid document with every error and its path, and stores nothing', async () => {
    const current = await api('GET', '/config');
    const versionsBefore = await db.sql`SELECT max(id) AS id FROM config_versions`;
    const bad = {
      ...current.body,
      routes: [{ name: 'bad', upstream: 'users', match: { paths: [{ prefix: 5 }] }, colour: 'red' }],
      upstreams: [{ name: 'users', targets: [{ address: '127.0.0.1:9001', weight: 'heavy' }] }],
    };
    const answer = await api('PUT', '/config', { body: bad, headers: { 'if-match': current.headers.get('etag') as string } });
    assert.equal(answer.status, 400);
    assert.match(answer.headers.get('content-type') ?? '', /^application\/problem\+json/);
    const paths = answer.body.errors.map((error: { path: string }) => error.path);
    assert.ok(paths.includes('routes[0].colour'), paths.join(', '));
    assert.ok(paths.some((path: string) => path.startsWith('upstreams[0].targets[0].weight')), paths.join(', '));
    assert.deepEqual(await db.sql`SELECT max(id) AS id FROM config_versions`, versionsBefore);
    assert.ok(!answer.text.includes('SELECT') && !answer.text.includes(' at '), answer.text);
  });

  it('accepts YAML and validates without storing', async () => {
    const yaml = 'version: 1\nupstreams: [{ name: u, targets: [{ address: "127.0.0.1:1" }] }]\nroutes: []\n';
    const answer = await api('POST', '/config/validate', { raw: yaml, contentType: 'application/yaml' });
    assert.equal(answer.status, 200, answer.text);
    assert.equal(answer.body.ok, true);
    const broken = await api('POST', '/config/validate', { raw: 'routes: [{ name: r, upstream: nowhere }]\n', contentType: 'application/yaml' });
    assert.equal(broken.status, 400);
  });

  it('answers a body over the limit with 413, and a body that is not JSON with 400', async () => {
    const big = { version: 1, routes: [], upstreams: [{ name: 'u', targets: [], padding: 'x'.repeat(70_000) }] };
    const answer = await api('POST', '/config/validate', { body: big });
    assert.equal(answer.status, 413);
    assert.match(answer.headers.get('content-type') ?? '', /^application\/problem\+json/);
    const garbage = await api('POST', '/upstreams', { raw: '{"name": ', contentType: 'application/json' });
    assert.equal(garbage.status, 400);
    assert.match(garbage.headers.get('content-type') ?? '', /^application\/problem\+json/);
  });
});

describe('entries', () => {
  it('creates, reads, replaces, patches and deletes each kind with ETags', async () => {
    const cases = [
      ['upstreams', { name: 'crud', targets: [{ address: '127.0.0.1:9200' }] }, { balance: 'least_requests' }],
      ['routes', { name: 'crud', upstream: 'users', match: { paths: [{ prefix: '/crud' }] } }, { priority: 7 }],
      ['filters', { name: 'crud', kind: 'request_id' }, { config: { header: 'x-trace' } }],
      ['consumers', { id: 'crud', username: 'crud-user', tags: ['team-a'] }, { username: 'renamed' }],
    ] as const;
    for (const [collection, entry, change] of cases) {
      const key = 'id' in entry ? entry.id : entry.name;
      const created = await api('POST', `/${collection}`, { body: entry });
      assert.equal(created.status, 201, `${collection}: ${created.text}`);
      assert.equal(created.headers.get('location'), `/api/v1/${collection}/${key}`);
      assert.equal((await api('POST', `/${collection}`, { body: entry })).status, 409);
      const read = await api('GET', `/${collection}/${key}`);
      assert.equal(read.status, 200);
      const etag = read.headers.get('etag') as string;
      assert.match(etag, /^"[0-9a-f]{20}"$/);
      assert.equal((await api('PATCH', `/${collection}/${key}`, { body: change, contentType: 'application/merge-patch+json' })).status, 428);
      const patched = await api('PATCH', `/${collection}/${key}`, { body: change, contentType: 'application/merge-patch+json', headers: { 'if-match': etag } });
      assert.equal(patched.status, 200, `${collection}: ${patched.text}`);
      for (const [field, value] of Object.entries(change)) assert.deepEqual(patched.body[field], value);
      assert.equal((await api('PUT', `/${collection}/${key}`, { body: entry, headers: { 'if-match': etag } })).status, 412);
      const replaced = await api('PUT', `/${collection}/${key}`, { body: entry, headers: { 'if-match': patched.headers.get('etag') as string } });
      assert.equal(replaced.status, 200, replaced.text);
      const stored = (await api('GET', `/${collection}/${key}`)).body;
      for (const [field, value] of Object.entries(entry)) assert.deepEqual(stored[field], value, `${collection}.${field}`);
      const stale = await api('PATCH', `/${collection}/${key}`, { body: change, contentType: 'application/merge-patch+json', headers: { 'if-match': patched.headers.get('etag') as string } });
      assert.equal(stale.status, 412);
      const gone = await api('DELETE', `/${collection}/${key}`, { headers: { 'if-match': '*' } });
      assert.equal(gone.status, 204);
      assert.equal((await api('GET', `/${collection}/${key}`)).status, 404);
    }
  });

  it('creates with PUT, and refuses a body whose name differs from the URL', async () => {
    const created = await api('PUT', '/upstreams/by-put', { body: { targets: [{ address: '127.0.0.1:9400' }] } });
    assert.equal(created.status, 201);
    assert.equal(created.body.name, 'by-put');
    const mismatch = await api('PUT', '/upstreams/by-put', { body: { name: 'other', targets: [{ address: '127.0.0.1:9400' }] }, headers: { 'if-match': '*' } });
    assert.equal(mismatch.status, 400);
    assert.equal(mismatch.body.errors[0].path, 'name');
  });

  it('refuses to delete an upstream a route uses, naming the route', async () => {
    const answer = await api('DELETE', '/upstreams/users', { headers: { 'if-match': '*' } });
    assert.equal(answer.status, 409);
    assert.match(answer.body.detail, /"users"/);
  });

  it('refuses an invalid entry with the error paths of the whole document', async () => {
    const answer = await api('POST', '/routes', { body: { name: 'broken', upstream: 'users', match: { methods: 'GET' }, filters: [{ kind: 'no_such_kind' }] } });
    assert.equal(answer.status, 400);
    const paths: string[] = answer.body.errors.map((error: { path: string }) => error.path);
    assert.ok(paths.some((path) => /^routes\[\d+\]\.match\.methods/.test(path)), paths.join(', '));
    assert.ok(paths.some((path) => /^routes\[\d+\]\.filters\[0\]\.kind/.test(path)), paths.join(', '));
  });

  it('pages with limit and an opaque cursor, and filters by tag', async () => {
    for (let index = 0; index < 5; index += 1) {
      assert.equal((await api('POST', '/consumers', { body: { id: `page-${index}`, tags: index % 2 ? ['odd'] : ['even'] } })).status, 201);
    }
    const seen: string[] = [];
    let cursor: string | null = null;
    do {
      const query: string = cursor ? `&cursor=${encodeURIComponent(cursor)}` : '';
      const answer: { body: { items: { id: string }[]; next_cursor: string | null } } = await api('GET', `/consumers?limit=2${query}`);
      assert.ok(answer.body.items.length <= 2);
      seen.push(...answer.body.items.map((item) => item.id));
      cursor = answer.body.next_cursor;
    } while (cursor);
    assert.deepEqual(seen.filter((id) => id.startsWith('page-')), ['page-0', 'page-1', 'page-2', 'page-3', 'page-4']);
    const odd = await api('GET', '/consumers?tag=odd');
    assert.deepEqual(odd.body.items.map((item: { id: string }) => item.id), ['page-1', 'page-3']);
    assert.equal((await api('GET', '/consumers?cursor=garbage')).status, 400);
    assert.equal((await api('GET', '/consumers?limit=0')).status, 400);
  });
});

describe('credentials', () => {
  it('makes an API key once, keeps only its hash, and never shows it again', async () => {
    assert.equal((await api('POST', '/consumers', { body: { id: 'keyed' } })).status, 201);
    const made = await api('POST', '/consumers/keyed/credentials', { body: { type: 'api_key' } });
    assert.equal(made.status, 201, made.text);
    const key = made.body.key as string;
    assert.match(key, /^gh_[A-Za-z0-9_-]{43}$/);
    assert.match(made.body.hash, /^sha256:[0-9a-f]{64}$/);
    const listed = await api('GET', '/consumers/keyed/credentials');
    assert.equal(listed.body.items.length, 1);
    assert.equal(listed.body.items[0].id, made.body.id);
    for (const path of ['/consumers/keyed', '/consumers/keyed/credentials', '/config', `/versions`]) {
      assert.ok(!(await api('GET', path)).text.includes(key), path);
    }
    const dump = spawnSync('pg_dump', ['--data-only', db.url], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
    assert.equal(dump.status, 0, dump.stderr);
    assert.ok(dump.stdout.includes(made.body.hash.slice('sha256:'.length)), 'the hash is stored');
    assert.ok(!dump.stdout.includes(key), 'the key in clear is in the database');
    assert.ok(!admin.logs().includes(key), 'the key in clear is in the log');
    const refused = await api('POST', '/consumers/keyed/credentials', { body: { type: 'api_key', hash: 'sha256:' + '0'.repeat(64) } });
    assert.equal(refused.status, 400);
    assert.equal((await api('DELETE', `/consumers/keyed/credentials/${made.body.id}`)).status, 204);
    assert.equal((await api('GET', '/consumers/keyed/credentials')).body.items.length, 0);
    assert.equal((await api('DELETE', `/consumers/keyed/credentials/${made.body.id}`)).status, 404);
  });
});

describe('client certificate credentials', () => {
  it('adds mtls credentials by common name and by SAN, each with its own id, and refuses both at once', async () => {
    assert.equal((await api('POST', '/consumers', { body: { id: 'partner' } })).status, 201);
    const byName = await api('POST', '/consumers/partner/credentials', { body: { type: 'mtls', subject: 'partner-gw' } });
    assert.equal(byName.status, 201, byName.text);
    const bySan = await api('POST', '/consumers/partner/credentials', { body: { type: 'mtls', san: 'spiffe://partner/gw' } });
    assert.equal(bySan.status, 201, bySan.text);
    const other = await api('POST', '/consumers/partner/credentials', { body: { type: 'mtls', san: 'spiffe://partner/other' } });
    assert.equal(other.status, 201, other.text);
    assert.equal(new Set([byName.body.id, bySan.body.id, other.body.id]).size, 3);
    const listed = await api('GET', '/consumers/partner/credentials');
    assert.deepEqual(listed.body.items.map((item: { type: string }) => item.type), ['mtls', 'mtls', 'mtls']);
    const both = await api('POST', '/consumers/partner/credentials', { body: { type: 'mtls', subject: 'a', san: 'b' } });
    assert.equal(both.status, 400, both.text);
    assert.equal((await api('DELETE', `/consumers/partner/credentials/${bySan.body.id}`)).status, 204);
    assert.equal((await api('GET', '/consumers/partner/credentials')).body.items.length, 2);
  });
});

describe('versions, diff and rollback', () => {
  it('diffs two versions with defaults applied, and rolls back as a new version', async () => {
    const before = await api('GET', '/config');
    const beforeVersion = Number(before.headers.get('gatehouse-config-version'));
    const added = await api('POST', '/upstreams?comment=add%20spare', { body: { name: 'spare', targets: [{ address: '127.0.0.1:9300', weight: 1 }] } });
    assert.equal(added.status, 201);
    const version = Number(added.headers.get('gatehouse-config-version'));
    assert.ok(version > beforeVersion);
    const listed = await api('GET', '/versions?limit=1');
    assert.equal(listed.body.items[0].id, version);
    assert.equal(listed.body.items[0].comment, 'add spare');
    assert.equal(listed.body.items[0].author, 'bootstrap');
    const diff = await api('GET', `/versions/${version}/diff?against=${beforeVersion}`);
    assert.equal(diff.status, 200, diff.text);
    assert.equal(diff.body.patch.length, 1, JSON.stringify(diff.body.patch));
    assert.equal(diff.body.patch[0].op, 'add');
    assert.match(diff.body.patch[0].path, /^\/upstreams\/\d+$/);
    assert.equal(diff.body.changes[0].path, `upstreams["spare"]`);
    // `weight: 1` is the default: it is no difference against a target written without it.
    const rewritten = await api('GET', '/upstreams/spare');
    const same = await api('PUT', '/upstreams/spare', { body: { name: 'spare', targets: [{ address: '127.0.0.1:9300' }] }, headers: { 'if-match': rewritten.headers.get('etag') as string } });
    assert.equal(same.status, 200);
    const noise = await api('GET', `/versions/${Number(same.headers.get('gatehouse-config-version'))}/diff?against=${version}`);
    assert.deepEqual(noise.body.patch, []);

    const rollback = await api('POST', `/versions/${beforeVersion}/rollback`);
    assert.equal(rollback.status, 200, rollback.text);
    assert.equal(rollback.body.changed, true);
    assert.ok(rollback.body.version > version);
    assert.equal((await api('GET', '/upstreams/spare')).status, 404);
    const history = await api('GET', '/versions?limit=50');
    assert.ok(history.body.items.some((item: { id: number }) => item.id === version), 'history was rewound');
    assert.match(history.body.items[0].comment, new RegExp(`rollback to version ${beforeVersion}`));
    assert.equal((await api('GET', '/versions/999999/diff')).status, 404);
  });

  it('writes an audit row in the same transaction as each change, and none for a refused one', async () => {
    const added = await api('POST', '/upstreams', { body: { name: 'audited', targets: [{ address: '127.0.0.1:9400' }] } });
    const version = Number(added.headers.get('gatehouse-config-version'));
    const audit = await api('GET', '/audit?limit=5');
    const row = audit.body.items.find((item: { version_id: number | null }) => item.version_id === version);
    assert.ok(row, JSON.stringify(audit.body.items));
    assert.equal(row.action, 'POST /api/v1/upstreams');
    assert.equal(row.resource, 'upstreams/audited');
    assert.equal(row.actor, 'bootstrap');
    assert.equal(row.source, '127.0.0.1');
    const count = async () => (await db.sql`SELECT count(*)::int AS n FROM admin_audit`)[0]?.n;
    const before = await count();
    assert.equal((await api('POST', '/upstreams', { body: { name: 'audited', targets: [{ address: '127.0.0.1:9400' }] } })).status, 409);
    assert.equal((await api('POST', '/routes', { body: { name: 'x', upstream: 'users', priority: 'high' } })).status, 400);
    assert.equal(await count(), before);
  });
});

describe('nodes, events and the OpenAPI document', () => {
  it('shows what each node serves and what it refused', async () => {
    await db.sql`INSERT INTO config_nodes (node, applied_version, applied_at, rejected_version, rejected_error, rejected_at, ops_address)
                 VALUES ('edge-1', 1, now(), 2, 'routes[0].upstream: unknown upstream', now(), '127.0.0.1:1')`;
    const answer = await api('GET', '/nodes');
    assert.equal(answer.status, 200);
    const node = answer.body.items.find((item: { node: string }) => item.node === 'edge-1');
    assert.equal(node.applied_version, 1);
    assert.equal(node.rejected_version, 2);
    assert.match(node.rejected_error, /unknown upstream/);
    assert.ok(node.behind > 0);
  });

  it('streams a version event when a change commits', async () => {
    const controller = new AbortController();
    const response = await fetch(`${admin.url}/api/v1/events`, { headers: { authorization: `Bearer ${token}` }, signal: controller.signal });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get('content-type'), 'text/event-stream');
    const reader = (response.body as ReadableStream<Uint8Array>).getReader();
    let text = '';
    const readUntil = async (pattern: RegExp) => {
      const deadline = Date.now() + 5000;
      while (!pattern.test(text) && Date.now() < deadline) {
        const { value, done } = await reader.read();
        if (done) break;
        text += Buffer.from(value).toString();
      }
      return pattern.exec(text);
    };
    assert.ok(await readUntil(/event: version\ndata: \{"version":\d+\}/));
    const added = await api('POST', '/upstreams', { body: { name: 'evented', targets: [{ address: '127.0.0.1:9400' }] } });
    const version = added.headers.get('gatehouse-config-version');
    assert.equal(added.status, 201, added.text);
    assert.ok(await readUntil(new RegExp(`"version":${version}\\}`)), text);
    controller.abort();
  });

  it('serves an OpenAPI 3.1 document of every endpoint', async () => {
    const answer = await api('GET', '/openapi.json');
    assert.equal(answer.status, 200);
    assert.equal(answer.body.openapi, '3.1.0');
    for (const path of ['/api/v1/config', '/api/v1/routes/{name}', '/api/v1/versions/{id}/rollback', '/api/v1/consumers/{id}/credentials', '/api/v1/tokens', '/api/v1/nodes']) {
      assert.ok(answer.body.paths[path], `${path} is missing`);
    }
    assert.ok(answer.body.components.schemas.RouteConfig);
    assert.equal((await call(admin.url, 'GET', '/api/v1/openapi.json')).status, 401);
  });
});
