// The admin API (`/api/v1`), its OpenAPI document, and the status page.

import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import swagger from '@fastify/swagger';
import AjvModule from 'ajv';
import { parse as parseYaml } from 'yaml';
import type { Sql } from './db.ts';
import { describe, diff, isObject, type Json, type JsonObject } from './json.ts';
import { Problem, problemSchema } from './problem.ts';
import {
  KINDS,
  credentialFromBody,
  credentialId,
  credentialView,
  entryFromBody,
  find,
  insert,
  keyOf,
  listOf,
  page,
  patch,
  put,
  remove,
  type Kind,
} from './resources.ts';
import { Scraper } from './metrics.ts';
import { packageDir, type Settings } from './settings.ts';
import { Store, audit, configEtag, contentEtag, loadConfig, requireMatch, type Actor } from './store.ts';
import { ROLES, allows, createToken, isRole, parseLifetime, tokenHash, tokenView, type Role, type TokenRow } from './tokens.ts';
import type { Validator } from './validate.ts';

const Ajv = AjvModule.default ?? AjvModule;

declare module 'fastify' {
  interface FastifyRequest {
    actor: (Actor & { role: Role }) | undefined;
  }
  interface FastifyContextConfig {
    /** The least role that may call the route. */
    role?: Role;
  }
}

export interface AppOptions {
  settings: Settings;
  sql: Sql;
  validator: Validator;
  logger?: boolean | object;
}

const JSON_TYPES = ['application/json', 'application/merge-patch+json'];

// ---- schemas for the OpenAPI document ----

const ref = (id: string) => ({ $ref: `${id}#` });
const problemResponse = (description: string) => ({
  description,
  content: { 'application/problem+json': { schema: problemSchema } },
});
const errors = (...codes: number[]) =>
  Object.fromEntries(
    [...new Set([400, 401, 414, 431, ...codes])].map((code) => [
      code,
      problemResponse(
        {
          400: 'Invalid request or config: every error with its path',
          401: 'No valid bearer token',
          403: 'The token\'s role does not allow this',
          404: 'No such resource',
          409: 'Conflict with the current config',
          412: 'If-Match names an older version',
          413: 'Body too large',
          414: 'A path segment is too long',
          431: 'The request head is too large',
          415: 'Unsupported body type',
          428: 'If-Match is required',
        }[code] ?? 'Error',
      ),
    ]),
  );
const json = (schema: object, description = 'OK') => ({
  description,
  content: { 'application/json': { schema } },
});
const ifMatchHeader = {
  type: 'object',
  properties: { 'if-match': { type: 'string', description: 'The ETag the change is based on, or `*`' } },
};
const commentQuery = {
  comment: { type: 'string', maxLength: 500, description: 'Recorded with the version it makes' },
};
const listQuery = {
  type: 'object',
  properties: {
    limit: { type: 'integer', minimum: 1, maximum: 500, default: 100 },
    cursor: { type: 'string', maxLength: 500 },
    tag: { type: 'string', maxLength: 200 },
  },
  additionalProperties: false,
};
const nameParams = {
  type: 'object',
  required: ['name'],
  properties: { name: { type: 'string', minLength: 1, maxLength: 253 } },
};
const idParams = {
  type: 'object',
  required: ['id'],
  properties: { id: { type: 'integer', minimum: 1, maximum: 9007199254740991 } },
};
const versionSchema = {
  type: 'object',
  required: ['id', 'author', 'created_at', 'status'],
  properties: {
    id: { type: 'integer' },
    author: { type: 'string' },
    comment: { type: ['string', 'null'] },
    created_at: { type: 'string' },
    status: { type: 'string', enum: ['pending', 'applied', 'rejected', 'superseded'] },
    error: { type: ['string', 'null'] },
    decided_at: { type: ['string', 'null'] },
    decided_by: { type: ['string', 'null'] },
    has_document: { type: 'boolean' },
  },
};
const patchSchema = {
  type: 'array',
  items: {
    type: 'object',
    required: ['op', 'path'],
    properties: { op: { type: 'string', enum: ['add', 'remove', 'replace'] }, path: { type: 'string' }, value: {} },
  },
};
const changeSchema = {
  type: 'array',
  items: {
    type: 'object',
    required: ['op', 'path'],
    properties: { op: { type: 'string' }, path: { type: 'string' }, before: {}, after: {} },
  },
};
const diffSchema = {
  type: 'object',
  required: ['patch', 'changes'],
  properties: {
    from: { type: ['integer', 'null'] },
    to: { type: ['integer', 'null'] },
    etag: { type: 'string' },
    patch: patchSchema,
    changes: changeSchema,
  },
};
const tokenSchema = {
  type: 'object',
  required: ['id', 'name', 'role', 'prefix', 'created_at'],
  properties: {
    id: { type: 'integer' },
    name: { type: 'string' },
    role: { type: 'string', enum: [...ROLES] },
    prefix: { type: 'string' },
    created_at: { type: 'string' },
    created_by: { type: 'string' },
    expires_at: { type: ['string', 'null'] },
    last_used_at: { type: ['string', 'null'] },
    revoked_at: { type: ['string', 'null'] },
    token: { type: 'string', description: 'Only in the answer that made it' },
  },
};
const nodeSchema = {
  type: 'object',
  required: ['node'],
  properties: {
    node: { type: 'string' },
    applied_version: { type: ['integer', 'null'] },
    applied_at: { type: ['string', 'null'] },
    rejected_version: { type: ['integer', 'null'] },
    rejected_error: { type: ['string', 'null'] },
    rejected_at: { type: ['string', 'null'] },
    ops_address: { type: ['string', 'null'] },
    seen_at: { type: 'string' },
    behind: { type: 'integer', description: 'Versions between the latest and the one it serves' },
  },
};
const credentialSchema = {
  type: 'object',
  required: ['id', 'type'],
  properties: {
    id: { type: 'string' },
    type: { type: 'string' },
    hash: { type: 'string' },
    key: { type: 'string', description: 'The API key in clear: only in the answer that made it' },
    disabled: { type: 'boolean' },
    expires_at: { type: ['string', 'null'] },
    issuer: { type: 'string' },
    subject: { type: 'string' },
  },
};

