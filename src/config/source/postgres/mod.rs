//! The PostgreSQL source (`config.source: postgres`). Upstreams, routes, filters, consumers,
//! `auth` and `redis` come from the database; the node's own file keeps the sections only it
//! can decide (`server`, `ops`, `config`, `telemetry`), which replace whatever the database
//! holds for them. The sync service LISTENs on `gatehouse_config`, waits out a debounce, reads
//! the whole config, and runs it through the same load and compile step as a file; a periodic
//! full resync catches missed notifications. Each version's outcome is written back once per
//! node. The last good config is kept in a file for a node that starts without the database.

pub mod database;
pub mod migrate;
pub mod state;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use gatehouse_filters::metrics::SampledRow;
use gatehouse_filters::util::now_millis;
use pingora_core::server::ShutdownWatch;
use tokio_postgres::Client;

use database::Event;
pub use database::{check_url, Database, DatabaseError, Loaded};
pub use migrate::MIGRATIONS;
pub use state::SourceState;

use super::Source;
use crate::config::compile::{config_hash, CompileEnv};
use crate::config::error::{ConfigError, ConfigErrors};
use crate::config::load::{parse_value, read_yaml, LoadedConfig};
use crate::config::model::PostgresSourceConfig;
use crate::config::snapshot::Snapshot;
use crate::config::store::ConfigStore;

/// Sections a node takes from its own file, never from the database.
pub const LOCAL_SECTIONS: &[&str] = &["server", "ops", "config", "telemetry"];

/// The channel PostgreSQL notifies on every committed config change.
pub const CHANNEL: &str = "gatehouse_config";

/// The node's side of `source: postgres`.
pub struct PostgresSource {
    settings: PostgresSourceConfig,
    database: Database,
    state: Arc<SourceState>,
    store: Arc<ConfigStore>,
    /// The node's own file as written: its local sections replace the database's.
    bootstrap: serde_yaml::Value,
    /// The address of this node's operations listener, recorded with each version's outcome
    /// (`None` when it is `off`).
    ops_address: Option<String>,
    /// The last version compiled (id, digest) and its errors if it was rejected.
    last_seen: Mutex<Option<(i64, String, Option<ConfigErrors>)>>,
    _metrics: Vec<SampledRow>,
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

/// This node's name in `config_versions.decided_by`.
pub fn node_name(settings: &PostgresSourceConfig) -> String {
    settings.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .ok()
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "gatehouse".into())
    })
}

