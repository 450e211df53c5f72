// JSON helpers: canonical text (for ETags and equality), RFC 6902 diffs that follow named list
// entries, applying a patch, and RFC 7396 merge patches.

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

export interface PatchOperation {
  op: 'add' | 'remove' | 'replace';
  path: string;
  value?: Json;
}

export function isObject(value: unknown): value is JsonObject {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/** JSON text with object keys sorted, so that equal values have equal text. */
export function canonical(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonical).join(',')}]`;
  if (isObject(value)) {
    const keys = Object.keys(value).sort();
    return `{${keys.map((key) => `${JSON.stringify(key)}:${canonical(value[key])}`).join(',')}}`;
  }
  return JSON.stringify(value ?? null);
}

export function deepEqual(a: unknown, b: unknown): boolean {
  return canonical(a) === canonical(b);
}

export function clone<T>(value: T): T {
  return structuredClone(value);
}

function escapeToken(token: string): string {
  return token.replace(/~/g, '~0').replace(/\//g, '~1');
}

function unescapeToken(token: string): string {
  return token.replace(/~1/g, '/').replace(/~0/g, '~');
}

/** The key that names a list entry: `name`, else `id`, else a filter's `kind`. */
export function entryKey(entry: Json | undefined): string | undefined {
  if (!isObject(entry)) return undefined;
  for (const field of ['name', 'id']) {
    const value = entry[field];
    if (typeof value === 'string') return value;
  }
  if (typeof entry.kind === 'string') return `kind:${entry.kind}`;
  if (typeof entry.address === 'string') return `address:${entry.address}`;
  if (typeof entry.hash === 'string') return `hash:${entry.hash.toLowerCase()}`;
  return undefined;
}

/** Keys of every entry, or undefined when some entry has none or two share one. */
function keysOf(list: Json[]): string[] | undefined {
  const keys: string[] = [];
  const seen = new Set<string>();
  for (const entry of list) {
    const key = entryKey(entry);
    if (key === undefined || seen.has(key)) return undefined;
    seen.add(key);
    keys.push(key);
  }
  return keys;
}

/**
 * An RFC 6902 patch that turns `from` into `to`. Lists of named entries (routes, upstreams,
 * targets, filters...) are compared entry by entry, so that adding one route is one `add`, not a
 * rewrite of every route after it.
 */
export function diff(from: Json, to: Json, path = ''): PatchOperation[] {
  if (deepEqual(from, to)) return [];
  if (isObject(from) && isObject(to)) {
    const ops: PatchOperation[] = [];
    for (const key of Object.keys(from)) {
      if (!(key in to)) ops.push({ op: 'remove', path: `${path}/${escapeToken(key)}` });
    }
    for (const key of Object.keys(to)) {
      const child = `${path}/${escapeToken(key)}`;
      if (!(key in from)) ops.push({ op: 'add', path: child, value: to[key] as Json });
      else ops.push(...diff(from[key] as Json, to[key] as Json, child));
    }
    return ops;
  }
  if (Array.isArray(from) && Array.isArray(to)) {
    const fromKeys = keysOf(from);
    const toKeys = keysOf(to);
    if (fromKeys && toKeys) {
      const kept = fromKeys.filter((key) => toKeys.includes(key));
      const keptInTo = toKeys.filter((key) => fromKeys.includes(key));
      if (kept.join('\u0000') === keptInTo.join('\u0000')) {
        const ops: PatchOperation[] = [];
        // Removals from the end, so earlier indices stay valid.
        for (let index = from.length - 1; index >= 0; index -= 1) {
          if (!toKeys.includes(fromKeys[index] as string)) {
            ops.push({ op: 'remove', path: `${path}/${index}` });
          }
        }
        // The kept entries, at their indices once the removals are done.
        kept.forEach((key, index) => {
          const before = from[fromKeys.indexOf(key)] as Json;
          const after = to[toKeys.indexOf(key)] as Json;
          ops.push(...diff(before, after, `${path}/${index}`));
        });
        // Insertions in ascending order: each lands where it belongs in `to`.
        toKeys.forEach((key, index) => {
          if (!fromKeys.includes(key)) {
            ops.push({ op: 'add', path: `${path}/${index}`, value: to[index] as Json });
          }
        });
        return ops;
      }
    } else if (from.length === to.length) {
      return from.flatMap((entry, index) => diff(entry, to[index] as Json, `${path}/${index}`));
    }
  }
  return [{ op: 'replace', path: path, value: to }];
}

/** Applies an RFC 6902 patch (add, remove, replace) to a copy of `document`. */
export function applyPatch(document: Json, patch: PatchOperation[]): Json {
  let root = clone(document);
  for (const operation of patch) {
    if (operation.path === '') {
      if (operation.op === 'remove') throw new Error('cannot remove the whole document');
      root = clone(operation.value as Json);
      continue;
    }
    const tokens = operation.path.split('/').slice(1).map(unescapeToken);
    const last = tokens.pop() as string;
    let parent: Json = root;
    for (const token of tokens) {
      const next: Json | undefined = Array.isArray(parent)
        ? parent[Number(token)]
        : isObject(parent)
          ? parent[token]
          : undefined;
      if (next === undefined) throw new Error(`no such path: ${operation.path}`);
      parent = next;
    }
    if (Array.isArray(parent)) {
      const index = last === '-' ? parent.length : Number(last);
      if (operation.op === 'add') parent.splice(index, 0, clone(operation.value as Json));
      else if (operation.op === 'remove') parent.splice(index, 1);
      else parent[index] = clone(operation.value as Json);
    } else if (isObject(parent)) {
      if (operation.op === 'remove') delete parent[last];
      else parent[last] = clone(operation.value as Json);
    } else {
      throw new Error(`no such path: ${operation.path}`);
    }
  }
  return root;
}

/** RFC 7396: `null` removes a member, objects merge, anything else replaces. */
export function mergePatch(target: Json, patch: Json): Json {
  if (!isObject(patch)) return clone(patch);
  const result: JsonObject = isObject(target) ? clone(target) : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else result[key] = mergePatch(result[key] ?? null, value);
  }
  return result;
}

/** A JSON pointer as a readable path: `/routes/2/upstream` on a document reads `routes[2].upstream`, or `routes["users"].upstream` when the entry has a name. */
export function readablePath(pointer: string, document?: Json): string {
  if (pointer === '') return '(the whole document)';
  let out = '';
  let node: Json | undefined = document;
  for (const token of pointer.split('/').slice(1).map(unescapeToken)) {
    if (Array.isArray(node) || /^\d+$/.test(token)) {
      const entry: Json | undefined = Array.isArray(node) ? node[Number(token)] : undefined;
      const key = entryKey(entry);
      out += key && !key.includes(':') ? `[${JSON.stringify(key)}]` : `[${token}]`;
      node = entry;
    } else {
      out += out === '' ? token : `.${token}`;
      node = isObject(node) ? node[token] : undefined;
    }
  }
  return out;
}

/** `routes[3].upstream` from an Ajv instance path `/routes/3/upstream`. */
export function pointerToPath(pointer: string): string {
  let out = '';
  for (const token of pointer.split('/').slice(1).map(unescapeToken)) {
    if (/^\d+$/.test(token)) out += `[${token}]`;
    else out += out === '' ? token : `.${token}`;
  }
  return out;
}

/** One line per operation, with the path named against the document as it is at that step. */
export interface Change {
  op: PatchOperation['op'];
  path: string;
  before?: Json;
  after?: Json;
}

export function describe(from: Json, patch: PatchOperation[], written?: Json): Change[] {
  let state = from;
  const changes: Change[] = [];
  for (const operation of patch) {
    const before = operation.op === 'add' ? undefined : get(state, operation.path);
    const next = applyPatch(state, [operation]);
    const named = operation.op === 'add' ? next : state;
    // An added entry is shown as it was written, without the defaults the comparison filled in.
    const shown = operation.op === 'add' && written !== undefined ? (follow(next, written, operation.path) ?? operation.value) : operation.value;
    changes.push({
      op: operation.op,
      path: readablePath(operation.path, named),
      ...(before === undefined ? {} : { before }),
      ...(operation.op === 'remove' ? {} : { after: shown as Json }),
    });
    state = next;
  }
  return changes;
}

function get(document: Json, pointer: string): Json | undefined {
  let node: Json | undefined = document;
  for (const token of pointer.split('/').slice(1).map(unescapeToken)) {
    if (Array.isArray(node)) node = node[Number(token)];
    else if (isObject(node)) node = node[token];
    else return undefined;
  }
  return node;
}

/**
 * The value in `other` at the place `pointer` names in `document`, list entries matched by
 * their names (so the two may hold the same entries at different indices).
 */
function follow(document: Json, other: Json, pointer: string): Json | undefined {
  let node: Json | undefined = document;
  let mirror: Json | undefined = other;
  for (const token of pointer.split('/').slice(1).map(unescapeToken)) {
    if (Array.isArray(node)) {
      const entry: Json | undefined = node[Number(token)];
      const key = entryKey(entry);
      mirror = Array.isArray(mirror)
        ? (key !== undefined ? mirror.find((candidate) => entryKey(candidate) === key) : mirror[Number(token)])
        : undefined;
      node = entry;
    } else if (isObject(node)) {
      node = node[token];
      mirror = isObject(mirror) ? mirror[token] : undefined;
    } else {
      return undefined;
    }
    if (mirror === undefined) return undefined;
  }
  return mirror;
}
