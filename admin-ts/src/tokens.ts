// Bearer tokens of the admin API: 256 bits of randomness with a recognisable prefix, shown once,
// kept only as SHA-256.

import { createHash, randomBytes } from 'node:crypto';
import type { Queryable } from './db.ts';

export const ROLES = ['read', 'write', 'admin'] as const;
export type Role = (typeof ROLES)[number];
export const TOKEN_PREFIX = 'ghadm_';

export function isRole(value: unknown): value is Role {
  return typeof value === 'string' && (ROLES as readonly string[]).includes(value);
}

/** Whether `role` may do what `needed` may. */
export function allows(role: Role, needed: Role): boolean {
  return ROLES.indexOf(role) >= ROLES.indexOf(needed);
}

export function newToken(): string {
  return TOKEN_PREFIX + randomBytes(32).toString('base64url');
}

export function tokenHash(token: string): string {
  return `sha256:${createHash('sha256').update(token).digest('hex')}`;
}

/** What a listing shows of a token: enough to recognise it, nothing to use. */
export function tokenDisplayPrefix(token: string): string {
  return token.slice(0, TOKEN_PREFIX.length + 6);
}

export interface TokenRow {
  id: number;
  name: string;
  role: Role;
  prefix: string;
  created_at: Date;
  created_by: string;
  expires_at: Date | null;
  last_used_at: Date | null;
  revoked_at: Date | null;
}

export function tokenView(row: TokenRow) {
  return {
    id: row.id,
    name: row.name,
    role: row.role,
    prefix: row.prefix,
    created_at: row.created_at.toISOString(),
    created_by: row.created_by,
    expires_at: row.expires_at?.toISOString() ?? null,
    last_used_at: row.last_used_at?.toISOString() ?? null,
    revoked_at: row.revoked_at?.toISOString() ?? null,
  };
}

/** `30d`, `12h`, `90m`, or `never`: the lifetime of a new token (seconds; null for never). */
export function parseLifetime(text: string): number | null {
  if (text === 'never') return null;
  const match = /^(\d+)([smhd])$/.exec(text);
  if (!match) throw new Error(`expires: expected a duration such as 30d, 12h or 90m, or "never"; got ${JSON.stringify(text)}`);
  const unit = { s: 1, m: 60, h: 3600, d: 86400 }[match[2] as 's' | 'm' | 'h' | 'd'];
  const seconds = Number(match[1]) * unit;
  if (seconds <= 0 || seconds > 10 * 365 * 86400) throw new Error('expires: between 1s and 3650d');
  return seconds;
}

/** Makes a token and stores its hash. Returns the token in clear: the only time it exists. */
export async function createToken(
  tx: Queryable,
  fields: { name: string; role: Role; lifetimeSeconds: number | null; createdBy: string },
): Promise<{ token: string; row: TokenRow }> {
  const token = newToken();
  const expires = fields.lifetimeSeconds === null ? null : new Date(Date.now() + fields.lifetimeSeconds * 1000);
  const [row] = await tx<TokenRow[]>`
    INSERT INTO admin_tokens (name, role, hash, prefix, created_by, expires_at)
    VALUES (${fields.name}, ${fields.role}, ${tokenHash(token)}, ${tokenDisplayPrefix(token)},
            ${fields.createdBy}, ${expires})
    RETURNING id, name, role, prefix, created_at, created_by, expires_at, last_used_at, revoked_at`;
  return { token, row: row as TokenRow };
}
