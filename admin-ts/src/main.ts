// `npm start`: the admin service. Applies the store's missing migrations (the same files and
// records as `gatehouse migrate`), then serves the API on GATEHOUSE_ADMIN_ADDRESS
// (127.0.0.1:9080 unless told otherwise).

import { buildApp } from './app.ts';
import { connect, migrate } from './db.ts';
import { readSettings, SettingsError } from './settings.ts';
import { Validator } from './validate.ts';

async function main(): Promise<number> {
  let settings;
  try {
    settings = readSettings();
  } catch (error) {
    if (error instanceof SettingsError) {
      console.error(`gatehouse-admin: ${error.message}`);
      return 2;
    }
    throw error;
  }
  const sql = connect(settings.databaseUrl, settings.schema);
  try {
    const applied = await migrate(sql, settings.schema);
    if (applied.length > 0) console.error(`gatehouse-admin: applied migrations ${applied.join(', ')}`);
  } catch (error) {
    console.error(`gatehouse-admin: cannot prepare the config store: ${(error as Error).message}`);
    await sql.end({ timeout: 1 });
    return 1;
  }
  const validator = new Validator(settings.gatehouseBin);
  const app = await buildApp({ settings, sql, validator });
  try {
    await app.listen({ host: settings.host, port: settings.port });
  } catch (error) {
    console.error(`gatehouse-admin: cannot listen on ${settings.host}:${settings.port}: ${(error as Error).message}`);
    await sql.end({ timeout: 1 });
    return 1;
  }
  app.log.info(
    { compile_step: settings.gatehouseBin ?? null, schema: settings.schema ?? null },
    settings.gatehouseBin
      ? `validating with the schema and ${settings.gatehouseBin}`
      : 'validating with the schema only: no gatehouse binary found (set GATEHOUSE_BIN)',
  );
  const [tokens] = await sql<{ count: number }[]>`SELECT count(*)::int AS count FROM admin_tokens`;
  if ((tokens?.count ?? 0) === 0) {
    app.log.warn('no admin token exists yet: make the first one with `npx --prefix admin-ts gatehousectl token create --bootstrap --role admin`');
  }
  await new Promise<void>((resolve) => {
    const stop = () => resolve();
    process.once('SIGTERM', stop);
    process.once('SIGINT', stop);
  });
  await app.close();
  await sql.end({ timeout: 5 });
  return 0;
}

main().then(
  (code) => process.exit(code),
  (error: Error) => {
    console.error(`gatehouse-admin: ${error.message}`);
    process.exit(1);
  },
);
