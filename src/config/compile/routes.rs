//! Routes: the router's matchers, and each route's upstream, path rewrite and filter chain (the
//! global filters, then its own, with its `auth` gate compiled in).

use std::collections::HashMap;
use std::sync::Arc;

use gatehouse_filters::{AuthGate, BuildCtx, BuildErrorKind, Chain, Filter, Registry};

use super::super::error::ConfigError;
use super::super::model::{
    is_filter_name, AuthMode, Config, FilterConfig, PathMatch, RetryOn, RouteConfig,
    FILTER_NAME_PATTERN,
};
use super::super::snapshot::{Mirror, RetryPolicy, Route, MIRROR_SLOTS};
use crate::router::{PathRewrite, Router};
use crate::telemetry::metrics::RouteMetrics;

/// The filters of one chain (`base` is its config path, e.g. `routes[2].filters`). Explicit
/// filter names are well formed and unique within the chain.
pub(super) fn build_filters(
    base: &str,
    specs: &[FilterConfig],
    registry: &Registry,
    ctx: &BuildCtx,
    errors: &mut Vec<ConfigError>,
) -> Vec<Arc<dyn Filter>> {
    check_filter_names(base, specs, errors);
    let mut filters = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        match registry.build(&spec.kind, &spec.config, ctx) {
            Ok(filter) => filters.push(filter),
            Err(build_errors) => {
                for error in build_errors {
                    let path = match (error.kind, error.path.as_str()) {
                        (BuildErrorKind::UnknownKind, _) => format!("{base}[{index}].kind"),
                        (BuildErrorKind::InvalidConfig, "") => format!("{base}[{index}].config"),
                        (BuildErrorKind::InvalidConfig, path) => {
                            format!("{base}[{index}].config.{path}")
                        }
                    };
                    errors.push(ConfigError::new(path, error.message));
                }
            }
        }
    }
    filters
}

/// Each explicit `name` of one chain matches [`FILTER_NAME_PATTERN`] and is used once.
fn check_filter_names(base: &str, specs: &[FilterConfig], errors: &mut Vec<ConfigError>) {
    let mut positions: HashMap<&str, usize> = HashMap::new();
    for (index, spec) in specs.iter().enumerate() {
        let Some(name) = spec.name.as_deref() else {
            continue;
        };
        let path = format!("{base}[{index}].name");
        if !is_filter_name(name) {
            errors.push(ConfigError::new(
                path,
                format!(
                    "\"{name}\" is not a valid filter name (it must match {FILTER_NAME_PATTERN})"
                ),
            ));
            continue;
        }
        if let Some(previous) = positions.get(name) {
            errors.push(ConfigError::new(
                path,
                format!("duplicate filter name \"{name}\" ({base}[{previous}] has it)"),
            ));
        } else {
            positions.insert(name, index);
        }
    }
}

/// The route matcher of all routes.
pub(super) fn build_router(config: &Config, errors: &mut Vec<ConfigError>) -> Option<Router> {
    match Router::build(&config.routes) {
        Ok(router) => Some(router),
        Err(router_errors) => {
            errors.extend(router_errors);
            None
        }
    }
}

