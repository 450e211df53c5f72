//! Responses a filter (or the proxy) answers with itself, and RFC 9457 problem documents.

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

/// A complete response written by Gatehouse instead of the upstream.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl Response {
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
}

/// An RFC 9457 `application/problem+json` error. Its `type` is stable, so clients can branch on
/// it; its text never carries internals or secrets.
#[derive(Clone, Debug)]
pub struct Problem {
    pub status: u16,
    /// The stable slug; rendered as `urn:gatehouse:problem:<slug>`.
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: Option<String>,
    /// Extra response headers, e.g. `WWW-Authenticate`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Problem {
    pub fn new(status: u16, slug: &'static str, title: &'static str) -> Self {
        Problem {
            status,
            slug,
            title,
            detail: None,
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 401 for a credential that was given but is not valid (RFC 6750 `invalid_token`). The
    /// answer never says which check failed.
    pub fn invalid_token() -> Self {
        Problem::new(401, "unauthorized", "Authentication failed").header(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"gatehouse\", error=\"invalid_token\""),
        )
    }

    /// 401 for a request that carried no credential where one is required.
    pub fn credentials_required() -> Self {
        Problem::new(401, "unauthorized", "Authentication required").header(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"gatehouse\""),
        )
    }

    /// 403: the caller is known but not allowed (RFC 6750 `insufficient_scope`).
    pub fn forbidden() -> Self {
        Problem::new(403, "forbidden", "Not allowed").header(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"gatehouse\", error=\"insufficient_scope\""),
        )
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The JSON body of this problem for the given request.
    pub fn to_json(&self, request_id: &str) -> String {
        let mut body = serde_json::json!({
            "type": format!("urn:gatehouse:problem:{}", self.slug),
            "title": self.title,
            "status": self.status,
            "request_id": request_id,
        });
        if let Some(detail) = &self.detail {
            body["detail"] = serde_json::Value::String(detail.clone());
        }
        body.to_string()
    }

    /// The whole response, with its content type and the request id header.
    pub fn into_response(self, request_id: &str) -> Response {
        let body = self.to_json(request_id);
        let mut response = Response::new(self.status);
        response.headers = self.headers;
        let mut response = response.header(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Ok(value) = HeaderValue::from_str(request_id) {
            response = response.header(HeaderName::from_static("x-request-id"), value);
        }
        response.body(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_renders_rfc9457_fields_and_request_id() {
        let response = Problem::new(404, "route-not-found", "No route matches this request")
            .detail("GET /nowhere")
            .into_response("abc");
        assert_eq!(response.status, 404);
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["type"], "urn:gatehouse:problem:route-not-found");
        assert_eq!(body["status"], 404);
        assert_eq!(body["request_id"], "abc");
        assert_eq!(body["detail"], "GET /nowhere");
        assert!(response
            .headers
            .iter()
            .any(|(name, value)| name == "content-type" && value == "application/problem+json"));
    }
}
