//! Value templates such as `"${consumer.id}"` or `"${request.header.x-tenant}/v1"`, parsed once
//! when a filter is built and rendered per request without reparsing. A variable whose value is
//! missing renders empty; a variable the parser does not know is a build error.
//!
//! A template reads two kinds of values: those of the request context (route, consumer, claims,
//! captures of the route's regex path) and those of the request head itself (headers, query,
//! host, method). The second kind comes through a [`RequestSource`]: the live request, or the
//! values a filter captured from it in an earlier phase ([`Captured`]).

use std::borrow::Cow;
use std::fmt::Write;

use http::HeaderName;
use pingora_http::RequestHeader;

use crate::RequestContext;

/// A value known only at request time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Variable {
    RequestId,
    Route,
    Upstream,
    ClientIp,
    ConsumerId,
    ConsumerUsername,
    Status,
    LatencyMs,
    Host,
    Method,
    Scheme,
    /// The host name the client asked the L4 balancer for (PROXY v2 `AUTHORITY`).
    ConnectionAuthority,
    /// The client certificate's common name (PROXY v2 `SSL`, or the listener's mTLS).
    ClientCertCn,
    RequestHeader(HeaderName),
    /// A top-level claim of the verified JWT.
    Claim(String),
    /// The first value of a query parameter, decoded.
    Query(String),
    /// A named capture of the route's regex path.
    PathCapture(String),
    /// A name the filter defines for itself (e.g. a capture of its own regex), by its index in
    /// the names given to [`Template::parse_in`].
    Local(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Variable(Variable),
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

pub const VARIABLES: &str = "request_id, route, upstream, client_ip, consumer.id, \
consumer.username, status, latency_ms, host, method, scheme, connection.authority, \
connection.client_cn, request.header.NAME, jwt.claim.NAME, query.NAME, path.CAPTURE";

/// The names a template may use besides the built-in variables.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scope<'a> {
    /// The named captures of the route's regex paths; `None` when any name is accepted (a
    /// filter of the global chain serves every route).
    pub path_captures: Option<&'a [String]>,
    /// The filter's own names, rendered from [`RequestSource::local`]. They are looked up
    /// before the built-in variables.
    pub locals: &'a [String],
}

/// How a rendered value is written out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Escape {
    /// As it is.
    None,
    /// Into a URL path: a value that did not come from the path itself (a header, a claim, a
    /// query parameter) is percent-encoded as one path segment, so it cannot add segments, dot
    /// segments or a query. Captures of the path are written as they are (already encoded).
    PathSegment,
}

impl Template {
    /// Parses `text` with the built-in variables only; any `${path.NAME}` is accepted.
    pub fn parse(text: &str) -> Result<Template, String> {
        Template::parse_in(text, &Scope::default())
    }

    /// Parses `text`; `scope` says which path captures and filter-defined names exist.
    pub fn parse_in(text: &str, scope: &Scope<'_>) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed \"${{\" in \"{text}\""))?;
            let name = after[..end].trim();
            parts.push(Part::Variable(variable(name, scope)?));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template { parts })
    }

    /// The template's text when it has no variables.
    pub fn as_literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Literal(text)] => Some(text),
            _ => None,
        }
    }

    /// The variables, in order.
    pub fn variables(&self) -> impl Iterator<Item = &Variable> {
        self.parts.iter().filter_map(|part| match part {
            Part::Variable(variable) => Some(variable),
            Part::Literal(_) => None,
        })
    }

    /// The request headers this template reads.
    pub fn request_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.variables().filter_map(|variable| match variable {
            Variable::RequestHeader(name) => Some(name),
            _ => None,
        })
    }

    /// Adds what this template reads from the request head to `reads`.
    pub fn collect_reads(&self, reads: &mut Reads) {
        for variable in self.variables() {
            reads.add(variable);
        }
    }

    /// Renders with the request context; `header` looks up request header values (which may
    /// have been captured in an earlier phase). Query, host and method render empty: use
    /// [`Template::render_from`] where the request head is at hand.
    pub fn render<'a>(
        &self,
        ctx: &mut RequestContext,
        header: impl Fn(&HeaderName) -> Option<&'a str>,
    ) -> String {
        self.render_from(ctx, &HeadersOnly(header, std::marker::PhantomData))
    }

    /// Renders with the request context and what `source` says of the request head.
    pub fn render_from(&self, ctx: &mut RequestContext, source: &dyn RequestSource) -> String {
        let mut out = String::new();
        self.render_into(&mut out, ctx, source, Escape::None);
        out
    }

    /// Renders at the end of `out`.
    pub fn render_into(
        &self,
        out: &mut String,
        ctx: &mut RequestContext,
        source: &dyn RequestSource,
        escape: Escape,
    ) {
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Variable(variable) => {
                    let from_path =
                        matches!(variable, Variable::PathCapture(_) | Variable::Local(_));
                    if escape == Escape::PathSegment && !from_path {
                        let mut value = String::new();
                        write_value(&mut value, variable, ctx, source);
                        push_path_segment(out, &value);
                    } else {
                        write_value(out, variable, ctx, source);
                    }
                }
            }
        }
    }
}

