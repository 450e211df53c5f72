//! Telemetry: process logging, the access log, and the Prometheus registry.

pub mod access_log;
pub mod logging;
pub mod metrics;
