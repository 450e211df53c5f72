// End to end: gatehousectl and the admin API against a real gateway in `postgres` mode.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { parse as parseYaml } from 'yaml';
import {
  bootstrapToken,
  call,
  createDatabase,
  ctl,
  eventually,
  gatehouseBin,
  startAdmin,
  startGateway,
  upstream,
  type Admin,
  type Gateway,
  type TestDatabase,
} from './support.ts';

let db: TestDatabase;
let admin: Admin;
let gateway: Gateway;
let token: string;
let a: Awaited<ReturnType<typeof upstream>>;
let b: Awaited<ReturnType<typeof upstream>>;
const dir = mkdtempSync(join(tmpdir(), 'gatehouse-admin-e2e-'));
const env = () => ({ GATEHOUSE_ADMIN_URL: admin.url, GATEHOUSE_ADMIN_TOKEN: token });

function file(name: string, text: string): string {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}

function configTo(target: string, routes: string[] = [], rest: string[] = []): string {
  return [
    'version: 1',
    'upstreams:',
    `  - { name: a, targets: [{ address: "${a.address}" }] }`,
    `  - { name: b, targets: [{ address: "${b.address}" }] }`,
    'routes:',
    `  - { name: svc, match: { paths: [{ prefix: /svc }] }, upstream: ${target} }`,
    ...routes,
    ...rest,
    '',
  ].join('\n');
}

async function through(path: string, headers: Record<string, string> = {}) {
  const response = await fetch(`${gateway.url}${path}`, { headers });
  return { status: response.status, text: await response.text() };
}

before(async () => {
  db = await createDatabase();
  a = await upstream('a');
  b = await upstream('b');
  token = bootstrapToken(db.url);
  admin = await startAdmin(db.url);
  gateway = await startGateway(db.url);
});

after(async () => {
  await gateway?.stop();
  await admin?.stop();
  a?.server.close();
  b?.server.close();
  await db?.drop();
});

