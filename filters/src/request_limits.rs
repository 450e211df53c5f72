//! `request_limits`: what a route accepts, checked before authentication: its methods (405 with
//! `Allow`), the size of a request body (413, from `Content-Length` up front or counted as a
//! chunked body streams), and the content types of request bodies (415).

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, Method};
use pingora_http::RequestHeader;
use serde::Deserialize;

use crate::units::ByteSize;
use crate::{
    BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, Problem, ProblemType,
    RequestContext, Stage,
};

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The largest request body this route accepts, at most the server's
    /// `limits.max_body_bytes`. Larger: 413.
    pub max_body_bytes: Option<ByteSize>,
    /// The methods this route accepts (`[GET, POST]`). Others: 405 with `Allow`.
    pub methods: Vec<String>,
    /// The media types a request body may have: `application/json`, `text/*`,
    /// `application/*+json` or `*/*`; parameters such as `charset` are not compared. A request
    /// with a body of another type, or of none: 415. Requests without a body are not checked.
    pub content_types: Vec<String>,
}

/// One accepted media range, lower case.
#[derive(Debug, PartialEq, Eq)]
enum MediaRange {
    /// `type/subtype`.
    Exact(String),
    /// `type/*`.
    AnySubtype(String),
    /// `type/*+suffix`: the type and `+suffix`.
    Suffix(String, String),
    /// `*/*`.
    Any,
}

impl MediaRange {
    fn parse(text: &str) -> Option<MediaRange> {
        let text = text.trim().to_ascii_lowercase();
        let (kind, subtype) = text.split_once('/')?;
        let token = |part: &str| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&byte))
        };
        match (kind, subtype) {
            ("*", "*") => Some(MediaRange::Any),
            (kind, "*") if token(kind) => Some(MediaRange::AnySubtype(kind.to_string())),
            (kind, subtype) if token(kind) => match subtype.strip_prefix("*+") {
                Some(suffix) if token(suffix) => {
                    Some(MediaRange::Suffix(kind.to_string(), format!("+{suffix}")))
                }
                Some(_) => None,
                None if token(subtype) => Some(MediaRange::Exact(text.clone())),
                None => None,
            },
            _ => None,
        }
    }

    /// Whether `media_type` (lower case `type/subtype`, without parameters) is in this range.
    fn contains(&self, media_type: &str) -> bool {
        match self {
            MediaRange::Any => true,
            MediaRange::Exact(exact) => exact == media_type,
            MediaRange::AnySubtype(kind) => media_type
                .split_once('/')
                .is_some_and(|(given, _)| given == kind),
            MediaRange::Suffix(kind, suffix) => {
                media_type.split_once('/').is_some_and(|(given, subtype)| {
                    given == kind && subtype.len() > suffix.len() && subtype.ends_with(suffix)
                })
            }
        }
    }
}

pub struct RequestLimits {
    max_body_bytes: Option<u64>,
    methods: Vec<Method>,
    /// The `Allow` header of a 405.
    allow: Option<HeaderValue>,
    content_types: Vec<MediaRange>,
    /// The accepted types as written, for the 415's detail.
    accepted: String,
}

impl FilterKind for RequestLimits {
    const KIND: &'static str = "request_limits";
    type Config = Config;

