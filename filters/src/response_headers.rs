//! `response_headers`: set, add and remove response headers, with values templated from the
//! request. The worked example of a multi-phase filter: request headers a template reads are
//! captured in the request phase (the upstream may not see them unchanged), and the response
//! phase renders and applies the operations.

use std::collections::BTreeMap;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use pingora_http::{RequestHeader, ResponseHeader};
use serde::Deserialize;

use crate::template::Template;
use crate::{BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, RequestContext};

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Headers to set, replacing any the upstream sent. Values may use `${...}` variables.
    pub set: BTreeMap<String, String>,
    /// Headers to append, keeping any the upstream sent.
    pub add: BTreeMap<String, String>,
    /// Headers to remove from the response.
    pub remove: Vec<String>,
}

struct Operation {
    name: HeaderName,
    value: Template,
    /// Set when the value has no variables, so the hot path skips rendering.
    literal: Option<HeaderValue>,
    replace: bool,
}

pub struct ResponseHeaders {
    operations: Vec<Operation>,
    remove: Vec<HeaderName>,
    /// Request headers the templates read, captured in the request phase.
    captured: Vec<HeaderName>,
}

/// Captured request header values, per filter instance (a chain may hold several).
#[derive(Clone, Default)]
struct Captured(Vec<(usize, Vec<Option<String>>)>);

impl ResponseHeaders {
    fn instance_id(&self) -> usize {
        self as *const Self as usize
    }
}

fn header_name(path: String, name: &str, errors: &mut Vec<BuildError>) -> Option<HeaderName> {
    match HeaderName::from_bytes(name.as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            errors.push(BuildError::new(
                path,
                format!("\"{name}\" is not a valid header name"),
            ));
            None
        }
    }
}

impl FilterKind for ResponseHeaders {
    const KIND: &'static str = "response_headers";
    type Config = Config;

    fn build(config: Config, _ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        let mut operations = Vec::new();
        for (section, replace, entries) in [("set", true, &config.set), ("add", false, &config.add)]
        {
            for (name, value) in entries {
                let path = format!("{section}.{name}");
                let Some(header) = header_name(path.clone(), name, &mut errors) else {
                    continue;
                };
                match Template::parse(value) {
                    Ok(template) => {
                        let literal = match template.as_literal() {
                            Some(text) => match HeaderValue::from_str(text) {
                                Ok(value) => Some(value),
                                Err(_) => {
                                    errors.push(BuildError::new(
                                        path,
                                        "not a valid header value".to_string(),
                                    ));
                                    continue;
                                }
                            },
                            None => None,
                        };
                        operations.push(Operation {
                            name: header,
                            value: template,
                            literal,
                            replace,
                        });
                    }
                    Err(message) => errors.push(BuildError::new(path, message)),
                }
            }
        }
        let remove = config
            .remove
            .iter()
            .enumerate()
            .filter_map(|(index, name)| header_name(format!("remove[{index}]"), name, &mut errors))
            .collect();
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut captured: Vec<HeaderName> = Vec::new();
        for operation in &operations {
            for name in operation.value.request_headers() {
                if !captured.contains(name) {
                    captured.push(name.clone());
                }
            }
        }
        Ok(ResponseHeaders {
            operations,
            remove,
            captured,
        })
    }
}

impl ResponseHeaders {
    /// Keeps the request headers the templates read, for the response phase.
    fn capture(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        if self.captured.is_empty() {
            return Decision::Continue;
        }
        let values = self
            .captured
            .iter()
            .map(|name| crate::template::request_header(request, name).map(str::to_owned))
            .collect();
        let mut captured = ctx.state.remove::<Captured>().unwrap_or_default();
        captured.0.push((self.instance_id(), values));
        ctx.state.insert(captured);
        Decision::Continue
    }
}

#[async_trait]
impl Filter for ResponseHeaders {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn phases(&self) -> Phases {
        if self.captured.is_empty() {
            Phases::RESPONSE
        } else {
            Phases::REQUEST | Phases::RESPONSE
        }
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        Some(self.capture(request, ctx))
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        for name in &self.remove {
            response.remove_header(name);
        }
        let captured = if self.captured.is_empty() {
            None
        } else {
            ctx.state.get::<Captured>().and_then(|captured| {
                captured
                    .0
                    .iter()
                    .find(|(id, _)| *id == self.instance_id())
                    .map(|(_, values)| values.clone())
            })
        };
        for operation in &self.operations {
            let value = match &operation.literal {
                Some(value) => value.clone(),
                None => {
                    let text = operation.value.render(ctx, |name| {
                        let index = self.captured.iter().position(|known| known == name)?;
                        captured.as_ref()?.get(index)?.as_deref()
                    });
                    match HeaderValue::from_str(&text) {
                        Ok(value) => value,
                        Err(_) => continue,
                    }
                }
            };
            if operation.replace {
                response.insert_header(operation.name.clone(), value).ok();
            } else {
                response.append_header(operation.name.clone(), value).ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn build(yaml: serde_json::Value) -> Result<ResponseHeaders, Vec<BuildError>> {
        ResponseHeaders::build(serde_json::from_value(yaml).unwrap(), &BuildCtx::default())
    }

    #[tokio::test]
    async fn sets_adds_removes_and_renders_captured_request_headers() {
        let filter = build(serde_json::json!({
            "set": {"x-served-by": "gatehouse", "x-tenant": "t=${request.header.x-tenant}"},
            "add": {"x-route": "${route}"},
            "remove": ["server"],
        }))
        .unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        ctx.route = Some("users".into());
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        request.insert_header("x-tenant", "acme").unwrap();
        filter.request(&mut request, &mut ctx).await;
        // The upstream request may lose the header; the captured value is what counts.
        request.remove_header("x-tenant");

        let mut response = ResponseHeader::build(200, None).unwrap();
        response.insert_header("server", "upstream").unwrap();
        response.insert_header("x-served-by", "upstream").unwrap();
        response.insert_header("x-route", "upstream-route").unwrap();
        filter.response(&mut response, &mut ctx);

        assert!(response.headers.get("server").is_none());
        assert_eq!(response.headers["x-served-by"], "gatehouse");
        assert_eq!(response.headers["x-tenant"], "t=acme");
        let routes: Vec<_> = response.headers.get_all("x-route").iter().collect();
        assert_eq!(routes, ["upstream-route", "users"]);
    }

    #[test]
    fn reports_every_bad_entry() {
        let errors = build(serde_json::json!({
            "set": {"bad name": "x", "x-ok": "${nope}"},
            "remove": ["also bad"],
        }))
        .err()
        .unwrap();
        let paths: Vec<_> = errors.iter().map(|error| error.path.as_str()).collect();
        assert_eq!(paths, ["set.bad name", "set.x-ok", "remove[0]"]);
    }
}
