//! `rewrite`: what the upstream is asked for. A regex path rewrite with captures (for routes
//! that need more than the route's own `strip_prefix` or `rewrite`), query parameters set,
//! added and removed, and the upstream `Host`: the client's, the target's, or one of its own.
//!
//! The path and query change in the request phase, on the target the route already made
//! (after its `strip_prefix` or `rewrite`), so later filters see the forwarded target and a
//! target that is not a valid URI is answered with 400 here. The `Host` changes in the
//! upstream-request phase, once the target is chosen (for each retry again) and after the
//! gateway has told the upstream the client's host in `X-Forwarded-Host` and `Forwarded`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora_http::RequestHeader;
use regex::Regex;
use serde::Deserialize;

use crate::template::{Escape, RequestSource, Scope, Template};
use crate::{
    BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, Problem, ProblemType,
    RequestContext,
};

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// A regex rewrite of the forwarded path.
    pub path: Option<PathConfig>,
    /// Query parameter operations, in this order: `remove`, `set`, `add`.
    pub query: QueryConfig,
    /// The `Host` the upstream receives.
    pub host: HostConfig,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PathConfig {
    /// Matched against the forwarded path (without the query); a path it does not match is
    /// forwarded unchanged.
    pub regex: String,
    /// Replaces the part of the path the regex matched. `${1}` or `${NAME}` are the regex's
    /// captures; every template variable may be used too, its value encoded as one path
    /// segment.
    pub replacement: String,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct QueryConfig {
    /// Parameters to set: every value already there is removed, and this one added. Values
    /// are templates; `${1}` or `${NAME}` are the captures of `path.regex` (empty when it did
    /// not match).
    pub set: BTreeMap<String, String>,
    /// Parameters to add, keeping those already there.
    pub add: BTreeMap<String, String>,
    /// Parameters to remove.
    pub remove: Vec<String>,
}

/// Whose `Host` the upstream receives.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostConfig {
    /// The client's, as it sent it.
    #[default]
    Client,
    /// The chosen target's: its host name (or address) as configured, with the port unless it
    /// is the scheme's default.
    Target,
    /// This value (a template).
    Set(String),
}

struct PathRewrite {
    regex: Regex,
    replacement: Template,
}

struct QueryOperations {
    remove: Vec<String>,
    /// `(name, value, replace)`: set (true) first, then add.
    write: Vec<(String, Template, bool)>,
}

enum Host {
    Client,
    Target,
    Set(Template, Option<HeaderValue>),
}