fn variable(name: &str, scope: &Scope<'_>) -> Result<Variable, String> {
    if let Some(index) = scope.locals.iter().position(|local| local == name) {
        return Ok(Variable::Local(index));
    }
    Ok(match name {
        "request_id" => Variable::RequestId,
        "route" => Variable::Route,
        "upstream" => Variable::Upstream,
        "client_ip" => Variable::ClientIp,
        "consumer.id" => Variable::ConsumerId,
        "consumer.username" => Variable::ConsumerUsername,
        "status" => Variable::Status,
        "latency_ms" => Variable::LatencyMs,
        "host" => Variable::Host,
        "method" => Variable::Method,
        "scheme" => Variable::Scheme,
        "connection.authority" => Variable::ConnectionAuthority,
        "connection.client_cn" => Variable::ClientCertCn,
        other => {
            if let Some(header) = other.strip_prefix("request.header.") {
                Variable::RequestHeader(
                    HeaderName::from_bytes(header.as_bytes())
                        .map_err(|_| format!("\"{header}\" is not a valid header name"))?,
                )
            } else if let Some(claim) = non_empty(other, "jwt.claim.") {
                Variable::Claim(claim.to_string())
            } else if let Some(parameter) = non_empty(other, "query.") {
                Variable::Query(parameter.to_string())
            } else if let Some(capture) = non_empty(other, "path.") {
                if let Some(known) = scope.path_captures {
                    if !known.iter().any(|known| known == capture) {
                        return Err(format!(
                            "\"${{{other}}}\": \"{capture}\" is not a named capture of this route's regex paths{}",
                            if known.is_empty() {
                                String::new()
                            } else {
                                format!(" (known: {})", known.join(", "))
                            }
                        ));
                    }
                }
                Variable::PathCapture(capture.to_string())
            } else {
                let locals = if scope.locals.is_empty() {
                    String::new()
                } else {
                    format!(", and here {}", scope.locals.join(", "))
                };
                return Err(format!(
                    "unknown variable \"${{{other}}}\" (known: {VARIABLES}{locals})"
                ));
            }
        }
    })
}

fn non_empty<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    name.strip_prefix(prefix).filter(|rest| !rest.is_empty())
}

fn write_value(
    out: &mut String,
    variable: &Variable,
    ctx: &mut RequestContext,
    source: &dyn RequestSource,
) {
    match variable {
        Variable::RequestId => out.push_str(ctx.request_id()),
        Variable::Route => out.push_str(ctx.route.as_deref().unwrap_or("")),
        Variable::Upstream => out.push_str(ctx.upstream.as_deref().unwrap_or("")),
        Variable::ClientIp => {
            if let Some(ip) = ctx.client_addr {
                let _ = write!(out, "{ip}");
            }
        }
        Variable::ConsumerId => {
            if let Some(consumer) = &ctx.consumer {
                out.push_str(&consumer.id)
            }
        }
        Variable::ConsumerUsername => {
            let consumer = ctx.consumer.as_ref();
            if let Some(username) = consumer.and_then(|consumer| consumer.username.as_deref()) {
                out.push_str(username)
            }
        }
        Variable::Status => {
            if let Some(status) = ctx.status {
                let _ = write!(out, "{status}");
            }
        }
        Variable::LatencyMs => {
            let _ = write!(out, "{}", ctx.started.elapsed().as_millis());
        }
        Variable::Scheme => out.push_str(if ctx.client_tls { "https" } else { "http" }),
        Variable::ConnectionAuthority => {
            let connection = ctx.connection.as_deref();
            if let Some(authority) = connection.and_then(|info| info.authority.as_deref()) {
                out.push_str(authority)
            }
        }
        Variable::ClientCertCn => {
            let connection = ctx.connection.as_deref();
            if let Some(name) = connection.and_then(|info| info.client_cert_cn.as_deref()) {
                out.push_str(name)
            }
        }
        Variable::Host => {
            if let Some(host) = source.host() {
                out.push_str(&host)
            }
        }
        Variable::Method => {
            if let Some(method) = source.method() {
                out.push_str(method)
            }
        }
        Variable::RequestHeader(name) => {
            if let Some(value) = source.header(name) {
                out.push_str(value)
            }
        }
        Variable::Query(name) => {
            if let Some(value) = source.query(name) {
                out.push_str(&value)
            }
        }
        Variable::Claim(name) => match ctx.claims.as_ref().and_then(|claims| claims.get(name)) {
            Some(serde_json::Value::String(text)) => out.push_str(text),
            Some(serde_json::Value::Null) | None => {}
            Some(other) => {
                let _ = write!(out, "{other}");
            }
        },
        Variable::PathCapture(name) => {
            if let Some((_, value)) = ctx.path_captures.iter().find(|(known, _)| known == name) {
                out.push_str(value)
            }
        }
        Variable::Local(index) => {
            if let Some(value) = source.local(*index) {
                out.push_str(value)
            }
        }
    }
}