impl PostgresSource {
    /// Reads the config from the database (or, when it is unreachable, from the last good
    /// snapshot file; with neither the node starts but is not ready).
    pub fn open(
        path: &Path,
        loaded: LoadedConfig,
        env: CompileEnv,
    ) -> Result<(Arc<ConfigStore>, Arc<PostgresSource>), ConfigErrors> {
        let settings = loaded.resolved.config.postgres.clone().ok_or_else(|| {
            errors(
                "config.postgres",
                "`source: postgres` needs a `postgres` section with the database `url`",
            )
        })?;
        let database = Database::from_settings(&settings)
            .map_err(|error| errors("config.postgres", error.to_string()))?;
        let bootstrap = read_yaml(path)?;
        // Until a config is loaded: the node's own sections, no routes, not serving.
        let metrics = env.metrics.clone();
        let store = Arc::new(ConfigStore::waiting(
            parse_value(merge(&bootstrap, &serde_json::json!({})))?,
            &format!("postgres:{}", database.display),
            env,
        )?);
        let state = Arc::new(SourceState::new());
        let source = Arc::new(PostgresSource {
            _metrics: state.export(&metrics),
            settings,
            database: database.clone(),
            state,
            store: store.clone(),
            bootstrap,
            ops_address: loaded.resolved.ops.listener_address().map(str::to_string),
            last_seen: Mutex::new(None),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| errors("", format!("cannot start a runtime: {error}")))?;
        match runtime.block_on(database.fetch()) {
            Ok(loaded) if loaded.version.is_some() => {
                if let Err(rejected) = source.apply(&loaded) {
                    tracing::error!(errors = %rejected, "the database config does not compile");
                    source.boot_from_snapshot_file();
                }
            }
            Ok(_) => {
                tracing::warn!(database = %database.display, "the database holds no config yet (push one with `gatehouse config push`); not ready until it does");
            }
            Err(error) => {
                tracing::error!(database = %database.display, %error, "cannot read the config from PostgreSQL at start");
                source.boot_from_snapshot_file();
            }
        }
        Ok((store, source))
    }

    fn origin(&self) -> String {
        format!("postgres:{}", self.database.display)
    }

    /// Serves the last good config written to `snapshot_path`, if there is one.
    fn boot_from_snapshot_file(&self) {
        let Some(path) = &self.settings.snapshot_path else {
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
        let document = merge(&self.bootstrap, &saved["config"]);
        let origin = format!("{} (snapshot file {path})", self.origin());
        match parse_value(document).and_then(|loaded| self.store.compile(loaded, &origin)) {
            Ok(mut snapshot) => {
                snapshot.database_version = version;
                tracing::warn!(
                    path,
                    database_version = version,
                    written_at = saved["written_at"].as_str().unwrap_or("?"),
                    "booted from the last good config snapshot; it is replaced as soon as PostgreSQL answers"
                );
                self.store.swap(snapshot);
                self.state
                    .booted_from_snapshot
                    .store(true, Ordering::Relaxed);
                if let Some(version) = version {
                    self.state.applied_version.store(version, Ordering::Relaxed);
                }
            }
            Err(rejected) => {
                tracing::error!(path, errors = %rejected, "the snapshot file does not compile; not ready until a config can be read from PostgreSQL");
            }
        }
    }

    /// Applies a version read from the database, through the same compile step as a file.
    /// Returns whether the served config changed; a version that does not compile is rejected
    /// (and the running config keeps serving). Blocking: compiling reads files and resolves
    /// names.
    fn apply(&self, loaded: &Loaded) -> Result<bool, ConfigErrors> {
        let Some(version) = loaded.version else {
            return Ok(false);
        };
        {
            let last = self.last_seen.lock().expect("postgres source lock");
            if let Some((seen, digest, rejected)) = last.as_ref() {
                if *seen == version && *digest == loaded.digest {
                    return match rejected {
                        Some(errors) => Err(errors.clone()),
                        None => Ok(false),
                    };
                }
            }
        }
        let document = merge(&self.bootstrap, &loaded.document);
        let current = self.store.load();
        let origin = self.origin();
        let result = parse_value(document).and_then(|parsed| {
            // The same config again: nothing to swap (unless the one served came from the
            // snapshot file, which the database's own version replaces).
            if current.serving
                && !self.state.booted_from_snapshot.load(Ordering::Relaxed)
                && config_hash(&parsed.as_written) == current.hash
            {
                return Ok(None);
            }
            self.store.compile(parsed, &origin).map(Some)
        });
        drop(current);
        let state = &self.state;
        let outcome = match result {
            Ok(built) => {
                // The state tells what is served: it changes once the new config is live.
                let changed = match built {
                    Some(mut snapshot) => {
                        snapshot.database_version = Some(version);
                        self.store.swap(snapshot);
                        true
                    }
                    None => false,
                };
                state.applied_version.store(version, Ordering::Relaxed);
                state
                    .applied_created_ms
                    .store(loaded.created_ms.unwrap_or(0), Ordering::Relaxed);
                state.booted_from_snapshot.store(false, Ordering::Relaxed);
                self.write_snapshot_file(version, loaded.created_ms, &loaded.document);
                Ok(changed)
            }
            Err(rejected) => {
                state
                    .last_rejected_version
                    .store(version, Ordering::Relaxed);
                self.store.reject(&origin, Some(version), &rejected);
                Err(rejected)
            }
        };
        *self.last_seen.lock().expect("postgres source lock") = Some((
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
        version: i64,
        created_ms: Option<u64>,
        document: &serde_json::Value,
    ) {
        let Some(path) = &self.settings.snapshot_path else {
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

    /// Applies a loaded version on a blocking thread and, with `record`, writes the outcome to
    /// the database. Returns whether the outcome was recorded.
    async fn apply_and_record(
        self: &Arc<Self>,
        client: &Client,
        loaded: &Loaded,
        node: &str,
        record: bool,
    ) -> bool {
        let Some(version) = loaded.version else {
            return false;
        };
        let source = self.clone();
        let candidate = loaded.clone();
        let outcome = match tokio::task::spawn_blocking(move || source.apply(&candidate)).await {
            Ok(outcome) => outcome,
            Err(error) => Err(errors("", format!("the compile step failed: {error}"))),
        };
        if !record {
            return false;
        }
        let text = outcome.as_ref().err().map(|errors| {
            errors
                .0
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        });
        match self
            .database
            .record(
                client,
                version,
                text.as_deref().map_or(Ok(()), Err),
                node,
                self.ops_address.as_deref(),
            )
            .await
        {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(version, %error, "could not record the version's outcome in config_versions and config_nodes");
                false
            }
        }
    }
}

#[async_trait]
impl Source for PostgresSource {
    async fn run(self: Arc<Self>, mut shutdown: ShutdownWatch) {
        let database = self.database.clone();
        let state = self.state.clone();
        let settings = self.settings.clone();
        let node = node_name(&settings);
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut backoff = Duration::from_millis(100);
        let mut recorded: Option<i64> = None;
        let mut first_attempt = true;
        loop {
            if !first_attempt {
                // Every way back here waits: an error that repeats (a wrong schema, migrations
                // not run, no permission) must not turn into a tight reconnect loop.
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            first_attempt = false;
            let (mut client, mut events) = match database.connect().await {
                Ok(connection) => connection,
                Err(error) => {
                    state.down(&error.to_string());
                    continue;
                }
            };
            if let Err(error) = database
                .within_timeout(client.batch_execute(&format!("LISTEN {CHANNEL}")))
                .await
            {
                state.down(&error.to_string());
                continue;
            }
            let mut resync = tokio::time::interval(settings.resync_interval.get());
            resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick is immediate: a (re)connected node catches up at once.
            let lost = loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = resync.tick() => {}
                    _ = async { match hangup.as_mut() { Some(signal) => { signal.recv().await; } None => std::future::pending().await } } => {
                        tracing::info!("SIGHUP: reading the config from PostgreSQL");
                    }
                    event = events.recv() => match event {
                        Some(Event::Notified(payload)) => {
                            if let Ok(version) = payload.trim().parse::<i64>() {
                                state.saw(version, None);
                            }
                            // Changes arriving together are read once.
                            tokio::select! {
                                _ = shutdown.changed() => return,
                                _ = tokio::time::sleep(settings.debounce.get()) => {}
                            }
                            let mut lost = None;
                            while let Ok(event) = events.try_recv() {
                                if let Event::Lost(error) = event {
                                    lost = Some(error);
                                }
                            }
                            if let Some(error) = lost {
                                break error;
                            }
                        }
                        Some(Event::Lost(error)) => break error,
                        None => break "the connection ended".to_string(),
                    },
                }
                let loaded = tokio::select! {
                    _ = shutdown.changed() => return,
                    loaded = database.load(&mut client) => loaded,
                };
                match loaded {
                    Ok(loaded) => {
                        if !state.up.swap(true, Ordering::Relaxed) {
                            tracing::info!(database = %database.display, "PostgreSQL connected; listening for config changes");
                        }
                        if let Ok(mut last) = state.last_error.lock() {
                            *last = None;
                        }
                        backoff = Duration::from_millis(100);
                        state.last_sync_ms.store(now_millis(), Ordering::Relaxed);
                        if let Some(version) = loaded.version {
                            state.saw(version, loaded.created_ms);
                        }
                        // Each version's outcome is written once per node, not at every resync.
                        let fresh = loaded.version.is_some() && loaded.version != recorded;
                        if self.apply_and_record(&client, &loaded, &node, fresh).await {
                            recorded = loaded.version;
                        }
                    }
                    Err(error) => break error.to_string(),
                }
            };
            state.down(&lost);
        }
    }

    fn report(&self, snapshot: &Snapshot) -> serde_json::Map<String, serde_json::Value> {
        let mut database = self.state.report(snapshot.database_version);
        database["snapshot_built_from_version"] = snapshot.database_version.into();
        database["database"] = self.database.display.clone().into();
        let mut report = serde_json::Map::new();
        report.insert("database".into(), database);
        report
    }
}
