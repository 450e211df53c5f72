// The service's settings, from the environment (the same variables the gateway's database
// commands read, plus the admin service's own).

import { existsSync } from 'node:fs';
import { delimiter, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const packageDir = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const repositoryDir = resolve(packageDir, '..');

export interface Settings {
  databaseUrl: string;
  /** The PostgreSQL schema of the config store (`config.postgres.schema` on the gateway side). */
  schema: string | undefined;
  host: string;
  port: number;
  /** The gateway binary for the compile step of validation, when there is one. */
  gatehouseBin: string | undefined;
  /** Where the nodes' /metrics are, when not the addresses the nodes report themselves. */
  metricsUrls: string[];
  /** The largest request body accepted, in bytes. */
  bodyLimit: number;
}

export class SettingsError extends Error {}

/** `host:port`, `[v6]:port` or `:port`. */
export function parseAddress(text: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]|([^:]*)):(\d{1,5})$/.exec(text.trim());
  const port = match ? Number(match[3]) : NaN;
  if (!match || port > 65535) {
    throw new SettingsError(
      `GATEHOUSE_ADMIN_ADDRESS=${text}: expected host:port, for example 127.0.0.1:9080`,
    );
  }
  return { host: match[1] ?? (match[2] || '127.0.0.1'), port };
}

function findGatehouse(env: NodeJS.ProcessEnv): string | undefined {
  if (env.GATEHOUSE_BIN !== undefined) return env.GATEHOUSE_BIN || undefined;
  for (const dir of (env.PATH ?? '').split(delimiter)) {
    const candidate = join(dir, 'gatehouse');
    if (dir && existsSync(candidate)) return candidate;
  }
  const target = env.CARGO_TARGET_DIR ?? join(repositoryDir, 'target');
  for (const profile of ['release', 'debug']) {
    const candidate = join(target, profile, 'gatehouse');
    if (existsSync(candidate)) return candidate;
  }
  return undefined;
}

export function readSettings(env: NodeJS.ProcessEnv = process.env): Settings {
  const databaseUrl = env.GATEHOUSE_DATABASE_URL;
  if (!databaseUrl) {
    throw new SettingsError(
      'GATEHOUSE_DATABASE_URL is not set: the admin service edits the PostgreSQL config store, ' +
        'for example GATEHOUSE_DATABASE_URL=postgres://gatehouse@127.0.0.1:5432/gatehouse',
    );
  }
  const { host, port } = parseAddress(env.GATEHOUSE_ADMIN_ADDRESS ?? '127.0.0.1:9080');
  const bodyLimit = Number(env.GATEHOUSE_ADMIN_BODY_LIMIT ?? 1024 * 1024);
  if (!Number.isInteger(bodyLimit) || bodyLimit < 1024) {
    throw new SettingsError('GATEHOUSE_ADMIN_BODY_LIMIT must be a number of bytes, at least 1024');
  }
  return {
    databaseUrl,
    schema: env.GATEHOUSE_SCHEMA || undefined,
    host,
    port,
    gatehouseBin: findGatehouse(env),
    metricsUrls: (env.GATEHOUSE_ADMIN_METRICS ?? '')
      .split(',')
      .map((url) => url.trim())
      .filter(Boolean),
    bodyLimit,
  };
}