/// Every route, in config order (the router's indexes).
pub(super) fn build_routes(
    config: &Config,
    upstream_index: &HashMap<String, usize>,
    global_filters: &[Arc<dyn Filter>],
    registry: &Registry,
    ctx: &BuildCtx,
    errors: &mut Vec<ConfigError>,
) -> Vec<Route> {
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
        if route.name.starts_with('(') {
            // `(none)` and `(global)` label requests that match no route and filters of the
            // global chain in metrics and rate-limit bucket names.
            errors.push(ConfigError::new(
                format!("{path}.name"),
                "route names starting with \"(\" are reserved",
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
        let upstream = match upstream_index.get(&route.upstream) {
            Some(&upstream) => upstream,
            None => {
                errors.push(ConfigError::new(
                    format!("{path}.upstream"),
                    format!("no upstream named \"{}\"", route.upstream),
                ));
                usize::MAX
            }
        };
        let rewrite = rewrite(&path, route, errors);
        let route_ctx = BuildCtx {
            route: Some(route.name.as_str().into()),
            path_captures: Some(capture_names(route).into()),
            ..ctx.clone()
        };
        let mut filters = global_filters.to_vec();
        filters.extend(build_filters(
            &format!("{path}.filters"),
            &route.filters,
            registry,
            &route_ctx,
            errors,
        ));
        let gate = match route.auth {
            Some(AuthMode::Required) => {
                if !filters.iter().any(|filter| filter.is_auth()) {
                    errors.push(ConfigError::new(format!("{path}.auth"), "`required` needs an auth filter (jwt, api_key) on the route or in the global chain"));
                }
                Some(AuthGate::Required)
            }
            Some(AuthMode::Optional) => Some(AuthGate::Optional {
                anonymous: ctx.consumers.anonymous.clone(),
            }),
            None => None,
        };
        let pool =
            |key: &str, name: &str, errors: &mut Vec<ConfigError>| match upstream_index.get(name) {
                Some(&index) => Some(index),
                None => {
                    errors.push(ConfigError::new(
                        format!("{path}.{key}"),
                        format!("no upstream named \"{name}\""),
                    ));
                    None
                }
            };
        let backup = route
            .backup
            .as_deref()
            .and_then(|name| pool("backup", name, errors));
        let mut split = Vec::new();
        let mut share = 0u32;
        for (index, part) in route.split.iter().enumerate() {
            share += part.weight;
            if let Some(upstream) =
                pool(&format!("split[{index}].upstream"), &part.upstream, errors)
            {
                split.push((upstream, share * 100));
            }
        }
        if share > 100 {
            errors.push(ConfigError::new(
                format!("{path}.split"),
                format!("the weights add up to {share}; they are percentages of the route's requests, at most 100 in all"),
            ));
        }
        let mirror = route.mirror.as_ref().and_then(|mirror| {
            pool("mirror.upstream", &mirror.upstream, errors).map(|upstream| Mirror {
                pool: upstream,
                share: mirror.percent.fraction(),
                slots: Arc::new(tokio::sync::Semaphore::new(MIRROR_SLOTS)),
            })
        });
        routes.push(Route {
            name: route.name.as_str().into(),
            upstream,
            backup,
            split,
            mirror,
            rewrite,
            timeout: route.timeout.map(|timeout| timeout.get()),
            retry: retry_policy(&path, route, errors),
            chain: Chain::new(filters, gate),
            metrics: {
                // The pools the route may send to, its own first: the rows of its requests.
                let mut pools: Vec<(usize, &str)> = Vec::new();
                if upstream != usize::MAX {
                    pools.push((upstream, &route.upstream));
                }
                let others = backup.zip(route.backup.as_deref()).into_iter().chain(
                    route.split.iter().filter_map(|part| {
                        upstream_index
                            .get(&part.upstream)
                            .map(|&index| (index, part.upstream.as_str()))
                    }),
                );
                for (index, name) in others {
                    if !pools.iter().any(|(known, _)| *known == index) {
                        pools.push((index, name));
                    }
                }
                let metrics = RouteMetrics::new(
                    &ctx.metrics,
                    &route.name,
                    &pools,
                    route.metrics.per_consumer,
                );
                match route.mirror {
                    Some(_) => metrics.with_mirror(&ctx.metrics, &route.name),
                    None => metrics,
                }
            },
            server_timing: route
                .server_timing
                .unwrap_or(config.telemetry.server_timing),
            websocket: route.websocket.as_ref().and_then(|websocket| {
                websocket
                    .limits()
                    .map(|limits| crate::config::snapshot::WebSocket {
                        idle_timeout: limits.idle_timeout.get(),
                        max_lifetime: limits.max_lifetime.get(),
                    })
            }),
        });
    }
    routes
}

/// The route's `retry` section, compiled.
fn retry_policy(path: &str, route: &RouteConfig, errors: &mut Vec<ConfigError>) -> RetryPolicy {
    let Some(retry) = &route.retry else {
        return RetryPolicy::connect_failures_once();
    };
    let path = format!("{path}.retry");
    if retry.attempts == 0 {
        errors.push(ConfigError::new(
            format!("{path}.attempts"),
            "must be at least 1 (the first try)",
        ));
    }
    let mut methods = Vec::new();
    for (index, method) in retry.methods.iter().enumerate() {
        match http::Method::from_bytes(method.to_ascii_uppercase().as_bytes()) {
            Ok(method) => methods.push(method),
            Err(_) => errors.push(ConfigError::new(
                format!("{path}.methods[{index}]"),
                format!("\"{method}\" is not an HTTP method"),
            )),
        }
    }
    for (index, status) in retry.statuses.iter().enumerate() {
        if !(100..=599).contains(status) {
            errors.push(ConfigError::new(
                format!("{path}.statuses[{index}]"),
                format!("{status} is not an HTTP status"),
            ));
        }
    }
    if retry
        .per_try_timeout
        .is_some_and(|timeout| timeout.get().is_zero())
    {
        errors.push(ConfigError::new(
            format!("{path}.per_try_timeout"),
            "must be longer than zero",
        ));
    }
    if retry.backoff.max < retry.backoff.base {
        errors.push(ConfigError::new(
            format!("{path}.backoff.max"),
            "must be at least `base`",
        ));
    }
    RetryPolicy {
        attempts: retry.attempts.max(1),
        on_connect_failure: retry.on.contains(&RetryOn::ConnectFailure),
        on_reset: retry.on.contains(&RetryOn::Reset),
        on_timeout: retry.on.contains(&RetryOn::Timeout),
        on_gateway_error: retry.on.contains(&RetryOn::GatewayError),
        statuses: retry
            .statuses
            .iter()
            .copied()
            .chain(retry.on.iter().filter_map(|on| match on {
                RetryOn::Status(status) => Some(*status),
                _ => None,
            }))
            .collect(),
        budget_percent: retry.budget_percent.map(|percent| percent.fraction()),
        methods,
        per_try_timeout: retry.per_try_timeout.map(|timeout| timeout.get()),
        backoff_base: retry.backoff.base.get(),
        backoff_max: retry.backoff.max.get(),
    }
}

/// The named captures of the route's regex paths.
fn capture_names(route: &RouteConfig) -> Vec<String> {
    route
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
        .collect()
}

/// The route's `strip_prefix` or `rewrite`, whose `${name}`s must be named captures of its
/// regex paths.
fn rewrite(path: &str, route: &RouteConfig, errors: &mut Vec<ConfigError>) -> Option<PathRewrite> {
    let capture_names = capture_names(route);
    match PathRewrite::build(
        path,
        route.strip_prefix.as_deref(),
        route.rewrite.as_deref(),
        &capture_names,
    ) {
        Ok(rewrite) => rewrite,
        Err(rewrite_errors) => {
            errors.extend(rewrite_errors);
            None
        }
    }
}
