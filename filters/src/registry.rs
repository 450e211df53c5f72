//! The registry of filter kinds: how each `{kind, config}` pair from YAML or PostgreSQL becomes
//! a running filter. The server builds one (`Registry::builtin()`, plus `register::<F>()` for
//! kinds from other crates) and hands it to the compile step, so both sources go through it.

use std::sync::Arc;

use schemars::gen::SchemaGenerator;
use schemars::schema::Schema;
use serde::Deserialize;

use crate::{BuildCtx, BuildError, Filter, FilterKind};

type BuildFn = fn(&serde_json::Value, &BuildCtx) -> Result<Arc<dyn Filter>, Vec<BuildError>>;

struct Registration {
    kind: &'static str,
    build: BuildFn,
    schema: fn(&mut SchemaGenerator) -> Schema,
}

/// The filter kinds a config may name.
pub struct Registry {
    kinds: Vec<Registration>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::builtin()
    }
}

impl Registry {
    /// No kinds at all.
    pub fn empty() -> Registry {
        Registry { kinds: Vec::new() }
    }

    /// The kinds this crate ships.
    pub fn builtin() -> Registry {
        let mut registry = Registry::empty();
        registry
            .register::<crate::api_key::ApiKey>()
            .register::<crate::cors::Cors>()
            .register::<crate::grpc_json::GrpcJson>()
            .register::<crate::grpc_web::GrpcWeb>()
            .register::<crate::ip_restriction::IpRestriction>()
            .register::<crate::json_body::JsonBody>()
            .register::<crate::jwt::Jwt>()
            .register::<crate::mtls::Mtls>()
            .register::<crate::oauth2::OAuth2>()
            .register::<crate::rate_limit::RateLimit>()
            .register::<crate::request_id::RequestId>()
            .register::<crate::request_limits::RequestLimits>()
            .register::<crate::response_headers::ResponseHeaders>()
            .register::<crate::headers::Headers>()
            .register::<crate::rewrite::Rewrite>();
        registry
    }

    /// Adds kind `F`; a kind registered again replaces the earlier one.
    pub fn register<F: FilterKind>(&mut self) -> &mut Registry {
        self.kinds
            .retain(|registration| registration.kind != F::KIND);
        self.kinds.push(Registration {
            kind: F::KIND,
            build: build_erased::<F>,
            schema: schema_erased::<F>,
        });
        self.kinds.sort_by_key(|registration| registration.kind);
        self
    }

    /// The names of every registered kind, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.iter().map(|registration| registration.kind)
    }

    /// Builds a filter of `kind` from its config (`null` means the defaults).
    pub fn build(
        &self,
        kind: &str,
        config: &serde_json::Value,
        ctx: &BuildCtx,
    ) -> Result<Arc<dyn Filter>, Vec<BuildError>> {
        match self.find(kind) {
            Some(registration) => (registration.build)(config, ctx),
            None => Err(vec![BuildError::unknown_kind(format!(
                "unknown filter kind \"{kind}\" (known: {})",
                self.kinds().collect::<Vec<_>>().join(", ")
            ))]),
        }
    }

    /// The JSON Schema of a kind's config, for the generated config schema.
    pub fn schema(&self, kind: &str, generator: &mut SchemaGenerator) -> Option<Schema> {
        self.find(kind)
            .map(|registration| (registration.schema)(generator))
    }

    fn find(&self, kind: &str) -> Option<&Registration> {
        self.kinds
            .iter()
            .find(|registration| registration.kind == kind)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BuildErrorKind, Decision, RequestContext};

    #[test]
    fn unknown_kind_names_the_known_ones() {
        let error = Registry::builtin()
            .build("nope", &serde_json::Value::Null, &BuildCtx::default())
            .err()
            .unwrap();
        assert_eq!(error[0].kind, BuildErrorKind::UnknownKind);
        assert!(error[0].message.contains("unknown filter kind \"nope\""));
        assert!(error[0].message.contains("request_id"));
    }

    #[test]
    fn unknown_config_field_is_rejected() {
        let error = Registry::builtin()
            .build(
                "request_id",
                &serde_json::json!({"headr": "x-id"}),
                &BuildCtx::default(),
            )
            .err()
            .unwrap();
        assert_eq!(error[0].kind, BuildErrorKind::InvalidConfig);
        assert!(
            error[0].message.contains("unknown field `headr`"),
            "{error:?}"
        );
    }

    /// A kind defined outside the registry's own module, as another crate would add one.
    struct Deny;

    #[derive(Default, serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct DenyConfig {
        status: Option<u16>,
    }

    #[async_trait::async_trait]
    impl Filter for Deny {
        fn kind(&self) -> &'static str {
            "deny"
        }

        async fn request(
            &self,
            _request: &mut pingora_http::RequestHeader,
            _ctx: &mut RequestContext,
        ) -> Decision {
            Decision::Reject(crate::Problem::new(crate::ProblemType::Forbidden))
        }
    }

    impl FilterKind for Deny {
        const KIND: &'static str = "deny";
        type Config = DenyConfig;

        fn build(config: DenyConfig, _ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
            match config.status {
                Some(status) if status != 403 => {
                    Err(vec![BuildError::new("status", "only 403 is supported")])
                }
                _ => Ok(Deny),
            }
        }
    }

    #[tokio::test]
    async fn a_kind_registered_from_outside_builds_and_runs() {
        let mut registry = Registry::builtin();
        assert!(!registry.kinds().any(|kind| kind == "deny"));
        registry.register::<Deny>();
        assert!(registry.kinds().any(|kind| kind == "deny"));
        let filter = registry
            .build("deny", &serde_json::Value::Null, &BuildCtx::default())
            .unwrap();
        let mut request = pingora_http::RequestHeader::build("GET", b"/", None).unwrap();
        let mut ctx = RequestContext::new(std::time::Instant::now());
        assert!(matches!(
            filter.request(&mut request, &mut ctx).await,
            Decision::Reject(problem) if problem.status == 403
        ));
        let errors = registry
            .build(
                "deny",
                &serde_json::json!({"status": 418}),
                &BuildCtx::default(),
            )
            .err()
            .unwrap();
        assert_eq!(errors[0].path, "status");
        let mut generator = schemars::gen::SchemaSettings::draft07().into_generator();
        assert!(registry.schema("deny", &mut generator).is_some());
    }
}
