//! Gatehouse: an API gateway on Pingora. It routes requests to upstream pools, runs a filter
//! chain per route, and reloads its configuration without a restart.

pub mod config;
pub mod ops;
pub mod proxy;
pub mod router;
pub mod server;
pub mod telemetry;
pub mod upstream;

/// The JSON Schema of the configuration file.
pub fn config_schema() -> serde_json::Value {
    let schema = schemars::gen::SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<config::Config>();
    serde_json::to_value(schema).expect("schema serialises")
}
