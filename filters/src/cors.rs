//! `cors`: cross-origin resource sharing answered at the gateway. A preflight from an allowed
//! origin is answered with 204 before any authentication runs (the filter's stage puts it ahead
//! of auth filters and the route's `auth` gate); one from another origin gets 403
//! `origin-not-allowed` without CORS headers. Other requests go on as usual, and their answers
//! carry `Access-Control-Allow-Origin` (and the exposed headers) when the origin is allowed, and
//! no CORS headers at all when it is not: the upstream's own are removed, so the gateway's
//! policy is the only one a browser sees.

use async_trait::async_trait;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderName, HeaderValue, Method};
use pingora_http::{RequestHeader, ResponseHeader};
use regex::Regex;
use serde::Deserialize;

use crate::{
    BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, Problem, ProblemType,
    RequestContext, Response, Stage,
};

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The origins allowed: `https://app.example.com` (exact), `*.example.com` (any subdomain,
    /// over http or https) or `https://*.example.com` (that scheme only), `{regex: "..."}`
    /// (matched against the whole `Origin`), or `"*"` for any origin.
    pub allow_origins: Vec<OriginPattern>,
    /// The methods a preflight is told are allowed; `"*"` allows the one it asks for.
    pub allow_methods: Vec<String>,
    /// The request headers a preflight is told are allowed (beyond the CORS-safelisted ones);
    /// `"*"` allows the ones it asks for.
    pub allow_headers: Vec<String>,
    /// The response headers a page may read (beyond the CORS-safelisted ones).
    pub expose_headers: Vec<String>,
    /// Allow cookies and HTTP authentication on cross-origin requests. Not with origin `"*"`.
    pub allow_credentials: bool,
    /// How long a browser may reuse a preflight's answer ("10m"); unset: the browser's default.
    pub max_age: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            allow_origins: Vec::new(),
            allow_methods: ["GET", "HEAD", "POST"].map(String::from).to_vec(),
            allow_headers: Vec::new(),
            expose_headers: Vec::new(),
            allow_credentials: false,
            max_age: None,
        }
    }
}

/// One entry of `allow_origins`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum OriginPattern {
    /// An exact origin, a `*.domain` wildcard, or `"*"`.
    Text(String),
    /// A regular expression the whole `Origin` must match (it is anchored for you).
    Regex { regex: String },
}

#[derive(Debug)]
enum OriginRule {
    /// Lower case `scheme://host[:port]`.
    Exact(String),
    /// `[scheme://]*.domain[:port]`: any subdomain of `domain` (not the domain itself).
    Subdomain {
        scheme: Option<String>,
        /// `.domain`, lower case.
        suffix: String,
        port: Option<String>,
    },
    Regex(Regex),
}

/// A list answered as configured, or by reflecting what the preflight asked for (`"*"`).
#[derive(Debug)]
enum Allowed {
    List(Option<HeaderValue>),
    Reflect,
}

pub struct Cors {
    any_origin: bool,
    origins: Vec<OriginRule>,
    methods: Allowed,
    headers: Allowed,
    expose_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
    /// Whether answers depend on the request's `Origin` (all but "any origin" without
    /// credentials, which is answered `*`): they then say `Vary: Origin`, so a cache never
    /// serves one origin's answer to another.
    varies: bool,
}

/// What the request phase found out for the response phase (kept per filter instance).
struct Granted {
    origin: HeaderValue,
    /// For a preflight: the method and headers it asked for (reflected when configured so).
    preflight: Option<(Option<HeaderValue>, Option<HeaderValue>)>,
}

/// `scheme`, `host` and `port` of an origin (`scheme://host[:port]`), when it has that form.
fn split_origin(origin: &str) -> Option<(&str, &str, Option<&str>)> {
    let (scheme, authority) = origin.split_once("://")?;
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok || authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ', '*']) {
        return None;
    }
    let (host, port) = if authority.starts_with('[') {
        match authority.rfind("]:") {
            Some(end) => (&authority[..=end], Some(&authority[end + 2..])),
            None => (authority, None),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port_ok =
        port.is_none_or(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
    (!host.is_empty() && port_ok).then_some((scheme, host, port))
}

/// A `[scheme://]*.domain[:port]` wildcard.
fn subdomain_rule(text: &str) -> Option<OriginRule> {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, text),
    };
    let domain = rest.strip_prefix("*.")?;
    let (_, host, port) = split_origin(&format!("{}://{domain}", scheme.unwrap_or("http"))).map(
        |(scheme, host, port)| (scheme.to_string(), host.to_string(), port.map(String::from)),
    )?;
    if host.starts_with('.') || host.ends_with('.') || host.contains("..") {
        return None;
    }
    Some(OriginRule::Subdomain {
        scheme: scheme.map(str::to_string),
        suffix: format!(".{host}"),
        port,
    })
}

