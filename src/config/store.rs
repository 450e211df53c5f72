//! The live Snapshot, swapped atomically. Readers pay one atomic load; a reload builds the new
//! Snapshot aside and swaps it in only if it compiled whole.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::compile::compile;
use super::error::ConfigErrors;
use super::load::load_file;
use super::snapshot::Snapshot;
use crate::telemetry::metrics;

pub struct ConfigStore {
    current: ArcSwap<Snapshot>,
    path: PathBuf,
    next_version: AtomicU64,
}

impl ConfigStore {
    /// Load and compile the file; the store starts with it as version 1.
    pub fn open(path: &Path) -> Result<ConfigStore, ConfigErrors> {
        let loaded = load_file(path)?;
        let snapshot = compile(loaded, &source_name(path), 1)?;
        metrics::record_config_applied(&snapshot);
        Ok(ConfigStore {
            current: ArcSwap::from_pointee(snapshot),
            path: path.to_path_buf(),
            next_version: AtomicU64::new(2),
        })
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