pub struct Rewrite {
    path: Option<PathRewrite>,
    /// For each local name of the templates (`${1}`, `${NAME}`), its group in the regex.
    groups: Vec<usize>,
    query: Option<QueryOperations>,
    host: Host,
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl FilterKind for Rewrite {
    const KIND: &'static str = "rewrite";
    type Config = Config;

    fn build(config: Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        let scope = ctx.template_scope();
        // The regex's groups, by number and by name, for the replacement and the query values.
        let mut locals = Vec::new();
        let mut groups = Vec::new();
        let regex = config
            .path
            .as_ref()
            .and_then(|path| match Regex::new(&path.regex) {
                Ok(regex) => Some(regex),
                Err(error) => {
                    errors.push(BuildError::new("path.regex", one_line(&error.to_string())));
                    None
                }
            });
        if let Some(regex) = &regex {
            for (group, name) in regex.capture_names().enumerate() {
                locals.push(group.to_string());
                groups.push(group);
                if let Some(name) = name {
                    locals.push(name.to_string());
                    groups.push(group);
                }
            }
        }
        let with_captures = Scope {
            locals: &locals,
            ..scope
        };
        let path = match (config.path.as_ref(), regex) {
            (Some(path), Some(regex)) => {
                match Template::parse_in(&path.replacement, &with_captures) {
                    Ok(replacement) => Some(PathRewrite { regex, replacement }),
                    Err(message) => {
                        errors.push(BuildError::new("path.replacement", message));
                        None
                    }
                }
            }
            _ => None,
        };
        let query = &config.query;
        let mut write = Vec::new();
        for (key, replace, entries) in [("set", true, &query.set), ("add", false, &query.add)] {
            for (name, value) in entries {
                let entry = format!("query.{key}.{name}");
                if name.is_empty() {
                    errors.push(BuildError::new(entry, "a parameter needs a name"));
                    continue;
                }
                match Template::parse_in(value, &with_captures) {
                    Ok(template) => write.push((name.clone(), template, replace)),
                    Err(message) => errors.push(BuildError::new(entry, message)),
                }
            }
        }
        for (index, name) in query.remove.iter().enumerate() {
            if name.is_empty() {
                errors.push(BuildError::new(
                    format!("query.remove[{index}]"),
                    "a parameter needs a name",
                ));
            }
        }
        let query = (!write.is_empty() || !query.remove.is_empty()).then(|| QueryOperations {
            remove: query.remove.clone(),
            write,
        });
        let host = match &config.host {
            HostConfig::Client => Host::Client,
            HostConfig::Target => Host::Target,
            HostConfig::Set(text) => match Template::parse_in(text, &scope) {
                Ok(template) => match template.as_literal() {
                    Some("") => {
                        errors.push(BuildError::new("host.set", "the host cannot be empty"));
                        Host::Client
                    }
                    Some(literal) => match HeaderValue::from_str(literal) {
                        Ok(value) => Host::Set(template, Some(value)),
                        Err(_) => {
                            errors.push(BuildError::new("host.set", "not a valid header value"));
                            Host::Client
                        }
                    },
                    None => Host::Set(template, None),
                },
                Err(message) => {
                    errors.push(BuildError::new("host.set", message));
                    Host::Client
                }
            },
        };
        if config.path.is_none() && query.is_none() && matches!(config.host, HostConfig::Client) {
            errors.push(BuildError::new(
                "",
                "give `path`, `query` or a `host` other than `client`",
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Rewrite {
            path,
            groups,
            query,
            host,
        })
    }
}

/// The request, and the captures of the rewrite's own regex (when it matched) as the
/// templates' local names.
struct PathSource<'a> {
    request: &'a RequestHeader,
    captures: Option<&'a regex::Captures<'a>>,
    groups: &'a [usize],
}

impl RequestSource for PathSource<'_> {
    fn header(&self, name: &HeaderName) -> Option<&str> {
        RequestSource::header(self.request, name)
    }

    fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        RequestSource::query(self.request, name)
    }

    fn host(&self) -> Option<Cow<'_, str>> {
        RequestSource::host(self.request)
    }

    fn method(&self) -> Option<&str> {
        RequestSource::method(self.request)
    }

    fn local(&self, index: usize) -> Option<&str> {
        let group = *self.groups.get(index)?;
        self.captures?.get(group).map(|found| found.as_str())
    }
}

impl QueryOperations {
    /// The query after the operations: kept parameters as they were sent, in order, then the
    /// set and added ones, form-encoded.
    fn apply(
        &self,
        query: Option<&str>,
        ctx: &mut RequestContext,
        source: &dyn RequestSource,
    ) -> String {
        let mut out = String::new();
        for pair in query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
        {
            let name = url::form_urlencoded::parse(pair.as_bytes())
                .next()
                .map(|(name, _)| name)
                .unwrap_or_default();
            let dropped = self.remove.iter().any(|removed| *removed == name)
                || self
                    .write
                    .iter()
                    .any(|(written, _, replace)| *replace && *written == name);
            if !dropped {
                push_separator(&mut out);
                out.push_str(pair);
            }
        }
        for (name, value, _) in &self.write {
            let value = value.render_from(ctx, source);
            push_separator(&mut out);
            out.extend(url::form_urlencoded::byte_serialize(name.as_bytes()));
            out.push('=');
            out.extend(url::form_urlencoded::byte_serialize(value.as_bytes()));
        }
        out
    }
}

fn push_separator(out: &mut String) {
    if !out.is_empty() {
        out.push('&');
    }
}

