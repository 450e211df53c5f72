//! Telemetry: process logging, the access log, and the Prometheus registry.

pub mod access_log;
pub mod logging;
pub mod metrics;

/// What of the telemetry settings a reload changes: the log level and the access log's sample
/// rate. Where logs go and their format are fixed at start.
pub fn apply(config: &crate::config::model::TelemetryConfig) {
    logging::set_level(&config.log.level);
    access_log::set_sample(config.access_log.sample);
}
