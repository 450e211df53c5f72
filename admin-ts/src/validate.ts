// Validation of config documents: Ajv against the gateway's own JSON Schema (conf/schema.json),
// then, when the `gatehouse` binary is here, the gateway's compile step (`gatehouse validate`),
// which knows what a schema cannot say (references between routes and upstreams, regexes,
// durations). Also: the document with the schema's defaults filled in, for diffs without
// false differences.

import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import AjvModule, { type ErrorObject, type ValidateFunction } from 'ajv';
import type { FieldError } from './problem.ts';
import { clone, isObject, pointerToPath, type Json, type JsonObject } from './json.ts';
import { repositoryDir } from './settings.ts';

const Ajv = AjvModule.default ?? AjvModule;

export const ROOT_ID = 'GatehouseConfig';
type Schema = Record<string, unknown>;

/** conf/schema.json as separate schemas, one per definition, that refer to each other by id. */
export function loadSchemas(path = join(repositoryDir, 'conf', 'schema.json')): Schema[] {
  const raw = JSON.parse(readFileSync(path, 'utf8')) as Schema;
  const rewrite = (node: unknown): unknown => {
    if (Array.isArray(node)) return node.map(rewrite);
    if (!isObject(node)) return node;
    const out: Record<string, unknown> = {};
    for (const [key, value] of Object.entries(node)) {
      if (key === '$ref' && typeof value === 'string' && value.startsWith('#/definitions/')) {
        out[key] = `${value.slice('#/definitions/'.length)}#`;
      } else {
        out[key] = rewrite(value);
      }
    }
    addDiscriminator(out);
    return out;
  };
  const definitions = (raw.definitions ?? {}) as Record<string, unknown>;
  const { definitions: _definitions, $schema: _schema, ...root } = raw;
  return [
    ...Object.entries(definitions).map(([name, schema]) => ({
      $id: name,
      ...(rewrite(schema) as Schema),
    })),
    { $id: ROOT_ID, ...(rewrite(root) as Schema) },
  ];
}

/**
 * A `oneOf` whose branches are told apart by one required constant property (`kind` for
 * filters, `type` for credentials, `op` for body operations) gets a discriminator, so that an
 * error is reported against the branch the value names, not against every branch.
 */
function addDiscriminator(schema: Record<string, unknown>) {
  const branches = schema.oneOf;
  if (!Array.isArray(branches) || branches.length < 2) return;
  const candidates = ['kind', 'type', 'op'];
  for (const property of candidates) {
    const fits = branches.every((branch) => {
      if (!isObject(branch)) return false;
      const required = branch.required;
      const properties = branch.properties;
      if (!Array.isArray(required) || !required.includes(property) || !isObject(properties)) return false;
      const field = properties[property];
      return isObject(field) && ('const' in field || (Array.isArray(field.enum) && field.enum.length === 1));
    });
    if (fits) {
      // Ajv skips a discriminated oneOf for a value that is not an object: say it must be one.
      schema.type = 'object';
      schema.discriminator = { propertyName: property };
      return;
    }
  }
}

export interface CompileResult {
  ok: boolean;
  errors: FieldError[];
  /** False when there is no gateway binary to ask. */
  ran: boolean;
}

export class Validator {
  readonly schemas: Schema[];
  private readonly ajv: InstanceType<typeof Ajv>;
  private readonly validateRoot: ValidateFunction;
  private readonly branchChecks = new WeakMap<object, ValidateFunction>();

  constructor(
    private readonly gatehouseBin: string | undefined,
    schemas: Schema[] = loadSchemas(),
  ) {
    this.schemas = schemas;
    this.ajv = new Ajv({ allErrors: true, strict: false, discriminator: true, validateFormats: false });
    for (const schema of schemas) this.ajv.addSchema(schema);
    this.validateRoot = this.ajv.getSchema(`${ROOT_ID}#`) as ValidateFunction;
  }

  /** Errors of the document against the schema, with gateway-style paths. */
  schemaErrors(document: unknown): FieldError[] {
    if (this.validateRoot(document)) return [];
    return toFieldErrors(this.validateRoot.errors ?? []);
  }

  /** The gateway's compile step on the document, when the binary is available. */
  async compile(document: unknown): Promise<CompileResult> {
    if (!this.gatehouseBin) return { ok: true, errors: [], ran: false };
    const output = await run(this.gatehouseBin, ['validate', '--format', 'json', '-'], JSON.stringify(document));
    let parsed: { ok?: boolean; errors?: FieldError[] } | undefined;
    try {
      parsed = JSON.parse(output.stdout) as { ok?: boolean; errors?: FieldError[] };
    } catch {
      parsed = undefined;
    }
    if (!parsed || typeof parsed.ok !== 'boolean') {
      throw new Error(`gatehouse validate gave no answer (exit ${output.code}): ${output.stderr.slice(0, 500)}`);
    }
    return { ok: parsed.ok, errors: parsed.errors ?? [], ran: true };
  }

