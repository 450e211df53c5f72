// The lists of the config document that the API edits one entry at a time: upstreams, routes,
// the global filter chain, consumers (and consumers' credentials).

import { createHash, randomBytes } from 'node:crypto';
import { clone, isObject, mergePatch, type Json, type JsonObject } from './json.ts';
import { Problem } from './problem.ts';
import { contentEtag, requireMatch } from './store.ts';

export interface Kind {
  /** The collection in the URL and the list in the document. */
  collection: 'upstreams' | 'routes' | 'filters' | 'consumers';
  singular: string;
  /** The field that names an entry (filters: `name`, defaulting to the kind). */
  keyField: 'name' | 'id';
  /** The schema of one entry. */
  schemaId: string;
}

export const KINDS: Kind[] = [
  { collection: 'upstreams', singular: 'upstream', keyField: 'name', schemaId: 'UpstreamConfig' },
  { collection: 'routes', singular: 'route', keyField: 'name', schemaId: 'RouteConfig' },
  { collection: 'filters', singular: 'filter', keyField: 'name', schemaId: 'Filter' },
  { collection: 'consumers', singular: 'consumer', keyField: 'id', schemaId: 'ConsumerConfig' },
];

export function keyOf(kind: Kind, entry: Json | undefined): string | undefined {
  if (!isObject(entry)) return undefined;
  const key = entry[kind.keyField];
  if (typeof key === 'string') return key;
  if (kind.collection === 'filters' && typeof entry.kind === 'string') return entry.kind;
  return undefined;
}

export function listOf(document: JsonObject, kind: Kind): Json[] {
  const list = document[kind.collection];
  return Array.isArray(list) ? list : [];
}

/** The entry named `name`; 404 without one, 409 when two share the name (filters only). */
export function find(document: JsonObject, kind: Kind, name: string): { index: number; entry: JsonObject } {
  const list = listOf(document, kind);
  const indices = list.flatMap((entry, index) => (keyOf(kind, entry) === name ? [index] : []));
  if (indices.length === 0) throw new Problem(404, `no ${kind.singular} named ${JSON.stringify(name)}`);
  if (indices.length > 1) {
    throw new Problem(
      409,
      `${indices.length} ${kind.collection} are named ${JSON.stringify(name)} ` +
        `(at ${indices.map((index) => `${kind.collection}[${index}]`).join(', ')}): give each a \`name\``,
    );
  }
  const index = indices[0] as number;
  return { index, entry: list[index] as JsonObject };
}

export function exists(document: JsonObject, kind: Kind, name: string): boolean {
  return listOf(document, kind).some((entry) => keyOf(kind, entry) === name);
}

/** The body of a PUT or POST as an entry named `name`. */
export function entryFromBody(kind: Kind, body: unknown, name: string | undefined): JsonObject {
  if (!isObject(body)) {
    throw new Problem(400, `the body must be a JSON object: one ${kind.singular}`);
  }
  const entry = clone(body);
  if (name !== undefined) {
    const given = keyOf(kind, entry);
    if (entry[kind.keyField] === undefined && given !== name) entry[kind.keyField] = name;
    else if (given !== name) {
      throw new Problem(
        400,
        `the body names ${kind.singular} ${JSON.stringify(given)} but the URL names ${JSON.stringify(name)}`,
        { errors: [{ path: kind.keyField, message: `must be ${JSON.stringify(name)}, as in the URL` }] },
      );
    }
  } else if (keyOf(kind, entry) === undefined) {
    throw new Problem(400, `a new ${kind.singular} needs a \`${kind.keyField}\``, {
      errors: [{ path: kind.keyField, message: 'missing field' }],
    });
  }
  return entry;
}

function withList(document: JsonObject, kind: Kind, list: Json[]): JsonObject {
  return { ...document, [kind.collection]: list };
}

export function insert(document: JsonObject, kind: Kind, entry: JsonObject): JsonObject {
  const name = keyOf(kind, entry) as string;
  if (exists(document, kind, name)) {
    throw new Problem(409, `a ${kind.singular} named ${JSON.stringify(name)} already exists`);
  }
  return withList(document, kind, [...listOf(document, kind), entry]);
}

/** PUT: replaces the entry (If-Match required) or appends a new one. */
export function put(
  document: JsonObject,
  kind: Kind,
  name: string,
  entry: JsonObject,
  ifMatch: string | undefined,
): { document: JsonObject; created: boolean } {
  if (!exists(document, kind, name)) {
    if (ifMatch !== undefined && ifMatch.trim() !== '') {
      throw new Problem(412, `no ${kind.singular} named ${JSON.stringify(name)} to match ${ifMatch}`);
    }
    return { document: insert(document, kind, entry), created: true };
  }
  const found = find(document, kind, name);
  requireMatch(ifMatch, contentEtag(found.entry), `${kind.singular} ${JSON.stringify(name)}`);
  const list = [...listOf(document, kind)];
  list[found.index] = entry;
  return { document: withList(document, kind, list), created: false };
}

