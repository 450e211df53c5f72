//! Configuration: the typed model, loading a document, the compile step that validates
//! everything (collecting all errors) into an immutable Snapshot, the store that swaps Snapshots
//! atomically, and the sources that feed it (a YAML file, or PostgreSQL).

pub mod compile;
pub mod error;
pub mod load;
pub mod model;
pub mod snapshot;
pub mod source;
pub mod store;
pub mod units;

pub use compile::{compile, CompileEnv};
pub use error::{ConfigError, ConfigErrors};
pub use model::Config;
pub use snapshot::Snapshot;
pub use store::ConfigStore;
