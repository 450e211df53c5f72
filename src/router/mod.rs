//! The route matcher, compiled once per Snapshot: host, path (exact, prefix, regex), method,
//! header and query conditions; explicit priority first, then the most specific match.
//!
//! Paths are indexed (a hash map for exact paths and for segment prefixes, one `RegexSet` for all
//! regex paths), so a request looks at the few routes whose path can match, not at every route.

pub mod normalize;
mod rewrite;

use std::collections::HashMap;

use rustc_hash::FxBuildHasher;
use smallvec::SmallVec;

type FastMap<K, V> = HashMap<K, V, FxBuildHasher>;
type Candidates = SmallVec<[Candidate; 8]>;

use http::{HeaderMap, Method};
use regex::{Regex, RegexSet};

use crate::config::error::ConfigError;
use crate::config::model::{PathMatch, RouteConfig, ValueMatch};
pub use rewrite::PathRewrite;

/// The parts of a request that routing looks at.
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Lower-case host without port, if the request named one.
    pub host: Option<&'a str>,
    /// The normalised path.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// The route a request matched, and the named captures of its regex path.
#[derive(Debug)]
pub struct RouteMatch {
    pub route: usize,
    pub captures: Vec<(String, String)>,
}

#[derive(Debug)]
enum HostMatch {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug)]
enum Condition {
    Present(bool),
    Equals(String),
    Regex(Regex),
}

#[derive(Debug)]
struct ValueCondition {
    name: String,
    header: Option<http::HeaderName>,
    condition: Condition,
}

#[derive(Debug)]
struct CompiledRoute {
    name: String,
    priority: i32,
    order: usize,
    hosts: Vec<HostMatch>,
    methods: Vec<Method>,
    headers: Vec<ValueCondition>,
    query: Vec<ValueCondition>,
    /// Regex paths by their index in the route's `paths`, for captures.
    regexes: Vec<(usize, Regex)>,
    has_paths: bool,
}

/// How well a path condition matched; higher is more specific.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PathScore {
    Any,
    Prefix(usize),
    Regex(usize),
    Exact(usize),
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    route: u32,
    score: PathScore,
    /// Index of the regex path that matched, for captures.
    regex: Option<u32>,
}

/// Why a candidate route did not match, for `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    Host,
    Method,
    Header(String),
    Query(String),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::Host => formatter.write_str("host did not match"),
            Rejection::Method => formatter.write_str("method did not match"),
            Rejection::Header(name) => write!(formatter, "header \"{name}\" did not match"),
            Rejection::Query(name) => write!(formatter, "query parameter \"{name}\" did not match"),
        }
    }
}

/// One route considered by `explain`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExplainedCandidate {
    pub route: String,
    pub priority: i32,
    pub path_match: String,
    pub outcome: String,
}

/// The path index of one host group.
#[derive(Debug, Default)]
struct PathIndex {
    exact: FastMap<String, Vec<u32>>,
    prefixes: FastMap<String, Vec<u32>>,
    regex_set: Option<RegexSet>,
    /// For each pattern of `regex_set`: (route, index into the route's `regexes`).
    regex_owners: Vec<(u32, u32)>,
    regex_patterns: Vec<String>,
    pathless: Vec<u32>,
}

impl PathIndex {
    fn add(&mut self, route: u32, paths: &[PathMatch], regexes: &[(usize, Regex)]) {
        if paths.is_empty() {
            self.pathless.push(route);
        }
        for (index, path) in paths.iter().enumerate() {
            match path {
                PathMatch::Exact(exact) => self.exact.entry(exact.clone()).or_default().push(route),
                PathMatch::Prefix(prefix) => {
                    self.prefixes.entry(prefix.clone()).or_default().push(route)
                }
                PathMatch::Regex(_) => {
                    if let Some(position) = regexes.iter().position(|(owner, _)| *owner == index) {
                        self.regex_owners.push((route, position as u32));
                        self.regex_patterns
                            .push(regexes[position].1.as_str().to_string());
                    }
                }
            }
        }
    }

