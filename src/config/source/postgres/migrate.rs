//! Schema migrations of the PostgreSQL config store: the SQL files built into the binary, each
//! applied once in its own transaction and recorded with its checksum, one migrating node at a
//! time.

use super::database::{quote_identifier, Database, DatabaseError};

/// The schema migrations, in order. `gatehouse migrate` applies the ones not yet recorded in
/// `schema_migrations`; the admin service reads the same files.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_config_store",
        include_str!("../../../../sql/migrations/0001_config_store.sql"),
    ),
    (
        "0002_config_history",
        include_str!("../../../../sql/migrations/0002_config_history.sql"),
    ),
    (
        "0003_admin",
        include_str!("../../../../sql/migrations/0003_admin.sql"),
    ),
];

/// Any advisory lock id will do as long as every node uses the same one.
const MIGRATION_LOCK: i64 = 7315209;

impl Database {
    /// Applies the migrations not yet recorded, each in its own transaction. Returns their names.
    pub async fn migrate(&self) -> Result<Vec<String>, DatabaseError> {
        let (mut client, _events) = self.connect().await?;
        // One migrating node at a time, from the very first statement; the others wait, then
        // find the work done.
        self.within_timeout(
            client.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})")),
        )
        .await?;
        if let Some(schema) = &self.schema {
            let quoted = quote_identifier(schema);
            self.within_timeout(client.batch_execute(&format!(
                "SET client_min_messages = warning; CREATE SCHEMA IF NOT EXISTS {quoted}; SET search_path TO {quoted}"
            )))
            .await?;
        }
        self.within_timeout(client.batch_execute(
            "SET client_min_messages = warning; \
             CREATE TABLE IF NOT EXISTS schema_migrations ( \
               name text PRIMARY KEY, checksum text NOT NULL, \
               applied_at timestamptz NOT NULL DEFAULT now())",
        ))
        .await?;
        let mut applied = Vec::new();
        for (name, sql) in MIGRATIONS {
            let checksum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(sql.as_bytes()));
            let transaction = client.transaction().await?;
            let recorded = transaction
                .query_opt(
                    "SELECT checksum FROM schema_migrations WHERE name = $1",
                    &[name],
                )
                .await?;
            match recorded {
                Some(row) => {
                    let recorded: String = row.get(0);
                    if recorded != checksum {
                        return Err(DatabaseError::ChangedMigration {
                            name: name.to_string(),
                            recorded,
                            built: checksum,
                        });
                    }
                }
                None => {
                    transaction.batch_execute(sql).await.map_err(|error| {
                        DatabaseError::Migration {
                            name: name.to_string(),
                            reason: DatabaseError::from(error).to_string(),
                        }
                    })?;
                    transaction
                        .execute(
                            "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)",
                            &[name, &checksum],
                        )
                        .await?;
                    applied.push(name.to_string());
                }
            }
            transaction.commit().await?;
        }
        Ok(applied)
    }
}