function iso(value: unknown): string | null {
  return value instanceof Date ? value.toISOString() : value === null || value === undefined ? null : String(value);
}

function commentOf(request: FastifyRequest): string | undefined {
  const query = request.query as { comment?: string } | undefined;
  if (query?.comment?.includes('\u0000')) {
    throw new Problem(400, 'comment: contains a NUL character', { errors: [{ path: 'comment', message: 'contains a NUL character' }] });
  }
  return query?.comment;
}

function ifMatchOf(request: FastifyRequest): string | undefined {
  const header = request.headers['if-match'];
  return Array.isArray(header) ? header.join(',') : header;
}

function actorOf(request: FastifyRequest): Actor {
  const actor = request.actor;
  if (!actor) throw new Problem(401, 'a bearer token is required');
  return { name: actor.name, tokenId: actor.tokenId, source: actor.source };
}

export async function buildApp(options: AppOptions): Promise<FastifyInstance> {
  const { sql, validator, settings } = options;
  const store = new Store(sql, validator);
  const scraper = new Scraper();
  const app = Fastify({
    // Requests are logged by method and path only: no header (where tokens travel) and no query
    // string (where a client may have put one by mistake).
    logger: options.logger ?? {
      level: 'info',
      serializers: {
        req: (request: { method: string; url: string; ip?: string; socket?: { remoteAddress?: string } }) => ({
          method: request.method,
          path: request.url.split('?')[0],
          remote: request.ip ?? request.socket?.remoteAddress,
        }),
      },
    },
    bodyLimit: settings.bodyLimit,
    trustProxy: false,
    routerOptions: { maxParamLength: 1024 },
    // What Node's HTTP parser refuses (a head over 16 KiB, a malformed request) is answered as
    // problem+json too.
    clientErrorHandler: (error: Error & { code?: string }, socket) => {
      const status = error.code === 'HPE_HEADER_OVERFLOW' ? 431 : 400;
      const body = JSON.stringify(new Problem(status, status === 431 ? 'the request head is larger than 16 KiB' : 'the request is malformed').body());
      if (socket.writable) {
        socket.end(`HTTP/1.1 ${status} ${status === 431 ? 'Request Header Fields Too Large' : 'Bad Request'}\r\ncontent-type: application/problem+json\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`);
      } else {
        socket.destroy(error);
      }
    },
    // Errors the router raises before a route runs (a path segment over 1024 bytes, a bad URL)
    // are problem+json like every other error.
    frameworkErrors: (error, _request, reply: FastifyReply) => {
      const status = (error as { statusCode?: number }).statusCode ?? 400;
      void reply
        .code(status)
        .header('content-type', 'application/problem+json')
        .send(new Problem(status, status === 414 ? 'a path segment is longer than 1024 bytes' : 'the request URL is malformed').body());
    },
    // Route schemas document the API. Parameters and queries are checked by Ajv; bodies are
    // checked as whole config documents (schema, then the gateway's compile step), so that every
    // error comes back with its path in the document.
    ajv: { customOptions: { removeAdditional: false, useDefaults: true, coerceTypes: true, allErrors: true, strict: false } },
  });
  app.decorateRequest('actor', undefined);

  const paramsAjv = new Ajv({ coerceTypes: true, useDefaults: true, allErrors: true, strict: false });
  app.setValidatorCompiler(({ schema, httpPart }) => {
    if (httpPart === 'body') return () => true;
    return paramsAjv.compile(schema);
  });
  app.setSerializerCompiler(() => (data) => JSON.stringify(data));

  for (const schema of validator.schemas) app.addSchema(schema);

  app.addContentTypeParser('application/merge-patch+json', { parseAs: 'string' }, (_request, body, done) => {
    try {
      done(null, JSON.parse(body as string));
    } catch {
      done(new Problem(400, 'the body is not valid JSON'), undefined);
    }
  });
  for (const type of ['application/yaml', 'application/x-yaml', 'text/yaml']) {
    app.addContentTypeParser(type, { parseAs: 'string' }, (_request, body, done) => {
      try {
        done(null, parseYaml(body as string) as unknown);
      } catch (error) {
        done(new Problem(400, `the body is not valid YAML: ${(error as Error).message.split('\n')[0]}`), undefined);
      }
    });
  }

  app.setErrorHandler((error: Error & { statusCode?: number; validation?: unknown[]; code?: string }, request, reply) => {
    let problem: Problem;
    if (error instanceof Problem) problem = error;
    else if (error.validation) {
      const details = (error.validation as { instancePath?: string; message?: string; params?: Record<string, unknown> }[]).map((item) => ({
        path: (item.instancePath ?? '').replace(/^\//, '').replace(/\//g, '.') || String(item.params?.missingProperty ?? ''),
        message: item.message ?? 'is invalid',
      }));
      problem = new Problem(400, `invalid request ${(error as { validationContext?: string }).validationContext ?? ''}`.trim(), { errors: details });
    } else if (error.statusCode && error.statusCode >= 400 && error.statusCode < 500) {
      const detail = error.code === 'FST_ERR_CTP_BODY_TOO_LARGE'
        ? `the body is larger than ${settings.bodyLimit} bytes`
        : error.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE'
          ? 'send application/json (application/merge-patch+json for PATCH, application/yaml for a whole config)'
          : error.message;
      problem = new Problem(error.statusCode, detail);
    } else if (['22P05', '22021', '54000'].includes(String((error as { code?: string }).code))) {
      // Text PostgreSQL cannot store (a NUL, an invalid byte sequence) or a value too large.
      problem = new Problem(400, 'the config store cannot keep this value (a NUL character, or too large)');
    } else if ((error as { code?: string }).code === '23503' || (error as { code?: string }).code === '23505' || (error as { code?: string }).code === '23514') {
      // A constraint of the store refused the write (a reference, a duplicate, a key in clear).
      const constraint = (error as { constraint_name?: string }).constraint_name;
      problem = new Problem(409, `the config store refused the change${constraint ? ` (constraint ${constraint})` : ''}`);
    } else {
      request.log.error({ err: { message: error.message, code: error.code } }, 'request failed');
      problem = new Problem(500, 'the admin service failed to answer; its log has the cause');
    }
    void reply
      .code(problem.status)
      .headers(problem.headers)
      .header('content-type', 'application/problem+json')
      .send(problem.body());
  });

  app.setNotFoundHandler((request, reply) => {
    void reply
      .code(404)
      .header('content-type', 'application/problem+json')
      .send(new Problem(404, `no such endpoint: ${request.method} ${request.url.split('?')[0]}`).body());
  });

  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'Gatehouse admin API',
        version: '1',
        description:
          'Edits the PostgreSQL config store of a Gatehouse fleet. Every endpoint needs a bearer ' +
          'token (`Authorization: Bearer ghadm_...`); every change is one config version, with ' +
          'its author, comment and audit row.',
      },
      components: {
        securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } },
      },
      security: [{ bearer: [] }],
    },
    refResolver: { buildLocalReference: (json, _baseUri, _fragment, i) => String(json.$id ?? `def-${i}`) },
  });

  // ---- authentication ----

  app.addHook('onRequest', async (request) => {
    const path = request.url.split('?')[0] ?? '';
    if (!path.startsWith('/api/')) return;
    const header = request.headers.authorization;
    const match = header ? /^Bearer\s+(\S+)\s*$/i.exec(header) : null;
    const unauthorized = (detail: string) =>
      new Problem(401, detail, { headers: { 'www-authenticate': 'Bearer realm="gatehouse-admin"' } });
    if (!match) throw unauthorized('a bearer token is required (Authorization: Bearer ghadm_...)');
    const [row] = await sql<(TokenRow & { expired: boolean })[]>`
      SELECT id, name, role, prefix, created_at, created_by, expires_at, last_used_at, revoked_at,
             expires_at IS NOT NULL AND expires_at <= now() AS expired
      FROM admin_tokens WHERE hash = ${tokenHash(match[1] as string)}`;
    if (!row) throw unauthorized('the token is not known');
    if (row.revoked_at) throw unauthorized('the token was revoked');
    if (row.expired) throw unauthorized('the token has expired');
    request.actor = { name: row.name, tokenId: row.id, role: row.role, source: request.ip };
    const needed = request.routeOptions.config.role ?? (request.method === 'GET' || request.method === 'HEAD' ? 'read' : 'write');
    if (!allows(row.role, needed)) {
      throw new Problem(403, `this needs a ${needed} token; ${JSON.stringify(row.name)} is a ${row.role} token`);
    }
    if (!row.last_used_at || Date.now() - row.last_used_at.getTime() > 60_000) {
      await sql`UPDATE admin_tokens SET last_used_at = now() WHERE id = ${row.id}`;
    }
  });

  const withEtag = (reply: FastifyReply, etag: string, version: number | null) => {
    void reply.header('etag', etag);
    if (version !== null) void reply.header('gatehouse-config-version', String(version));
  };

  await app.register(
    async (api) => {
      // ---- the whole document ----
      api.get('/config', {
        schema: { tags: ['config'], summary: 'The whole config document', response: { 200: json(ref('GatehouseConfig')), ...errors(403) } },
      }, async (_request, reply) => {
        const loaded = await store.read();
        withEtag(reply, configEtag(loaded.version), loaded.version);
        return loaded.document;
      });

      api.put('/config', {
        schema: {
          tags: ['config'],
          summary: 'Replace the whole document (one version)',
          headers: ifMatchHeader,
          querystring: { type: 'object', properties: commentQuery },
          body: ref('GatehouseConfig'),
          response: { 200: json(ref('GatehouseConfig')), ...errors(400, 403, 412, 413, 415, 428) },
        },
      }, async (request, reply) => {
        const body = request.body;
        if (!isObject(body)) throw new Problem(400, 'the body must be a config document (a JSON or YAML object)');
        const ifMatch = ifMatchOf(request);
        const result = await store.write(
          { actor: actorOf(request), action: 'PUT /api/v1/config', resource: 'config', comment: commentOf(request) },
          (current) => {
            requireMatch(ifMatch, configEtag(current.version), 'the config');
            return { document: body, value: null };
          },
        );
        withEtag(reply, configEtag(result.current), result.current);
        return result.document;
      });

      api.post('/config/validate', {
        schema: {
          tags: ['config'],
          summary: 'Validate a document without storing it',
          body: ref('GatehouseConfig'),
          response: {
            200: json({ type: 'object', required: ['ok'], properties: { ok: { type: 'boolean' }, compiled: { type: 'boolean' } } }),
            ...errors(400, 403, 413, 415),
          },
        },
      }, async (request) => {
        const { errors: found, compiled } = await validator.validate(request.body);
        if (found.length > 0) throw new Problem(400, `${found.length} error${found.length === 1 ? '' : 's'} in config`, { errors: found, type: 'invalid-config', title: 'Invalid config' });
        return { ok: true, compiled };
      });

      api.post('/config/diff', {
        schema: {
          tags: ['config'],
          summary: 'What storing this document would change, with defaults applied to both sides',
          body: ref('GatehouseConfig'),
          response: { 200: json(diffSchema), ...errors(400, 403, 413, 415) },
        },
      }, async (request, reply) => {
        if (!isObject(request.body)) throw new Problem(400, 'the body must be a config document');
        const loaded = await store.read();
        const from = validator.withDefaults(loaded.document);
        const to = validator.withDefaults(request.body as Json);
        const operations = diff(from, to);
        void reply.header('etag', configEtag(loaded.version));
        return { from: loaded.version, to: null, etag: configEtag(loaded.version), patch: operations, changes: describe(from, operations, request.body as Json) };
      });

      // ---- one entry at a time ----
      for (const kind of KINDS) registerKind(api, kind);

      // ---- credentials ----
      const consumers = KINDS[3] as Kind;
      const consumerParams = { type: 'object', required: ['id'], properties: { id: { type: 'string', minLength: 1, maxLength: 253 } } };
      api.get('/consumers/:id/credentials', {
        schema: { tags: ['consumers'], summary: 'A consumer\'s credentials (API keys show only their hash)', params: consumerParams, response: { 200: json({ type: 'object', required: ['items'], properties: { items: { type: 'array', items: credentialSchema } } }), ...errors(403, 404) } },
      }, async (request) => {
        const { id } = request.params as { id: string };
        const { entry } = find((await store.read()).document, consumers, id);
        const credentials = Array.isArray(entry.credentials) ? entry.credentials : [];
        return { items: credentials.map(credentialView) };
      });
      api.post('/consumers/:id/credentials', {
        schema: {
          tags: ['consumers'],
          summary: 'Add a credential; an API key is made here and shown once',
          params: consumerParams,
          querystring: { type: 'object', properties: commentQuery },
          body: {
            type: 'object',
            properties: {
              type: { type: 'string', enum: ['api_key', 'jwt', 'mtls'], default: 'api_key' },
              expires_at: { type: 'string', description: 'RFC 3339 (API keys)' },
              disabled: { type: 'boolean' },
              issuer: { type: 'string' },
              subject: { type: 'string', description: 'JWT subject claim, or (mtls) the client certificate\'s subject common name' },
              san: { type: 'string', description: '(mtls) one subject alternative name of the client certificate' },
            },
          },
          response: { 201: json(credentialSchema, 'Created; `key` is the API key, shown this once'), ...errors(400, 403, 404, 409, 413, 415) },
        },
      }, async (request, reply) => {
        const { id } = request.params as { id: string };
        const { credential, key } = credentialFromBody(request.body);
        const result = await store.write(
          { actor: actorOf(request), action: `POST /api/v1/consumers/${id}/credentials`, resource: `consumers/${id}/credentials/${credentialId(credential)}`, comment: commentOf(request) ?? `new ${String(credential.type)} credential for ${id}` },
          (current) => {
            const { index, entry } = find(current.document, consumers, id);
            const existing = Array.isArray(entry.credentials) ? entry.credentials : [];
            if (existing.some((other) => credentialId(other) === credentialId(credential))) {
              throw new Problem(409, `consumer ${JSON.stringify(id)} already has this credential`);
            }
            const list = [...listOf(current.document, consumers)];
            list[index] = { ...entry, credentials: [...existing, credential] };
            return { document: { ...current.document, consumers: list }, value: null };
          },
        );
        if (result.current !== null) void reply.header('gatehouse-config-version', String(result.current));
        void reply.code(201).header('location', `/api/v1/consumers/${encodeURIComponent(id)}/credentials/${credentialId(credential)}`);
        return { ...credentialView(credential), ...(key ? { key } : {}) };
      });
      api.delete('/consumers/:id/credentials/:credential', {
        schema: {
          tags: ['consumers'],
          summary: 'Remove a credential',
          params: { type: 'object', required: ['id', 'credential'], properties: { id: { type: 'string', minLength: 1 }, credential: { type: 'string', minLength: 1 } } },
          querystring: { type: 'object', properties: commentQuery },
          response: { 204: { description: 'Removed', type: 'null' }, ...errors(403, 404) },
        },
      }, async (request, reply) => {
        const { id, credential } = request.params as { id: string; credential: string };
        await store.write(
          { actor: actorOf(request), action: `DELETE /api/v1/consumers/${id}/credentials/${credential}`, resource: `consumers/${id}/credentials/${credential}`, comment: commentOf(request) },
          (current) => {
            const { index, entry } = find(current.document, consumers, id);
            const existing = Array.isArray(entry.credentials) ? entry.credentials : [];
            const kept = existing.filter((other) => credentialId(other) !== credential);
            if (kept.length === existing.length) throw new Problem(404, `consumer ${JSON.stringify(id)} has no credential ${JSON.stringify(credential)}`);
            const list = [...listOf(current.document, consumers)];
            list[index] = { ...entry, credentials: kept };
            return { document: { ...current.document, consumers: list }, value: null };
          },
        );
        return reply.code(204).send();
      });

      // ---- versions ----
      api.get('/versions', {
        schema: {
          tags: ['versions'],
          summary: 'Config versions, newest first',
          querystring: { type: 'object', properties: { limit: { type: 'integer', minimum: 1, maximum: 500, default: 50 }, before: { type: 'integer', minimum: 1, maximum: 9007199254740991 } }, additionalProperties: false },
          response: { 200: json({ type: 'object', required: ['items'], properties: { items: { type: 'array', items: versionSchema }, next_before: { type: ['integer', 'null'] } } }), ...errors(400, 403) },
        },
      }, async (request) => {
        const { limit, before } = request.query as { limit: number; before?: number };
        const rows = await sql<JsonObject[]>`
          SELECT v.id, v.author, v.comment, v.created_at, v.status, v.error, v.decided_at, v.decided_by,
                 EXISTS (SELECT 1 FROM config_snapshots s WHERE s.version_id = v.id) AS has_document
          FROM config_versions v
          WHERE ${before === undefined ? sql`true` : sql`v.id < ${before}`}
          ORDER BY v.id DESC LIMIT ${limit + 1}`;
        const items = rows.slice(0, limit).map(versionView);
        const last = items[items.length - 1];
        return { items, next_before: rows.length > limit && last ? last.id : null };
      });
      api.get('/versions/:id', {
        schema: {
          tags: ['versions'],
          summary: 'One version, with its document',
          params: idParams,
          response: { 200: json({ type: 'object', required: ['version'], properties: { version: versionSchema, document: { anyOf: [ref('GatehouseConfig'), { type: 'null' }] } } }), ...errors(400, 403, 404) },
        },
      }, async (request) => {
        const { id } = request.params as { id: number };
        const [row] = await sql<JsonObject[]>`
          SELECT v.id, v.author, v.comment, v.created_at, v.status, v.error, v.decided_at, v.decided_by,
                 s.document, s.document IS NOT NULL AS has_document
          FROM config_versions v LEFT JOIN config_snapshots s ON s.version_id = v.id WHERE v.id = ${id}`;
        if (!row) throw new Problem(404, `no version ${id}`);
        return { version: versionView(row), document: row.document ?? null };
      });
      api.get('/versions/:id/diff', {
        schema: {
          tags: ['versions'],
          summary: 'RFC 6902 patch from `against` (default: the version before) to this version, defaults applied',
          params: idParams,
          querystring: { type: 'object', properties: { against: { type: 'integer', minimum: 1, maximum: 9007199254740991 } }, additionalProperties: false },
          response: { 200: json(diffSchema), ...errors(400, 403, 404, 409) },
        },
      }, async (request) => {
        const { id } = request.params as { id: number };
        const { against } = request.query as { against?: number };
        const to = await snapshot(id);
        let fromId: number | null = against ?? null;
        if (fromId === null) {
          const [previous] = await sql<{ version_id: number }[]>`
            SELECT version_id FROM config_snapshots WHERE version_id < ${id} ORDER BY version_id DESC LIMIT 1`;
          fromId = previous?.version_id ?? null;
        }
        const from = fromId === null ? { version: 1 } : await snapshot(fromId);
        const a = validator.withDefaults(from as Json);
        const b = validator.withDefaults(to as Json);
        const operations = diff(a, b);
        return { from: fromId, to: id, patch: operations, changes: describe(a, operations, to as Json) };
      });
      api.post('/versions/:id/rollback', {
        schema: {
          tags: ['versions'],
          summary: 'Store version `id`\'s document as a new version (history is never rewound)',
          params: idParams,
          headers: ifMatchHeader,
          querystring: { type: 'object', properties: commentQuery },
          response: { 200: json({ type: 'object', required: ['version'], properties: { version: { type: ['integer', 'null'] }, changed: { type: 'boolean' } } }), ...errors(400, 403, 404, 409, 412) },
        },
      }, async (request, reply) => {
        const { id } = request.params as { id: number };
        const document = await snapshot(id);
        const ifMatch = ifMatchOf(request);
        const result = await store.write(
          { actor: actorOf(request), action: `POST /api/v1/versions/${id}/rollback`, resource: 'config', comment: commentOf(request) ?? `rollback to version ${id}` },
          (current) => {
            if (ifMatch !== undefined) requireMatch(ifMatch, configEtag(current.version), 'the config');
            return { document, value: null };
          },
        );
        withEtag(reply, configEtag(result.current), result.current);
        return { version: result.current, changed: result.version !== null };
      });

      async function snapshot(id: number): Promise<JsonObject> {
        const [row] = await sql<{ id: number; document: JsonObject | null }[]>`
          SELECT v.id, s.document FROM config_versions v
          LEFT JOIN config_snapshots s ON s.version_id = v.id WHERE v.id = ${id}`;
        if (!row) throw new Problem(404, `no version ${id}`);
        if (!row.document) throw new Problem(409, `version ${id} predates the config history: its document was not kept`);
        return row.document;
      }

      // ---- nodes ----
      api.get('/nodes', {
        schema: { tags: ['nodes'], summary: 'What each gateway node serves, and what it refused and why', response: { 200: json({ type: 'object', required: ['items'], properties: { latest_version: { type: ['integer', 'null'] }, items: { type: 'array', items: nodeSchema } } }), ...errors(403) } },
      }, async () => nodes());

      async function nodes() {
        const [latest] = await sql<{ id: number | null }[]>`SELECT max(id) AS id FROM config_versions`;
        const rows = await sql<JsonObject[]>`SELECT * FROM config_nodes ORDER BY node`;
        const latestId = latest?.id ?? null;
        return {
          latest_version: latestId,
          items: rows.map((row) => ({
            node: row.node,
            applied_version: row.applied_version ?? null,
            applied_at: iso(row.applied_at),
            rejected_version: row.rejected_version ?? null,
            rejected_error: row.rejected_error ?? null,
            rejected_at: iso(row.rejected_at),
            ops_address: row.ops_address ?? null,
            seen_at: iso(row.seen_at) ?? '',
            behind: latestId === null ? 0 : latestId - Number(row.applied_version ?? 0),
          })),
        };
      }

      // ---- live events ----
      api.get('/events', {
        schema: { tags: ['events'], summary: 'Server-Sent Events: `version` when a new config version commits', response: { 200: { description: 'text/event-stream', content: { 'text/event-stream': { schema: { type: 'string' } } } }, ...errors(403) } },
      }, async (request, reply) => {
        reply.hijack();
        const raw = reply.raw;
        raw.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store', connection: 'keep-alive' });
        let last: number | null = null;
        const send = async () => {
          const [row] = await sql<{ id: number | null }[]>`SELECT max(id) AS id FROM config_versions`;
          const id = row?.id ?? null;
          if (id !== last) {
            last = id;
            raw.write(`event: version\ndata: ${JSON.stringify({ version: id })}\n\n`);
          }
        };
        let closed = false;
        let stop = () => {};
        // The response's close: the client went away (the request's own close fires as soon as
        // its head is read).
        raw.on('close', () => {
          closed = true;
          stop();
        });
        // Listen first, then say where the store is: a version committed in between is in the
        // first event or in a notification, never lost.
        const listener = await sql.listen('gatehouse_config', () => {
          send().catch(() => {});
        });
        await send();
        const heartbeat = setInterval(() => raw.write(': keep-alive\n\n'), 15_000);
        stop = () => {
          clearInterval(heartbeat);
          void listener.unlisten();
        };
        if (closed) stop();
      });

      // ---- tokens and audit (admin) ----
      api.get('/tokens', {
        config: { role: 'admin' },
        schema: { tags: ['tokens'], summary: 'Tokens (never their value)', response: { 200: json({ type: 'object', required: ['items'], properties: { items: { type: 'array', items: tokenSchema } } }), ...errors(403) } },
      }, async () => {
        const rows = await sql<TokenRow[]>`
          SELECT id, name, role, prefix, created_at, created_by, expires_at, last_used_at, revoked_at
          FROM admin_tokens ORDER BY id`;
        return { items: rows.map(tokenView) };
      });
      api.post('/tokens', {
        config: { role: 'admin' },
        schema: {
          tags: ['tokens'],
          summary: 'Make a token; its value is in this answer only',
          body: {
            type: 'object',
            required: ['name', 'role'],
            properties: {
              name: { type: 'string', minLength: 1, maxLength: 200 },
              role: { type: 'string', enum: [...ROLES] },
              expires_in: { type: 'string', description: '`30d`, `12h`, `90m` or `never` (default 90d)' },
            },
            additionalProperties: false,
          },
          response: { 201: json(tokenSchema), ...errors(400, 403, 413, 415) },
        },
      }, async (request, reply) => {
        const body = request.body;
        if (!isObject(body) || typeof body.name !== 'string' || body.name.trim() === '' || body.name.length > 200 || !isRole(body.role)) {
          throw new Problem(400, 'a token needs a `name` and a `role` (read, write or admin)', {
            errors: [
              ...(!isObject(body) || typeof body.name !== 'string' || body.name.trim() === '' || (body.name as string).length > 200 ? [{ path: 'name', message: 'a non-empty string of at most 200 characters' }] : []),
              ...(!isObject(body) || !isRole(body.role) ? [{ path: 'role', message: 'one of read, write, admin' }] : []),
            ],
          });
        }
        const unknown = Object.keys(body).filter((key) => !['name', 'role', 'expires_in'].includes(key));
        if (unknown.length > 0) throw new Problem(400, 'unknown fields', { errors: unknown.map((key) => ({ path: key, message: 'unknown field' })) });
        let lifetime: number | null;
        try {
          lifetime = parseLifetime(typeof body.expires_in === 'string' ? body.expires_in : '90d');
        } catch (error) {
          throw new Problem(400, (error as Error).message, { errors: [{ path: 'expires_in', message: (error as Error).message }] });
        }
        const actor = actorOf(request);
        const created = await sql.begin(async (tx) => {
          const made = await createToken(tx, { name: body.name as string, role: body.role as Role, lifetimeSeconds: lifetime, createdBy: actor.name });
          await audit(tx, { actor, action: 'POST /api/v1/tokens', resource: `tokens/${made.row.id}`, comment: `${made.row.role} token ${made.row.name}` }, null);
          return made;
        });
        void reply.code(201);
        return { ...tokenView(created.row), token: created.token };
      });
      api.delete('/tokens/:id', {
        config: { role: 'admin' },
        schema: { tags: ['tokens'], summary: 'Revoke a token', params: idParams, response: { 204: { description: 'Revoked', type: 'null' }, ...errors(400, 403, 404) } },
      }, async (request, reply) => {
        const { id } = request.params as { id: number };
        const actor = actorOf(request);
        const found = await sql.begin(async (tx) => {
          const rows = await tx`UPDATE admin_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = ${id} RETURNING id`;
          if (rows.length === 0) return false;
          await audit(tx, { actor, action: `DELETE /api/v1/tokens/${id}`, resource: `tokens/${id}`, comment: undefined }, null);
          return true;
        });
        if (!found) throw new Problem(404, `no token ${id}`);
        return reply.code(204).send();
      });
      api.get('/audit', {
        config: { role: 'admin' },
        schema: {
          tags: ['audit'],
          summary: 'Who changed what, newest first',
          querystring: { type: 'object', properties: { limit: { type: 'integer', minimum: 1, maximum: 500, default: 100 }, before: { type: 'integer', minimum: 1, maximum: 9007199254740991 } }, additionalProperties: false },
          response: {
            200: json({
              type: 'object',
              required: ['items'],
              properties: {
                next_before: { type: ['integer', 'null'] },
                items: {
                  type: 'array',
                  items: {
                    type: 'object',
                    required: ['id', 'at', 'actor', 'action'],
                    properties: {
                      id: { type: 'integer' }, at: { type: 'string' }, actor: { type: 'string' }, token_id: { type: ['integer', 'null'] },
                      action: { type: 'string' }, resource: { type: ['string', 'null'] }, version_id: { type: ['integer', 'null'] },
                      source: { type: ['string', 'null'] }, comment: { type: ['string', 'null'] },
                    },
                  },
                },
              },
            }),
            ...errors(400, 403),
          },
        },
      }, async (request) => {
        const { limit, before } = request.query as { limit: number; before?: number };
        const rows = await sql<JsonObject[]>`
          SELECT id, at, actor, token_id, action, resource, version_id, source, comment FROM admin_audit
          WHERE ${before === undefined ? sql`true` : sql`id < ${before}`}
          ORDER BY id DESC LIMIT ${limit + 1}`;
        const items = rows.slice(0, limit).map((row) => ({ ...row, at: iso(row.at) }));
        const last = items[items.length - 1];
        return { items, next_before: rows.length > limit && last ? ((last as JsonObject).id as number) : null };
      });

      // ---- what the status page shows ----
      api.get('/status', {
        schema: { tags: ['status'], summary: 'Routes, targets, versions, nodes and live traffic, for the status page', response: { 200: json({ type: 'object' }), ...errors(403) } },
      }, async () => {
        const [loaded, nodeList, versions] = await Promise.all([
          store.read(),
          nodes(),
          sql<JsonObject[]>`SELECT id, author, comment, created_at, status, error, decided_at, decided_by, true AS has_document
                            FROM config_versions ORDER BY id DESC LIMIT 10`,
        ]);
        const urls = settings.metricsUrls.length > 0
          ? settings.metricsUrls
          : nodeList.items.flatMap((node) => (node.ops_address ? [`http://${String(node.ops_address).replace(/^0\.0\.0\.0:/, '127.0.0.1:')}/metrics`] : []));
        await scraper.refresh(urls);
        const health = scraper.targets();
        const routes = listOf(loaded.document, KINDS[1] as Kind).filter(isObject).map((route) => ({
          name: route.name,
          upstream: route.upstream,
          match: route.match ?? {},
        }));
        const upstreams = listOf(loaded.document, KINDS[0] as Kind).filter(isObject).map((upstream) => ({
          name: upstream.name,
          targets: (Array.isArray(upstream.targets) ? upstream.targets : []).filter(isObject).map((target) => {
            const state = health.find((item) => item.upstream === upstream.name && item.target === target.address);
            return { address: target.address, healthy: state ? state.healthy : null, healthy_on: state?.healthy_on ?? 0, reported_by: state?.reported_by ?? 0 };
          }),
        }));
        return {
          version: loaded.version,
          routes,
          upstreams,
          versions: versions.map(versionView),
          nodes: nodeList.items,
          traffic: scraper.traffic(),
          sources: scraper.sourceStates(),
          at: new Date().toISOString(),
        };
      });
    },
    { prefix: '/api/v1' },
  );

  function registerKind(api: FastifyInstance, kind: Kind) {
    const base = `/${kind.collection}`;
    const tags = [kind.collection];
    const entrySchema = ref(kind.schemaId);
    api.get(base, {
      schema: {
        tags,
        summary: `List ${kind.collection}${kind.collection === 'filters' ? ' (the global chain)' : ''}`,
        querystring: listQuery,
        response: { 200: json({ type: 'object', required: ['items', 'next_cursor'], properties: { items: { type: 'array', items: entrySchema }, next_cursor: { type: ['string', 'null'] } } }), ...errors(400, 403) },
      },
    }, async (request, reply) => {
      const query = request.query as { limit: number; cursor?: string; tag?: string };
      const loaded = await store.read();
      void reply.header('gatehouse-config-version', String(loaded.version ?? 0));
      return page(listOf(loaded.document, kind), kind, { limit: query.limit, cursor: query.cursor, tag: query.tag });
    });
    api.post(base, {
      schema: {
        tags,
        summary: `Add a ${kind.singular}`,
        querystring: { type: 'object', properties: commentQuery },
        body: entrySchema,
        response: { 201: json(entrySchema, 'Created'), ...errors(400, 403, 409, 413, 415) },
      },
    }, async (request, reply) => {
      const entry = entryFromBody(kind, request.body, undefined);
      const name = keyOf(kind, entry) as string;
      const result = await store.write(
        { actor: actorOf(request), action: `POST /api/v1${base}`, resource: `${kind.collection}/${name}`, comment: commentOf(request) },
        (current) => ({ document: insert(current.document, kind, entry), value: null }),
      );
      withEtag(reply, contentEtag(entry), result.current);
      void reply.code(201).header('location', `/api/v1${base}/${encodeURIComponent(name)}`);
      return entry;
    });
    api.get(`${base}/:name`, {
      schema: { tags, summary: `One ${kind.singular}`, params: nameParams, response: { 200: json(entrySchema), ...errors(403, 404, 409) } },
    }, async (request, reply) => {
      const { name } = request.params as { name: string };
      const loaded = await store.read();
      const { entry } = find(loaded.document, kind, name);
      withEtag(reply, contentEtag(entry), loaded.version);
      return entry;
    });
    api.put(`${base}/:name`, {
      schema: {
        tags,
        summary: `Replace a ${kind.singular} (If-Match), or add it`,
        params: nameParams,
        headers: ifMatchHeader,
        querystring: { type: 'object', properties: commentQuery },
        body: entrySchema,
        response: { 200: json(entrySchema, 'Replaced'), 201: json(entrySchema, 'Created'), ...errors(400, 403, 409, 412, 413, 415, 428) },
      },
    }, async (request, reply) => {
      const { name } = request.params as { name: string };
      const entry = entryFromBody(kind, request.body, name);
      const ifMatch = ifMatchOf(request);
      const result = await store.write(
        { actor: actorOf(request), action: `PUT /api/v1${base}/${name}`, resource: `${kind.collection}/${name}`, comment: commentOf(request) },
        (current) => {
          const outcome = put(current.document, kind, name, entry, ifMatch);
          return { document: outcome.document, value: outcome.created };
        },
      );
      withEtag(reply, contentEtag(entry), result.current);
      void reply.code(result.value ? 201 : 200);
      return entry;
    });
    api.patch(`${base}/:name`, {
      schema: {
        tags,
        summary: `Change a ${kind.singular} with a JSON merge patch (RFC 7396)`,
        params: nameParams,
        headers: ifMatchHeader,
        querystring: { type: 'object', properties: commentQuery },
        body: { type: 'object', description: 'A JSON merge patch: `null` removes a key' },
        response: { 200: json(entrySchema), ...errors(400, 403, 404, 409, 412, 413, 415, 428) },
      },
    }, async (request, reply) => {
      const { name } = request.params as { name: string };
      const ifMatch = ifMatchOf(request);
      const result = await store.write(
        { actor: actorOf(request), action: `PATCH /api/v1${base}/${name}`, resource: `${kind.collection}/${name}`, comment: commentOf(request) },
        (current) => {
          const outcome = patch(current.document, kind, name, request.body, ifMatch);
          return { document: outcome.document, value: outcome.entry };
        },
      );
      withEtag(reply, contentEtag(result.value), result.current);
      return result.value;
    });
    api.delete(`${base}/:name`, {
      schema: {
        tags,
        summary: `Remove a ${kind.singular}`,
        params: nameParams,
        headers: ifMatchHeader,
        querystring: { type: 'object', properties: commentQuery },
        response: { 204: { description: 'Removed', type: 'null' }, ...errors(400, 403, 404, 409, 412, 428) },
      },
    }, async (request, reply) => {
      const { name } = request.params as { name: string };
      const ifMatch = ifMatchOf(request);
      const result = await store.write(
        { actor: actorOf(request), action: `DELETE /api/v1${base}/${name}`, resource: `${kind.collection}/${name}`, comment: commentOf(request) },
        (current) => ({ document: remove(current.document, kind, name, ifMatch), value: null }),
      );
      if (result.current !== null) void reply.header('gatehouse-config-version', String(result.current));
      return reply.code(204).send();
    });
  }

  // ---- the OpenAPI document and the status page ----
  app.get('/api/v1/openapi.json', { schema: { hide: true } }, async () => app.swagger());

  const publicDir = join(packageDir, 'public');
  const uplotDir = join(packageDir, 'node_modules', 'uplot', 'dist');
  const files: Record<string, [string, string]> = {
    '/': [join(publicDir, 'index.html'), 'text/html; charset=utf-8'],
    '/status.js': [join(publicDir, 'status.js'), 'text/javascript; charset=utf-8'],
    '/status.css': [join(publicDir, 'status.css'), 'text/css; charset=utf-8'],
    '/uplot.js': [join(uplotDir, 'uPlot.iife.min.js'), 'text/javascript; charset=utf-8'],
    '/uplot.css': [join(uplotDir, 'uPlot.min.css'), 'text/css; charset=utf-8'],
  };
  for (const [path, [file, type]] of Object.entries(files)) {
    app.get(path, { schema: { hide: true } }, async (_request, reply) => {
      if (!existsSync(file)) throw new Problem(404, `${path} is not built (npm --prefix admin-ts run build)`);
      return reply
        .header('content-type', type)
        .header('cache-control', 'no-cache')
        .header('content-security-policy', "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'")
        .header('x-content-type-options', 'nosniff')
        .send(readFileSync(file));
    });
  }

  return app;
}

function versionView(row: JsonObject) {
  return {
    id: row.id as number,
    author: row.author as string,
    comment: (row.comment as string | null) ?? null,
    created_at: iso(row.created_at) ?? '',
    status: row.status as string,
    error: (row.error as string | null) ?? null,
    decided_at: iso(row.decided_at),
    decided_by: (row.decided_by as string | null) ?? null,
    has_document: Boolean(row.has_document),
  };
}

export { loadConfig };