export function patch(
  document: JsonObject,
  kind: Kind,
  name: string,
  body: unknown,
  ifMatch: string | undefined,
): { document: JsonObject; entry: JsonObject } {
  const found = find(document, kind, name);
  requireMatch(ifMatch, contentEtag(found.entry), `${kind.singular} ${JSON.stringify(name)}`);
  if (!isObject(body)) {
    throw new Problem(400, 'a merge patch (RFC 7396) of an entry is a JSON object');
  }
  const merged = mergePatch(found.entry, body);
  const entry = entryFromBody(kind, merged, name);
  const list = [...listOf(document, kind)];
  list[found.index] = entry;
  return { document: withList(document, kind, list), entry };
}

export function remove(document: JsonObject, kind: Kind, name: string, ifMatch: string | undefined): JsonObject {
  const found = find(document, kind, name);
  requireMatch(ifMatch, contentEtag(found.entry), `${kind.singular} ${JSON.stringify(name)}`);
  if (kind.collection === 'upstreams') {
    const users = listOf(document, KINDS[1] as Kind)
      .filter((route) => isObject(route) && route.upstream === name)
      .map((route) => keyOf(KINDS[1] as Kind, route));
    if (users.length > 0) {
      throw new Problem(409, `upstream ${JSON.stringify(name)} is used by route${users.length > 1 ? 's' : ''} ${users.map((user) => JSON.stringify(user)).join(', ')}`);
    }
  }
  const list = [...listOf(document, kind)];
  list.splice(found.index, 1);
  return withList(document, kind, list);
}

/** `limit` entries after the cursor, with the cursor of the next page. */
export function page(
  list: Json[],
  kind: Kind,
  options: { limit: number; cursor: string | undefined; tag: string | undefined },
): { items: Json[]; next_cursor: string | null } {
  let entries = list;
  if (options.tag !== undefined) {
    entries = entries.filter((entry) => isObject(entry) && Array.isArray(entry.tags) && entry.tags.includes(options.tag as string));
  }
  let start = 0;
  if (options.cursor !== undefined) {
    const cursor = decodeCursor(options.cursor);
    const at = entries.findIndex((entry) => keyOf(kind, entry) === cursor.after);
    start = at >= 0 ? at + 1 : Math.min(cursor.offset, entries.length);
  }
  const items = entries.slice(start, start + options.limit);
  const last = items[items.length - 1];
  const more = start + options.limit < entries.length;
  return {
    items,
    next_cursor: more && last !== undefined ? encodeCursor({ after: keyOf(kind, last) ?? '', offset: start + items.length }) : null,
  };
}

interface Cursor {
  after: string;
  offset: number;
}

function encodeCursor(cursor: Cursor): string {
  return Buffer.from(JSON.stringify([cursor.after, cursor.offset])).toString('base64url');
}

function decodeCursor(text: string): Cursor {
  try {
    const [after, offset] = JSON.parse(Buffer.from(text, 'base64url').toString('utf8')) as [unknown, unknown];
    if (typeof after === 'string' && Number.isInteger(offset) && (offset as number) >= 0) {
      return { after, offset: offset as number };
    }
  } catch {
    // falls through
  }
  throw new Problem(400, 'cursor: not a cursor this API gave out', { errors: [{ path: 'cursor', message: 'invalid cursor' }] });
}

// ---- credentials ----

/** A credential's id in the API: derived from what identifies it, never from a secret. */
export function credentialId(credential: Json): string {
  if (!isObject(credential)) return '';
  if (typeof credential.hash === 'string') {
    return (credential.hash.split(':')[1] ?? '').toLowerCase().slice(0, 16);
  }
  // A client certificate is named by its subject common name or by one SAN.
  const identity = credential.type === 'mtls'
    ? `mtls\n${String(credential.subject ?? '')}\n${String(credential.san ?? '')}`
    : `${String(credential.type)}\n${String(credential.issuer)}\n${String(credential.subject)}`;
  return createHash('sha256').update(identity).digest('hex').slice(0, 16);
}

export function credentialView(credential: Json): JsonObject {
  return { id: credentialId(credential), ...(isObject(credential) ? credential : {}) };
}

/** An API key in the same form as `gatehouse keygen`, and its stored hash. */
export function newApiKey(): { key: string; hash: string } {
  const key = `gh_${randomBytes(32).toString('base64url')}`;
  return { key, hash: `sha256:${createHash('sha256').update(key).digest('hex')}` };
}

export function credentialFromBody(body: unknown): { credential: JsonObject; key: string | undefined } {
  if (!isObject(body)) throw new Problem(400, 'the body must be a JSON object: {"type": "api_key"}, {"type": "jwt", ...} or {"type": "mtls", ...}');
  const type = body.type ?? 'api_key';
  if (type === 'api_key') {
    for (const field of ['hash', 'key']) {
      if (field in body) {
        throw new Problem(400, 'API keys are made by the server and shown once; do not send one', {
          errors: [{ path: field, message: 'not accepted: the server makes the key' }],
        });
      }
    }
    const { key, hash } = newApiKey();
    return { credential: { ...clone(body), type: 'api_key', hash }, key };
  }
  return { credential: clone(body), key: undefined };
}
