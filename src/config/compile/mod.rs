//! The compile step shared by every config source: validate everything, collect all errors with
//! their paths, and build a Snapshot (router, upstream pools, filter chains). Each part of the
//! config has its named check in this folder; `compile` runs them in order.
//!
//! Compiling reads files (certificates, CA bundles, secret files), so callers run it off the
//! async threads. Upstream host names are not looked up here: the discovery service does that
//! in the background.

mod consumers;
mod routes;
mod server;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use gatehouse_filters::{BuildCtx, Metrics, Registry};
use sha2::{Digest, Sha256};

use super::error::{ConfigError, ConfigErrors};
use super::load::LoadedConfig;
use super::model::Config;
use super::snapshot::Snapshot;
use crate::telemetry::metrics::RouteMetrics;
use crate::upstream::{CaCache, UpstreamPool, UpstreamRegistry};

/// What compiling needs besides the config: the filter kinds it may name, and the metrics
/// registry the built filters and routes report in.
#[derive(Clone)]
pub struct CompileEnv {
    pub registry: Arc<Registry>,
    pub metrics: Metrics,
    /// The state of pools and targets kept across config versions.
    pub upstreams: UpstreamRegistry,
}

impl Default for CompileEnv {
    /// This build's filter kinds and a metrics registry of its own (for `validate` and tests).
    fn default() -> Self {
        CompileEnv {
            registry: Arc::new(crate::filter_registry()),
            metrics: Metrics::new(),
            upstreams: UpstreamRegistry::default(),
        }
    }
}

/// Hash of the config as written, whatever the order of its keys (a config stored in
/// PostgreSQL comes back with its objects' keys sorted).
pub fn config_hash(config: &Config) -> String {
    let mut value = serde_json::to_value(config).unwrap_or_default();
    sort_keys(&mut value);
    let canonical = serde_json::to_vec(&value).unwrap_or_default();
    hex::encode(Sha256::digest(&canonical))
}

fn sort_keys(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(members) => {
            members.sort_keys();
            members.values_mut().for_each(sort_keys);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

/// Validate and build a Snapshot. Every error is reported, not only the first.
pub fn compile(
    loaded: LoadedConfig,
    source: &str,
    version: u64,
    env: &CompileEnv,
) -> Result<Snapshot, ConfigErrors> {
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
    let listeners = server::check_listeners(&config, &mut errors);
    let limits = server::limits(&config, &mut errors);
    server::check_node(&config, &mut errors);
    let (upstreams, upstream_index) = build_upstreams(&config, env, &mut errors);
    let dns = crate::upstream::discovery::DnsSettings::build(&config.server.dns, &mut errors);
    let consumers = consumers::build(&config, &mut errors);
    let identity_headers = consumers::identity_headers(&config, &mut errors);
    let request_id_header = server::request_id_header(&config);
    let build_ctx = BuildCtx {
        consumers: Arc::new(consumers),
        redis: redis_client(&config, env, &mut errors),
        metrics: env.metrics.clone(),
        route: None,
        server_max_body_bytes: Some(limits.max_body_bytes),
        path_captures: None,
        gateway_headers: identity_headers
            .names()
            .chain([&request_id_header])
            .cloned()
            .collect(),
    };
    let global_filters = routes::build_filters(
        "filters",
        &config.filters,
        &env.registry,
        &build_ctx,
        &mut errors,
    );
    let router = routes::build_router(&config, &mut errors);
    let routes = routes::build_routes(
        &config,
        &upstream_index,
        &global_filters,
        &env.registry,
        &build_ctx,
        &mut errors,
    );
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
        dns,
        global_chain: gatehouse_filters::Chain::new(global_filters, None),
        limits,
        trusted_proxies: config.server.trusted_proxies.clone(),
        forwarded_headers: crate::config::snapshot::ForwardedSet::new(
            &config.server.forwarded_headers,
        ),
        listeners,
        identity_headers,
        request_id_header,
        redis: build_ctx.redis.clone(),
        serving: true,
        database_version: None,
        unmatched_metrics: RouteMetrics::unmatched(&env.metrics),
        config: as_written,
    })
}

