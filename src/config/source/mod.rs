//! Where a node's config comes from. A source feeds the store: it reads the first config at
//! start, then keeps the store up to date as a background service. Each source is one file (or
//! folder) here; adding one is a new module and one arm in `open`.

pub mod file;
pub mod postgres;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::compile::CompileEnv;
use super::error::ConfigErrors;
use super::load::{parse_yaml, read_text};
use super::model::SourceKind;
use super::snapshot::Snapshot;
use super::store::ConfigStore;

/// A config source.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// Keeps the store up to date until shutdown.
    async fn run(self: Arc<Self>, shutdown: ShutdownWatch);

    /// What `/config` shows about the source, besides the live snapshot.
    fn report(&self, snapshot: &Snapshot) -> serde_json::Map<String, serde_json::Value>;
}

/// Opens the config file at `path`; its `config.source` says where the routes come from.
pub fn open(
    path: &Path,
    env: CompileEnv,
) -> Result<(Arc<ConfigStore>, Arc<dyn Source>), ConfigErrors> {
    let text = read_text(path)?;
    let loaded = parse_yaml(&text)?;
    match loaded.resolved.config.source {
        SourceKind::File => {
            let (store, source) = file::FileSource::open(path, &text, loaded, env)?;
            Ok((store, source))
        }
        SourceKind::Postgres => {
            let (store, source) = postgres::PostgresSource::open(path, loaded, env)?;
            Ok((store, source))
        }
    }
}

/// A source as a Pingora background service.
pub struct Service(pub Arc<dyn Source>);

#[async_trait]
impl BackgroundService for Service {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.clone().run(shutdown).await;
    }
}
