// How the service starts and how it fails: its defaults, and clear words for bad settings, an
// unreachable PostgreSQL and an unreachable admin API.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { packageDir, readSettings, SettingsError } from '../src/settings.ts';
import { ctl, freePort } from './support.ts';

describe('settings', () => {
  it('binds to loopback port 9080 unless told otherwise', () => {
    const settings = readSettings({ GATEHOUSE_DATABASE_URL: 'postgres://x@127.0.0.1/db', GATEHOUSE_BIN: '' });
    assert.equal(settings.host, '127.0.0.1');
    assert.equal(settings.port, 9080);
    assert.equal(settings.schema, undefined);
    assert.equal(settings.bodyLimit, 1024 * 1024);
    const v6 = readSettings({ GATEHOUSE_DATABASE_URL: 'postgres://x@h/db', GATEHOUSE_ADMIN_ADDRESS: '[::1]:9999', GATEHOUSE_BIN: '' });
    assert.deepEqual([v6.host, v6.port], ['::1', 9999]);
  });

  it('says what is missing or wrong', () => {
    assert.throws(() => readSettings({}), (error: Error) => error instanceof SettingsError && /GATEHOUSE_DATABASE_URL is not set/.test(error.message));
    assert.throws(() => readSettings({ GATEHOUSE_DATABASE_URL: 'postgres://x@h/db', GATEHOUSE_ADMIN_ADDRESS: 'localhost' }), /expected host:port/);
    assert.throws(() => readSettings({ GATEHOUSE_DATABASE_URL: 'postgres://x@h/db', GATEHOUSE_ADMIN_BODY_LIMIT: 'big' }), /GATEHOUSE_ADMIN_BODY_LIMIT/);
  });
});

describe('failing to start', () => {
  it('stops with a clear message when PostgreSQL is unreachable', async () => {
    const dead = await freePort();
    const started = Date.now();
    const result = spawnSync(process.execPath, ['--import', 'tsx', join(packageDir, 'src', 'main.ts')], {
      cwd: packageDir,
      env: { ...process.env, GATEHOUSE_DATABASE_URL: `postgres://postgres@127.0.0.1:${dead}/gatehouse`, GATEHOUSE_ADMIN_ADDRESS: '127.0.0.1:0' },
      encoding: 'utf8',
      timeout: 30_000,
    });
    assert.equal(result.status, 1, result.stderr);
    assert.match(result.stderr, /cannot prepare the config store: .*(ECONNREFUSED|connect)/);
    assert.ok(Date.now() - started < 30_000);
  });

  it('stops with exit 2 and the variable to set when GATEHOUSE_DATABASE_URL is missing', () => {
    const env = { ...process.env };
    delete env.GATEHOUSE_DATABASE_URL;
    const result = spawnSync(process.execPath, ['--import', 'tsx', join(packageDir, 'src', 'main.ts')], { cwd: packageDir, env, encoding: 'utf8', timeout: 30_000 });
    assert.equal(result.status, 2);
    assert.match(result.stderr, /GATEHOUSE_DATABASE_URL is not set/);
  });

  it('gatehousectl says when the admin API cannot be reached or no token is set', async () => {
    const dead = await freePort();
    const unreachable = ctl(['versions'], { GATEHOUSE_ADMIN_URL: `http://127.0.0.1:${dead}`, GATEHOUSE_ADMIN_TOKEN: 'ghadm_x' });
    assert.equal(unreachable.code, 1);
    assert.match(unreachable.stderr, /cannot reach the admin API at http:\/\/127\.0\.0\.1:\d+/);
    const tokenless = ctl(['versions'], { GATEHOUSE_ADMIN_URL: `http://127.0.0.1:${dead}`, GATEHOUSE_ADMIN_TOKEN: '' });
    assert.equal(tokenless.code, 1);
    assert.match(tokenless.stderr, /GATEHOUSE_ADMIN_TOKEN is not set/);
    const unknown = ctl(['frobnicate'], {});
    assert.equal(unknown.code, 2);
  });
});
