//! The compile step shared by every config source: validate everything, collect all errors with
//! their paths, and build a Snapshot (router, upstream pools, filter chains).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use gatehouse_filters::consumers::{parse_key_hash, ApiKeyCredential, ConsumerRegistry};
use gatehouse_filters::{BuildCtx, Consumer, Filter};
use sha2::{Digest, Sha256};

use super::error::{ConfigError, ConfigErrors};
use super::load::LoadedConfig;
use super::model::{Config, CredentialConfig, FilterConfig, PathMatch, SourceKind};
use super::snapshot::{IdentityHeaders, Limits, Route, Snapshot};
use crate::router::{PathRewrite, Router};
use crate::telemetry::metrics;
use crate::upstream::{CaCache, UpstreamPool};

/// Pingora's own parser refuses more header fields than this (with 400), so a larger limit
/// could never apply.
const PINGORA_MAX_HEADERS: usize = 256;
const PINGORA_MAX_HEADER_BYTES: u64 = 1_048_575;

fn build_chain(
    base: &str,
    specs: &[FilterConfig],
    ctx: &BuildCtx,
    errors: &mut Vec<ConfigError>,
) -> Vec<Arc<dyn Filter>> {
    let mut chain = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        match gatehouse_filters::build_filter(&spec.kind, &spec.config, ctx) {
            Ok(filter) => chain.push(filter),
            Err(build_errors) => {
                for error in build_errors {
                    let path = if error.message.starts_with("unknown filter kind") {
                        format!("{base}[{index}].kind")
                    } else if error.path.is_empty() {
                        format!("{base}[{index}].config")
                    } else {
                        format!("{base}[{index}].config.{}", error.path)
                    };
                    errors.push(ConfigError::new(path, error.message));
                }
            }
        }
    }
    chain
}

/// The consumer registry, with every credential checked.
fn build_consumers(config: &Config, errors: &mut Vec<ConfigError>) -> ConsumerRegistry {
    let secret = config
        .auth
        .api_key_secret
        .as_ref()
        .map(|secret| secret.as_bytes().to_vec());
    if secret.as_ref().is_some_and(|secret| secret.len() < 16) {
        errors.push(ConfigError::new(
            "auth.api_key_secret",
            "use at least 16 bytes",
        ));
    }
    let mut registry = ConsumerRegistry::new(secret);
    let mut ids = HashMap::new();
    let mut consumers = HashMap::new();
    for (index, consumer) in config.consumers.iter().enumerate() {
        let path = format!("consumers[{index}]");
        if consumer.id.is_empty() {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                "a consumer needs an id",
            ));
        }
        if let Some(previous) = ids.insert(consumer.id.as_str(), index) {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                format!(
                    "duplicate consumer id \"{}\" (also consumers[{previous}])",
                    consumer.id
                ),
            ));
        }
        let built = Consumer {
            id: consumer.id.as_str().into(),
            username: consumer.username.as_deref().map(Into::into),
            tags: consumer.tags.clone().into(),
        };
        consumers.insert(consumer.id.as_str(), built.clone());
        for (credential_index, credential) in consumer.credentials.iter().enumerate() {
            let path = format!("{path}.credentials[{credential_index}]");
            match credential {
                CredentialConfig::ApiKey {
                    hash,
                    disabled,
                    expires_at,
                } => {
                    let expires_at = match expires_at {
                        Some(text) => match humantime::parse_rfc3339_weak(text) {
                            Ok(time) => Some(time),
                            Err(_) => {
                                errors.push(ConfigError::new(format!("{path}.expires_at"), format!("\"{text}\" is not an RFC 3339 time like 2027-01-31T00:00:00Z")));
                                None
                            }
                        },
                        None => None,
                    };
                    match parse_key_hash(hash) {
                        Ok((kind, digest)) => {
                            if kind == gatehouse_filters::consumers::KeyHashKind::HmacSha256
                                && !registry.has_hmac_secret()
                            {
                                errors.push(ConfigError::new(
                                    format!("{path}.hash"),
                                    "an hmac-sha256 hash needs `auth.api_key_secret`",
                                ));
                            }
                            let added = registry.add_api_key(
                                kind,
                                ApiKeyCredential {
                                    consumer: built.clone(),
                                    hash: digest,
                                    disabled: *disabled,
                                    expires_at,
                                },
                            );
                            if !added {
                                errors.push(ConfigError::new(
                                    format!("{path}.hash"),
                                    "this key is already registered",
                                ));
                            }
                        }
                        Err(message) => {
                            errors.push(ConfigError::new(format!("{path}.hash"), message))
                        }
                    }
                }
                CredentialConfig::Jwt { issuer, subject } => {
                    if !registry.add_jwt_subject(issuer, subject, built.clone()) {
                        errors.push(ConfigError::new(
                            path,
                            "issuer and subject already belong to another consumer",
                        ));
                    }
                }
            }
        }
    }
    if let Some(anonymous) = &config.auth.anonymous {
        match consumers.get(anonymous.as_str()) {
            Some(consumer) => registry.anonymous = Some(consumer.clone()),
            None => errors.push(ConfigError::new(
                "auth.anonymous",
                format!("no consumer with id \"{anonymous}\""),
            )),
        }
    }
    registry
}

