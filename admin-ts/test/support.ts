// The test harness: a PostgreSQL database of each test's own, the admin service as a real process
// on a free port, the real gateway binary, and plain HTTP servers as upstreams.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import { createServer as createNetServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import postgres from 'postgres';
import { packageDir, repositoryDir } from '../src/settings.ts';

export const serverUrl = process.env.GATEHOUSE_TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';

export interface TestDatabase {
  name: string;
  url: string;
  sql: postgres.Sql;
  drop(): Promise<void>;
}

export async function createDatabase(): Promise<TestDatabase> {
  const name = `gatehouse_admin_test_${process.pid}_${randomBytes(4).toString('hex')}`;
  const admin = postgres(serverUrl, { max: 1, onnotice: () => {} });
  await admin.unsafe(`CREATE DATABASE ${name}`);
  await admin.end();
  const url = `${serverUrl.slice(0, serverUrl.lastIndexOf('/'))}/${name}`;
  const sql = postgres(url, { max: 4, onnotice: () => {}, types: { bigint: postgres.BigInt } });
  return {
    name,
    url,
    sql,
    async drop() {
      await sql.end({ timeout: 1 });
      const cleanup = postgres(serverUrl, { max: 1, onnotice: () => {} });
      await cleanup.unsafe(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await cleanup.end();
    },
  };
}

/** The gateway binary `cargo build` made (debug first: `make test` builds it). */
export function gatehouseBin(): string {
  if (process.env.GATEHOUSE_BIN) return process.env.GATEHOUSE_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? join(repositoryDir, 'target');
  for (const profile of ['debug', 'release']) {
    const candidate = join(target, profile, 'gatehouse');
    if (existsSync(candidate)) return candidate;
  }
  throw new Error(`no gatehouse binary under ${target}: build it first (cargo build), or set GATEHOUSE_BIN`);
}

export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createNetServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() => resolvePort(typeof address === 'object' && address ? address.port : 0));
    });
  });
}

export interface Admin {
  url: string;
  process: ChildProcess;
  logs(): string;
  stop(): Promise<void>;
}

/** The admin service, as `npm start` runs it, on a free port. */
export async function startAdmin(databaseUrl: string, env: Record<string, string | undefined> = {}): Promise<Admin> {
  const port = await freePort();
  const child = spawn(process.execPath, ['--import', 'tsx', join(packageDir, 'src', 'main.ts')], {
    cwd: packageDir,
    env: {
      ...process.env,
      GATEHOUSE_DATABASE_URL: databaseUrl,
      GATEHOUSE_ADMIN_ADDRESS: `127.0.0.1:${port}`,
      GATEHOUSE_BIN: env.GATEHOUSE_BIN ?? process.env.GATEHOUSE_BIN ?? gatehouseBin(),
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`the admin service exited (${child.exitCode}):\n${output}`);
    try {
      await fetch(`${url}/`);
      break;
    } catch {
      if (Date.now() > deadline) throw new Error(`the admin service did not listen on ${url}:\n${output}`);
      await sleep(100);
    }
  }
  return {
    url,
    process: child,
    logs: () => output,
    stop: () => stopChild(child),
  };
}

/** SIGTERM, and SIGKILL if the process has not exited within 5 s. */
async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null) return;
  const exited = new Promise((done) => child.once('exit', done));
  child.kill('SIGTERM');
  await Promise.race([exited, sleep(5000)]);
  if (child.exitCode === null) child.kill('SIGKILL');
}

export function sleep(ms: number): Promise<void> {
  return new Promise((done) => setTimeout(done, ms));
}

/** Runs gatehousectl as an operator would, through npx. */
export function ctl(args: string[], env: Record<string, string | undefined>, input?: string) {
  const result = spawnSync('npx', ['--prefix', packageDir, 'gatehousectl', ...args], {
    cwd: repositoryDir,
    env: { ...process.env, NO_COLOR: '1', FORCE_COLOR: undefined, ...env },
    encoding: 'utf8',
    ...(input !== undefined ? { input } : {}),
    timeout: 60_000,
  });
  return { code: result.status ?? -1, stdout: result.stdout, stderr: result.stderr };
}

