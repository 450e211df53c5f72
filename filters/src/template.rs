//! Header value templates such as `"${consumer.id}"` or `"${request.header.x-tenant}/v1"`,
//! parsed once when a filter is built and rendered per request without reparsing.

use crate::RequestContext;
use pingora_http::RequestHeader;

/// A value known only at request time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Variable {
    RequestId,
    Route,
    Upstream,
    ClientIp,
    ConsumerId,
    Status,
    LatencyMs,
    RequestHeader(http::HeaderName),
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

pub const VARIABLES: &str = "request_id, route, upstream, client_ip, consumer.id, status, \
latency_ms, request.header.NAME";

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
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
            let variable = match name {
                "request_id" => Variable::RequestId,
                "route" => Variable::Route,
                "upstream" => Variable::Upstream,
                "client_ip" => Variable::ClientIp,
                "consumer.id" => Variable::ConsumerId,
                "status" => Variable::Status,
                "latency_ms" => Variable::LatencyMs,
                other => match other.strip_prefix("request.header.") {
                    Some(header) => Variable::RequestHeader(
                        http::HeaderName::from_bytes(header.as_bytes())
                            .map_err(|_| format!("\"{header}\" is not a valid header name"))?,
                    ),
                    None => {
                        return Err(format!(
                            "unknown variable \"${{{other}}}\" (known: {VARIABLES})"
                        ))
                    }
                },
            };
            parts.push(Part::Variable(variable));
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

    /// The request headers this template reads.
    pub fn request_headers(&self) -> impl Iterator<Item = &http::HeaderName> {
        self.parts.iter().filter_map(|part| match part {
            Part::Variable(Variable::RequestHeader(name)) => Some(name),
            _ => None,
        })
    }

    /// Render with the request context; `header` looks up request header values (which may have
    /// been captured in an earlier phase).
    pub fn render<'a>(
        &self,
        ctx: &mut RequestContext,
        header: impl Fn(&http::HeaderName) -> Option<&'a str>,
    ) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Variable(variable) => match variable {
                    Variable::RequestId => out.push_str(ctx.request_id()),
                    Variable::Route => out.push_str(ctx.route.as_deref().unwrap_or("")),
                    Variable::Upstream => out.push_str(ctx.upstream.as_deref().unwrap_or("")),
                    Variable::ClientIp => {
                        if let Some(ip) = ctx.client_addr {
                            out.push_str(&ip.to_string())
                        }
                    }
                    Variable::ConsumerId => {
                        if let Some(consumer) = &ctx.consumer {
                            out.push_str(&consumer.id)
                        }
                    }
                    Variable::Status => {
                        if let Some(status) = ctx.status {
                            out.push_str(&status.to_string())
                        }
                    }
                    Variable::LatencyMs => {
                        out.push_str(&ctx.started.elapsed().as_millis().to_string())
                    }
                    Variable::RequestHeader(name) => {
                        if let Some(value) = header(name) {
                            out.push_str(value)
                        }
                    }
                },
            }
        }
        out
    }
}

/// Look up a request header as text.
pub fn request_header<'a>(request: &'a RequestHeader, name: &http::HeaderName) -> Option<&'a str> {
    request
        .headers
        .get(name)
        .and_then(|value| value.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
            .contains("unknown variable"));
        assert!(Template::parse("${route").unwrap_err().contains("unclosed"));
    }

    #[test]
    fn plain_text_is_literal() {
        assert_eq!(
            Template::parse("gatehouse").unwrap().as_literal(),
            Some("gatehouse")
        );
    }
}
