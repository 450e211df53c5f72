// gatehousectl: the admin API from a shell. Reads GATEHOUSE_ADMIN_URL (default
// http://127.0.0.1:9080) and GATEHOUSE_ADMIN_TOKEN; `token create --bootstrap` and `migrate`
// talk to PostgreSQL directly (GATEHOUSE_DATABASE_URL, GATEHOUSE_SCHEMA).

import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { parse as parseYaml, stringify as toYaml } from 'yaml';
import { connect, migrate } from '../db.ts';
import type { Change } from '../json.ts';
import { createToken, isRole, parseLifetime } from '../tokens.ts';

const USAGE = `gatehousectl: the Gatehouse admin API from a shell

  gatehousectl apply -f FILE [--dry-run] [--comment TEXT]   show the diff, then store FILE as one version
  gatehousectl diff -f FILE                                 what apply would change
  gatehousectl validate -f FILE                             check FILE as the gateway would
  gatehousectl get KIND [NAME] [-o yaml|json]               KIND: upstreams, routes, filters, consumers
  gatehousectl export [-o yaml|json]                        the whole stored config
  gatehousectl versions [--limit N]                         config versions, newest first
  gatehousectl rollback ID [--comment TEXT]                 store version ID's config as a new version
  gatehousectl nodes                                        what each gateway node serves
  gatehousectl token create --role read|write|admin [--name NAME] [--expires 90d|never] [--bootstrap]
  gatehousectl token list
  gatehousectl token revoke ID
  gatehousectl migrate                                      apply the store's missing migrations

Environment: GATEHOUSE_ADMIN_URL (default http://127.0.0.1:9080), GATEHOUSE_ADMIN_TOKEN;
--bootstrap and migrate use GATEHOUSE_DATABASE_URL and GATEHOUSE_SCHEMA.
`;

class CliError extends Error {
  constructor(message: string, readonly code = 1) {
    super(message);
  }
}

const useColor = process.env.NO_COLOR === undefined && (process.stdout.isTTY || process.env.FORCE_COLOR !== undefined);
const paint = (code: number) => (text: string) => (useColor ? `\u001b[${code}m${text}\u001b[0m` : text);
const green = paint(32);
const red = paint(31);
const yellow = paint(33);
const dim = paint(2);

interface Problem {
  status?: number;
  title?: string;
  detail?: string;
  errors?: { path: string; message: string }[];
}

async function api(method: string, path: string, options: { body?: unknown; headers?: Record<string, string> } = {}) {
  const base = (process.env.GATEHOUSE_ADMIN_URL ?? 'http://127.0.0.1:9080').replace(/\/$/, '');
  const token = process.env.GATEHOUSE_ADMIN_TOKEN;
  if (!token) throw new CliError('GATEHOUSE_ADMIN_TOKEN is not set (make one with `gatehousectl token create`)');
  let response: Response;
  try {
    response = await fetch(`${base}/api/v1${path}`, {
      method,
      headers: {
        authorization: `Bearer ${token}`,
        ...(options.body !== undefined ? { 'content-type': 'application/json' } : {}),
        ...options.headers,
      },
      ...(options.body !== undefined ? { body: JSON.stringify(options.body) } : {}),
    });
  } catch (error) {
    throw new CliError(`cannot reach the admin API at ${base}: ${(error as Error).cause ?? (error as Error).message}`);
  }
  const text = await response.text();
  const body = text ? (JSON.parse(text) as unknown) : undefined;
  if (!response.ok) {
    const problem = (body ?? {}) as Problem;
    const lines = [`${response.status} ${problem.title ?? response.statusText}: ${problem.detail ?? ''}`.trim()];
    for (const error of problem.errors ?? []) lines.push(`  ${error.path ? `${error.path}: ` : ''}${error.message}`);
    throw new CliError(lines.join('\n'));
  }
  return { body, headers: response.headers, status: response.status };
}

function readDocument(file: string): unknown {
  let text: string;
  try {
    text = readFileSync(file === '-' ? 0 : file, 'utf8');
  } catch (error) {
    throw new CliError(`cannot read ${file}: ${(error as Error).message}`);
  }
  try {
    return parseYaml(text) as unknown;
  } catch (error) {
    throw new CliError(`${file}: not valid YAML: ${(error as Error).message.split('\n')[0]}`);
  }
}

function show(value: unknown, format: string | undefined): string {
  return format === 'json' ? `${JSON.stringify(value, null, 2)}\n` : toYaml(value);
}

function short(value: unknown): string {
  const text = JSON.stringify(value);
  return text.length > 100 ? `${text.slice(0, 97)}...` : text;
}

export function formatChanges(changes: Change[]): string {
  const lines: string[] = [];
  for (const change of changes) {
    if (change.op === 'add') {
      const body = toYaml(change.after).trimEnd().split('\n');
      if (typeof change.after !== 'object' || change.after === null) lines.push(green(`+ ${change.path}: ${JSON.stringify(change.after)}`));
      else lines.push(green(`+ ${change.path}:`), ...body.map((line) => green(`+     ${line}`)));
    } else if (change.op === 'remove') {
      lines.push(red(`- ${change.path}`) + dim(`  (was ${short(change.before)})`));
    } else {
      lines.push(yellow(`~ ${change.path}: ${short(change.before)} → ${short(change.after)}`));
    }
  }
  return lines.join('\n') + (lines.length ? '\n' : '');
}

