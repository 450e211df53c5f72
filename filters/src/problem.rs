//! Responses a filter (or the proxy) answers with itself, and the catalogue of RFC 9457 problem
//! types Gatehouse answers with: each type's slug, status and title are declared here, once.

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

/// Every kind of problem Gatehouse answers with. The slug is the stable part of the `type`
/// (`urn:gatehouse:problem:<slug>`) that clients branch on; the title never changes between
/// occurrences of a type (RFC 9457 section 3.1.3), so what varies goes into `detail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProblemType {
    InvalidPath,
    BadRequest,
    UpgradeNotAllowed,
    Unauthorized,
    LoginFailed,
    Forbidden,
    AddressNotAllowed,
    OriginNotAllowed,
    RouteNotFound,
    MethodNotAllowed,
    ContentTooLarge,
    UriTooLong,
    UnsupportedMediaType,
    RateLimited,
    HeaderFieldsTooLarge,
    /// A failure Pingora reported with its own status; the problem carries that status.
    Error,
    /// A gRPC service a `grpc_json` filter transcodes for answered with an error status; the
    /// problem carries the HTTP status of that gRPC code.
    GrpcError,
    InternalError,
    /// A plugin (a `wasm` filter) failed on the request and its fail policy is `closed`.
    PluginFailed,
    UpstreamUnavailable,
    AuthUnavailable,
    RateLimitUnavailable,
    ConfigNotLoaded,
    NoHealthyUpstream,
    CircuitOpen,
    UpstreamTimeout,
}

impl ProblemType {
    /// The whole catalogue, in status order.
    pub const ALL: &'static [ProblemType] = &[
        ProblemType::InvalidPath,
        ProblemType::BadRequest,
        ProblemType::UpgradeNotAllowed,
        ProblemType::Unauthorized,
        ProblemType::LoginFailed,
        ProblemType::Forbidden,
        ProblemType::AddressNotAllowed,
        ProblemType::OriginNotAllowed,
        ProblemType::RouteNotFound,
        ProblemType::MethodNotAllowed,
        ProblemType::ContentTooLarge,
        ProblemType::UriTooLong,
        ProblemType::UnsupportedMediaType,
        ProblemType::RateLimited,
        ProblemType::HeaderFieldsTooLarge,
        ProblemType::Error,
        ProblemType::GrpcError,
        ProblemType::InternalError,
        ProblemType::PluginFailed,
        ProblemType::UpstreamUnavailable,
        ProblemType::AuthUnavailable,
        ProblemType::RateLimitUnavailable,
        ProblemType::ConfigNotLoaded,
        ProblemType::NoHealthyUpstream,
        ProblemType::CircuitOpen,
        ProblemType::UpstreamTimeout,
    ];

    /// (slug, status, title).
    const fn describe(self) -> (&'static str, u16, &'static str) {
        match self {
            ProblemType::InvalidPath => ("invalid-path", 400, "The request path is not acceptable"),
            ProblemType::BadRequest => ("bad-request", 400, "The request could not be read"),
            ProblemType::UpgradeNotAllowed => (
                "upgrade-not-allowed",
                400,
                "This route does not accept this protocol upgrade",
            ),
            ProblemType::Unauthorized => ("unauthorized", 401, "Authentication failed"),
            ProblemType::LoginFailed => ("login-failed", 401, "The login could not be completed"),
            ProblemType::Forbidden => ("forbidden", 403, "Not allowed"),
            ProblemType::AddressNotAllowed => (
                "address-not-allowed",
                403,
                "The client address is not allowed",
            ),
            ProblemType::OriginNotAllowed => (
                "origin-not-allowed",
                403,
                "The origin is not allowed to make cross-origin requests",
            ),
            ProblemType::RouteNotFound => ("route-not-found", 404, "No route matches this request"),
            ProblemType::MethodNotAllowed => (
                "method-not-allowed",
                405,
                "The method is not allowed on this route",
            ),
            ProblemType::ContentTooLarge => {
                ("content-too-large", 413, "The request body is too large")
            }
            ProblemType::UriTooLong => ("uri-too-long", 414, "The request target is too long"),
            ProblemType::UnsupportedMediaType => (
                "unsupported-media-type",
                415,
                "The request body's content type is not accepted",
            ),
            ProblemType::RateLimited => ("rate-limited", 429, "Too many requests"),
            ProblemType::HeaderFieldsTooLarge => (
                "header-fields-too-large",
                431,
                "The request header fields are too large",
            ),
            ProblemType::Error => ("error", 500, "The request failed"),
            ProblemType::GrpcError => {
                ("grpc-error", 500, "The gRPC service answered with an error")
            }
            ProblemType::InternalError => (
                "internal-error",
                500,
                "The gateway failed to handle the request",
            ),
            ProblemType::PluginFailed => ("plugin-failed", 500, "A plugin failed on this request"),
            ProblemType::UpstreamUnavailable => (
                "upstream-unavailable",
                502,
                "The upstream could not be reached or failed",
            ),
            ProblemType::AuthUnavailable => (
                "auth-unavailable",
                503,
                "The authentication service did not answer in time",
            ),
            ProblemType::RateLimitUnavailable => (
                "rate-limit-unavailable",
                503,
                "The rate limit could not be checked",
            ),
            ProblemType::ConfigNotLoaded => (
                "config-not-loaded",
                503,
                "This node has not loaded its routes yet",
            ),
            ProblemType::NoHealthyUpstream => (
                "no-healthy-upstream",
                503,
                "No upstream target is available",
            ),
            ProblemType::CircuitOpen => (
                "circuit-open",
                503,
                "The upstream is not taking requests right now",
            ),
            ProblemType::UpstreamTimeout => (
                "upstream-timeout",
                504,
                "The upstream did not answer in time",
            ),
        }
    }

    pub const fn slug(self) -> &'static str {
        self.describe().0
    }

    /// The status answered with; for [`ProblemType::Error`] and [`ProblemType::GrpcError`], the
    /// default when the failure carries none.
    pub const fn status(self) -> u16 {
        self.describe().1
    }

    pub const fn title(self) -> &'static str {
        self.describe().2
    }

    /// The `type` URI of the problem document.
    pub fn uri(self) -> String {
        format!("urn:gatehouse:problem:{}", self.slug())
    }
}