impl Rewrite {
    /// The new target, if the path or query changes.
    fn target(&self, request: &RequestHeader, ctx: &mut RequestContext) -> Option<String> {
        let path = request.uri.path();
        let query = request.uri.query();
        let captures = self
            .path
            .as_ref()
            .and_then(|rewrite| rewrite.regex.captures(path));
        let source = PathSource {
            request,
            captures: captures.as_ref(),
            groups: &self.groups,
        };
        let new_path = match (&self.path, &captures) {
            (Some(rewrite), Some(found)) => {
                let whole = found.get(0)?;
                let mut out = String::with_capacity(path.len() + 32);
                out.push_str(&path[..whole.start()]);
                rewrite
                    .replacement
                    .render_into(&mut out, ctx, &source, Escape::PathSegment);
                out.push_str(&path[whole.end()..]);
                Some(out)
            }
            _ => None,
        };
        let new_query = self
            .query
            .as_ref()
            .map(|operations| operations.apply(query, ctx, &source));
        if new_path.is_none() && new_query.is_none() {
            return None;
        }
        let mut target = new_path.unwrap_or_else(|| path.to_string());
        match new_query.as_deref().or(query) {
            Some("") | None => {}
            Some(query) => {
                target.push('?');
                target.push_str(query);
            }
        }
        Some(target)
    }
}

#[async_trait]
impl Filter for Rewrite {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn phases(&self) -> Phases {
        let mut phases = Phases::NONE;
        if self.path.is_some() || self.query.is_some() {
            phases = phases | Phases::REQUEST;
        }
        if !matches!(self.host, Host::Client) {
            phases = phases | Phases::UPSTREAM_REQUEST;
        }
        phases
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        let Some(target) = self.target(request, ctx) else {
            return Some(Decision::Continue);
        };
        if !target.starts_with('/') {
            return Some(Decision::Reject(
                Problem::new(ProblemType::InvalidPath)
                    .detail("the rewritten path does not start with \"/\""),
            ));
        }
        match http::Uri::from_maybe_shared(Bytes::from(target)) {
            Ok(uri) => {
                request.set_uri(uri);
                Some(Decision::Continue)
            }
            Err(_) => Some(Decision::Reject(
                Problem::new(ProblemType::InvalidPath)
                    .detail("the rewritten path is not a valid request target"),
            )),
        }
    }

