//! Process logging through `tracing`, as JSON lines or text, to stderr. Pingora's own `log`
//! records are bridged into the same output. The level follows the live config (a reload that
//! changes `telemetry.log.level` applies it), unless `GATEHOUSE_LOG` set it at start; the
//! format is fixed at start.

use once_cell::sync::OnceCell;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter};

use crate::config::model::{LogConfig, LogFormat};

/// Replaces the level filter of the installed subscriber.
type SetLevel = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The level in force, and how to change it; unset when `GATEHOUSE_LOG` fixed the level.
static LEVEL: OnceCell<(std::sync::Mutex<String>, SetLevel)> = OnceCell::new();

/// Install the global subscriber. `GATEHOUSE_LOG` overrides the configured level, and then
/// for the life of the process.
pub fn init(config: &LogConfig) {
    let from_environment = std::env::var("GATEHOUSE_LOG")
        .ok()
        .and_then(|level| EnvFilter::try_new(level).ok());
    let follows_config = from_environment.is_none();
    let filter = from_environment
        .or_else(|| EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only for a terminal: a file or a journal gets plain text.
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match config.format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(output.json().with_current_span(false))
            .try_init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(output)
            .try_init(),
    };
    let set_level: SetLevel =
        Box::new(move |filter| handle.reload(filter).map_err(|error| error.to_string()));
    if let Err(error) = result {
        eprintln!("logging already initialised: {error}");
        return;
    }
    if follows_config {
        let _ = LEVEL.set((std::sync::Mutex::new(config.level.clone()), set_level));
    }
}

/// Applies the live config's level, if it changed (and `GATEHOUSE_LOG` did not fix it).
pub fn set_level(level: &str) {
    let Some((current, set)) = LEVEL.get() else {
        return;
    };
    let mut current = current.lock().expect("log level lock");
    if *current == level {
        return;
    }
    // The config was validated, so the filter parses; a failure keeps the level in force.
    match EnvFilter::try_new(level) {
        Ok(filter) => match set(filter) {
            Ok(()) => {
                tracing::info!(from = %current, to = %level, "log level changed");
                *current = level.to_string();
            }
            Err(error) => tracing::warn!(%error, "cannot change the log level"),
        },
        Err(error) => tracing::warn!(%error, level, "cannot change the log level"),
    }
}