/// An RFC 9457 `application/problem+json` error. Its `type` is stable, so clients can branch on
/// it; its text never carries internals or secrets.
#[derive(Clone, Debug)]
pub struct Problem {
    pub kind: ProblemType,
    pub status: u16,
    pub detail: Option<String>,
    /// Extra response headers, e.g. `WWW-Authenticate`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// An answer written whole by a plugin (a proxy-wasm local response), sent in place of the
    /// problem document from a phase that can only answer with a problem.
    pub answer: Option<Box<Response>>,
    /// Extension members of the document (RFC 9457 section 3.2), written after the standard
    /// ones; a member named like a standard one is left out.
    pub members: Vec<(String, serde_json::Value)>,
}

impl Problem {
    pub fn new(kind: ProblemType) -> Self {
        Problem {
            kind,
            status: kind.status(),
            detail: None,
            headers: Vec::new(),
            answer: None,
            members: Vec::new(),
        }
    }

    /// `response` itself, sent as is (with the request id header added) where a problem is
    /// expected.
    pub fn answer(response: Response) -> Self {
        Problem {
            status: response.status,
            answer: Some(Box::new(response)),
            ..Problem::new(ProblemType::Error)
        }
    }

    /// A failure reported with a status of its own (a [`ProblemType::Error`]).
    pub fn failure(status: u16) -> Self {
        Problem {
            status,
            ..Problem::new(ProblemType::Error)
        }
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 401 for a credential that was given but is not valid (RFC 6750 `invalid_token`). The
    /// answer never says which check failed.
    pub fn invalid_token() -> Self {
        Problem::new(ProblemType::Unauthorized).header(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"gatehouse\", error=\"invalid_token\""),
        )
    }

