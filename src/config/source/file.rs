//! The file source (`config.source: file`, the default): the YAML file is the whole config. It
//! is read again on SIGHUP always, and on changes when `config.watch` is on (the directory is
//! watched, so editors that replace the file by rename are seen; a burst of changes is read once
//! it has been quiet for a moment).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora_core::server::ShutdownWatch;
use sha2::{Digest, Sha256};

use super::Source;
use crate::config::compile::{config_hash, CompileEnv};
use crate::config::error::{ConfigError, ConfigErrors};
use crate::config::load::{parse_yaml, LoadedConfig};
use crate::config::model::Config;
use crate::config::snapshot::Snapshot;
use crate::config::store::ConfigStore;

/// How long the file must be left alone before a change is read.
const QUIET: Duration = Duration::from_millis(100);

pub struct FileSource {
    path: PathBuf,
    store: Arc<ConfigStore>,
    watch: bool,
    /// The digest of the file's text as last read.
    seen: Mutex<[u8; 32]>,
    /// The digest of the file's last text that was rejected: a change event for the same text
    /// (editors and deploy tools write in several steps) is not rejected and counted again.
    last_rejected: Mutex<Option<[u8; 32]>>,
}

/// Why the file is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// A change was seen (or may have been missed): the same rejected text is not reported twice.
    Change,
    /// An operator asked (SIGHUP): whatever the file holds is judged again.
    Signal,
}

fn origin(path: &Path) -> String {
    format!("file:{}", path.display())
}

impl FileSource {
    /// The store serving `loaded`, read from `text`.
    pub fn open(
        path: &Path,
        text: &str,
        loaded: LoadedConfig,
        env: CompileEnv,
    ) -> Result<(Arc<ConfigStore>, Arc<FileSource>), ConfigErrors> {
        let watch = loaded.resolved.config.watch;
        let store = Arc::new(ConfigStore::open(loaded, &origin(path), env)?);
        let source = Arc::new(FileSource {
            path: path.to_path_buf(),
            store: store.clone(),
            watch,
            seen: Mutex::new(Sha256::digest(text.as_bytes()).into()),
            last_rejected: Mutex::new(None),
        });
        Ok((store, source))
    }