  /**
   * Every error of the document: first what the gateway's compile step reports (its exact
   * words), then what the schema finds elsewhere. The gateway stops at the first error of
   * shape (a wrong type, an unknown key) while the schema reports them all, so together they
   * give every error, and always the ones `gatehouse validate` prints.
   */
  async validate(document: unknown): Promise<{ errors: FieldError[]; compiled: boolean }> {
    const schemaErrors = this.schemaErrors(document);
    const compiled = await this.compile(document);
    if (compiled.ok) return { errors: schemaErrors, compiled: compiled.ran };
    const related = (a: string, b: string) =>
      a === b || a.startsWith(`${b}.`) || a.startsWith(`${b}[`) || b.startsWith(`${a}.`) || b.startsWith(`${a}[`);
    const others = schemaErrors.filter((error) => !compiled.errors.some((gateway) => related(gateway.path, error.path)));
    return { errors: [...compiled.errors, ...others], compiled: compiled.ran };
  }

  /** A copy of the document with every default of the schema filled in. */
  withDefaults(document: Json): Json {
    const copy = clone(document);
    this.fill(this.schemaById(ROOT_ID), copy);
    return copy;
  }

  private schemaById(id: string): Schema {
    const found = this.schemas.find((schema) => schema.$id === id);
    if (!found) throw new Error(`no schema ${id}`);
    return found;
  }

  private resolve(schema: unknown): Schema | undefined {
    if (!isObject(schema)) return undefined;
    const ref = schema.$ref;
    if (typeof ref === 'string') return this.resolve(this.schemaById(ref.replace(/#$/, '')));
    return schema as Schema;
  }

  private fill(schemaNode: unknown, value: Json): void {
    const schema = this.resolve(schemaNode);
    if (!schema) return;
    for (const part of (schema.allOf as unknown[] | undefined) ?? []) this.fill(part, value);
    for (const keyword of ['oneOf', 'anyOf'] as const) {
      const branches = schema[keyword];
      if (!Array.isArray(branches)) continue;
      const branch = branches.find((candidate) => this.matches(candidate, value));
      if (branch !== undefined) this.fill(branch, value);
    }
    if (isObject(value) && isObject(schema.properties)) {
      for (const [key, propertySchema] of Object.entries(schema.properties)) {
        if (!(key in value) && isObject(propertySchema) && 'default' in propertySchema) {
          value[key] = clone(propertySchema.default as Json);
        }
        if (key in value) this.fill(propertySchema, value[key] as Json);
      }
    }
    if (Array.isArray(value) && schema.items !== undefined && !Array.isArray(schema.items)) {
      for (const entry of value) this.fill(schema.items, entry);
    }
  }

  private matches(branch: unknown, value: Json): boolean {
    if (!isObject(branch)) return branch === true;
    let check = this.branchChecks.get(branch);
    if (!check) {
      check = this.ajv.compile(branch);
      this.branchChecks.set(branch, check);
    }
    return check(value) as boolean;
  }
}

function toFieldErrors(errors: ErrorObject[]): FieldError[] {
  const out: FieldError[] = [];
  const seen = new Set<string>();
  const paths = new Set(errors.map((error) => error.instancePath));
  for (const error of errors) {
    // A failed oneOf/anyOf is also reported by the branch errors under it; keep those.
    if ((error.keyword === 'oneOf' || error.keyword === 'anyOf') &&
        [...paths].some((path) => path !== error.instancePath && path.startsWith(error.instancePath))) {
      continue;
    }
    let path = pointerToPath(error.instancePath);
    let message = error.message ?? 'is invalid';
    const params = error.params as Record<string, unknown>;
    if (error.keyword === 'required') {
      path = join_(path, String(params.missingProperty));
      message = 'missing field';
    } else if (error.keyword === 'additionalProperties') {
      path = join_(path, String(params.additionalProperty));
      message = 'unknown field';
    } else if (error.keyword === 'enum') {
      message = `must be one of ${(params.allowedValues as unknown[]).map((value) => JSON.stringify(value)).join(', ')}`;
    } else if (error.keyword === 'discriminator' && params.error === 'mapping') {
      path = join_(path, String(params.tag));
      message = `unknown value ${JSON.stringify(params.tagValue)}`;
    }
    const key = `${path}\u0000${message}`;
    if (seen.has(key)) continue;
    seen.add(key);
    out.push({ path, message });
  }
  return out;
}

function join_(path: string, key: string): string {
  return path === '' ? key : `${path}.${key}`;
}

function run(command: string, args: string[], input: string): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'pipe'], timeout: 20_000 });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolvePromise({ code: code ?? -1, stdout, stderr }));
    child.stdin.on('error', () => {});
    child.stdin.end(input);
  });
}

export type { JsonObject };