    fn build(config: Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        if config.max_body_bytes.is_none()
            && config.methods.is_empty()
            && config.content_types.is_empty()
        {
            errors.push(BuildError::new(
                "",
                "give `max_body_bytes`, `methods` or `content_types`",
            ));
        }
        let max_body_bytes = config.max_body_bytes.map(|size| size.0);
        if let (Some(limit), Some(server)) = (max_body_bytes, ctx.server_max_body_bytes) {
            if limit > server {
                errors.push(BuildError::new(
                    "max_body_bytes",
                    format!(
                        "{} is above the server's limits.max_body_bytes ({}), which refuses larger bodies first; give at most that",
                        ByteSize(limit),
                        ByteSize(server)
                    ),
                ));
            }
        }
        let mut methods: Vec<Method> = Vec::new();
        for (index, method) in config.methods.iter().enumerate() {
            match Method::from_bytes(method.trim().to_ascii_uppercase().as_bytes()) {
                Ok(method) if !methods.contains(&method) => methods.push(method),
                Ok(_) => {}
                Err(_) => errors.push(BuildError::new(
                    format!("methods[{index}]"),
                    format!("\"{method}\" is not an HTTP method"),
                )),
            }
        }
        let mut content_types = Vec::new();
        for (index, text) in config.content_types.iter().enumerate() {
            match MediaRange::parse(text) {
                Some(range) => content_types.push(range),
                None => errors.push(BuildError::new(
                    format!("content_types[{index}]"),
                    format!(
                        "\"{text}\" is not a media type like \"application/json\", \"text/*\" or \"application/*+json\" (without parameters)"
                    ),
                )),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let allow = (!methods.is_empty()).then(|| {
            let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
            HeaderValue::from_str(&list.join(", ")).expect("method names are header-safe")
        });
        Ok(RequestLimits {
            max_body_bytes,
            methods,
            allow,
            content_types,
            accepted: config
                .content_types
                .iter()
                .map(|text| text.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// Whether the request carries a body: a `Content-Length` above zero, or any
/// `Transfer-Encoding` (a chunked body declares no length).
fn has_body(request: &RequestHeader, declared: Option<u64>) -> bool {
    declared.is_some_and(|length| length > 0)
        || request
            .headers
            .contains_key(http::header::TRANSFER_ENCODING)
}

impl RequestLimits {
    fn check(&self, request: &RequestHeader) -> Result<(), Problem> {
        if let Some(allow) = &self.allow {
            if !self.methods.contains(&request.method) {
                return Err(Problem::new(ProblemType::MethodNotAllowed)
                    .header(http::header::ALLOW, allow.clone()));
            }
        }
        let declared = request
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok());
        if let Some(limit) = self.max_body_bytes {
            if declared.is_some_and(|length| length > limit) {
                return Err(Problem::new(ProblemType::ContentTooLarge)
                    .detail(format!("This route accepts bodies up to {limit} bytes")));
            }
        }
        if !self.content_types.is_empty() && has_body(request, declared) {
            let mut given = request.headers.get_all(http::header::CONTENT_TYPE).iter();
            let media_type = match (given.next(), given.next()) {
                // Two content types are ambiguous: the upstream might read either.
                (Some(value), None) => value.to_str().ok().map(|value| {
                    value
                        .split(';')
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .to_ascii_lowercase()
                }),
                _ => None,
            };
            let accepted = media_type.is_some_and(|media_type| {
                self.content_types
                    .iter()
                    .any(|range| range.contains(&media_type))
            });
            if !accepted {
                return Err(Problem::new(ProblemType::UnsupportedMediaType)
                    .detail(format!("Accepted content types: {}", self.accepted)));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Filter for RequestLimits {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn stage(&self) -> Stage {
        Stage::Admission
    }

    fn phases(&self) -> Phases {
        if self.max_body_bytes.is_some() {
            Phases::REQUEST | Phases::REQUEST_BODY
        } else {
            Phases::REQUEST
        }
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        _ctx: &mut RequestContext,
    ) -> Option<Decision> {
        Some(match self.check(request) {
            Ok(()) => Decision::Continue,
            Err(problem) => Decision::Reject(problem),
        })
    }

    /// A body without a declared length is counted as it streams (the proxy counts the bytes).
    fn request_body(
        &self,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestContext,
    ) -> Result<(), Problem> {
        match self.max_body_bytes {
            Some(limit) if ctx.request_body_bytes > limit => {
                Err(Problem::new(ProblemType::ContentTooLarge)
                    .detail(format!("This route accepts bodies up to {limit} bytes")))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn build_with(
        config: serde_json::Value,
        server: Option<u64>,
    ) -> Result<RequestLimits, Vec<BuildError>> {
        let ctx = BuildCtx {
            server_max_body_bytes: server,
            ..BuildCtx::default()
        };
        RequestLimits::build(serde_json::from_value(config).unwrap(), &ctx)
    }

    fn build(config: serde_json::Value) -> RequestLimits {
        build_with(config, Some(10 << 20)).unwrap()
    }

    fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build(method, b"/", None).unwrap();
        for (name, value) in headers {
            request
                .append_header(name.to_string(), value.to_string())
                .unwrap();
        }
        request
    }

    fn status(filter: &RequestLimits, request: &RequestHeader) -> Option<u16> {
        filter.check(request).err().map(|problem| problem.status)
    }

    #[test]
    fn other_methods_get_405_with_allow() {
        let filter = build(serde_json::json!({"methods": ["get", "POST", "GET"]}));
        assert_eq!(status(&filter, &request("GET", &[])), None);
        assert_eq!(status(&filter, &request("POST", &[])), None);
        let problem = filter.check(&request("DELETE", &[])).unwrap_err();
        assert_eq!(problem.status, 405);
        assert_eq!(problem.kind, ProblemType::MethodNotAllowed);
        assert_eq!(
            problem.headers,
            [(http::header::ALLOW, HeaderValue::from_static("GET, POST"))]
        );
    }

    #[test]
    fn declared_and_streamed_bodies_over_the_limit_get_413() {
        let filter = build(serde_json::json!({"max_body_bytes": "1KiB"}));
        assert_eq!(
            status(&filter, &request("POST", &[("content-length", "1024")])),
            None
        );
        assert_eq!(
            status(&filter, &request("POST", &[("content-length", "1025")])),
            Some(413)
        );
        let mut ctx = RequestContext::new(Instant::now());
        ctx.request_body_bytes = 1024;
        assert!(filter.request_body(&mut None, false, &mut ctx).is_ok());
        ctx.request_body_bytes = 1025;
        let problem = filter.request_body(&mut None, false, &mut ctx).unwrap_err();
        assert_eq!(problem.status, 413);
        assert!(filter.phases().contains(Phases::REQUEST_BODY));
        let no_size = build(serde_json::json!({"methods": ["GET"]}));
        assert!(!no_size.phases().contains(Phases::REQUEST_BODY));
    }

    #[test]
    fn bodies_of_other_types_get_415() {
        let filter = build(serde_json::json!({
            "content_types": ["application/json", "text/*", "application/*+json"]
        }));
        let with_body = |content_type: &str| {
            status(
                &filter,
                &request(
                    "POST",
                    &[("content-length", "2"), ("content-type", content_type)],
                ),
            )
        };
        assert_eq!(with_body("application/json"), None);
        assert_eq!(with_body("Application/JSON; charset=utf-8"), None);
        assert_eq!(with_body("text/csv"), None);
        assert_eq!(with_body("application/problem+json"), None);
        assert_eq!(with_body("application/xml"), Some(415));
        assert_eq!(with_body("application/+json"), Some(415));
        assert_eq!(with_body("application/jsonx"), Some(415));
        // No type, or two.
        assert_eq!(
            status(&filter, &request("POST", &[("content-length", "2")])),
            Some(415)
        );
        assert_eq!(
            status(
                &filter,
                &request(
                    "POST",
                    &[
                        ("transfer-encoding", "chunked"),
                        ("content-type", "application/json"),
                        ("content-type", "application/xml"),
                    ],
                ),
            ),
            Some(415)
        );
        // A chunked body is a body; no body is not checked.
        assert_eq!(
            status(
                &filter,
                &request(
                    "POST",
                    &[
                        ("transfer-encoding", "chunked"),
                        ("content-type", "image/png")
                    ]
                )
            ),
            Some(415)
        );
        assert_eq!(status(&filter, &request("GET", &[])), None);
        assert_eq!(
            status(&filter, &request("POST", &[("content-length", "0")])),
            None
        );
    }

    #[test]
    fn config_errors_name_their_paths() {
        let errors = build_with(
            serde_json::json!({
                "max_body_bytes": "20MiB",
                "methods": ["GET", "G E T"],
                "content_types": ["application/json", "json", "text/html; charset=utf-8", "*/json"],
            }),
            Some(10 << 20),
        )
        .err()
        .unwrap();
        let paths: Vec<_> = errors.iter().map(|error| error.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "max_body_bytes",
                "methods[1]",
                "content_types[1]",
                "content_types[2]",
                "content_types[3]"
            ]
        );
        assert!(errors[0].message.contains("10MiB"), "{errors:?}");
        // At the server's limit is fine; nothing at all is not.
        assert!(build_with(
            serde_json::json!({"max_body_bytes": "10MiB"}),
            Some(10 << 20)
        )
        .is_ok());
        let errors = build_with(serde_json::json!({}), None).err().unwrap();
        assert_eq!(errors[0].path, "");
    }
}
