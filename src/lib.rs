//! Gatehouse: an API gateway on Pingora. It routes requests to upstream pools, runs a filter
//! chain per route, and reloads its configuration without a restart.

pub mod config;
pub mod edge;
pub mod ops;
pub mod proxy;
pub mod router;
pub mod server;
pub mod telemetry;
pub mod upstream;

/// The filter kinds this build knows: the built-in ones, and those of other crates, added here
/// with one `registry.register::<Kind>()` line each. The server, `validate`, `explain`, `schema`
/// and `config push` all build configs with it.
pub fn filter_registry() -> gatehouse_filters::Registry {
    let mut registry = gatehouse_filters::Registry::builtin();
    registry.register::<gatehouse_wasm::Wasm>();
    registry
}

/// The JSON Schema of the configuration file, with the filter kinds of `registry`.
pub fn config_schema(registry: &gatehouse_filters::Registry) -> serde_json::Value {
    let mut generator = schemars::gen::SchemaSettings::draft07().into_generator();
    // Defined first, so the model's own `Filter` schema (the built-in kinds) is not used.
    let filter = config::model::filter_schema(registry, &mut generator);
    generator
        .definitions_mut()
        .insert("Filter".to_string(), filter);
    let schema = generator.into_root_schema_for::<config::Config>();
    serde_json::to_value(schema).expect("schema serialises")
}
