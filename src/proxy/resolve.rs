//! From request to route, once: the path normalised (every later decision is made on the path
//! that is forwarded), the host as routing reads it, the route matched on the pinned Snapshot,
//! and the target forwarded upstream (the normalised or rewritten path, the query kept).
//! `/explain` runs these same steps, so it names the route live traffic takes.
//!
//! A CORS preflight is routed as the request it asks about when that route answers preflights
//! (it has a `cors` filter): a route that matches only `[GET, POST]` still gets its preflights,
//! and a catch-all route does not take them.

use std::borrow::Cow;

use gatehouse_filters::{Chain, FilterKind, Problem, ProblemType};
use http::uri::PathAndQuery;
use http::Method;
use pingora_http::RequestHeader;

use crate::config::Snapshot;
use crate::router::normalize::normalize_path;
use crate::router::{request_host, RequestView, RouteMatch};

/// What resolving found.
pub struct Resolution<'a> {
    /// Lower-case host without port or trailing dot, as routing saw it.
    pub host: Option<Cow<'a, str>>,
    /// The path as the request sent it, and its normalised form when that differs.
    raw_path: &'a str,
    normalized: Option<String>,
    pub query: Option<&'a str>,
    pub matched: Option<RouteMatch>,
    /// The request target sent upstream.
    pub forward: Forward,
    /// For a CORS preflight routed as the request it asks about: that request's method.
    routed_method: Option<Method>,
}

/// The request target the upstream receives.
pub enum Forward {
    /// The request's own.
    Unchanged,
    /// The normalised or rewritten path, with the request's query.
    To(http::Uri),
    /// The route's rewrite made a target that is not a valid URI: the request is a 400, counted
    /// under its route.
    Invalid,
}

impl Resolution<'_> {
    /// The normalised path every decision is made on.
    pub fn path(&self) -> &str {
        self.normalized.as_deref().unwrap_or(self.raw_path)
    }

    /// The request as the router sees it.
    pub fn view<'v>(&'v self, request: &'v RequestHeader) -> RequestView<'v> {
        RequestView {
            method: self.routed_method.as_ref().unwrap_or(&request.method),
            host: self.host.as_deref(),
            path: self.path(),
            query: self.query,
            headers: &request.headers,
        }
    }

    /// The path and query the upstream receives.
    pub fn forwarded_target(&self) -> Option<String> {
        Some(match &self.forward {
            Forward::To(uri) => uri.to_string(),
            Forward::Invalid => return None,
            Forward::Unchanged => match self.query {
                Some(query) => format!("{}?{query}", self.path()),
                None => self.path().to_string(),
            },
        })
    }
}

/// Normalises, routes and works out the forwarded target. A path that cannot be normalised (an
/// encoded `/`, a NUL) is a 400, before any route is chosen.
pub fn resolve<'a>(
    snapshot: &Snapshot,
    request: &'a RequestHeader,
) -> Result<Resolution<'a>, Problem> {
    let raw_path = request.uri.path();
    let normalized = normalize_path(raw_path)
        .map_err(|error| Problem::new(ProblemType::InvalidPath).detail(error.to_string()))?;
    let mut resolution = Resolution {
        host: request_host(&request.uri, &request.headers),
        raw_path,
        normalized,
        query: request.uri.query(),
        matched: None,
        forward: Forward::Unchanged,
        routed_method: preflight_method(request),
    };
    if resolution.routed_method.is_some() {
        match snapshot.router.find(&resolution.view(request)) {
            Some(matched) if answers_preflights(&snapshot.routes[matched.route].chain) => {
                resolution.matched = Some(matched);
            }
            _ => resolution.routed_method = None,
        }
    }
    if resolution.matched.is_none() {
        resolution.matched = snapshot.router.find(&resolution.view(request));
    }
    let Some(matched) = &resolution.matched else {
        return Ok(resolution);
    };
    let path = match &snapshot.routes[matched.route].rewrite {
        Some(rewrite) => Some(rewrite.apply(resolution.path(), &matched.captures)),
        None => resolution.normalized.clone(),
    };
    if let Some(path) = path {
        let target = match resolution.query {
            Some(query) if path.contains('?') => format!("{path}&{query}"),
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        let uri = PathAndQuery::from_maybe_shared(bytes::Bytes::from(target))
            .ok()
            .and_then(|path_and_query| {
                let mut parts = http::uri::Parts::default();
                parts.path_and_query = Some(path_and_query);
                http::Uri::from_parts(parts).ok()
            });
        resolution.forward = uri.map_or(Forward::Invalid, Forward::To);
    }
    Ok(resolution)
}

/// The method a CORS preflight asks about: `OPTIONS` with `Origin` and a valid
/// `Access-Control-Request-Method`.
fn preflight_method(request: &RequestHeader) -> Option<Method> {
    if request.method != Method::OPTIONS || !request.headers.contains_key(http::header::ORIGIN) {
        return None;
    }
    let asked = request
        .headers
        .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(asked.as_bytes()).ok()
}

/// Whether a chain answers CORS preflights.
fn answers_preflights(chain: &Chain) -> bool {
    chain
        .filters()
        .iter()
        .any(|filter| filter.kind() == gatehouse_filters::cors::Cors::KIND)
}
