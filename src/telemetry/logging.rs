//! Process logging through `tracing`, as JSON lines or text, to stderr. Pingora's own `log`
//! records are bridged into the same output.

use tracing_subscriber::EnvFilter;

use crate::config::model::{LogConfig, LogFormat};

/// Install the global subscriber. `GATEHOUSE_LOG` overrides the configured level.
pub fn init(config: &LogConfig) {
    let filter = std::env::var("GATEHOUSE_LOG")
        .ok()
        .and_then(|level| EnvFilter::try_new(level).ok())
        .or_else(|| EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if let Err(error) = result {
        eprintln!("logging already initialised: {error}");
    }
}