/// Percent-encodes everything but unreserved characters, and a whole value of `.` or `..`, so
/// the value stays one path segment.
fn push_path_segment(out: &mut String, value: &str) {
    if value == "." || value == ".." {
        out.push_str(if value == "." { "%2E" } else { "%2E%2E" });
        return;
    }
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

/// What a template reads from the request head.
pub trait RequestSource {
    /// A request header's value, as text.
    fn header(&self, name: &HeaderName) -> Option<&str>;
    /// The first value of a query parameter, decoded.
    fn query(&self, name: &str) -> Option<Cow<'_, str>>;
    /// The host the request asked for: lower case, without port.
    fn host(&self) -> Option<Cow<'_, str>>;
    fn method(&self) -> Option<&str>;
    /// A filter-defined name's value (see [`Scope::locals`]).
    fn local(&self, _index: usize) -> Option<&str> {
        None
    }
}

impl RequestSource for RequestHeader {
    fn header(&self, name: &HeaderName) -> Option<&str> {
        request_header(self, name)
    }

    fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        query_value(self.uri.query()?, name)
    }

    fn host(&self) -> Option<Cow<'_, str>> {
        let authority = match self.uri.host() {
            Some(host) => host,
            None => request_header(self, &http::header::HOST)?,
        };
        host_without_port(authority)
    }

    fn method(&self) -> Option<&str> {
        Some(self.method.as_str())
    }
}

/// Only headers, from a lookup function (the request head is not at hand).
struct HeadersOnly<'a, F>(F, std::marker::PhantomData<&'a str>);

impl<'a, F: Fn(&HeaderName) -> Option<&'a str>> RequestSource for HeadersOnly<'a, F> {
    fn header(&self, name: &HeaderName) -> Option<&str> {
        (self.0)(name)
    }

    fn query(&self, _name: &str) -> Option<Cow<'_, str>> {
        None
    }

    fn host(&self) -> Option<Cow<'_, str>> {
        None
    }

    fn method(&self) -> Option<&str> {
        None
    }
}

/// The first value of `name` in a query string, form-decoded (`+` is a space).
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

/// `Example.COM:8080` as `example.com`; `[::1]:80` as `[::1]`.
fn host_without_port(authority: &str) -> Option<Cow<'_, str>> {
    let host = if authority.starts_with('[') {
        authority
            .find(']')
            .map_or(authority, |end| &authority[..=end])
    } else {
        authority.split(':').next().unwrap_or(authority)
    };
    let host = host.trim_end_matches('.');
    if host.is_empty() {
        return None;
    }
    Some(if host.bytes().any(|byte| byte.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

/// Look up a request header as text.
pub fn request_header<'a>(request: &'a RequestHeader, name: &HeaderName) -> Option<&'a str> {
    request
        .headers
        .get(name)
        .and_then(|value| value.to_str().ok())
}

/// What a set of templates reads from the request head, so a filter that renders them in a
/// later phase (when the request head is gone) can capture just that in the request phase.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    headers: Vec<HeaderName>,
    query: Vec<String>,
    host: bool,
    method: bool,
}

impl Reads {
    fn add(&mut self, variable: &Variable) {
        match variable {
            Variable::RequestHeader(name) if !self.headers.contains(name) => {
                self.headers.push(name.clone())
            }
            Variable::Query(name) if !self.query.contains(name) => self.query.push(name.clone()),
            Variable::Host => self.host = true,
            Variable::Method => self.method = true,
            _ => {}
        }
    }