    fn upstream_request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) {
        let value = match &self.host {
            Host::Client => return,
            Host::Target => match &ctx.target_host {
                Some(host) => host.clone(),
                None => return,
            },
            Host::Set(_, Some(literal)) => literal.clone(),
            Host::Set(template, None) => {
                let text = template.render_from(ctx, &*request);
                match HeaderValue::from_maybe_shared(Bytes::from(text)) {
                    Ok(value) if !value.is_empty() => value,
                    // Rendered empty or invalid: the client's host stays.
                    _ => return,
                }
            }
        };
        request.insert_header(http::header::HOST, value).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn build(config: serde_json::Value) -> Result<Rewrite, Vec<BuildError>> {
        Rewrite::build(
            serde_json::from_value(config).unwrap(),
            &BuildCtx::default(),
        )
    }

    fn run(filter: &Rewrite, target: &str, ctx: &mut RequestContext) -> (Decision, String) {
        let mut request = RequestHeader::build("GET", target.as_bytes(), None).unwrap();
        request.insert_header("x-tenant", "acme").unwrap();
        let decision = filter.try_request(&mut request, ctx).unwrap();
        (decision, request.uri.to_string())
    }

    #[test]
    fn rewrites_the_path_with_captures_and_keeps_the_rest() {
        let filter = build(serde_json::json!({
            "path": { "regex": "^/api/v(?P<version>[0-9]+)/(\\w+)", "replacement": "/${2}/v${version}/${request.header.x-tenant}" }
        }))
        .unwrap();
        assert_eq!(filter.phases(), Phases::REQUEST);
        let mut ctx = RequestContext::new(Instant::now());
        let (decision, uri) = run(&filter, "/api/v2/users/7?x=1", &mut ctx);
        assert!(matches!(decision, Decision::Continue));
        assert_eq!(uri, "/users/v2/acme/7?x=1");
        // Not matched: unchanged.
        let (_, uri) = run(&filter, "/other?x=1", &mut ctx);
        assert_eq!(uri, "/other?x=1");
    }

    #[test]
    fn query_parameters_are_removed_set_and_added() {
        let filter = build(serde_json::json!({
            "query": {
                "remove": ["debug"],
                "set": { "version": "2", "tenant": "${request.header.x-tenant}" },
                "add": { "tag": "a b" },
            }
        }))
        .unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        let (_, uri) = run(
            &filter,
            "/x?tag=1&debug=yes&version=1&keep=%2F&debug",
            &mut ctx,
        );
        assert_eq!(uri, "/x?tag=1&keep=%2F&tenant=acme&version=2&tag=a+b");
        let (_, uri) = run(&filter, "/x", &mut ctx);
        assert_eq!(uri, "/x?tenant=acme&version=2&tag=a+b");
        let captured = build(serde_json::json!({
            "path": { "regex": "^/users/(?P<id>[0-9]+)$", "replacement": "/users.php" },
            "query": { "set": { "id": "${id}" } },
        }))
        .unwrap();
        let (_, uri) = run(&captured, "/users/7?x=1", &mut ctx);
        assert_eq!(uri, "/users.php?x=1&id=7");
        let (_, uri) = run(&captured, "/other", &mut ctx);
        assert_eq!(uri, "/other?id=");
        let remove_only = build(serde_json::json!({ "query": { "remove": ["a"] } })).unwrap();
        let (_, uri) = run(&remove_only, "/x?a=1", &mut ctx);
        assert_eq!(uri, "/x");
        let (_, uri) = run(&remove_only, "/x?b=1", &mut ctx);
        assert_eq!(uri, "/x?b=1");
    }

    #[test]
    fn a_rewrite_to_something_that_is_not_a_path_is_a_400() {
        let filter = build(serde_json::json!({
            "path": { "regex": "^/", "replacement": "" }
        }))
        .unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        let (decision, _) = run(&filter, "/x", &mut ctx);
        assert!(matches!(decision, Decision::Reject(problem) if problem.status == 400));
    }

    #[test]
    fn the_host_is_the_clients_the_targets_or_its_own() {
        let mut ctx = RequestContext::new(Instant::now());
        ctx.target_host = Some(HeaderValue::from_static("users.internal:8080"));
        ctx.consumer = Some(crate::Consumer::new("acme"));
        for (host, expected) in [
            (serde_json::json!("target"), "users.internal:8080"),
            (serde_json::json!({ "set": "api.internal" }), "api.internal"),
            (
                serde_json::json!({ "set": "${consumer.id}.internal" }),
                "acme.internal",
            ),
        ] {
            let filter = build(serde_json::json!({ "host": host })).unwrap();
            assert_eq!(filter.phases(), Phases::UPSTREAM_REQUEST);
            let mut request = RequestHeader::build("GET", b"/", None).unwrap();
            request.insert_header("host", "client.example").unwrap();
            filter.upstream_request(&mut request, &mut ctx);
            assert_eq!(request.headers["host"], expected);
        }
    }

    #[test]
    fn reports_every_bad_entry_with_its_path() {
        let errors = build(serde_json::json!({
            "path": { "regex": "^/(unclosed", "replacement": "/" },
            "query": { "set": { "a": "${nope}" }, "remove": [""] },
            "host": { "set": "${path.}" },
        }))
        .err()
        .unwrap();
        let paths: Vec<_> = errors.iter().map(|error| error.path.as_str()).collect();
        assert_eq!(
            paths,
            ["path.regex", "query.set.a", "query.remove[0]", "host.set"]
        );
        assert!(!errors[0].message.contains('\n'));
        let errors = build(serde_json::json!({
            "path": { "regex": "^/(?P<id>x)", "replacement": "/${name}" }
        }))
        .err()
        .unwrap();
        assert_eq!(errors[0].path, "path.replacement");
        assert!(
            errors[0].message.contains("and here 0, 1, id"),
            "{}",
            errors[0].message
        );
        assert_eq!(build(serde_json::json!({})).err().unwrap()[0].path, "");
    }
}