/// The upstream pools, and each name's index (`usize::MAX` for a pool that did not build, so
/// routes naming it do not add a misleading error).
fn build_upstreams(
    config: &Config,
    env: &CompileEnv,
    errors: &mut Vec<ConfigError>,
) -> (Vec<UpstreamPool>, HashMap<String, usize>) {
    let mut index = HashMap::new();
    let mut positions = HashMap::new();
    let mut upstreams = Vec::new();
    let mut ca_cache = CaCache::default();
    for (position, upstream) in config.upstreams.iter().enumerate() {
        let path = format!("upstreams[{position}]");
        if let Some(previous) = positions.insert(upstream.name.as_str(), position) {
            positions.insert(upstream.name.as_str(), previous);
            errors.push(ConfigError::new(
                format!("{path}.name"),
                format!(
                    "duplicate upstream name \"{}\" (also upstreams[{previous}])",
                    upstream.name
                ),
            ));
            continue;
        }
        match UpstreamPool::build(&path, upstream, &mut ca_cache, &env.upstreams, &env.metrics) {
            Ok(pool) => {
                index.insert(upstream.name.clone(), upstreams.len());
                upstreams.push(pool);
            }
            Err(pool_errors) => {
                index.insert(upstream.name.clone(), usize::MAX);
                errors.extend(pool_errors);
            }
        }
    }
    (upstreams, index)
}