fn header_list(
    key: &str,
    entries: &[String],
    errors: &mut Vec<BuildError>,
) -> (bool, Option<HeaderValue>) {
    let mut names = Vec::new();
    let mut star = false;
    for (index, entry) in entries.iter().enumerate() {
        let entry = entry.trim();
        if entry == "*" {
            star = true;
        } else if HeaderName::from_bytes(entry.as_bytes()).is_ok() {
            names.push(entry.to_ascii_lowercase());
        } else {
            errors.push(BuildError::new(
                format!("{key}[{index}]"),
                format!("\"{entry}\" is not a valid header name"),
            ));
        }
    }
    let value = (!names.is_empty())
        .then(|| HeaderValue::from_str(&names.join(", ")).expect("header names are header-safe"));
    (star, value)
}

impl FilterKind for Cors {
    const KIND: &'static str = "cors";
    type Config = Config;

    fn build(config: Config, _ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        if config.allow_origins.is_empty() {
            errors.push(BuildError::new(
                "allow_origins",
                "list at least one origin (or \"*\" for any)",
            ));
        }
        let mut any_origin = false;
        let mut origins = Vec::new();
        for (index, pattern) in config.allow_origins.iter().enumerate() {
            let path = format!("allow_origins[{index}]");
            match pattern {
                OriginPattern::Text(text) if text.trim() == "*" => {
                    any_origin = true;
                    if config.allow_credentials {
                        errors.push(BuildError::new(
                            path,
                            "\"*\" cannot be combined with `allow_credentials: true` (browsers refuse credentials for any origin); list the origins, or use a regex",
                        ));
                    }
                }
                OriginPattern::Text(text) => {
                    let text = text.trim().to_ascii_lowercase();
                    let rule = if text.contains('*') {
                        subdomain_rule(&text)
                    } else {
                        split_origin(&text).map(|_| OriginRule::Exact(text.clone()))
                    };
                    match rule {
                        Some(rule) => origins.push(rule),
                        None => errors.push(BuildError::new(
                            path,
                            format!("\"{text}\" is not an origin like \"https://app.example.com\" (scheme, host and optional port, no path) or a wildcard like \"*.example.com\" or \"https://*.example.com\""),
                        )),
                    }
                }
                OriginPattern::Regex { regex } => match Regex::new(&format!("^(?:{regex})$")) {
                    Ok(regex) => origins.push(OriginRule::Regex(regex)),
                    Err(error) => errors.push(BuildError::new(
                        format!("{path}.regex"),
                        format!("invalid regular expression: {error}"),
                    )),
                },
            }
        }
        let mut method_names = Vec::new();
        let mut reflect_methods = false;
        for (index, method) in config.allow_methods.iter().enumerate() {
            let method = method.trim().to_ascii_uppercase();
            if method == "*" {
                reflect_methods = true;
            } else if Method::from_bytes(method.as_bytes()).is_ok() {
                method_names.push(method);
            } else {
                errors.push(BuildError::new(
                    format!("allow_methods[{index}]"),
                    format!("\"{method}\" is not an HTTP method"),
                ));
            }
        }
        let (reflect_headers, allow_headers) =
            header_list("allow_headers", &config.allow_headers, &mut errors);
        let (expose_all, expose_headers) =
            header_list("expose_headers", &config.expose_headers, &mut errors);
        if expose_all && config.allow_credentials {
            errors.push(BuildError::new(
                "expose_headers",
                "\"*\" cannot be combined with `allow_credentials: true` (browsers read it as a header named \"*\"); list the headers",
            ));
        }
        let expose_headers = if expose_all {
            Some(HeaderValue::from_static("*"))
        } else {
            expose_headers
        };
        let max_age = config.max_age.as_deref().map(|text| {
            let seconds = crate::util::duration("max_age", text, &mut errors).as_secs();
            HeaderValue::from(seconds)
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        let methods = if reflect_methods {
            Allowed::Reflect
        } else {
            Allowed::List((!method_names.is_empty()).then(|| {
                HeaderValue::from_str(&method_names.join(", ")).expect("methods are header-safe")
            }))
        };
        let headers = if reflect_headers {
            Allowed::Reflect
        } else {
            Allowed::List(allow_headers)
        };
        Ok(Cors {
            any_origin,
            origins,
            methods,
            headers,
            expose_headers,
            credentials: config.allow_credentials,
            max_age,
            varies: !any_origin || config.allow_credentials,
        })
    }
}

/// Adds `token` to the response's `Vary` unless it (or `*`) is there already.
fn add_vary(response: &mut ResponseHeader, token: &'static str) {
    let present = response
        .headers
        .get_all(VARY)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|given| {
            let given = given.trim();
            given == "*" || given.eq_ignore_ascii_case(token)
        });
    if !present {
        response
            .append_header(VARY, HeaderValue::from_static(token))
            .ok();
    }
}

impl Cors {
    /// Whether `origin` (an `Origin` header's value) may make cross-origin requests.
    pub fn allows(&self, origin: &str) -> bool {
        if self.any_origin {
            return true;
        }
        let lower = origin.to_ascii_lowercase();
        let parts = split_origin(&lower);
        self.origins.iter().any(|rule| match rule {
            OriginRule::Exact(exact) => *exact == lower,
            OriginRule::Subdomain {
                scheme,
                suffix,
                port,
            } => parts.is_some_and(|(given_scheme, host, given_port)| {
                let scheme_ok = match scheme {
                    Some(scheme) => scheme == given_scheme,
                    None => matches!(given_scheme, "http" | "https"),
                };
                scheme_ok
                    && host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && given_port == port.as_deref()
            }),
            OriginRule::Regex(regex) => regex.is_match(origin),
        })
    }