    /// Adds what `other` reads.
    pub fn merge(&mut self, other: &Reads) {
        for name in &other.headers {
            if !self.headers.contains(name) {
                self.headers.push(name.clone());
            }
        }
        for name in &other.query {
            if !self.query.contains(name) {
                self.query.push(name.clone());
            }
        }
        self.host |= other.host;
        self.method |= other.method;
    }

    /// Whether the templates read nothing from the request head.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty() && self.query.is_empty() && !self.host && !self.method
    }

    /// The values the templates read, taken from `request`.
    pub fn capture(&self, request: &RequestHeader) -> Captured {
        let owned = |value: Option<&str>| value.map(str::to_owned);
        Captured {
            headers: self
                .headers
                .iter()
                .map(|name| (name.clone(), owned(request_header(request, name))))
                .collect(),
            query: self
                .query
                .iter()
                .map(|name| {
                    (
                        name.clone(),
                        RequestSource::query(request, name).map(Cow::into_owned),
                    )
                })
                .collect(),
            host: if self.host {
                RequestSource::host(request).map(Cow::into_owned)
            } else {
                None
            },
            method: if self.method {
                Some(request.method.as_str().to_owned())
            } else {
                None
            },
        }
    }
}

/// Request head values captured by [`Reads::capture`]; a [`RequestSource`] for later phases.
#[derive(Clone, Debug, Default)]
pub struct Captured {
    headers: Vec<(HeaderName, Option<String>)>,
    query: Vec<(String, Option<String>)>,
    host: Option<String>,
    method: Option<String>,
}

impl RequestSource for Captured {
    fn header(&self, name: &HeaderName) -> Option<&str> {
        self.headers
            .iter()
            .find(|(known, _)| known == name)?
            .1
            .as_deref()
    }

    fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        self.query
            .iter()
            .find(|(known, _)| known == name)?
            .1
            .as_deref()
            .map(Cow::Borrowed)
    }

    fn host(&self) -> Option<Cow<'_, str>> {
        self.host.as_deref().map(Cow::Borrowed)
    }

    fn method(&self) -> Option<&str> {
        self.method.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    fn request(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build("POST", uri.as_bytes(), None).unwrap();
        for (name, value) in headers {
            request.append_header(name.to_string(), *value).unwrap();
        }
        request
    }

    #[test]
    fn parses_literals_and_variables() {
        let template = Template::parse("id=${request_id};r=${route}").unwrap();
        assert!(template.as_literal().is_none());
        let mut ctx = RequestContext::new(Instant::now());
        ctx.set_request_id("abc".into());
        ctx.route = Some("users".into());
        assert_eq!(template.render(&mut ctx, |_| None), "id=abc;r=users");
    }

    #[test]
    fn reports_unknown_variables_and_unclosed_braces() {
        assert!(Template::parse("${nope}")
            .unwrap_err()
            .contains("unknown variable \"${nope}\""));
        assert!(Template::parse("${route").unwrap_err().contains("unclosed"));
        assert!(Template::parse("${request.header.bad name}")
            .unwrap_err()
            .contains("not a valid header name"));
        for empty in ["${query.}", "${jwt.claim.}", "${path.}"] {
            assert!(
                Template::parse(empty)
                    .unwrap_err()
                    .contains("unknown variable"),
                "{empty}"
            );
        }
    }

    #[test]
    fn plain_text_is_literal() {
        assert_eq!(
            Template::parse("gatehouse").unwrap().as_literal(),
            Some("gatehouse")
        );
        assert_eq!(Template::parse("").unwrap().as_literal(), Some(""));
    }

    #[test]
    fn renders_every_variable_from_the_context_and_the_request() {
        let template = Template::parse(
            "${consumer.id}|${consumer.username}|${jwt.claim.sub}|${jwt.claim.level}|\
             ${jwt.claim.roles}|${query.q}|${query.tag}|${path.id}|${host}|${method}|${scheme}|\
             ${request.header.x-tenant}|${client_ip}|${upstream}|${status}",
        )
        .unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        ctx.consumer = Some(crate::Consumer {
            id: "acme".into(),
            username: Some("acme-corp".into()),
            tags: Arc::from(Vec::new()),
        });
        ctx.claims = Some(Arc::new(serde_json::json!({
            "sub": "alice", "level": 3, "roles": ["a", "b"]
        })));
        ctx.path_captures = vec![("id".into(), "42".into())];
        ctx.client_tls = true;
        ctx.client_addr = Some("192.0.2.1".parse().unwrap());
        ctx.upstream = Some("users".into());
        ctx.status = Some(201);
        let request = request(
            "/x?q=a+b%21&tag=1&tag=2",
            &[("host", "API.Example.com:8443"), ("x-tenant", "t1")],
        );
        assert_eq!(
            template.render_from(&mut ctx, &request),
            "acme|acme-corp|alice|3|[\"a\",\"b\"]|a b!|1|42|api.example.com|POST|https|t1|\
             192.0.2.1|users|201"
        );
    }

    #[test]
    fn missing_values_render_empty() {
        let template = Template::parse(
            "[${consumer.id}${consumer.username}${jwt.claim.sub}${query.q}${path.id}\
             ${request.header.x-missing}${status}${upstream}]",
        )
        .unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        let request = request("/x", &[]);
        assert_eq!(template.render_from(&mut ctx, &request), "[]");
        // A consumer without a username, a token without the claim.
        ctx.consumer = Some(crate::Consumer::new("acme"));
        ctx.claims = Some(Arc::new(serde_json::json!({ "sub": null })));
        assert_eq!(template.render_from(&mut ctx, &request), "[acme]");
    }

    #[test]
    fn path_captures_are_checked_against_the_route() {
        let known = vec!["id".to_string()];
        let scope = Scope {
            path_captures: Some(&known),
            locals: &[],
        };
        assert!(Template::parse_in("${path.id}", &scope).is_ok());
        let error = Template::parse_in("${path.version}", &scope).unwrap_err();
        assert!(
            error.contains("\"version\" is not a named capture") && error.contains("known: id"),
            "{error}"
        );
        // The global chain serves every route: any capture name.
        assert!(Template::parse("${path.version}").is_ok());
    }

    #[test]
    fn locals_come_first_and_render_from_the_source() {
        struct Source;
        impl RequestSource for Source {
            fn header(&self, _: &HeaderName) -> Option<&str> {
                None
            }
            fn query(&self, _: &str) -> Option<Cow<'_, str>> {
                None
            }
            fn host(&self) -> Option<Cow<'_, str>> {
                None
            }
            fn method(&self) -> Option<&str> {
                None
            }
            fn local(&self, index: usize) -> Option<&str> {
                ["seven", "r"].get(index).copied()
            }
        }
        let locals = vec!["1".to_string(), "route".to_string()];
        let scope = Scope {
            path_captures: None,
            locals: &locals,
        };
        let template = Template::parse_in("/${1}/${route}", &scope).unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        ctx.route = Some("ignored".into());
        assert_eq!(template.render_from(&mut ctx, &Source), "/seven/r");
        assert!(Template::parse_in("${2}", &scope)
            .unwrap_err()
            .contains("and here 1, route"));
    }

    #[test]
    fn path_escaping_keeps_a_value_in_one_segment() {
        let template = Template::parse("/t/${request.header.x-tenant}/${path.rest}").unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        ctx.path_captures = vec![("rest".into(), "a/b%20c".into())];
        for (tenant, expected) in [
            ("acme", "/t/acme/a/b%20c"),
            ("../admin?x=1", "/t/..%2Fadmin%3Fx%3D1/a/b%20c"),
            ("..", "/t/%2E%2E/a/b%20c"),
            ("a b", "/t/a%20b/a/b%20c"),
        ] {
            let request = request("/", &[("x-tenant", tenant)]);
            let mut out = String::new();
            template.render_into(&mut out, &mut ctx, &request, Escape::PathSegment);
            assert_eq!(out, expected, "{tenant}");
        }
    }

    #[test]
    fn captured_values_render_like_the_request() {
        let template =
            Template::parse("${host} ${method} ${query.q} ${request.header.x-a} ${route}").unwrap();
        let mut reads = Reads::default();
        template.collect_reads(&mut reads);
        assert!(!reads.is_empty());
        let request = request("/p?q=1", &[("host", "h.example"), ("x-a", "va")]);
        let captured = reads.capture(&request);
        let mut ctx = RequestContext::new(Instant::now());
        ctx.route = Some("r".into());
        assert_eq!(
            template.render_from(&mut ctx, &captured),
            template.render_from(&mut ctx, &request)
        );
        assert_eq!(
            template.render_from(&mut ctx, &captured),
            "h.example POST 1 va r"
        );
        let mut none = Reads::default();
        Template::parse("${route}${consumer.id}")
            .unwrap()
            .collect_reads(&mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn hosts_lose_their_port_and_case() {
        assert_eq!(
            host_without_port("Example.COM:8080").unwrap(),
            "example.com"
        );
        assert_eq!(host_without_port("[::1]:80").unwrap(), "[::1]");
        assert_eq!(host_without_port("example.com.").unwrap(), "example.com");
        assert!(host_without_port("").is_none());
    }
}
