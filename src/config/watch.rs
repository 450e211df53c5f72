//! The background service that reloads the config file: on SIGHUP always, and on file changes
//! when `config.watch` is on (debounced, and watching the directory so editors that replace the
//! file by rename are seen).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::store::ConfigStore;

pub struct ConfigReloader {
    pub store: Arc<ConfigStore>,
    pub watch: bool,
}

const DEBOUNCE: Duration = Duration::from_millis(100);

#[async_trait]
impl BackgroundService for ConfigReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP; reload by file change only");
                None
            }
        };
        let (sender, mut changes) = tokio::sync::mpsc::unbounded_channel::<()>();
        let path = self.store.path().to_path_buf();
        let file_name = path.file_name().map(|name| name.to_os_string());
        let _watcher = if self.watch {
            let directory = path
                .parent()
                .filter(|parent| !parent.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."))
                .to_path_buf();
            let watched = file_name.clone();
            let watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    if let Ok(event) = event {
                        let relevant = event.paths.iter().any(|changed| {
                            changed.file_name().map(|name| name.to_os_string()) == watched
                        });
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
        } else {
            drop(sender);
            None
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { match hangup.as_mut() { Some(signal) => signal.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading config");
                    self.reload().await;
                }
                Some(()) = changes.recv() => {
                    // Let a burst of writes finish, then reload once.
                    tokio::time::sleep(DEBOUNCE).await;
                    while changes.try_recv().is_ok() {}
                    self.reload().await;
                }
            }
        }
    }
}

impl ConfigReloader {
    async fn reload(&self) {
        let store = self.store.clone();
        // Compiling reads files and resolves names: keep it off the async threads.
        let _ = tokio::task::spawn_blocking(move || store.reload()).await;
    }
}