    fn decide(&self, request: &RequestHeader, ctx: &mut RequestContext) -> Decision {
        let mut origins = request.headers.get_all(ORIGIN).iter();
        let origin = match (origins.next(), origins.next()) {
            (Some(origin), None) => origin,
            // No origin: not a cross-origin request. Two: not one a browser sends.
            _ => return Decision::Continue,
        };
        let preflight = request.method == Method::OPTIONS
            && request.headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD);
        let allowed = origin.to_str().is_ok_and(|origin| self.allows(origin));
        if !allowed {
            return if preflight {
                Decision::Reject(Problem::new(ProblemType::OriginNotAllowed))
            } else {
                Decision::Continue
            };
        }
        let asked = |name: HeaderName| request.headers.get(name).cloned();
        let granted = Granted {
            origin: origin.clone(),
            preflight: preflight.then(|| {
                (
                    asked(ACCESS_CONTROL_REQUEST_METHOD),
                    asked(ACCESS_CONTROL_REQUEST_HEADERS),
                )
            }),
        };
        ctx.set_instance_state(self, granted);
        if preflight {
            Decision::Respond(Response::new(204))
        } else {
            Decision::Continue
        }
    }
}

#[async_trait]
impl Filter for Cors {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn stage(&self) -> Stage {
        Stage::Preflight
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST | Phases::RESPONSE
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        Some(self.decide(request, ctx))
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        for name in [
            ACCESS_CONTROL_ALLOW_ORIGIN,
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            ACCESS_CONTROL_EXPOSE_HEADERS,
        ] {
            response.remove_header(&name);
        }
        if self.varies {
            add_vary(response, "Origin");
        }
        let Some(granted) = ctx.instance_state::<_, Granted>(self) else {
            return;
        };
        let mut set = |name: HeaderName, value: HeaderValue| {
            response.insert_header(name, value).ok();
        };
        set(
            ACCESS_CONTROL_ALLOW_ORIGIN,
            if self.any_origin && !self.credentials {
                HeaderValue::from_static("*")
            } else {
                granted.origin.clone()
            },
        );
        if self.credentials {
            set(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        let Some((method, headers)) = &granted.preflight else {
            if let Some(expose) = &self.expose_headers {
                set(ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
            }
            return;
        };
        for (name, allowed, asked, vary) in [
            (
                ACCESS_CONTROL_ALLOW_METHODS,
                &self.methods,
                method,
                "Access-Control-Request-Method",
            ),
            (
                ACCESS_CONTROL_ALLOW_HEADERS,
                &self.headers,
                headers,
                "Access-Control-Request-Headers",
            ),
        ] {
            let value = match allowed {
                Allowed::List(list) => list.clone(),
                Allowed::Reflect => {
                    add_vary(response, vary);
                    asked.clone()
                }
            };
            if let Some(value) = value {
                response.insert_header(name, value).ok();
            }
        }
        if let Some(max_age) = &self.max_age {
            response
                .insert_header(ACCESS_CONTROL_MAX_AGE, max_age.clone())
                .ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn build(config: serde_json::Value) -> Result<Cors, Vec<BuildError>> {
        Cors::build(
            serde_json::from_value(config).unwrap(),
            &BuildCtx::default(),
        )
    }

    /// The decision, and the headers the response phase wrote on a fresh 200 (or on the
    /// filter's own answer).
    fn exchange(
        filter: &Cors,
        method: &str,
        headers: &[(&str, &str)],
    ) -> (Decision, ResponseHeader) {
        let mut request = RequestHeader::build(method, b"/", None).unwrap();
        for (name, value) in headers {
            request
                .append_header(name.to_string(), value.to_string())
                .unwrap();
        }
        let mut ctx = RequestContext::new(Instant::now());
        let decision = filter.try_request(&mut request, &mut ctx).unwrap();
        let status = match &decision {
            Decision::Respond(response) => response.status,
            Decision::Reject(problem) => problem.status,
            Decision::Continue => 200,
        };
        let mut response = ResponseHeader::build(status, None).unwrap();
        response
            .insert_header("access-control-allow-origin", "https://upstream.example")
            .unwrap();
        filter.response(&mut response, &mut ctx);
        (decision, response)
    }

    fn header<'a>(response: &'a ResponseHeader, name: &str) -> Option<&'a str> {
        response
            .headers
            .get(name)
            .map(|value| value.to_str().unwrap())
    }

    fn site() -> Cors {
        build(serde_json::json!({
            "allow_origins": [
                "https://app.example.com",
                "*.example.org",
                "https://*.example.net:8443",
                {"regex": "https://tenant-[0-9]+\\.example\\.io"}
            ],
            "allow_methods": ["GET", "put"],
            "allow_headers": ["Content-Type", "X-Tenant"],
            "expose_headers": ["x-request-id"],
            "allow_credentials": true,
            "max_age": "10m",
        }))
        .unwrap()
    }

    #[test]
    fn origins_match_exactly_by_subdomain_or_by_anchored_regex() {
        let cors = site();
        for allowed in [
            "https://app.example.com",
            "HTTPS://APP.EXAMPLE.COM",
            "http://a.example.org",
            "https://a.b.example.org",
            "https://eu.example.net:8443",
            "https://tenant-42.example.io",
        ] {
            assert!(cors.allows(allowed), "{allowed}");
        }
        for refused in [
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.com.evil.test",
            "https://example.org",
            "https://evilexample.org",
            "ftp://a.example.org",
            "https://eu.example.net",
            "https://tenant-42.example.io.evil.test",
            "https://x.tenant-42.example.io",
            "null",
            "",
        ] {
            assert!(!cors.allows(refused), "{refused}");
        }
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_is_answered_with_204_and_the_policy() {
        let (decision, response) = exchange(
            &site(),
            "OPTIONS",
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "content-type"),
            ],
        );
        assert!(matches!(decision, Decision::Respond(ref answer) if answer.status == 204));
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(
            header(&response, "access-control-allow-credentials"),
            Some("true")
        );
        assert_eq!(
            header(&response, "access-control-allow-methods"),
            Some("GET, PUT")
        );
        assert_eq!(
            header(&response, "access-control-allow-headers"),
            Some("content-type, x-tenant")
        );
        assert_eq!(header(&response, "access-control-max-age"), Some("600"));
        assert_eq!(header(&response, "vary"), Some("Origin"));
        assert_eq!(header(&response, "access-control-expose-headers"), None);
    }

    #[test]
    fn a_disallowed_origin_gets_no_cors_headers() {
        let (decision, response) = exchange(
            &site(),
            "OPTIONS",
            &[
                ("origin", "https://evil.test"),
                ("access-control-request-method", "PUT"),
            ],
        );
        assert!(
            matches!(decision, Decision::Reject(ref problem) if problem.kind == ProblemType::OriginNotAllowed)
        );
        assert!(
            response
                .headers
                .keys()
                .all(|name| !name.as_str().starts_with("access-control-")),
            "{response:?}"
        );
        assert_eq!(header(&response, "vary"), Some("Origin"));

        // An actual request goes on, and its answer carries no CORS headers, not even the
        // upstream's.
        let (decision, response) = exchange(&site(), "GET", &[("origin", "https://evil.test")]);
        assert!(matches!(decision, Decision::Continue));
        assert_eq!(header(&response, "access-control-allow-origin"), None);
        assert_eq!(header(&response, "vary"), Some("Origin"));
    }

    #[test]
    fn actual_requests_from_allowed_origins_get_origin_and_exposed_headers() {
        let (decision, response) = exchange(&site(), "GET", &[("origin", "https://a.example.org")]);
        assert!(matches!(decision, Decision::Continue));
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            Some("https://a.example.org")
        );
        assert_eq!(
            header(&response, "access-control-expose-headers"),
            Some("x-request-id")
        );
        assert_eq!(header(&response, "access-control-allow-methods"), None);
        // An OPTIONS without Access-Control-Request-Method is not a preflight.
        let (decision, _) = exchange(&site(), "OPTIONS", &[("origin", "https://a.example.org")]);
        assert!(matches!(decision, Decision::Continue));
        // No origin: nothing to grant, but the answer still depends on the origin.
        let (_, response) = exchange(&site(), "GET", &[]);
        assert_eq!(header(&response, "access-control-allow-origin"), None);
        assert_eq!(header(&response, "vary"), Some("Origin"));
    }