    fn candidates(&self, routes: &[CompiledRoute], path: &str, out: &mut Candidates) {
        if let Some(found) = self.exact.get(path) {
            for &route in found {
                out.push(Candidate {
                    route,
                    score: PathScore::Exact(path.len()),
                    regex: None,
                });
            }
        }
        if !self.prefixes.is_empty() {
            let mut check = |key: &str| {
                if let Some(found) = self.prefixes.get(key) {
                    for &route in found {
                        out.push(Candidate {
                            route,
                            score: PathScore::Prefix(key.len()),
                            regex: None,
                        });
                    }
                }
            };
            for (index, &byte) in path.as_bytes().iter().enumerate() {
                if byte == b'/' {
                    if index > 0 {
                        check(&path[..index]);
                    }
                    check(&path[..=index]);
                }
            }
            if !path.ends_with('/') {
                check(path);
            }
        }
        if let Some(set) = &self.regex_set {
            for pattern in set.matches(path).iter() {
                let (route, regex) = self.regex_owners[pattern];
                let length = routes[route as usize].regexes[regex as usize]
                    .1
                    .as_str()
                    .len();
                out.push(Candidate {
                    route,
                    score: PathScore::Regex(length),
                    regex: Some(regex),
                });
            }
        }
        for &route in &self.pathless {
            out.push(Candidate {
                route,
                score: PathScore::Any,
                regex: None,
            });
        }
    }

    fn finish(&mut self) -> Result<(), regex::Error> {
        if !self.regex_patterns.is_empty() {
            self.regex_set = Some(RegexSet::new(&self.regex_patterns)?);
        }
        Ok(())
    }
}

/// Routes grouped by host (exact, wildcard suffix, any), each group with its own path index, so
/// a request looks only at routes for its host whose path can match.
#[derive(Debug)]
pub struct Router {
    routes: Vec<CompiledRoute>,
    by_host: FastMap<String, PathIndex>,
    by_suffix: FastMap<String, PathIndex>,
    any_host: PathIndex,
}

fn compile_values(
    path: &str,
    conditions: &[ValueMatch],
    is_header: bool,
    errors: &mut Vec<ConfigError>,
) -> Vec<ValueCondition> {
    let mut compiled = Vec::new();
    for (index, condition) in conditions.iter().enumerate() {
        let path = format!("{path}[{index}]");
        let given = [
            condition.present.is_some(),
            condition.equals.is_some(),
            condition.regex.is_some(),
        ]
        .iter()
        .filter(|given| **given)
        .count();
        if given != 1 {
            errors.push(ConfigError::new(
                &path,
                "give exactly one of `present`, `equals` or `regex`",
            ));
            continue;
        }
        let header = if is_header {
            match http::HeaderName::from_bytes(condition.name.as_bytes()) {
                Ok(name) => Some(name),
                Err(_) => {
                    errors.push(ConfigError::new(
                        format!("{path}.name"),
                        format!("\"{}\" is not a valid header name", condition.name),
                    ));
                    continue;
                }
            }
        } else {
            None
        };
        let kind = if let Some(present) = condition.present {
            Condition::Present(present)
        } else if let Some(equals) = &condition.equals {
            Condition::Equals(equals.clone())
        } else {
            let pattern = condition.regex.as_deref().unwrap_or_default();
            match Regex::new(pattern) {
                Ok(regex) => Condition::Regex(regex),
                Err(error) => {
                    errors.push(ConfigError::new(
                        format!("{path}.regex"),
                        format!("invalid regular expression: {error}"),
                    ));
                    continue;
                }
            }
        };
        compiled.push(ValueCondition {
            name: condition.name.clone(),
            header,
            condition: kind,
        });
    }
    compiled
}

fn anchored(pattern: &str) -> String {
    format!("^(?:{pattern})$")
}

