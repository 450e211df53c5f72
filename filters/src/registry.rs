//! The registry of filter kinds: how each `{kind, config}` pair from YAML or PostgreSQL becomes
//! a running filter. Adding a filter is one module plus one line in `KINDS`.

use std::sync::Arc;

use schemars::gen::SchemaGenerator;
use schemars::schema::Schema;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::{BuildCtx, BuildError, Filter};

/// A filter kind: its name, its config schema, and how to build it.
pub trait FilterKind: Filter + Sized {
    const KIND: &'static str;
    type Config: DeserializeOwned + schemars::JsonSchema + Default;
    fn build(config: Self::Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>>;
}

type BuildFn = fn(&serde_json::Value, &BuildCtx) -> Result<Arc<dyn Filter>, Vec<BuildError>>;

struct Registration {
    kind: &'static str,
    build: BuildFn,
    schema: fn(&mut SchemaGenerator) -> Schema,
}

const fn register<F: FilterKind>() -> Registration {
    Registration {
        kind: F::KIND,
        build: build_erased::<F>,
        schema: schema_erased::<F>,
    }
}

static KINDS: &[Registration] = &[
    register::<crate::api_key::ApiKey>(),
    register::<crate::jwt::Jwt>(),
    register::<crate::oauth2::OAuth2>(),
    register::<crate::rate_limit::RateLimit>(),
    register::<crate::request_id::RequestId>(),
    register::<crate::response_headers::ResponseHeaders>(),
];

fn build_erased<F: FilterKind>(
    config: &serde_json::Value,
    ctx: &BuildCtx,
) -> Result<Arc<dyn Filter>, Vec<BuildError>> {
    let config: F::Config = if config.is_null() {
        F::Config::default()
    } else {
        F::Config::deserialize(config)
            .map_err(|error| vec![BuildError::new("", error.to_string())])?
    };
    Ok(Arc::new(F::build(config, ctx)?))
}

fn schema_erased<F: FilterKind>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<F::Config>()
}

/// The names of every known filter kind.
pub fn filter_kinds() -> impl Iterator<Item = &'static str> {
    KINDS.iter().map(|registration| registration.kind)
}

/// Build a filter of `kind` from its config (`null` means the defaults).
pub fn build_filter(
    kind: &str,
    config: &serde_json::Value,
    ctx: &BuildCtx,
) -> Result<Arc<dyn Filter>, Vec<BuildError>> {
    match KINDS.iter().find(|registration| registration.kind == kind) {
        Some(registration) => (registration.build)(config, ctx),
        None => Err(vec![BuildError::new(
            "",
            format!(
                "unknown filter kind \"{kind}\" (known: {})",
                filter_kinds().collect::<Vec<_>>().join(", ")
            ),
        )]),
    }
}

/// The JSON Schema of a kind's config, for the generated config schema.
pub fn schema_for_kind(kind: &str, generator: &mut SchemaGenerator) -> Option<Schema> {
    KINDS
        .iter()
        .find(|registration| registration.kind == kind)
        .map(|registration| (registration.schema)(generator))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kind_names_the_known_ones() {
        let error = build_filter("nope", &serde_json::Value::Null, &BuildCtx::default())
            .err()
            .unwrap();
        assert!(error[0].message.contains("unknown filter kind \"nope\""));
        assert!(error[0].message.contains("request_id"));
    }

    #[test]
    fn unknown_config_field_is_rejected() {
        let error = build_filter(
            "request_id",
            &serde_json::json!({"headr": "x-id"}),
            &BuildCtx::default(),
        )
        .err()
        .unwrap();
        assert!(
            error[0].message.contains("unknown field `headr`"),
            "{error:?}"
        );
    }
}
