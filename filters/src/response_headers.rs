//! `response_headers`: the older name of the `headers` filter's response half. Its config is a
//! `headers` `response:` section (set, add, append, remove, rename), given at the top level,
//! and it behaves exactly as `headers` with only that section.

use async_trait::async_trait;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::headers::{Headers, Operations, Section, Side};
use crate::{BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, RequestContext};

pub use crate::headers::Section as Config;

pub struct ResponseHeaders(Headers);

impl FilterKind for ResponseHeaders {
    const KIND: &'static str = "response_headers";
    type Config = Section;

    fn build(config: Section, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        let response = Operations::build("", Side::Response, &config, ctx, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(ResponseHeaders(Headers::new(
            Self::KIND,
            Operations::default(),
            response,
        )))
    }
}

#[async_trait]
impl Filter for ResponseHeaders {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn phases(&self) -> Phases {
        self.0.phases()
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        self.0.try_request(request, ctx)
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        self.0.response(response, ctx);
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
        assert_eq!(filter.kind(), "response_headers");
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
