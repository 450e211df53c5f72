// Reading and writing the config store. Every write is one transaction that takes the writer
// lock first, checks its precondition (If-Match) against what is committed now, validates the
// whole new document, stores it as one version with its author and comment, and writes its
// audit row, so two writers can never both pass the same check.

import { createHash } from 'node:crypto';
import { query, type Queryable, type Sql, type Tx } from './db.ts';
import { canonical, deepEqual, type Json, type JsonObject } from './json.ts';
import { Problem, invalidConfig } from './problem.ts';
import type { Validator } from './validate.ts';

const LOAD_CONFIG = query('load_config');

export interface Loaded {
  version: number | null;
  document: JsonObject;
}

export async function loadConfig(db: Queryable): Promise<Loaded> {
  const [row] = await db.unsafe<{ version_id: number | null; config: JsonObject }[]>(LOAD_CONFIG);
  return { version: row?.version_id ?? null, document: (row?.config ?? {}) as JsonObject };
}

export function configEtag(version: number | null): string {
  return `"v${version ?? 0}"`;
}

/** The ETag of one resource: its content, so edits elsewhere in the config do not move it. */
export function contentEtag(value: unknown): string {
  return `"${createHash('sha256').update(canonical(value)).digest('hex').slice(0, 20)}"`;
}

/**
 * Whether `ifMatch` (the header as sent) names `etag`. `*` matches anything that exists; a list
 * matches if any member does. Weak tags are compared weakly.
 */
export function etagMatches(ifMatch: string, etag: string | undefined): boolean {
  if (ifMatch.trim() === '*') return etag !== undefined;
  if (etag === undefined) return false;
  return ifMatch
    .split(',')
    .map((tag) => tag.trim().replace(/^W\//, ''))
    .includes(etag.replace(/^W\//, ''));
}

export interface Actor {
  name: string;
  tokenId: number | null;
  source: string;
}

export interface WriteResult<T> {
  /** The version the write made; null when the document did not change. */
  version: number | null;
  /** The config version now current. */
  current: number | null;
  document: JsonObject;
  value: T;
}

export interface WriteOptions {
  actor: Actor;
  action: string;
  resource: string;
  comment: string | undefined;
  /** Only validates: nothing is stored and no audit row is written. */
  dryRun?: boolean;
}

export class Store {
  constructor(
    readonly sql: Sql,
    private readonly validator: Validator,
  ) {}

  async read(): Promise<Loaded> {
    return this.sql.begin('ISOLATION LEVEL REPEATABLE READ READ ONLY', (tx) => loadConfig(tx));
  }

  /**
   * Runs `change` on the committed document under the writer lock, and stores what it returns
   * as one new version. `change` throws a Problem to refuse (412 for a stale ETag, 404, 409).
   */
  async write<T>(options: WriteOptions, change: (current: Loaded) => { document: JsonObject; value: T }): Promise<WriteResult<T>> {
    return this.sql.begin(async (tx) => {
      await tx`SELECT gatehouse_lock_config_writers()`;
      const current = await loadConfig(tx);
      const { document, value } = change(current);
      if (deepEqual(document, current.document)) {
        return { version: null, current: current.version, document: current.document, value };
      }
      await this.check(document);
      if (options.dryRun) {
        return { version: null, current: current.version, document, value };
      }
      const author = options.actor.name;
      const [row] = await tx<{ id: number }[]>`
        SELECT gatehouse_replace_config(${tx.json(document as never)}::jsonb, ${author},
                                        ${options.comment ?? ''}) AS id`;
      const version = row?.id ?? null;
      await audit(tx, options, version);
      return { version, current: version, document, value };
    });
  }

  /** Refuses (400, with every error and its path) a document the gateway would not load. */
  async check(document: Json): Promise<void> {
    const nul = nulPaths(document, '');
    if (nul.length > 0) throw invalidConfig(nul.map((path) => ({ path, message: 'contains a NUL character, which the store cannot keep' })));
    const { errors } = await this.validator.validate(document);
    if (errors.length > 0) throw invalidConfig(errors);
  }
}

/** Where a string (or an object key) holds U+0000: PostgreSQL text cannot. */
function nulPaths(value: Json, path: string): string[] {
  if (typeof value === 'string') return value.includes('\u0000') ? [path] : [];
  if (Array.isArray(value)) return value.flatMap((entry, index) => nulPaths(entry, `${path}[${index}]`));
  if (value !== null && typeof value === 'object') {
    return Object.entries(value).flatMap(([key, entry]) => {
      const child = path === '' ? key : `${path}.${key}`;
      return key.includes('\u0000') ? [child] : nulPaths(entry, child);
    });
  }
  return [];
}

export async function audit(tx: Tx | Queryable, options: WriteOptions, version: number | null): Promise<void> {
  await tx`
    INSERT INTO admin_audit (actor, token_id, action, resource, version_id, source, comment)
    VALUES (${options.actor.name}, ${options.actor.tokenId}, ${options.action}, ${options.resource},
            ${version}, ${options.actor.source}, ${options.comment ?? null})`;
}

/** 428 without If-Match, 412 when it names something else than `etag`. */
export function requireMatch(ifMatch: string | undefined, etag: string | undefined, what: string): void {
  if (ifMatch === undefined) {
    throw new Problem(428, `changing ${what} needs an If-Match header with its current ETag (or If-Match: *)`);
  }
  if (!etagMatches(ifMatch, etag)) {
    throw new Problem(412, `${what} changed since ${ifMatch} was read${etag ? `: it is now ${etag}` : ''}`, {
      headers: etag ? { etag } : {},
    });
  }
}
