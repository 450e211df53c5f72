//! Configuration: the typed model, loading from a source, the compile step that validates
//! everything (collecting all errors) into an immutable Snapshot, and the store that swaps
//! Snapshots atomically.

pub mod compile;
pub mod error;
pub mod load;
pub mod model;
pub mod postgres;
pub mod snapshot;
pub mod store;
pub mod units;
pub mod watch;

pub use compile::compile;
pub use error::{ConfigError, ConfigErrors};
pub use model::Config;
pub use snapshot::Snapshot;
pub use store::ConfigStore;
