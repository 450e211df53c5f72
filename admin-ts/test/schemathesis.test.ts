// schemathesis (property-based testing from the OpenAPI document) against the real service:
// no 5xx, no undocumented status, and no response that violates its schema. Bounded: a fixed
// number of examples per operation and a deadline.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, it } from 'node:test';
import { packageDir } from '../src/settings.ts';
import { bootstrapToken, createDatabase, startAdmin, type Admin, type TestDatabase } from './support.ts';

const st = process.env.SCHEMATHESIS ?? '/var/tmp/gatehouse-venv/bin/st';
let db: TestDatabase;
let admin: Admin;
let token: string;

before(async () => {
  db = await createDatabase();
  token = bootstrapToken(db.url);
  admin = await startAdmin(db.url);
});

after(async () => {
  await admin?.stop();
  await db?.drop();
});

it('finds no server error and no response outside the OpenAPI document', { timeout: 600_000 }, async () => {
  assert.ok(existsSync(st), `schemathesis is not installed at ${st} (make admin-deps installs it, or set SCHEMATHESIS)`);
  const args = [
    'run', `${admin.url}/api/v1/openapi.json`,
    '--header', `Authorization: Bearer ${token}`,
    '--checks', 'not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance',
    '--max-examples', process.env.SCHEMATHESIS_EXAMPLES ?? '10',
    '--workers', '2',
    '--request-timeout', '20',
    '--phases', 'examples,fuzzing',
    // The event stream never ends, and revoking a token could revoke the one this run uses.
    '--exclude-path', '/api/v1/events',
    '--exclude-path', '/api/v1/tokens/{id}',
    '--warnings', 'off',
    '--no-color',
  ];
  const { code, output } = await new Promise<{ code: number; output: string }>((resolve) => {
    const child = spawn(st, args, { env: { ...process.env, SCHEMATHESIS_HOOKS: '' }, stdio: ['ignore', 'pipe', 'pipe'] });
    let text = '';
    child.stdout.on('data', (chunk: Buffer) => (text += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (text += chunk.toString()));
    const timer = setTimeout(() => child.kill('SIGKILL'), 540_000);
    child.on('close', (status) => {
      clearTimeout(timer);
      resolve({ code: status ?? -1, output: text });
    });
  });
  const out = process.env.GATEHOUSE_TEST_ARTIFACTS ?? join(packageDir, 'test-results');
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, 'schemathesis.txt'), output);
  // Fuzzed URLs can be kilobytes long: the message keeps the gist of each line.
  const gist = output.split('\n').map((line) => (line.length > 300 ? `${line.slice(0, 300)}...` : line)).slice(-250).join('\n');
  const summary = /(\d+) generated/.exec(output);
  assert.ok(summary && Number(summary[1]) > 100, `schemathesis generated too few cases:\n${gist}`);
  assert.equal(code, 0, gist);
  assert.ok(!admin.logs().includes(token));
});
