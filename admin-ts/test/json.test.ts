// The diff, patch and merge-patch helpers, and the defaults the schema fills in.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { applyPatch, describe as describeChanges, diff, mergePatch, type Json } from '../src/json.ts';
import { Validator } from '../src/validate.ts';

describe('diff', () => {
  const cases: [string, Json, Json][] = [
    ['a scalar', { a: 1 }, { a: 2 }],
    ['keys added and removed', { a: 1, b: 2 }, { b: 3, c: 4 }],
    ['named entries removed, changed and added', { routes: [{ name: 'a', x: 1 }, { name: 'b', x: 1 }, { name: 'c', x: 1 }] }, { routes: [{ name: 'n', x: 0 }, { name: 'a', x: 2 }, { name: 'c', x: 1 }, { name: 'z', x: 9 }] }],
    ['named entries reordered', { routes: [{ name: 'a' }, { name: 'b' }] }, { routes: [{ name: 'b' }, { name: 'a' }] }],
    ['plain lists', { tags: ['a', 'b'] }, { tags: ['a', 'c', 'd'] }],
    ['the whole value', { a: 1 }, [1, 2]],
  ];
  for (const [name, from, to] of cases) {
    it(`turns one document into the other: ${name}`, () => {
      assert.deepEqual(applyPatch(from, diff(from, to)), to);
    });
  }

  it('adds one named entry with one operation, and names it in the description', () => {
    const from = { routes: [{ name: 'a' }, { name: 'b' }] };
    const to = { routes: [{ name: 'a' }, { name: 'new' }, { name: 'b' }] };
    const patch = diff(from, to);
    assert.deepEqual(patch, [{ op: 'add', path: '/routes/1', value: { name: 'new' } }]);
    assert.equal(describeChanges(from, patch)[0]?.path, 'routes["new"]');
  });

  it('names a change inside an entry by the entry', () => {
    const from = { routes: [{ name: 'x', upstream: 'a' }, { name: 'users', upstream: 'a' }] };
    const to = { routes: [{ name: 'users', upstream: 'b' }] };
    const changes = describeChanges(from, diff(from, to));
    assert.deepEqual(changes.map((change) => `${change.op} ${change.path}`), ['remove routes["x"]', 'replace routes["users"].upstream']);
  });
});

describe('merge patch (RFC 7396)', () => {
  it('merges objects, removes nulls and replaces the rest', () => {
    assert.deepEqual(mergePatch({ a: 1, b: { c: 2, d: 3 }, e: [1] }, { a: null, b: { c: 5 }, e: [2], f: 'x' }), { b: { c: 5, d: 3 }, e: [2], f: 'x' });
  });
});

describe('defaults from the schema', () => {
  const validator = new Validator(undefined);

  it('fills in the defaults of the matching filter kind only', () => {
    const filled = validator.withDefaults({ version: 1, routes: [{ name: 'r', upstream: 'u', filters: [{ kind: 'rate_limit', config: { policies: [] } }] }] }) as any;
    assert.equal(filled.routes[0].priority, 0);
    assert.deepEqual(filled.routes[0].match.paths, []);
    assert.equal(filled.routes[0].filters[0].config.max_keys, 100000);
    assert.equal(filled.ops.address, '127.0.0.1:9901');
  });

  it('makes a document with explicit defaults equal to one without', () => {
    const terse = { version: 1, upstreams: [{ name: 'u', targets: [{ address: '127.0.0.1:1' }] }], routes: [{ name: 'r', upstream: 'u' }] };
    const explicit = { version: 1, filters: [], consumers: [], upstreams: [{ name: 'u', balance: 'round_robin', targets: [{ address: '127.0.0.1:1', weight: 1 }] }], routes: [{ name: 'r', upstream: 'u', priority: 0, filters: [] }] };
    assert.deepEqual(diff(validator.withDefaults(terse), validator.withDefaults(explicit)), []);
    assert.notDeepEqual(diff(terse, explicit), []);
  });

  it('reports schema errors with gateway-style paths, one per problem', () => {
    const errors = validator.schemaErrors({ version: 1, routes: [{ name: 'r', upstream: 'u', filters: [{ kind: 'headers', config: { request: { set: 5 } } }, { kind: 'nope' }] }] });
    assert.deepEqual(errors, [
      { path: 'routes[0].filters[0].config.request.set', message: 'must be object' },
      { path: 'routes[0].filters[1].kind', message: 'unknown value "nope"' },
    ]);
  });
});
