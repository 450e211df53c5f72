//! Routes: the router's matchers, and each route's upstream, path rewrite and filter chain (the
//! global filters, then its own, with its `auth` gate compiled in).

use std::collections::HashMap;
use std::sync::Arc;

use gatehouse_filters::{AuthGate, BuildCtx, BuildErrorKind, Chain, Filter, Registry};

use super::super::error::ConfigError;
use super::super::model::{AuthMode, Config, FilterConfig, PathMatch, RouteConfig};
use super::super::snapshot::Route;
use crate::router::{PathRewrite, Router};
use crate::telemetry::metrics::RouteMetrics;

/// The filters of one chain (`base` is its config path, e.g. `routes[2].filters`).
pub(super) fn build_filters(
    base: &str,
    specs: &[FilterConfig],
    registry: &Registry,
    ctx: &BuildCtx,
    errors: &mut Vec<ConfigError>,
) -> Vec<Arc<dyn Filter>> {
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
        routes.push(Route {
            name: route.name.as_str().into(),
            upstream,
            rewrite,
            read_timeout: route.timeout.map(|timeout| timeout.get()),
            chain: Chain::new(filters, gate),
            metrics: RouteMetrics::new(&ctx.metrics, &route.name),
        });
    }
    routes
}

/// The route's `strip_prefix` or `rewrite`, whose `${name}`s must be named captures of its
/// regex paths.
fn rewrite(path: &str, route: &RouteConfig, errors: &mut Vec<ConfigError>) -> Option<PathRewrite> {
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