    #[test]
    fn any_origin_answers_star_without_vary_and_star_lists_reflect_the_preflight() {
        let cors = build(serde_json::json!({
            "allow_origins": ["*"],
            "allow_methods": ["*"],
            "allow_headers": ["*"],
            "expose_headers": ["*"],
        }))
        .unwrap();
        let (_, response) = exchange(
            &cors,
            "OPTIONS",
            &[
                ("origin", "https://anyone.test"),
                ("access-control-request-method", "PATCH"),
                ("access-control-request-headers", "x-one, x-two"),
            ],
        );
        assert_eq!(header(&response, "access-control-allow-origin"), Some("*"));
        assert_eq!(
            header(&response, "access-control-allow-methods"),
            Some("PATCH")
        );
        assert_eq!(
            header(&response, "access-control-allow-headers"),
            Some("x-one, x-two")
        );
        let vary: Vec<_> = response.headers.get_all("vary").iter().collect();
        assert_eq!(
            vary,
            [
                "Access-Control-Request-Method",
                "Access-Control-Request-Headers"
            ]
        );
        let (_, response) = exchange(&cors, "GET", &[("origin", "https://anyone.test")]);
        assert_eq!(
            header(&response, "access-control-expose-headers"),
            Some("*")
        );
        assert_eq!(header(&response, "vary"), None);
    }

    #[test]
    fn config_errors_name_their_paths() {
        let errors = build(serde_json::json!({
            "allow_origins": [
                "*",
                "https://app.example.com/",
                "app.example.com",
                "https://*.",
                "https://a.*.example.com",
                {"regex": "https://(unclosed"}
            ],
            "allow_methods": ["GET", "BAD METHOD"],
            "allow_headers": ["x ok"],
            "expose_headers": ["*"],
            "allow_credentials": true,
            "max_age": "soon",
        }))
        .err()
        .unwrap();
        let paths: Vec<_> = errors.iter().map(|error| error.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "allow_origins[0]",
                "allow_origins[1]",
                "allow_origins[2]",
                "allow_origins[3]",
                "allow_origins[4]",
                "allow_origins[5].regex",
                "allow_methods[1]",
                "allow_headers[0]",
                "expose_headers",
                "max_age"
            ]
        );
        assert!(
            errors[0].message.contains("allow_credentials"),
            "{errors:?}"
        );
        let errors = build(serde_json::json!({})).err().unwrap();
        assert_eq!(errors[0].path, "allow_origins");
    }
}
