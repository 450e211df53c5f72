//! The live Snapshot, swapped atomically. Readers pay one atomic load; a reload builds the new
//! Snapshot aside and swaps it in only if it compiled whole.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use std::sync::Mutex;

use super::compile::compile;
use super::error::{ConfigError, ConfigErrors};
use super::load::{load_file, parse_value, read_yaml};
use super::model::{PostgresSourceConfig, SourceKind};
use super::postgres::{Database, Loaded, SourceState, LOCAL_SECTIONS};
use super::snapshot::Snapshot;
use crate::telemetry::metrics;

pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    path: PathBuf,
    next_version: AtomicU64,
    postgres: Option<Arc<PostgresSource>>,
}

/// The node's side of `source: postgres`.
pub struct PostgresSource {
    pub settings: PostgresSourceConfig,
    pub database: Database,
    pub state: Arc<SourceState>,
    /// The node's own file as written: its local sections replace the database's.
    bootstrap: serde_yaml::Value,
    /// The last version compiled (id, digest) and its errors if it was rejected.
    last_seen: Mutex<Option<(i64, String, Option<ConfigErrors>)>>,
}

fn errors(path: &str, message: impl Into<String>) -> ConfigErrors {
    ConfigErrors(vec![ConfigError::new(path, message)])
}

/// The database document with the node's own sections from its file.
fn merge(bootstrap: &serde_yaml::Value, database: &serde_json::Value) -> serde_yaml::Value {
    let mut document = serde_yaml::to_value(database).unwrap_or_default();
    if let serde_yaml::Value::Mapping(map) = &mut document {
        if !map.contains_key("version") {
            let version = bootstrap.get("version").cloned().unwrap_or(1.into());
            map.insert("version".into(), version);
        }
        for section in LOCAL_SECTIONS {
            map.remove(*section);
            if let Some(value) = bootstrap.get(*section) {
                map.insert((*section).into(), value.clone());
            }
        }
    }
    document
}

impl ConfigStore {
    /// Load and compile the file; the store starts with it as version 1. With `source: postgres`
    /// the routes come from the database (or, when it is unreachable, from the last good
    /// snapshot file; with neither the node starts but is not ready).
    pub fn open(path: &Path) -> Result<ConfigStore, ConfigErrors> {
        let loaded = load_file(path)?;
        if loaded.resolved.config.source == SourceKind::Postgres {
            return ConfigStore::open_postgres(path, loaded.resolved.config.postgres.clone());
        }
        let snapshot = compile(loaded, &source_name(path), 1)?;
        metrics::record_config_applied(&snapshot);
        Ok(ConfigStore {
            current: ArcSwap::from_pointee(snapshot),
            path: path.to_path_buf(),
            next_version: AtomicU64::new(2),
            postgres: None,
        })
    }

    fn open_postgres(
        path: &Path,
        settings: Option<PostgresSourceConfig>,
    ) -> Result<ConfigStore, ConfigErrors> {
        let settings = settings.ok_or_else(|| {
            errors(
                "config.postgres",
                "`source: postgres` needs a `postgres` section with the database `url`",
            )
        })?;
        let database = Database::from_settings(&settings)
            .map_err(|message| errors("config.postgres", message))?;
        let bootstrap = read_yaml(path)?;
        // Until a config is loaded: the node's own sections, no routes, not serving.
        let mut placeholder = compile(
            parse_value(merge(&bootstrap, &serde_json::json!({})))?,
            &format!("postgres:{}", database.display),
            1,
        )?;
        placeholder.serving = false;
        let store = ConfigStore {
            current: ArcSwap::from_pointee(placeholder),
            path: path.to_path_buf(),
            next_version: AtomicU64::new(2),
            postgres: Some(Arc::new(PostgresSource {
                settings,
                database: database.clone(),
                state: Arc::new(SourceState::new()),
                bootstrap,
                last_seen: Mutex::new(None),
            })),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| errors("", format!("cannot start a runtime: {error}")))?;
        match runtime.block_on(database.fetch()) {
            Ok(loaded) if loaded.version.is_some() => {
                if let Err(rejected) = store.apply_database(&loaded) {
                    tracing::error!(errors = %rejected, "the database config does not compile");
                    store.boot_from_snapshot_file();
                }
            }
            Ok(_) => {
                tracing::warn!(database = %database.display, "the database holds no config yet (push one with `gatehouse config push`); not ready until it does");
            }
            Err(error) => {
                tracing::error!(database = %database.display, %error, "cannot read the config from PostgreSQL at start");
                store.boot_from_snapshot_file();
            }
        }
        Ok(store)
    }