async function diffOf(file: string) {
  const document = readDocument(file);
  const { body } = await api('POST', '/config/diff', { body: document });
  return { document, diff: body as { etag: string; from: number | null; changes: Change[] } };
}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      file: { type: 'string', short: 'f' },
      'dry-run': { type: 'boolean' },
      comment: { type: 'string' },
      output: { type: 'string', short: 'o' },
      limit: { type: 'string' },
      role: { type: 'string' },
      name: { type: 'string' },
      expires: { type: 'string' },
      bootstrap: { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  const [command, ...rest] = positionals;
  const out = (text: string) => process.stdout.write(text);
  const note = (text: string) => process.stderr.write(`${text}\n`);
  const commentQuery = values.comment ? `?comment=${encodeURIComponent(values.comment)}` : '';
  const needFile = () => {
    if (!values.file) throw new CliError(`${command}: -f FILE is required`, 2);
    return values.file;
  };
  switch (command) {
    case undefined:
    case 'help':
      out(USAGE);
      return command === undefined && !values.help ? 2 : 0;
    case 'diff': {
      const { diff } = await diffOf(needFile());
      out(diff.changes.length ? formatChanges(diff.changes) : 'no changes\n');
      return 0;
    }
    case 'validate': {
      const { body } = await api('POST', '/config/validate', { body: readDocument(needFile()) });
      out(`${values.file}: ok${(body as { compiled?: boolean }).compiled ? ' (compiled by the gateway)' : ' (schema only)'}\n`);
      return 0;
    }
    case 'apply': {
      const file = needFile();
      const { document, diff } = await diffOf(file);
      if (diff.changes.length === 0) {
        out('no changes\n');
        return 0;
      }
      out(formatChanges(diff.changes));
      const count = diff.changes.length;
      if (values['dry-run']) {
        await api('POST', '/config/validate', { body: document });
        out(`dry run: ${count} change${count === 1 ? '' : 's'}, valid; nothing stored\n`);
        return 0;
      }
      const { headers } = await api('PUT', `/config${commentQuery}`, { body: document, headers: { 'if-match': diff.etag } }).catch((error: CliError) => {
        if (error.message.startsWith('412')) throw new CliError(`${error.message}\nthe stored config changed while this ran; run apply again to see the new diff`);
        throw error;
      });
      out(`applied: ${count} change${count === 1 ? '' : 's'} as version ${headers.get('gatehouse-config-version') ?? '?'}\n`);
      return 0;
    }
    case 'get': {
      const [kind, name] = rest;
      if (!kind || !['upstreams', 'routes', 'filters', 'consumers'].includes(kind)) {
        throw new CliError('get: KIND is one of upstreams, routes, filters, consumers', 2);
      }
      if (name) {
        out(show((await api('GET', `/${kind}/${encodeURIComponent(name)}`)).body, values.output));
        return 0;
      }
      const items: unknown[] = [];
      let cursor: string | null = null;
      do {
        const query: string = `?limit=500${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
        const page = (await api('GET', `/${kind}${query}`)).body as { items: unknown[]; next_cursor: string | null };
        items.push(...page.items);
        cursor = page.next_cursor;
      } while (cursor);
      out(show(items, values.output));
      return 0;
    }
    case 'export':
      out(show((await api('GET', '/config')).body, values.output));
      return 0;
    case 'versions': {
      const limit = values.limit ?? '20';
      const { body } = await api('GET', `/versions?limit=${encodeURIComponent(limit)}`);
      for (const version of (body as { items: Record<string, string | number | null>[] }).items) {
        out(`${String(version.id).padStart(5)}  ${String(version.status).padEnd(10)}  ${String(version.created_at)}  ${String(version.author)}${version.comment ? `  ${version.comment}` : ''}\n`);
        if (version.error) out(dim(`       ${String(version.error).split('\n').join('\n       ')}\n`));
      }
      return 0;
    }
    case 'rollback': {
      const [id] = rest;
      if (!id || !/^\d+$/.test(id)) throw new CliError('rollback: ID is a version number (see `gatehousectl versions`)', 2);
      const { body } = await api('GET', `/versions/${id}/diff?against=${await currentVersion()}`).catch(() => ({ body: undefined }));
      const changes = (body as { changes?: Change[] } | undefined)?.changes;
      if (changes) out(changes.length ? formatChanges(changes) : 'no changes\n');
      const result = (await api('POST', `/versions/${id}/rollback${commentQuery}`)).body as { version: number; changed: boolean };
      out(result.changed ? `rolled back to version ${id}'s config as version ${result.version}\n` : `version ${id}'s config is already the current one\n`);
      return 0;
    }
    case 'nodes': {
      const { body } = await api('GET', '/nodes');
      const nodes = body as { latest_version: number | null; items: Record<string, string | number | null>[] };
      out(`latest version: ${nodes.latest_version ?? 'none'}\n`);
      for (const node of nodes.items) {
        out(`${String(node.node).padEnd(24)} serves ${String(node.applied_version ?? '-').padStart(5)}${Number(node.behind) > 0 ? yellow(` (${node.behind} behind)`) : ''}  seen ${String(node.seen_at)}\n`);
        if (node.rejected_version !== null) out(red(`${' '.repeat(25)}refused version ${node.rejected_version}: ${String(node.rejected_error)}\n`));
      }
      return 0;
    }
    case 'token':
      return token(rest, values);
    case 'migrate': {
      const sql = database();
      try {
        const applied = await migrate(sql, process.env.GATEHOUSE_SCHEMA || undefined);
        out(applied.length ? `applied: ${applied.join(', ')}\n` : 'nothing to apply: the store is up to date\n');
      } finally {
        await sql.end({ timeout: 1 });
      }
      return 0;
    }
    default:
      note(USAGE);
      throw new CliError(`unknown command ${JSON.stringify(command)}`, 2);
  }

  async function currentVersion(): Promise<string> {
    const { body } = await api('GET', '/versions?limit=1');
    return String((body as { items: { id: number }[] }).items[0]?.id ?? 1);
  }
}

function database() {
  const url = process.env.GATEHOUSE_DATABASE_URL;
  if (!url) throw new CliError('GATEHOUSE_DATABASE_URL is not set');
  return connect(url, process.env.GATEHOUSE_SCHEMA || undefined, 1);
}

async function token(rest: string[], values: Record<string, string | boolean | undefined>): Promise<number> {
  const [action, id] = rest;
  if (action === 'create') {
    const role = values.role;
    if (!isRole(role)) throw new CliError('token create: --role read|write|admin is required', 2);
    const name = typeof values.name === 'string' ? values.name : values.bootstrap ? 'bootstrap' : `${role}-token`;
    const expires = typeof values.expires === 'string' ? values.expires : values.bootstrap ? 'never' : '90d';
    let lifetime: number | null;
    try {
      lifetime = parseLifetime(expires);
    } catch (error) {
      throw new CliError((error as Error).message, 2);
    }
    if (values.bootstrap) {
      const sql = database();
      try {
        const schema = process.env.GATEHOUSE_SCHEMA || undefined;
        await migrate(sql, schema);
        const made = await sql.begin(async (tx) => {
          // One bootstrap at a time; it works only while no token exists at all.
          await tx`LOCK TABLE admin_tokens IN SHARE ROW EXCLUSIVE MODE`;
          const [existing] = await tx<{ count: number }[]>`SELECT count(*)::int AS count FROM admin_tokens`;
          if ((existing?.count ?? 0) > 0) return undefined;
          const created = await createToken(tx, { name, role, lifetimeSeconds: lifetime, createdBy: 'bootstrap' });
          await tx`INSERT INTO admin_audit (actor, token_id, action, resource, source, comment)
                   VALUES ('bootstrap', NULL, 'token create --bootstrap', ${`tokens/${created.row.id}`}, 'gatehousectl', ${`${role} token ${name}`})`;
          return created;
        });
        if (!made) {
          throw new CliError('token create --bootstrap works only while no token exists; ask an admin for one (gatehousectl token create)');
        }
        process.stderr.write(`made ${role} token ${JSON.stringify(name)} (id ${made.row.id}); it is shown once, here:\n`);
        process.stdout.write(`${made.token}\n`);
        return 0;
      } finally {
        await sql.end({ timeout: 1 });
      }
    }
    const { body } = await api('POST', '/tokens', { body: { name, role, expires_in: expires } });
    const made = body as { id: number; token: string; expires_at: string | null };
    process.stderr.write(`made ${role} token ${JSON.stringify(name)} (id ${made.id}, expires ${made.expires_at ?? 'never'}); it is shown once, here:\n`);
    process.stdout.write(`${made.token}\n`);
    return 0;
  }
  if (action === 'list') {
    const { body } = await api('GET', '/tokens');
    for (const row of (body as { items: Record<string, string | number | null>[] }).items) {
      const state = row.revoked_at ? red('revoked') : row.expires_at && Date.parse(String(row.expires_at)) <= Date.now() ? red('expired') : green('active');
      process.stdout.write(`${String(row.id).padStart(4)}  ${String(row.prefix)}…  ${String(row.role).padEnd(5)}  ${state}  ${String(row.name)}  expires ${row.expires_at ?? 'never'}  last used ${row.last_used_at ?? 'never'}\n`);
    }
    return 0;
  }
  if (action === 'revoke') {
    if (!id || !/^\d+$/.test(id)) throw new CliError('token revoke: ID is a token id (see `gatehousectl token list`)', 2);
    await api('DELETE', `/tokens/${id}`);
    process.stdout.write(`revoked token ${id}\n`);
    return 0;
  }
  throw new CliError('token: create, list or revoke', 2);
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error: Error) => {
    process.stderr.write(`gatehousectl: ${error.message}\n`);
    process.exit(error instanceof CliError ? error.code : 1);
  },
);
