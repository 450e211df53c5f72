// The PostgreSQL config store: connections, migrations, and the queries in sql/queries.

import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import postgres from 'postgres';
import { repositoryDir } from './settings.ts';

export type Sql = postgres.Sql<{ bigint: number }>;
export type Tx = postgres.TransactionSql<{ bigint: number }>;
export type Queryable = Sql | Tx;

const migrationsDir = join(repositoryDir, 'sql', 'migrations');
const queriesDir = join(repositoryDir, 'sql', 'queries');
/** The advisory lock `gatehouse migrate` takes: one migrating process at a time. */
const MIGRATION_LOCK = 7315209;

export function quoteIdentifier(name: string): string {
  return `"${name.replace(/"/g, '""')}"`;
}

export function connect(url: string, schema?: string, max = 10): Sql {
  return postgres(url, {
    max,
    onnotice: () => {},
    connect_timeout: 5,
    idle_timeout: 60,
    types: {
      bigint: {
        to: 20,
        from: [20],
        serialize: (value: number) => String(value),
        parse: (value: string) => Number(value),
      },
    },
    connection: {
      application_name: 'gatehouse-admin',
      ...(schema ? { search_path: quoteIdentifier(schema) } : {}),
    },
  }) as unknown as Sql;
}

export function query(name: string): string {
  return readFileSync(join(queriesDir, `${name}.sql`), 'utf8');
}

export interface Migration {
  name: string;
  sql: string;
  checksum: string;
}

/** The files of sql/migrations in order, with the checksums `gatehouse migrate` records. */
export function migrations(): Migration[] {
  return readdirSync(migrationsDir)
    .filter((file) => file.endsWith('.sql'))
    .sort()
    .map((file) => {
      const sql = readFileSync(join(migrationsDir, file), 'utf8');
      return {
        name: file.replace(/\.sql$/, ''),
        sql,
        checksum: createHash('sha256').update(sql).digest('hex'),
      };
    });
}

export class MigrationError extends Error {}

/**
 * Applies the migrations not yet recorded in `schema_migrations`, each in its own transaction,
 * exactly as `gatehouse migrate` does (same table, same checksums, same lock). Returns their
 * names. A recorded migration whose file changed is an error.
 */
export async function migrate(sql: Sql, schema?: string): Promise<string[]> {
  const applied: string[] = [];
  for (const migration of migrations()) {
    await sql.begin(async (tx) => {
      await tx`SELECT pg_advisory_xact_lock(${MIGRATION_LOCK})`;
      await tx.unsafe('SET LOCAL client_min_messages = warning').simple();
      if (schema) {
        const quoted = quoteIdentifier(schema);
        await tx.unsafe(`CREATE SCHEMA IF NOT EXISTS ${quoted}; SET LOCAL search_path TO ${quoted}`).simple();
      }
      await tx
        .unsafe(
          'CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, ' +
            'checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())',
        )
        .simple();
      const [recorded] = await tx<{ checksum: string }[]>`
        SELECT checksum FROM schema_migrations WHERE name = ${migration.name}`;
      if (recorded) {
        if (recorded.checksum !== migration.checksum) {
          throw new MigrationError(
            `migration ${migration.name} was applied with different contents ` +
              `(checksum ${recorded.checksum}, this copy has ${migration.checksum})`,
          );
        }
        return;
      }
      try {
        await tx.unsafe(migration.sql).simple();
      } catch (error) {
        throw new MigrationError(`migration ${migration.name}: ${(error as Error).message}`);
      }
      await tx`INSERT INTO schema_migrations (name, checksum)
               VALUES (${migration.name}, ${migration.checksum})`;
      applied.push(migration.name);
    });
  }
  return applied;
}