    /// With `source: postgres`: the database side.
    pub fn postgres(&self) -> Option<&Arc<PostgresSource>> {
        self.postgres.as_ref()
    }

    /// Serves the last good config written to `snapshot_path`, if there is one.
    fn boot_from_snapshot_file(&self) {
        let Some(source) = &self.postgres else {
            return;
        };
        let Some(path) = &source.settings.snapshot_path else {
            tracing::error!(
                "no config to serve: no `snapshot_path` is set; not ready until a config can be read from PostgreSQL"
            );
            return;
        };
        let saved: serde_json::Value = match std::fs::read(path)
            .map_err(|error| error.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|error| error.to_string()))
        {
            Ok(saved) => saved,
            Err(error) => {
                tracing::error!(path, %error, "no config to serve: the snapshot file cannot be read; not ready until a config can be read from PostgreSQL");
                return;
            }
        };
        let version = saved["database_version"].as_i64();
        let document = merge(&source.bootstrap, &saved["config"]);
        match parse_value(document).and_then(|loaded| {
            compile(
                loaded,
                &format!(
                    "postgres:{} (snapshot file {path})",
                    source.database.display
                ),
                self.next_version.fetch_add(1, Ordering::Relaxed),
            )
        }) {
            Ok(mut snapshot) => {
                snapshot.database_version = version;
                source
                    .state
                    .booted_from_snapshot
                    .store(true, Ordering::Relaxed);
                if let Some(version) = version {
                    source
                        .state
                        .applied_version
                        .store(version, Ordering::Relaxed);
                }
                tracing::warn!(
                    path,
                    database_version = version,
                    written_at = saved["written_at"].as_str().unwrap_or("?"),
                    "booted from the last good config snapshot; it is replaced as soon as PostgreSQL answers"
                );
                metrics::record_config_applied(&snapshot);
                self.current.store(Arc::new(snapshot));
            }
            Err(rejected) => {
                tracing::error!(path, errors = %rejected, "the snapshot file does not compile; not ready until a config can be read from PostgreSQL");
            }
        }
    }

    /// Applies a version read from the database, through the same compile step as a file.
    /// Returns whether the served config changed; a version that does not compile is rejected
    /// (and the running config keeps serving).
    pub fn apply_database(&self, loaded: &Loaded) -> Result<bool, ConfigErrors> {
        let Some(source) = &self.postgres else {
            return Ok(false);
        };
        let Some(version) = loaded.version else {
            return Ok(false);
        };
        {
            let last = source.last_seen.lock().expect("config store lock");
            if let Some((seen, digest, rejected)) = last.as_ref() {
                if *seen == version && *digest == loaded.digest {
                    return match rejected {
                        Some(errors) => Err(errors.clone()),
                        None => Ok(false),
                    };
                }
            }
        }
        let document = merge(&source.bootstrap, &loaded.document);
        let current = self.current.load();
        let result = parse_value(document.clone()).and_then(|parsed| {
            // The same config again: nothing to swap (unless the one served came from the
            // snapshot file, which the database's own version replaces).
            if current.serving
                && !source.state.booted_from_snapshot.load(Ordering::Relaxed)
                && super::compile::config_hash(&parsed.as_written) == current.hash
            {
                return Ok(None);
            }
            compile(
                parsed,
                &format!("postgres:{}", source.database.display),
                self.next_version.fetch_add(1, Ordering::Relaxed),
            )
            .map(Some)
        });
        let state = &source.state;
        let outcome = match result {
            Ok(built) => {
                state.applied_version.store(version, Ordering::Relaxed);
                state
                    .applied_created_ms
                    .store(loaded.created_ms.unwrap_or(0), Ordering::Relaxed);
                state.booted_from_snapshot.store(false, Ordering::Relaxed);
                self.write_snapshot_file(source, version, loaded.created_ms, &loaded.document);
                match built {
                    Some(mut snapshot) => {
                        snapshot.database_version = Some(version);
                        metrics::record_config_applied(&snapshot);
                        tracing::info!(
                            version = snapshot.version,
                            database_version = version,
                            hash = %snapshot.hash,
                            "config applied"
                        );
                        self.current.store(Arc::new(snapshot));
                        Ok(true)
                    }
                    None => Ok(false),
                }
            }
            Err(rejected) => {
                metrics::record_config_rejected();
                state
                    .last_rejected_version
                    .store(version, Ordering::Relaxed);
                tracing::error!(
                    database_version = version,
                    errors = %rejected.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                    "database config version rejected; the running config keeps serving"
                );
                Err(rejected)
            }
        };
        *source.last_seen.lock().expect("config store lock") = Some((
            version,
            loaded.digest.clone(),
            outcome.as_ref().err().cloned(),
        ));
        outcome
    }

    /// Writes the last good config where a node starting without PostgreSQL finds it. Written
    /// aside and renamed, so a crash never leaves half a file.
    fn write_snapshot_file(
        &self,
        source: &PostgresSource,
        version: i64,
        created_ms: Option<u64>,
        document: &serde_json::Value,
    ) {
        let Some(path) = &source.settings.snapshot_path else {
            return;
        };
        // The database's document as written (secret references, never their values); the
        // node's own sections come from its file at boot.
        let body = serde_json::json!({
            "database_version": version,
            "created_ms": created_ms,
            "written_at": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            "config": document,
        });
        let temporary = format!("{path}.tmp");
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let bytes = serde_json::to_vec_pretty(&body)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, path)?;
            if let Some(directory) = Path::new(path).parent() {
                if let Ok(directory) = std::fs::File::open(directory) {
                    let _ = directory.sync_all();
                }
            }
            Ok(())
        })();
        if let Err(error) = written {
            tracing::warn!(path, %error, "cannot write the config snapshot file");
        }
    }

    /// The live Snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the file again and apply it if it compiles; otherwise keep serving the current one.
    /// Returns the new version, or `None` when the file is unchanged.
    pub fn reload(&self) -> Result<Option<u64>, ConfigErrors> {
        if self.postgres.is_some() {
            // The database is the source: its sync service rereads it (also on SIGHUP).
            return Ok(None);
        }
        let result = load_file(&self.path).and_then(|loaded| {
            let current = self.current.load();
            if super::compile::config_hash(&loaded.as_written) == current.hash {
                return Ok(None);
            }
            let version = self.next_version.fetch_add(1, Ordering::Relaxed);
            compile(loaded, &source_name(&self.path), version).map(Some)
        });
        match result {
            Ok(None) => Ok(None),
            Ok(Some(snapshot)) => {
                let previous = self.current.load();
                warn_about_restart_only_changes(&previous.config, &snapshot.config);
                let version = snapshot.version;
                metrics::record_config_applied(&snapshot);
                tracing::info!(version, hash = %snapshot.hash, source = %snapshot.source, "config applied");
                self.current.store(Arc::new(snapshot));
                Ok(Some(version))
            }
            Err(errors) => {
                metrics::record_config_rejected();
                tracing::error!(
                    source = %source_name(&self.path),
                    errors = %errors.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                    "config rejected; the running config keeps serving"
                );
                Err(errors)
            }
        }
    }
}

fn source_name(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// Listeners, threads and the ops address are bound at start; say so when a reload changes them.
fn warn_about_restart_only_changes(old: &super::model::Config, new: &super::model::Config) {
    let listeners = |config: &super::model::Config| {
        serde_json::to_string(&config.server.listeners).unwrap_or_default()
    };
    if listeners(old) != listeners(new)
        || old.server.threads != new.server.threads
        || old.ops.address != new.ops.address
        || old.server.upstream_keepalive_pool_size != new.server.upstream_keepalive_pool_size
    {
        tracing::warn!("listeners, threads, ops address and pool size apply at start; use a graceful upgrade (SIGQUIT) to change them");
    }
}
