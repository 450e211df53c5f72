//! Telemetry: process logging, the access log, the Prometheus registry and traces.

pub mod access_log;
pub mod json_line;
pub mod logging;
pub mod metrics;
pub mod traces;
mod worker;

/// What of the telemetry settings a reload changes: the log level, the access log's sample
/// rate, and the trace sample ratio and `trust_incoming`. Where logs go, their format and
/// where traces go are fixed at start.
pub fn apply(config: &crate::config::model::TelemetryConfig) {
    logging::set_level(&config.log.level);
    access_log::set_sample(config.access_log.sample);
    traces::apply(config.tracing.as_ref());
}