fn identity_header(
    path: &str,
    name: &Option<String>,
    errors: &mut Vec<ConfigError>,
) -> Option<http::HeaderName> {
    let name = name.as_ref().filter(|name| !name.is_empty())?;
    match http::HeaderName::from_bytes(name.as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            errors.push(ConfigError::new(
                path,
                format!("\"{name}\" is not a valid header name"),
            ));
            None
        }
    }
}

/// Hash of the config as written.
pub fn config_hash(config: &Config) -> String {
    let canonical = serde_json::to_vec(config).unwrap_or_default();
    hex::encode(Sha256::digest(&canonical))
}

/// Validate and build a Snapshot. Every error is reported, not only the first.
pub fn compile(loaded: LoadedConfig, source: &str, version: u64) -> Result<Snapshot, ConfigErrors> {
    let LoadedConfig {
        as_written,
        resolved: config,
    } = loaded;
    let mut errors = Vec::new();
    if config.version != 1 {
        errors.push(ConfigError::new(
            "version",
            format!(
                "unsupported version {}; this Gatehouse reads version 1",
                config.version
            ),
        ));
    }

    // server
    let server = &config.server;
    if server.listeners.is_empty() {
        errors.push(ConfigError::new(
            "server.listeners",
            "at least one listener is needed",
        ));
    }
    let mut listener_names = HashMap::new();
    let mut listener_addresses = HashMap::new();
    for (index, listener) in server.listeners.iter().enumerate() {
        let path = format!("server.listeners[{index}]");
        if let Some(previous) = listener_names.insert(listener.name.as_str(), index) {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                format!(
                    "duplicate listener name \"{}\" (also server.listeners[{previous}])",
                    listener.name
                ),
            ));
        }
        if listener.address.parse::<std::net::SocketAddr>().is_err() {
            errors.push(ConfigError::new(
                format!("{path}.address"),
                format!("\"{}\" is not an IP:PORT address", listener.address),
            ));
        } else if let Some(previous) = listener_addresses.insert(listener.address.as_str(), index) {
            errors.push(ConfigError::new(
                format!("{path}.address"),
                format!("address already used by server.listeners[{previous}]"),
            ));
        }
        if let Some(tls) = &listener.tls {
            for (key, file) in [("cert", &tls.cert), ("key", &tls.key)] {
                if std::fs::metadata(file).is_err() {
                    errors.push(ConfigError::new(
                        format!("{path}.tls.{key}"),
                        format!("cannot read \"{file}\""),
                    ));
                }
            }
        }
    }
    if server.threads == Some(0) {
        errors.push(ConfigError::new("server.threads", "must be at least 1"));
    }
    let limits = &server.limits;
    if limits.max_headers == 0 || limits.max_headers > PINGORA_MAX_HEADERS {
        errors.push(ConfigError::new(
            "server.limits.max_headers",
            format!("must be between 1 and {PINGORA_MAX_HEADERS}"),
        ));
    }
    if limits.max_header_bytes.0 == 0 || limits.max_header_bytes.0 > PINGORA_MAX_HEADER_BYTES {
        errors.push(ConfigError::new(
            "server.limits.max_header_bytes",
            format!("must be between 1 and {PINGORA_MAX_HEADER_BYTES} bytes"),
        ));
    }
    if limits.max_uri_bytes.0 == 0 {
        errors.push(ConfigError::new(
            "server.limits.max_uri_bytes",
            "must be at least 1",
        ));
    }
    if limits.header_read_timeout.get().is_zero() {
        errors.push(ConfigError::new(
            "server.limits.header_read_timeout",
            "must be longer than zero",
        ));
    }
    if config.ops.address != "off" && config.ops.address.parse::<std::net::SocketAddr>().is_err() {
        errors.push(ConfigError::new(
            "ops.address",
            format!(
                "\"{}\" is not an IP:PORT address (or \"off\")",
                config.ops.address
            ),
        ));
    }
    match (&config.config.source, &config.config.postgres) {
        (SourceKind::Postgres, None) => errors.push(ConfigError::new(
            "config.postgres",
            "`source: postgres` needs a `postgres` section with the database `url`",
        )),
        (SourceKind::Postgres, Some(postgres)) => {
            if let Err(message) = super::postgres::check_url(&postgres.url) {
                errors.push(ConfigError::new("config.postgres.url", message));
            }
            for (key, value) in [
                ("resync_interval", postgres.resync_interval),
                ("connect_timeout", postgres.connect_timeout),
            ] {
                if value.get().is_zero() {
                    errors.push(ConfigError::new(
                        format!("config.postgres.{key}"),
                        "must be more than 0s",
                    ));
                }
            }
        }
        (SourceKind::File, _) => {}
    }
    let sample = config.telemetry.access_log.sample;
    if !(0.0..=1.0).contains(&sample) {
        errors.push(ConfigError::new(
            "telemetry.access_log.sample",
            "must be between 0.0 and 1.0",
        ));
    }

    // upstreams
    let mut upstream_index = HashMap::new();
    let mut upstreams = Vec::new();
    let mut ca_cache = CaCache::default();
    for (index, upstream) in config.upstreams.iter().enumerate() {
        let path = format!("upstreams[{index}]");
        if let Some(previous) = upstream_index.get(upstream.name.as_str()) {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                format!(
                    "duplicate upstream name \"{}\" (also upstreams[{previous}])",
                    upstream.name
                ),
            ));
            continue;
        }
        match UpstreamPool::build(&path, upstream, &mut ca_cache) {
            Ok(pool) => {
                upstream_index.insert(upstream.name.as_str(), upstreams.len());
                upstreams.push(pool);
            }
            Err(pool_errors) => {
                // Keep the name known so routes naming it do not add a misleading error.
                upstream_index.insert(upstream.name.as_str(), usize::MAX);
                errors.extend(pool_errors);
            }
        }
    }

    // consumers and identity
    let registry = build_consumers(&config, &mut errors);
    let headers = &config.auth.upstream_headers;
    let identity_headers = IdentityHeaders {
        consumer_id: identity_header(
            "auth.upstream_headers.consumer_id",
            &headers.consumer_id,
            &mut errors,
        ),
        consumer_username: identity_header(
            "auth.upstream_headers.consumer_username",
            &headers.consumer_username,
            &mut errors,
        ),
        subject: identity_header(
            "auth.upstream_headers.subject",
            &headers.subject,
            &mut errors,
        ),
    };

    // filters
    let redis = match &config.redis {
        Some(redis) => match gatehouse_filters::shared::redis_client(
            &gatehouse_filters::shared::RedisSettings {
                url: redis.url.clone(),
                command_timeout: redis.command_timeout.get(),
                connect_timeout: redis.connect_timeout.get(),
                max_queue: redis.max_queue,
            },
        ) {
            Ok(client) => Some(client),
            Err(message) => {
                errors.push(ConfigError::new("redis.url", message));
                None
            }
        },
        None => None,
    };
    let build_ctx = BuildCtx {
        consumers: Arc::new(registry),
        redis,
    };
    let global_chain = build_chain("filters", &config.filters, &build_ctx, &mut errors);

    // routes
    let router = match Router::build(&config.routes) {
        Ok(router) => Some(router),
        Err(router_errors) => {
            errors.extend(router_errors);
            None
        }
    };
    let mut route_names = HashMap::new();
    let mut routes = Vec::new();
    for (index, route) in config.routes.iter().enumerate() {
        let path = format!("routes[{index}]");
        if route.name.is_empty() {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                "a route needs a name",
            ));
        }
        if let Some(previous) = route_names.insert(route.name.as_str(), index) {
            errors.push(ConfigError::new(
                format!("{path}.name"),
                format!(
                    "duplicate route name \"{}\" (also routes[{previous}])",
                    route.name
                ),
            ));
        }
        let upstream = match upstream_index.get(route.upstream.as_str()) {
            Some(&upstream) => upstream,
            None => {
                errors.push(ConfigError::new(
                    format!("{path}.upstream"),
                    format!("no upstream named \"{}\"", route.upstream),
                ));
                usize::MAX
            }
        };
        let capture_names: Vec<String> = route
            .matcher
            .paths
            .iter()
            .filter_map(|path| match path {
                PathMatch::Regex(pattern) => regex::Regex::new(pattern).ok(),
                _ => None,
            })
            .flat_map(|regex| {
                regex
                    .capture_names()
                    .flatten()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        let rewrite = match PathRewrite::build(
            &path,
            route.strip_prefix.as_deref(),
            route.rewrite.as_deref(),
            &capture_names,
        ) {
            Ok(rewrite) => rewrite,
            Err(rewrite_errors) => {
                errors.extend(rewrite_errors);
                None
            }
        };
        let own_chain = build_chain(
            &format!("{path}.filters"),
            &route.filters,
            &build_ctx,
            &mut errors,
        );
        let mut chain = global_chain.clone();
        chain.extend(own_chain);
        // `auth` is enforced right after the last filter that identifies callers.
        let auth_gate = chain
            .iter()
            .rposition(|filter| filter.is_auth())
            .map_or(0, |last| last + 1);
        if route.auth == Some(super::model::AuthMode::Required)
            && !chain.iter().any(|filter| filter.is_auth())
        {
            errors.push(ConfigError::new(format!("{path}.auth"), "`required` needs an auth filter (jwt, api_key) on the route or in the global chain"));
        }
        routes.push(Route {
            auth: route.auth,
            auth_gate,
            name: route.name.as_str().into(),
            upstream,
            rewrite,
            read_timeout: route.timeout.map(|timeout| timeout.get()),
            chain,
            metrics: metrics::route_metrics(&route.name),
        });
    }

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Snapshot {
        version,
        hash: config_hash(&as_written),
        loaded_at: SystemTime::now(),
        source: source.to_string(),
        router: router.expect("no errors means the router built"),
        routes,
        upstreams,
        global_chain,
        limits: Limits {
            max_header_bytes: limits.max_header_bytes.0 as usize,
            max_headers: limits.max_headers,
            max_uri_bytes: limits.max_uri_bytes.0 as usize,
            max_body_bytes: limits.max_body_bytes.0,
            header_read_timeout: limits.header_read_timeout.get(),
        },
        trusted_proxies: config.server.trusted_proxies.clone(),
        identity_headers,
        anonymous: build_ctx.consumers.anonymous.clone(),
        redis: build_ctx.redis.clone(),
        serving: true,
        database_version: None,
        unmatched_metrics: metrics::route_metrics(metrics::UNMATCHED_ROUTE),
        config: as_written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_yaml;

    fn errors_of(yaml: &str) -> Vec<String> {
        let loaded = parse_yaml(yaml).unwrap();
        match compile(loaded, "test", 1) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let errors = errors_of(
            r#"
version: 1
server:
  listeners: [{ name: public, address: "nope" }]
  limits: { max_headers: 1000 }
upstreams:
  - name: users
    targets: []
filters:
  - kind: no_such_filter
routes:
  - name: a
    upstream: billing
    match: { paths: [{ regex: "(" }] }
  - name: a
    upstream: users
    rewrite: "/x/${id}"
"#,
        );
        let expected = [
            "server.listeners[0].address: \"nope\" is not an IP:PORT address",
            "server.limits.max_headers: must be between 1 and 256",
            "upstreams[0].targets: an upstream needs at least one target",
            "filters[0].kind: unknown filter kind \"no_such_filter\"",
            "routes[0].match.paths[0].regex: invalid regular expression",
            "routes[0].upstream: no upstream named \"billing\"",
            "routes[1].name: duplicate route name \"a\" (also routes[0])",
            "routes[1].rewrite: \"${id}\" is not a named capture",
        ];
        for expected in expected {
            assert!(
                errors.iter().any(|error| error.starts_with(expected)),
                "missing {expected:?} in {errors:#?}"
            );
        }
    }

    #[test]
    fn a_valid_config_compiles_with_a_stable_hash() {
        let yaml = r#"
version: 1
server: { listeners: [{ name: public, address: "127.0.0.1:0" }] }
upstreams: [{ name: users, targets: [{ address: "127.0.0.1:9001" }] }]
routes: [{ name: users, upstream: users, match: { paths: [{ prefix: /users }] } }]
"#;
        let first = compile(parse_yaml(yaml).unwrap(), "test", 1).unwrap();
        let second = compile(parse_yaml(yaml).unwrap(), "test", 2).unwrap();
        assert_eq!(first.hash, second.hash);
        assert_eq!(first.hash.len(), 64);
        assert_eq!(first.routes.len(), 1);
    }
}
