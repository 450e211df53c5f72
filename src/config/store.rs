//! The live Snapshot, swapped atomically. Readers pay one atomic load. A source compiles each
//! candidate aside through the store, which swaps it in only if it compiled whole; every outcome
//! is counted and logged here, whatever the source.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use gatehouse_filters::metrics::Row;
use prometheus::{IntCounter, IntGauge};

use super::compile::{compile, CompileEnv};
use super::error::ConfigErrors;
use super::load::LoadedConfig;
use super::snapshot::Snapshot;

pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    next_version: AtomicU64,
    env: CompileEnv,
    applied: Row<IntCounter>,
    rejected: Row<IntCounter>,
    version: IntGauge,
    applied_at: IntGauge,
    /// The version served, for services that follow config changes (health checks).
    changes: tokio::sync::watch::Sender<u64>,
}

impl ConfigStore {
    /// A store serving `loaded`, compiled as version 1.
    pub fn open(
        loaded: LoadedConfig,
        origin: &str,
        env: CompileEnv,
    ) -> Result<ConfigStore, ConfigErrors> {
        let first = compile(loaded, origin, 1, &env)?;
        Ok(ConfigStore::serving(first, env))
    }

    /// A store for a node with nothing to serve yet: `loaded` holds only the node's own
    /// sections; the node is not ready and answers 503 until a source swaps in a config.
    pub fn waiting(
        loaded: LoadedConfig,
        origin: &str,
        env: CompileEnv,
    ) -> Result<ConfigStore, ConfigErrors> {
        let mut placeholder = compile(loaded, origin, 1, &env)?;
        placeholder.serving = false;
        Ok(ConfigStore::with_metrics(placeholder, env))
    }

    fn serving(first: Snapshot, env: CompileEnv) -> ConfigStore {
        let store = ConfigStore::with_metrics(first, env);
        store.applied.inc();
        store.show(&store.load());
        store
    }

    fn with_metrics(first: Snapshot, env: CompileEnv) -> ConfigStore {
        let metrics = &env.metrics;
        let reloads = metrics.counters(
            "gatehouse_config_reloads_total",
            "Config reloads, by result (applied or rejected)",
            &["result"],
        );
        ConfigStore {
            changes: tokio::sync::watch::Sender::new(first.version),
            current: ArcSwap::from_pointee(first),
            next_version: AtomicU64::new(2),
            applied: reloads.row(&["applied"]),
            rejected: reloads.row(&["rejected"]),
            version: metrics.gauge("gatehouse_config_version", "Version of the live config"),
            applied_at: metrics.gauge(
                "gatehouse_config_applied_timestamp_seconds",
                "When the live config was applied (Unix time)",
            ),
            env,
        }
    }

    /// The live Snapshot.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Compiles a candidate aside, with the next version number. Blocking: it reads files and
    /// resolves names.
    pub fn compile(&self, loaded: LoadedConfig, origin: &str) -> Result<Snapshot, ConfigErrors> {
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        compile(loaded, origin, version, &self.env)
    }

    /// Serves `snapshot` from now on. Requests already running finish on the one they started
    /// with.
    pub fn swap(&self, snapshot: Snapshot) {
        // The log level first, so that a reload raising it shows this very line.
        crate::telemetry::apply(&snapshot.config.telemetry);
        tracing::info!(
            version = snapshot.version,
            hash = %snapshot.hash,
            source = %snapshot.source,
            database_version = snapshot.database_version,
            "config applied"
        );
        self.applied.inc();
        self.show(&snapshot);
        let version = snapshot.version;
        self.current.store(Arc::new(snapshot));
        self.changes.send_replace(version);
    }

    /// The state of pools and targets kept across config versions.
    pub fn upstreams(&self) -> &crate::upstream::UpstreamRegistry {
        &self.env.upstreams
    }

    /// Changes whenever a new config is served.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Counts and logs a candidate that did not compile (with the version a database gave it);
    /// the running config keeps serving.
    pub fn reject(&self, origin: &str, database_version: Option<i64>, errors: &ConfigErrors) {
        self.rejected.inc();
        tracing::error!(
            source = %origin,
            database_version,
            errors = %errors.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            "config rejected; the running config keeps serving"
        );
    }

    fn show(&self, snapshot: &Snapshot) {
        self.version.set(snapshot.version as i64);
        let applied = snapshot
            .loaded_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs() as i64)
            .unwrap_or_default();
        self.applied_at.set(applied);
    }
}