export function bootstrapToken(databaseUrl: string): string {
  const result = ctl(['token', 'create', '--bootstrap', '--role', 'admin'], { GATEHOUSE_DATABASE_URL: databaseUrl });
  if (result.code !== 0) throw new Error(`bootstrap: ${result.stderr}`);
  return result.stdout.trim();
}

export interface Answer {
  status: number;
  headers: Headers;
  body: any;
  text: string;
}

export async function call(
  base: string,
  method: string,
  path: string,
  options: { token?: string; body?: unknown; headers?: Record<string, string>; raw?: string; contentType?: string } = {},
): Promise<Answer> {
  const headers: Record<string, string> = { ...options.headers };
  if (options.token) headers.authorization = `Bearer ${options.token}`;
  let body: string | undefined;
  if (options.raw !== undefined) body = options.raw;
  else if (options.body !== undefined) body = JSON.stringify(options.body);
  if (body !== undefined) headers['content-type'] = options.contentType ?? 'application/json';
  const response = await fetch(`${base}${path}`, { method, headers, ...(body !== undefined ? { body } : {}) });
  const text = await response.text();
  let parsed: unknown;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    parsed = undefined;
  }
  return { status: response.status, headers: response.headers, body: parsed, text };
}

/** An upstream that answers every request with its name. */
export async function upstream(name: string): Promise<{ address: string; server: Server; hits: () => number }> {
  let hits = 0;
  const server = createServer((request, response) => {
    hits += 1;
    request.resume();
    response.setHeader('content-type', 'text/plain');
    response.end(name);
  });
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  const address = server.address();
  return { address: `127.0.0.1:${typeof address === 'object' && address ? address.port : 0}`, server, hits: () => hits };
}

export interface Gateway {
  url: string;
  ops: string;
  node: string;
  logs(): string;
  stop(): Promise<void>;
}

/** The real gateway in postgres mode, reading `databaseUrl`. */
export async function startGateway(databaseUrl: string): Promise<Gateway> {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-admin-gw-'));
  const port = await freePort();
  const ops = await freePort();
  const node = `node-${randomBytes(3).toString('hex')}`;
  const file = join(dir, 'gatehouse.yaml');
  writeFileSync(
    file,
    [
      'version: 1',
      'server:',
      `  listeners: [{ name: public, address: "127.0.0.1:${port}" }]`,
      '  threads: 1',
      '  grace_period: 1s',
      '  shutdown_timeout: 1s',
      `  upgrade_socket: ${dir}/upgrade.sock`,
      `  pid_file: ${dir}/gatehouse.pid`,
      `ops: { address: "127.0.0.1:${ops}" }`,
      'telemetry: { log: { format: text, level: warn } }',
      `config: { source: postgres, postgres: { url: "${databaseUrl}", resync_interval: 1s, node_name: ${node} } }`,
      '',
    ].join('\n'),
  );
  const child = spawn(gatehouseBin(), ['run', '-c', file], { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  child.stderr?.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const opsUrl = `http://127.0.0.1:${ops}`;
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`the gateway exited (${child.exitCode}):\n${output}`);
    try {
      await fetch(`${opsUrl}/healthz`);
      break;
    } catch {
      if (Date.now() > deadline) throw new Error(`the gateway did not start:\n${output}`);
      await sleep(100);
    }
  }
  return {
    url: `http://127.0.0.1:${port}`,
    ops: opsUrl,
    node,
    logs: () => output,
    stop: () => stopChild(child),
  };
}

/** Polls `check` until it is true or `ms` pass; returns whether it became true. */
export async function eventually(check: () => Promise<boolean>, ms: number, every = 25): Promise<boolean> {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return true;
    } catch {
      // not yet
    }
    if (Date.now() > deadline) return false;
    await sleep(every);
  }
}

export const fixtures = resolve(packageDir, 'test', 'fixtures');