    /// 401 for a request that carried no credential where one is required.
    pub fn credentials_required() -> Self {
        Problem::new(ProblemType::Unauthorized)
            .detail("This route requires credentials")
            .header(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"gatehouse\""),
            )
    }

    /// 403: the caller is known but not allowed (RFC 6750 `insufficient_scope`).
    pub fn forbidden() -> Self {
        Problem::new(ProblemType::Forbidden).header(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"gatehouse\", error=\"insufficient_scope\""),
        )
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds an extension member to the document.
    pub fn member(mut self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.members.push((name.into(), value.into()));
        self
    }

    /// The JSON body of this problem for the given request.
    pub fn to_json(&self, request_id: &str) -> String {
        let mut body = serde_json::json!({
            "type": self.kind.uri(),
            "title": self.kind.title(),
            "status": self.status,
            "request_id": request_id,
        });
        if let Some(detail) = &self.detail {
            body["detail"] = serde_json::Value::String(detail.clone());
        }
        if let serde_json::Value::Object(standard) = &mut body {
            for (name, value) in &self.members {
                if !standard.contains_key(name) {
                    standard.insert(name.clone(), value.clone());
                }
            }
        }
        body.to_string()
    }

    /// The whole response, with its content type and the request id in `id_header` (the header
    /// the request id travels in on this gateway).
    pub fn into_response(self, request_id: &str, id_header: &HeaderName) -> Response {
        if let Some(answer) = self.answer {
            let mut answer = *answer;
            if let Ok(value) = HeaderValue::from_str(request_id) {
                answer.headers.push((id_header.clone(), value));
            }
            return answer;
        }
        let body = self.to_json(request_id);
        let mut response = Response::new(self.status);
        response.headers = self.headers;
        let mut response = response.header(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Ok(value) = HeaderValue::from_str(request_id) {
            response = response.header(id_header.clone(), value);
        }
        response.body(body)
    }
}

impl Problem {
    /// The answer to a gRPC client (a request whose `content-type` is `application/grpc*`): a
    /// trailers-only response, HTTP 200 with `grpc-status` and `grpc-message` in its head and no
    /// body, the status being the gRPC code of the problem's HTTP status. `content_type` is the
    /// flavour the client speaks (`application/grpc`, `application/grpc-web+proto`, ...). A
    /// plugin's own answer is sent as it is.
    pub fn into_grpc_response(
        self,
        request_id: &str,
        id_header: &HeaderName,
        content_type: &'static str,
    ) -> (Response, crate::grpc::Code) {
        let code = crate::grpc::Code::for_http_status(self.status);
        if self.answer.is_some() {
            return (self.into_response(request_id, id_header), code);
        }
        let message = match &self.detail {
            Some(detail) => format!("{}: {detail}", self.kind.title()),
            None => self.kind.title().to_string(),
        };
        let mut response = Response::new(200);
        response.headers = self.headers;
        response
            .headers
            .retain(|(name, _)| name != http::header::CONTENT_TYPE);
        let mut response = response
            .header(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static(content_type),
            )
            .header(crate::grpc::STATUS, HeaderValue::from_static(code.as_str()));
        if let Ok(value) = HeaderValue::from_str(&crate::grpc::encode_message(&message)) {
            response = response.header(crate::grpc::MESSAGE, value);
        }
        if let Ok(value) = HeaderValue::from_str(request_id) {
            response = response.header(id_header.clone(), value);
        }
        (response, code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_renders_rfc9457_fields_and_request_id() {
        let response = Problem::new(ProblemType::RouteNotFound)
            .detail("GET /nowhere")
            .into_response("abc", &HeaderName::from_static("x-trace-id"));
        assert_eq!(response.status, 404);
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["type"], "urn:gatehouse:problem:route-not-found");
        assert_eq!(body["title"], "No route matches this request");
        assert_eq!(body["status"], 404);
        assert_eq!(body["request_id"], "abc");
        assert_eq!(body["detail"], "GET /nowhere");
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.to_str().unwrap().to_string())
        };
        assert_eq!(
            header("content-type").as_deref(),
            Some("application/problem+json")
        );
        assert_eq!(header("x-trace-id").as_deref(), Some("abc"));
        assert_eq!(header("x-request-id"), None);
    }

    #[test]
    fn slugs_are_unique_and_failures_keep_their_status() {
        let mut slugs: Vec<_> = ProblemType::ALL.iter().map(|kind| kind.slug()).collect();
        slugs.sort_unstable();
        slugs.dedup();
        assert_eq!(slugs.len(), ProblemType::ALL.len());
        assert_eq!(Problem::failure(418).status, 418);
        assert_eq!(Problem::failure(418).kind.slug(), "error");
    }

    #[test]
    fn extension_members_follow_the_standard_ones() {
        let problem = Problem {
            status: 404,
            ..Problem::new(ProblemType::GrpcError)
        }
        .detail("no such book")
        .member("grpc_status", "NOT_FOUND")
        .member("grpc_code", 5)
        .member("status", 1);
        let body: serde_json::Value = serde_json::from_str(&problem.to_json("id")).unwrap();
        assert_eq!(body["type"], "urn:gatehouse:problem:grpc-error");
        assert_eq!(body["status"], 404);
        assert_eq!(body["grpc_status"], "NOT_FOUND");
        assert_eq!(body["grpc_code"], 5);
    }
}