/// The shared Redis client of the `redis` section.
fn redis_client(
    config: &Config,
    env: &CompileEnv,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<gatehouse_filters::shared::Redis>> {
    let redis = config.redis.as_ref()?;
    let settings = gatehouse_filters::shared::RedisSettings {
        url: redis.url.clone(),
        command_timeout: redis.command_timeout.get(),
        connect_timeout: redis.connect_timeout.get(),
        max_queue: redis.max_queue,
    };
    match gatehouse_filters::shared::redis_client(&settings, &env.metrics) {
        Ok(client) => Some(client),
        Err(message) => {
            errors.push(ConfigError::new("redis.url", message));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_yaml;

    fn errors_of(yaml: &str) -> Vec<String> {
        let loaded = parse_yaml(yaml).unwrap();
        match compile(loaded, "test", 1, &CompileEnv::default()) {
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
  - kind: request_id
    config: { header: "bad header" }
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
            "filters[1].config.header: \"bad header\" is not a valid header name",
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
    fn filter_names_are_unique_per_chain_and_well_formed() {
        let errors = errors_of(
            r#"
version: 1
server: { listeners: [{ name: public, address: "127.0.0.1:0" }] }
upstreams: [{ name: users, targets: [{ address: "127.0.0.1:9001" }] }]
filters:
  - { kind: request_id, name: auth }
  - { kind: response_headers, config: { set: { x-a: "1" } } }
  - { kind: response_headers, name: auth, config: { set: { x-b: "2" } } }
  - { kind: response_headers, name: "-bad name", config: { set: { x-c: "3" } } }
routes:
  - name: a
    upstream: users
    match: { paths: [{ prefix: /a }] }
    filters:
      - { kind: response_headers, name: auth, config: { set: { x-d: "4" } } }
      - { kind: response_headers, name: headers.v2, config: { set: { x-e: "5" } } }
      - { kind: response_headers, name: headers.v2, config: { set: { x-f: "6" } } }
"#,
        );
        assert_eq!(
            errors,
            [
                "filters[2].name: duplicate filter name \"auth\" (filters[0] has it)",
                "filters[3].name: \"-bad name\" is not a valid filter name (it must match ^[A-Za-z0-9][A-Za-z0-9_.-]*$)",
                "routes[0].filters[2].name: duplicate filter name \"headers.v2\" (routes[0].filters[1] has it)",
            ],
        );
        // Unnamed filters of one kind, and one name in two chains, are fine.
        assert!(errors_of(
            r#"
version: 1
server: { listeners: [{ name: public, address: "127.0.0.1:0" }] }
upstreams: [{ name: users, targets: [{ address: "127.0.0.1:9001" }] }]
filters:
  - { kind: response_headers, name: security, config: { set: { x-a: "1" } } }
  - { kind: response_headers, config: { set: { x-b: "2" } } }
  - { kind: response_headers, config: { set: { x-c: "3" } } }
routes:
  - name: a
    upstream: users
    match: { paths: [{ prefix: /a }] }
    filters: [{ kind: response_headers, name: security, config: { set: { x-d: "4" } } }]
"#,
        )
        .is_empty());
    }

    #[test]
    fn a_valid_config_compiles_with_a_stable_hash() {
        let yaml = r#"
version: 1
server: { listeners: [{ name: public, address: "127.0.0.1:0" }] }
upstreams: [{ name: users, targets: [{ address: "127.0.0.1:9001" }] }]
routes: [{ name: users, upstream: users, match: { paths: [{ prefix: /users }] } }]
"#;
        let env = CompileEnv::default();
        let first = compile(parse_yaml(yaml).unwrap(), "test", 1, &env).unwrap();
        let second = compile(parse_yaml(yaml).unwrap(), "test", 2, &env).unwrap();
        assert_eq!(first.hash, second.hash);
        assert_eq!(first.hash.len(), 64);
        assert_eq!(first.routes.len(), 1);
    }

    #[test]
    fn the_short_resilience_keys_mean_the_same_as_the_long_ones() {
        let model = |yaml: &str| parse_yaml(yaml).unwrap().resolved;
        let short_text = r#"
version: 1
upstreams:
  - name: users
    targets: [{ address: "127.0.0.1:9001" }]
    health_check: { path: /healthz, interval: 5s, timeout: 1s, healthy: 2, unhealthy: 3 }
    outlier: { consecutive_failures: 5, base_ejection: 30s, max_ejection_percent: 50 }
    circuit_breaker: { failure_threshold: 5, open_for: 10s, half_open_probes: 3, max_concurrent: 1000 }
routes:
  - name: users
    upstream: users
    match: { paths: [{ prefix: /users }] }
    retry: { attempts: 3, on: [connect_failure, "503"], per_try_timeout: 2s, budget_percent: 20 }
"#;
        let short = model(short_text);
        let long = model(
            r#"
version: 1
upstreams:
  - name: users
    targets: [{ address: "127.0.0.1:9001" }]
    health_check: { path: /healthz, interval: 5s, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3 }
    outlier_detection: { consecutive_failures: 5, base_ejection_time: 30s, max_ejection_percent: 50% }
    circuit_breaker: { consecutive_failures: 5, open_duration: 10s, half_open_probes: 3, max_requests: 1000 }
routes:
  - name: users
    upstream: users
    match: { paths: [{ prefix: /users }] }
    retry: { attempts: 3, on: [connect_failure, 503], per_try_timeout: 2s, budget_percent: 20% }
"#,
        );
        assert_eq!(
            serde_json::to_value(&short).unwrap(),
            serde_json::to_value(&long).unwrap()
        );
        let snapshot = compile(
            parse_yaml(short_text).unwrap(),
            "test",
            1,
            &CompileEnv::default(),
        )
        .unwrap();
        let policy = &snapshot.routes[0].retry;
        assert_eq!(policy.statuses, [503]);
        assert!(policy.on_connect_failure && !policy.on_reset);
        assert_eq!(policy.budget_percent, Some(0.2));
        let breaker = snapshot.upstreams[0].breaker.as_ref().unwrap();
        assert_eq!(breaker.consecutive_failures, Some(5));
        assert_eq!(breaker.max_requests, 1000);
    }

    #[test]
    fn problems_carry_the_request_id_in_the_header_the_request_id_filter_names() {
        let yaml = |filters: &str| {
            format!(
                "version: 1\nserver: {{ listeners: [{{ name: public, address: \"127.0.0.1:0\" }}] }}\n{filters}\n"
            )
        };
        let env = CompileEnv::default();
        let plain = compile(parse_yaml(&yaml("")).unwrap(), "test", 1, &env).unwrap();
        assert_eq!(plain.request_id_header, "x-request-id");
        let named = compile(
            parse_yaml(&yaml(
                "filters: [{ kind: request_id, config: { header: x-trace-id } }]",
            ))
            .unwrap(),
            "test",
            2,
            &env,
        )
        .unwrap();
        assert_eq!(named.request_id_header, "x-trace-id");
    }
}