describe('gatehousectl with a running gateway', () => {
  let first = 0;

  it('applies a new route, and a request reaches the new upstream within a second', async () => {
    const result = ctl(['apply', '-f', file('a.yaml', configTo('a')), '--comment', 'route svc to a'], env());
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /\+ routes\["svc"\]/);
    const applied = /as version (\d+)/.exec(result.stdout);
    assert.ok(applied, result.stdout);
    first = Number(applied[1]);
    const started = Date.now();
    assert.ok(await eventually(async () => (await through('/svc')).text === 'a', 1000), gateway.logs());
    assert.ok(Date.now() - started <= 1000);
  });

  it('shows no difference for a file that only spells out defaults, and a dry run stores nothing', async () => {
    const spelled = configTo('a').replace('upstream: a }', 'upstream: a, priority: 0, filters: [] }').replace(`address: "${a.address}" }]`, `address: "${a.address}", weight: 1 }], balance: round_robin`);
    const diff = ctl(['diff', '-f', file('spelled.yaml', spelled)], env());
    assert.equal(diff.code, 0, diff.stderr);
    assert.equal(diff.stdout, 'no changes\n');
    const before = (await db.sql`SELECT max(id)::int AS id FROM config_versions`)[0]?.id;
    const dry = ctl(['apply', '--dry-run', '-f', file('dry.yaml', configTo('b'))], env());
    assert.equal(dry.code, 0, dry.stderr);
    assert.match(dry.stdout, /~ routes\["svc"\]\.upstream: "a" → "b"/);
    assert.match(dry.stdout, /nothing stored/);
    assert.equal((await db.sql`SELECT max(id)::int AS id FROM config_versions`)[0]?.id, before);
  });

  it('rolls back, and the old behaviour is back', async () => {
    const moved = ctl(['apply', '-f', file('b.yaml', configTo('b'))], env());
    assert.equal(moved.code, 0, moved.stderr);
    assert.ok(await eventually(async () => (await through('/svc')).text === 'b', 2000));
    const rolled = ctl(['rollback', String(first)], env());
    assert.equal(rolled.code, 0, rolled.stderr);
    assert.match(rolled.stdout, /~ routes\["svc"\]\.upstream: "b" → "a"/);
    assert.match(rolled.stdout, /as version \d+/);
    assert.ok(await eventually(async () => (await through('/svc')).text === 'a', 2000));
    const versions = ctl(['versions'], env());
    assert.match(versions.stdout, new RegExp(`rollback to version ${first}`));
  });

  it('refuses what the gateway\'s compile step refuses, with its paths, and stores nothing', async () => {
    const before = (await db.sql`SELECT max(id)::int AS id FROM config_versions`)[0]?.id;
    const broken = configTo('a').replace('prefix: /svc', 'regex: "/svc/(unclosed"');
    const result = ctl(['apply', '-f', file('broken.yaml', broken)], env());
    assert.equal(result.code, 1);
    assert.match(result.stderr, /400 Invalid config/);
    assert.match(result.stderr, /routes\[0\]\.match\.paths\[0\]/);
    const viaApi = await call(admin.url, 'POST', '/api/v1/routes', {
      token,
      body: { name: 'ghost', upstream: 'missing', match: { paths: [{ prefix: '/ghost' }] } },
    });
    assert.equal(viaApi.status, 400);
    assert.ok(viaApi.body.errors.some((error: { path: string; message: string }) => /^routes\[\d+\]\.upstream$/.test(error.path)), viaApi.text);
    assert.equal((await db.sql`SELECT max(id)::int AS id FROM config_versions`)[0]?.id, before);
    assert.equal((await through('/svc')).text, 'a');
    // The API's errors are the ones `gatehouse validate` prints for the same document.
    const document = parseYaml(broken.replace('upstream: a }', 'upstream: nowhere }'));
    const answer = await call(admin.url, 'POST', '/api/v1/config/validate', { token, body: document });
    assert.equal(answer.status, 400);
    const cli = spawnSync(gatehouseBin(), ['validate', '--format', 'json', '-'], { input: JSON.stringify(document), encoding: 'utf8' });
    assert.equal(cli.status, 1, cli.stderr);
    assert.deepEqual(answer.body.errors, JSON.parse(cli.stdout).errors);
    assert.ok(answer.body.errors.length >= 2, answer.text);
  });

  it('makes an API key through the API that the gateway accepts', async () => {
    const keyed = configTo(
      'a',
      ['  - { name: keyed, match: { paths: [{ prefix: /keyed }] }, upstream: b, auth: required, filters: [{ kind: api_key, config: { header: x-api-key } }] }'],
      ['consumers: [{ id: partner }]'],
    );
    const applied = ctl(['apply', '-f', file('keyed.yaml', keyed)], env());
    assert.equal(applied.code, 0, applied.stderr + applied.stdout);
    assert.ok(await eventually(async () => (await through('/keyed')).status === 401, 2000));
    const made = await call(admin.url, 'POST', '/api/v1/consumers/partner/credentials', { token, body: { type: 'api_key' } });
    assert.equal(made.status, 201, made.text);
    assert.ok(await eventually(async () => (await through('/keyed', { 'x-api-key': made.body.key })).text === 'b', 2000), gateway.logs());
    assert.equal((await through('/keyed', { 'x-api-key': `${made.body.key}x` })).status, 401);
  });

  it('lists the node with the version it serves', async () => {
    const latest = (await db.sql`SELECT max(id)::int AS id FROM config_versions`)[0]?.id;
    assert.ok(await eventually(async () => {
      const nodes = await call(admin.url, 'GET', '/api/v1/nodes', { token });
      const node = nodes.body.items.find((item: { node: string }) => item.node === gateway.node);
      return node?.applied_version === latest && node.ops_address === gateway.ops.replace('http://', '');
    }, 3000));
    const shown = ctl(['nodes'], env());
    assert.match(shown.stdout, new RegExp(`${gateway.node}\\s+serves\\s+${latest}`));
  });
});