impl Router {
    /// Compile the matchers of all routes, collecting every error.
    pub fn build(routes: &[RouteConfig]) -> Result<Router, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut router = Router {
            routes: Vec::with_capacity(routes.len()),
            by_host: FastMap::default(),
            by_suffix: FastMap::default(),
            any_host: PathIndex::default(),
        };
        for (order, route) in routes.iter().enumerate() {
            let base = format!("routes[{order}].match");
            let matcher = &route.matcher;
            let mut hosts = Vec::new();
            for (index, host) in matcher.hosts.iter().enumerate() {
                let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
                if let Some(suffix) = host.strip_prefix("*.") {
                    if suffix.is_empty() || suffix.contains('*') {
                        errors.push(ConfigError::new(
                            format!("{base}.hosts[{index}]"),
                            "a wildcard host looks like \"*.example.com\"",
                        ));
                    }
                    hosts.push(HostMatch::Suffix(format!(".{suffix}")));
                } else if host.is_empty() || host.contains('*') || host.contains('/') {
                    errors.push(ConfigError::new(
                        format!("{base}.hosts[{index}]"),
                        format!("\"{host}\" is not a host name or \"*.domain\" wildcard"),
                    ));
                } else {
                    hosts.push(HostMatch::Exact(host));
                }
            }
            let mut methods = Vec::new();
            for (index, method) in matcher.methods.iter().enumerate() {
                match Method::from_bytes(method.to_ascii_uppercase().as_bytes()) {
                    Ok(method) => methods.push(method),
                    Err(_) => errors.push(ConfigError::new(
                        format!("{base}.methods[{index}]"),
                        format!("\"{method}\" is not an HTTP method"),
                    )),
                }
            }
            let mut regexes = Vec::new();
            for (index, path) in matcher.paths.iter().enumerate() {
                let key_path = format!("{base}.paths[{index}]");
                match path {
                    PathMatch::Exact(exact) | PathMatch::Prefix(exact)
                        if !exact.starts_with('/') =>
                    {
                        errors.push(ConfigError::new(key_path, "a path must start with \"/\""));
                    }
                    PathMatch::Exact(_) | PathMatch::Prefix(_) => {}
                    PathMatch::Regex(pattern) => match Regex::new(&anchored(pattern)) {
                        Ok(regex) => regexes.push((index, regex)),
                        Err(error) => errors.push(ConfigError::new(
                            format!("{key_path}.regex"),
                            format!("invalid regular expression: {error}"),
                        )),
                    },
                }
            }
            let headers = compile_values(
                &format!("{base}.headers"),
                &matcher.headers,
                true,
                &mut errors,
            );
            let query =
                compile_values(&format!("{base}.query"), &matcher.query, false, &mut errors);
            router.routes.push(CompiledRoute {
                name: route.name.clone(),
                priority: route.priority,
                order,
                hosts,
                methods,
                headers,
                query,
                regexes,
                has_paths: !matcher.paths.is_empty(),
            });
        }
        for (order, route) in routes.iter().enumerate() {
            let compiled = &router.routes[order];
            let paths = &route.matcher.paths;
            let route_index = order as u32;
            if compiled.hosts.is_empty() {
                router.any_host.add(route_index, paths, &compiled.regexes);
            }
            for host in &compiled.hosts {
                let group = match host {
                    HostMatch::Exact(exact) => router.by_host.entry(exact.clone()).or_default(),
                    HostMatch::Suffix(suffix) => {
                        router.by_suffix.entry(suffix.clone()).or_default()
                    }
                };
                group.add(route_index, paths, &compiled.regexes);
            }
        }
        let groups = std::iter::once(&mut router.any_host)
            .chain(router.by_host.values_mut())
            .chain(router.by_suffix.values_mut());
        for group in groups {
            if let Err(error) = group.finish() {
                errors.push(ConfigError::new(
                    "routes",
                    format!("regular expressions do not compile together: {error}"),
                ));
                break;
            }
        }
        if errors.is_empty() {
            Ok(router)
        } else {
            Err(errors)
        }
    }

    /// Routes whose host group and path match. A route may appear more than once (several of
    /// its paths matched); callers keep its best score.
    fn candidates(&self, host: Option<&str>, path: &str, out: &mut Candidates) {
        self.any_host.candidates(&self.routes, path, out);
        if let Some(host) = host {
            if let Some(group) = self.by_host.get(host) {
                group.candidates(&self.routes, path, out);
            }
            if !self.by_suffix.is_empty() {
                for (index, byte) in host.bytes().enumerate() {
                    if byte == b'.' && index > 0 {
                        if let Some(group) = self.by_suffix.get(&host[index..]) {
                            group.candidates(&self.routes, path, out);
                        }
                    }
                }
            }
        }
    }

    /// The full rank of a candidate that passed every condition; higher wins.
    fn rank(
        &self,
        candidate: &Candidate,
        host_score: usize,
    ) -> (i32, PathScore, usize, usize, std::cmp::Reverse<usize>) {
        let route = &self.routes[candidate.route as usize];
        let conditions =
            usize::from(!route.methods.is_empty()) + route.headers.len() + route.query.len();
        (
            route.priority,
            candidate.score,
            host_score,
            conditions,
            std::cmp::Reverse(route.order),
        )
    }

    fn check(&self, route: &CompiledRoute, request: &RequestView<'_>) -> Result<usize, Rejection> {
        let host_score = if route.hosts.is_empty() {
            0
        } else {
            let host = request.host.unwrap_or("");
            route
                .hosts
                .iter()
                .filter_map(|pattern| match pattern {
                    HostMatch::Exact(exact) if exact == host => Some(usize::MAX),
                    HostMatch::Suffix(suffix)
                        if host.len() > suffix.len() && host.ends_with(suffix.as_str()) =>
                    {
                        Some(suffix.len())
                    }
                    _ => None,
                })
                .max()
                .ok_or(Rejection::Host)?
        };
        if !route.methods.is_empty() && !route.methods.contains(request.method) {
            return Err(Rejection::Method);
        }
        for condition in &route.headers {
            let header = condition
                .header
                .as_ref()
                .expect("header conditions have names");
            let mut values = request.headers.get_all(header).iter().peekable();
            let ok = match &condition.condition {
                Condition::Present(present) => values.peek().is_some() == *present,
                Condition::Equals(expected) => {
                    values.any(|value| value.as_bytes() == expected.as_bytes())
                }
                Condition::Regex(regex) => values.any(|value| {
                    value
                        .to_str()
                        .map(|text| regex.is_match(text))
                        .unwrap_or(false)
                }),
            };
            if !ok {
                return Err(Rejection::Header(condition.name.clone()));
            }
        }
        if !route.query.is_empty() {
            let pairs: Vec<(String, String)> = request
                .query
                .map(|query| {
                    query
                        .split('&')
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                            (decode_query(name), decode_query(value))
                        })
                        .collect()
                })
                .unwrap_or_default();
            for condition in &route.query {
                let mut values = pairs
                    .iter()
                    .filter(|(name, _)| *name == condition.name)
                    .map(|(_, value)| value)
                    .peekable();
                let ok = match &condition.condition {
                    Condition::Present(present) => values.peek().is_some() == *present,
                    Condition::Equals(expected) => values.any(|value| value == expected),
                    Condition::Regex(regex) => values.any(|value| regex.is_match(value)),
                };
                if !ok {
                    return Err(Rejection::Query(condition.name.clone()));
                }
            }
        }
        Ok(host_score)
    }

    /// The best route for this request, if any.
    pub fn find(&self, request: &RequestView<'_>) -> Option<RouteMatch> {
        let mut candidates = Candidates::new();
        self.candidates(request.host, request.path, &mut candidates);
        let mut best: Option<(_, Candidate)> = None;
        for candidate in candidates {
            let route = &self.routes[candidate.route as usize];
            if let Ok(host_score) = self.check(route, request) {
                let rank = self.rank(&candidate, host_score);
                if best.as_ref().is_none_or(|(best_rank, _)| rank > *best_rank) {
                    best = Some((rank, candidate));
                }
            }
        }
        let (_, candidate) = best?;
        let route = &self.routes[candidate.route as usize];
        let captures = match candidate.regex {
            Some(regex) => {
                let regex = &route.regexes[regex as usize].1;
                regex
                    .captures(request.path)
                    .map(|captures| {
                        regex
                            .capture_names()
                            .flatten()
                            .filter_map(|name| {
                                Some((name.to_string(), captures.name(name)?.as_str().to_string()))
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            }
            None => Vec::new(),
        };
        Some(RouteMatch {
            route: route.order,
            captures,
        })
    }

    /// Every route whose path could match, and what became of it: selected, beaten, or rejected
    /// by one of its conditions.
    pub fn explain(&self, request: &RequestView<'_>) -> (Option<usize>, Vec<ExplainedCandidate>) {
        let mut candidates = Candidates::new();
        self.candidates(request.host, request.path, &mut candidates);
        candidates.sort_by_key(|candidate| (candidate.route, std::cmp::Reverse(candidate.score)));
        candidates.dedup_by_key(|candidate| candidate.route);
        let mut ranked = Vec::new();
        let mut explained = Vec::new();
        for candidate in &candidates {
            let route = &self.routes[candidate.route as usize];
            let path_match = match candidate.score {
                PathScore::Any => "any path".to_string(),
                PathScore::Prefix(length) => {
                    format!("prefix {}", &request.path[..length.min(request.path.len())])
                }
                PathScore::Regex(_) => format!(
                    "regex {}",
                    candidate
                        .regex
                        .map(|index| route.regexes[index as usize].1.as_str().to_string())
                        .unwrap_or_default()
                ),
                PathScore::Exact(_) => format!("exact {}", request.path),
            };
            match self.check(route, request) {
                Ok(host_score) => ranked.push((
                    self.rank(candidate, host_score),
                    route.order,
                    route.priority,
                    path_match,
                )),
                Err(rejection) => explained.push(ExplainedCandidate {
                    route: route.name.clone(),
                    priority: route.priority,
                    path_match,
                    outcome: format!("rejected: {rejection}"),
                }),
            }
        }
        ranked.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        let winner = ranked.first().map(|entry| entry.1);
        let winner_rank = ranked.first().map(|entry| entry.0);
        let mut ordered = Vec::new();
        for (rank, order, priority, path_match) in ranked {
            let name = self.routes[order].name.clone();
            let outcome = if Some(order) == winner {
                "selected".to_string()
            } else {
                let best = winner_rank.expect("a winner exists when any route ranked");
                let reason = if rank.0 != best.0 {
                    format!("lower priority ({} < {})", rank.0, best.0)
                } else if rank.1 != best.1 {
                    "less specific path".to_string()
                } else if rank.2 != best.2 {
                    "less specific host".to_string()
                } else if rank.3 != best.3 {
                    "fewer conditions".to_string()
                } else {
                    "defined later in the config".to_string()
                };
                format!("beaten: {reason}")
            };
            ordered.push(ExplainedCandidate {
                route: name,
                priority,
                path_match,
                outcome,
            });
        }
        ordered.extend(explained);
        (winner, ordered)
    }

    pub fn route_count(&self) -> usize {
        self.routes.len()
    }

    /// Whether the route has a path condition (for `explain` output).
    pub fn has_paths(&self, route: usize) -> bool {
        self.routes[route].has_paths
    }
}

fn decode_query(text: &str) -> String {
    let replaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&replaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// The host a request is for: the `Host` header or the URI's authority, lower-cased, without
/// port and trailing dot.
pub fn request_host<'a>(
    uri: &'a http::Uri,
    headers: &'a HeaderMap,
) -> Option<std::borrow::Cow<'a, str>> {
    let raw = match uri.host() {
        Some(host) => host,
        None => headers.get(http::header::HOST)?.to_str().ok()?,
    };
    let without_port = if raw.starts_with('[') {
        raw.split(']')
            .next()
            .map(|host| &raw[..host.len() + 1])
            .unwrap_or(raw)
    } else {
        raw.rsplit_once(':').map(|(host, _)| host).unwrap_or(raw)
    };
    let host = without_port.trim_end_matches('.');
    if host.bytes().any(|byte| byte.is_ascii_uppercase()) {
        Some(std::borrow::Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(std::borrow::Cow::Borrowed(host))
    }
}

#[cfg(test)]
mod tests;