    /// Reads the file again and applies it if it compiles; otherwise the current config keeps
    /// serving. Returns the new version, or `None` when nothing changed.
    pub fn reload(&self, trigger: Trigger) -> Result<Option<u64>, ConfigErrors> {
        let origin = origin(&self.path);
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) => {
                let errors = ConfigErrors(vec![ConfigError::new(
                    "",
                    format!("cannot read {}: {error}", self.path.display()),
                )]);
                self.store.reject(&origin, None, &errors);
                return Err(errors);
            }
        };
        let digest: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        *lock(&self.seen) = digest;
        let outcome = parse_yaml(&text).and_then(|loaded| {
            let current = self.store.load();
            if config_hash(&loaded.as_written) == current.hash {
                return Ok(None);
            }
            let previous = current.config.clone();
            drop(current);
            let snapshot = self.store.compile(loaded, &origin)?;
            warn_about_restart_only_changes(&previous, &snapshot.config);
            let version = snapshot.version;
            self.store.swap(snapshot);
            Ok(Some(version))
        });
        let mut last_rejected = lock(&self.last_rejected);
        match &outcome {
            Ok(_) => *last_rejected = None,
            Err(errors) => {
                if trigger == Trigger::Signal || *last_rejected != Some(digest) {
                    self.store.reject(&origin, None, errors);
                }
                *last_rejected = Some(digest);
            }
        }
        outcome
    }

    /// Reloads on a blocking thread: compiling reads files and resolves names.
    async fn reload_aside(self: &Arc<Self>, trigger: Trigger) {
        let source = self.clone();
        if let Err(error) = tokio::task::spawn_blocking(move || source.reload(trigger)).await {
            tracing::error!(%error, "the reload failed; the running config keeps serving");
        }
    }

    async fn watch(self: Arc<Self>, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP; reload by file change only");
                None
            }
        };
        let (sender, mut changes) = tokio::sync::mpsc::unbounded_channel::<()>();
        let _watcher = if self.watch {
            let watcher = self.watcher(sender);
            // Anything written between the first read and the watch being in place would
            // otherwise wait for the next change. Reading a config file once is quick enough
            // for this thread; only a changed file is compiled, aside.
            if self.changed_since_read() {
                self.reload_aside(Trigger::Change).await;
            }
            watcher
        } else {
            drop(sender);
            None
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { match hangup.as_mut() { Some(signal) => signal.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading config");
                    self.reload_aside(Trigger::Signal).await;
                }
                Some(()) = changes.recv() => {
                    // Read once the writes have stopped for a moment.
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(QUIET) => break,
                            more = changes.recv() => if more.is_none() { break },
                        }
                    }
                    self.reload_aside(Trigger::Change).await;
                }
            }
        }
    }

    /// Whether the file's text differs from the text last read (or cannot be read now).
    fn changed_since_read(&self) -> bool {
        match std::fs::read(&self.path) {
            Ok(text) => {
                let digest: [u8; 32] = Sha256::digest(&text).into();
                digest != *lock(&self.seen)
            }
            Err(_) => true,
        }
    }

    fn watcher(
        &self,
        sender: tokio::sync::mpsc::UnboundedSender<()>,
    ) -> Option<notify::RecommendedWatcher> {
        let directory = self
            .path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let watched = self.path.file_name().map(|name| name.to_os_string());
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                let relevant = event
                    .paths
                    .iter()
                    .any(|changed| changed.file_name().map(|name| name.to_os_string()) == watched);
                if relevant && !event.kind.is_access() {
                    let _ = sender.send(());
                }
            }
        });
        match watcher {
            Ok(mut watcher) => match watcher.watch(&directory, RecursiveMode::NonRecursive) {
                Ok(()) => Some(watcher),
                Err(error) => {
                    tracing::error!(%error, directory = %directory.display(), "cannot watch the config directory; reload with SIGHUP");
                    None
                }
            },
            Err(error) => {
                tracing::error!(%error, "cannot watch the config file; reload with SIGHUP");
                None
            }
        }
    }
}

#[async_trait]
impl Source for FileSource {
    async fn run(self: Arc<Self>, shutdown: ShutdownWatch) {
        self.watch(shutdown).await;
    }

    fn report(&self, _snapshot: &Snapshot) -> serde_json::Map<String, serde_json::Value> {
        let mut report = serde_json::Map::new();
        report.insert(
            "file".into(),
            serde_json::json!({ "path": self.path.display().to_string(), "watch": self.watch }),
        );
        report
    }
}

/// A lock that a reload which panicked (a bug) leaves usable for the next one.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Listeners, threads and the ops address are bound at start; say so when a reload changes them.
/// (A listener's `proxy_protocol` applies to the connections accepted after the reload.)
fn warn_about_restart_only_changes(old: &Config, new: &Config) {
    let listeners = |config: &Config| {
        let mut listeners = config.server.listeners.clone();
        for listener in &mut listeners {
            listener.proxy_protocol = None;
        }
        serde_json::to_string(&listeners).unwrap_or_default()
    };
    if listeners(old) != listeners(new)
        || old.server.threads != new.server.threads
        || old.ops.address != new.ops.address
        || old.server.upstream_keepalive_pool_size != new.server.upstream_keepalive_pool_size
        || old.server.http2 != new.server.http2
        || old.server.max_requests_per_connection != new.server.max_requests_per_connection
    {
        tracing::warn!("listeners, threads, ops address, pool size, http2 and max_requests_per_connection apply at start; use a graceful upgrade (SIGQUIT) to change them");
    }
}
