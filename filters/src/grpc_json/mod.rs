//! `grpc_json`: REST/JSON clients calling a gRPC service (like Envoy's
//! `grpc_json_transcoder`). Requests are matched against the bindings of a protobuf descriptor
//! set: the `google.api.http` annotations of its methods, the config's `mappings`, and for every
//! method of an exposed service `POST /pkg.Service/Method` with the whole message as body.
//!
//! - **Request with a body binding** (and a body): the head becomes
//!   `POST /pkg.Service/Method`, `content-type: application/grpc`, `te: trailers`, without
//!   `accept-encoding`/`grpc-accept-encoding` (so the service does not compress), and the
//!   filter asks the proxy to read the body whole (`buffers_request_body`). The JSON body is
//!   parsed into the method's input message (unknown members refused), the path and query
//!   values set on top, and the upstream gets one uncompressed gRPC frame. `Content-Length` is
//!   left for the proxy to set to the frame's length (a body read ahead) or to drop (chunked).
//! - **Request without a body binding** (GET, DELETE), or with one but no body (no
//!   `Transfer-Encoding`, and a `Content-Length` of 0 or, over HTTP/1, none): the proxy
//!   cannot give a bodiless request a body, so the filter calls the route's upstream itself
//!   (the process's [`crate::call::Caller`]) and answers with the converted reply, buffered
//!   whole. The call carries the client's headers but hop-by-hop, framing and content ones,
//!   not the forwarding and identity headers the proxy adds to proxied requests.
//! - **Reply:** a trailers-only answer (`grpc-status` in the head) is answered with `{}`/`[]`
//!   (OK) or an `application/problem+json` document of type `grpc-error` with the status the
//!   gRPC code maps to. Otherwise the 200 head goes out as `application/json`
//!   (`application/x-ndjson` for a server stream in `ndjson` mode) and each message is written
//!   as JSON as it arrives: one object for a unary method, a JSON array or one line each for a
//!   server stream. An error in the trailers after that is an element
//!   `{"error":{"code","status","message","http_status"}}` closing the stream, or for a unary
//!   method that sent no message the problem document as the body (under the 200 already
//!   sent). An answer that ends without trailers ends with an `UNKNOWN` error the same way.
//!   A reply that is not gRPC (no `grpc-status`, and not a 200 `application/grpc`) passes
//!   through untouched.
//! - Requests matching no binding, and gRPC requests, pass through untouched.

mod template;
pub mod transcoder;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderName, HeaderValue};
use pingora_http::{RequestHeader, ResponseHeader};
use serde::Deserialize;
use sha2::Digest;

pub use template::{percent_decode, PathTemplate};
pub use transcoder::{Bound, Mode, Options, ReplyWriter, Status, Transcoder};

use crate::call::{Call, CallError, Reply};
use crate::grpc::{self, Code};
use crate::units::ByteSize;
use crate::{
    BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, Problem, ProblemType,
    RequestContext, Response,
};

/// The default `max_message_bytes`: 4 MiB, gRPC's own default.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 4 << 20;
/// The request body held when the server sets no limit: 4 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 4 << 20;
/// The most of an answer the filter's own call keeps (a whole server stream).
pub const CALL_MAX_BODY: usize = 64 << 20;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The protobuf descriptor set of the services (`protoc --descriptor_set_out=FILE
    /// --include_imports`), read at every config load.
    pub descriptor: String,
    /// The SHA-256 of the descriptor file, in hex; a file that differs is refused.
    pub sha256: String,
    /// The fully-qualified services whose annotated methods (and default
    /// `POST /pkg.Service/Method` bindings) are exposed; all of the set's when unset.
    #[serde(default)]
    pub services: Option<Vec<String>>,
    /// Routes besides the `google.api.http` annotations.
    #[serde(default)]
    pub mappings: Vec<Mapping>,
    /// How server-streaming replies are written: `json_array` (one JSON array whose elements
    /// are sent as they arrive) or `ndjson` (a line per message).
    #[serde(default)]
    pub streaming: Streaming,
    /// Whether query parameters that name no field of the request message are ignored; by
    /// default they are refused with 400.
    #[serde(default)]
    pub ignore_unknown_query_parameters: bool,
    /// Whether a request that no method is bound to (and that is not gRPC already) is answered
    /// with 404 (`route-not-found`) instead of going to the upstream as it is.
    #[serde(default)]
    pub reject_unknown_methods: bool,
    /// Whether JSON replies use the fields' `.proto` names instead of lowerCamelCase (requests
    /// accept both either way).
    #[serde(default)]
    pub preserve_proto_field_names: bool,
    /// Whether JSON replies include fields holding their default value.
    #[serde(default)]
    pub emit_defaults: bool,
    /// The largest gRPC message read from the upstream (default 4MiB); a larger one ends the
    /// reply with an `INTERNAL` error.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: ByteSize,
    /// How long the filter's own call to the upstream (requests without a body binding) may
    /// take, unless the client's `grpc-timeout` is shorter (default "30s").
    #[serde(default = "default_call_timeout")]
    pub call_timeout: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            descriptor: String::new(),
            sha256: String::new(),
            services: None,
            mappings: Vec::new(),
            streaming: Streaming::default(),
            ignore_unknown_query_parameters: false,
            reject_unknown_methods: false,
            preserve_proto_field_names: false,
            emit_defaults: false,
            max_message_bytes: default_max_message_bytes(),
            call_timeout: default_call_timeout(),
        }
    }
}

fn default_max_message_bytes() -> ByteSize {
    ByteSize(DEFAULT_MAX_MESSAGE_BYTES)
}

fn default_call_timeout() -> String {
    "30s".into()
}

/// How a server-streaming reply is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Streaming {
    /// One JSON array; each message is an element, sent as it arrives.
    #[default]
    JsonArray,
    /// Newline-delimited JSON (`application/x-ndjson`), a line per message.
    Ndjson,
}

/// A route to a method besides the annotations: exactly one of `get`, `post`, `put`, `patch`
/// and `delete`, holding a path template (`/v1/{name=messages/*}`, `{id}`, `*`, `**`, an
/// optional `:verb`).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// The path template of a GET.
    #[serde(default)]
    pub get: Option<String>,
    /// The path template of a POST.
    #[serde(default)]
    pub post: Option<String>,
    /// The path template of a PUT.
    #[serde(default)]
    pub put: Option<String>,
    /// The path template of a PATCH.
    #[serde(default)]
    pub patch: Option<String>,
    /// The path template of a DELETE.
    #[serde(default)]
    pub delete: Option<String>,
    /// The method called, `pkg.Service/Method`.
    pub method: String,
    /// What the JSON body is: `*` (the whole request message) or the name of a top-level field.
    /// Default: `*` for post, put and patch, no body for get and delete.
    #[serde(default)]
    pub body: Option<String>,
    /// The field of the reply message written as the response body, instead of the whole.
    #[serde(default)]
    pub response_body: Option<String>,
}

/// The `grpc_json` filter.
pub struct GrpcJson {
    transcoder: Arc<Transcoder>,
    streaming: Streaming,
    max_message: usize,
    max_request: usize,
    call_timeout: Duration,
    reject_unknown_methods: bool,
}

/// What the filter keeps about a request it transcodes through the proxy.
struct State {
    bound: Bound,
    /// The JSON body so far.
    body: BytesMut,
    /// Whether the frame was written (a later piece is a retry's replay: start over).
    request_done: bool,
    /// Whether the client speaks HTTP/1.1 or later, so the reply may be chunked.
    chunked_ok: bool,
    /// The request id, for a problem document written in the body.
    request_id: String,
    /// The reply being converted; `None` before its head and when it passes through.
    writer: Option<ReplyWriter>,
    /// A body fixed with the head (a trailers-only answer), not yet sent.
    pending: Option<Bytes>,
    /// Whether the end of the reply body was written.
    finished: bool,
}

/// What the request phase found.
enum Prepared {
    /// Not for this filter.
    Pass,
    Reject(Problem),
    /// Goes through the proxy, its body transcoded.
    Proxy(Bound),
    /// Answered by the filter's own call.
    Call(Bound),
}

/// Headers of the client never copied to the filter's own call.
const NOT_COPIED: [&str; 20] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "accept",
    "accept-encoding",
    "expect",
    "grpc-accept-encoding",
    "grpc-encoding",
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
];

impl FilterKind for GrpcJson {
    const KIND: &'static str = "grpc_json";
    type Config = Config;

    fn build(config: Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        let call_timeout = crate::util::duration("call_timeout", &config.call_timeout, &mut errors);
        if call_timeout.is_zero() && errors.is_empty() {
            errors.push(BuildError::new("call_timeout", "must be longer than zero"));
        }
        if config.max_message_bytes.0 == 0 {
            errors.push(BuildError::new("max_message_bytes", "must be above 0"));
        }
        let expected = match hex::decode(config.sha256.trim()) {
            Ok(digest) if digest.len() == 32 => Some(digest),
            _ => {
                errors.push(BuildError::new(
                    "sha256",
                    "give the SHA-256 of the descriptor file as 64 hex digits",
                ));
                None
            }
        };
        if config.descriptor.trim().is_empty() {
            errors.push(BuildError::new(
                "descriptor",
                "give the path of a descriptor set (protoc --descriptor_set_out=FILE --include_imports)",
            ));
            return Err(errors);
        }
        let path = config.descriptor.trim();
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) => {
                errors.push(BuildError::new(
                    "descriptor",
                    format!("cannot read {path}: {error}"),
                ));
                return Err(errors);
            }
        };
        if let Some(expected) = expected {
            let actual = sha2::Sha256::digest(&bytes);
            if actual.as_slice() != expected.as_slice() {
                errors.push(BuildError::new(
                    "sha256",
                    format!(
                        "{path} has the SHA-256 {}, not the configured one",
                        hex::encode(actual)
                    ),
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let pool = prost_reflect::DescriptorPool::decode(bytes.as_slice()).map_err(|error| {
            vec![BuildError::new(
                "descriptor",
                format!("{path} is not a usable protobuf descriptor set: {error}"),
            )]
        })?;
        let transcoder = Transcoder::build(
            &pool,
            config.services.as_deref(),
            &config.mappings,
            Options {
                ignore_unknown_query_parameters: config.ignore_unknown_query_parameters,
                preserve_proto_field_names: config.preserve_proto_field_names,
                emit_defaults: config.emit_defaults,
            },
        )?;
        if transcoder.bindings.is_empty() {
            return Err(vec![BuildError::new(
                "descriptor",
                format!("{path} has no method to expose"),
            )]);
        }
        let max_request = ctx
            .server_max_body_bytes
            .unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
        Ok(GrpcJson {
            transcoder: Arc::new(transcoder),
            streaming: config.streaming,
            max_message: usize::try_from(config.max_message_bytes.0).unwrap_or(usize::MAX),
            max_request: usize::try_from(max_request).unwrap_or(usize::MAX),
            call_timeout,
            reject_unknown_methods: config.reject_unknown_methods,
        })
    }
}

/// Whether the request head announces a body, or may have one: an HTTP/2 request without a
/// `Content-Length` is taken to have one (its DATA frames need not be declared), and an empty
/// body then becomes an empty message.
fn has_body(request: &RequestHeader) -> bool {
    if request.headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    match declared_length(&request.headers) {
        Some(length) => length > 0,
        None => request.version == http::Version::HTTP_2,
    }
}

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn too_large(limit: usize) -> Problem {
    Problem::new(ProblemType::ContentTooLarge).detail(format!(
        "This route transcodes JSON request bodies of at most {}",
        ByteSize(limit as u64)
    ))
}

fn call_failed(error: CallError) -> Problem {
    let kind = match error {
        CallError::NoTarget => ProblemType::NoHealthyUpstream,
        CallError::Timeout => ProblemType::UpstreamTimeout,
        CallError::Unreachable | CallError::TooLarge | CallError::Broken => {
            ProblemType::UpstreamUnavailable
        }
    };
    Problem::new(kind).detail(format!("The gRPC call failed: {error}"))
}

impl GrpcJson {
    /// The transcoder, for benches and tools.
    pub fn transcoder(&self) -> &Transcoder {
        &self.transcoder
    }

    fn prepare(&self, request: &RequestHeader) -> Prepared {
        if request
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|value| grpc::is_grpc_content_type(value.as_bytes()))
        {
            return Prepared::Pass;
        }
        let Some((binding, values)) = self.transcoder.find(&request.method, request.uri.path())
        else {
            if self.reject_unknown_methods {
                return Prepared::Reject(Problem::new(ProblemType::RouteNotFound).detail(format!(
                    "No method of the service is bound to {} {}",
                    request.method,
                    request.uri.path()
                )));
            }
            return Prepared::Pass;
        };
        let bound = match self.transcoder.bind(binding, values, request.uri.query()) {
            Ok(bound) => bound,
            Err(problem) => return Prepared::Reject(problem),
        };
        if !self.transcoder.has_body(binding) || !has_body(request) {
            return Prepared::Call(bound);
        }
        if request
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|coding| !coding.as_bytes().eq_ignore_ascii_case(b"identity"))
        {
            return Prepared::Reject(Problem::new(ProblemType::UnsupportedMediaType).detail(
                "This route transcodes JSON request bodies sent without a content coding",
            ));
        }
        if declared_length(&request.headers).is_some_and(|length| length > self.max_request as u64)
        {
            return Prepared::Reject(too_large(self.max_request));
        }
        Prepared::Proxy(bound)
    }

    /// The request head as the gRPC upstream gets it.
    fn rewrite_head(&self, request: &mut RequestHeader, bound: &Bound) {
        let path = &self.transcoder.method(bound.binding).path;
        // Only the path changes: an HTTP/2 request's authority (and scheme) live in its URI.
        let mut parts = request.uri.clone().into_parts();
        if let Ok(path) = path.parse() {
            parts.path_and_query = Some(path);
            if let Ok(uri) = http::Uri::from_parts(parts) {
                request.set_uri(uri);
            }
        }
        request.set_method(http::Method::POST);
        request
            .insert_header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            )
            .ok();
        request
            .insert_header(header::TE, HeaderValue::from_static("trailers"))
            .ok();
        request.remove_header(&header::ACCEPT_ENCODING);
        request.remove_header("grpc-accept-encoding");
        request.remove_header("grpc-encoding");
    }

    /// Calls the upstream for a request the proxy cannot send (no body), and answers with the
    /// converted reply.
    async fn call(
        &self,
        request: &RequestHeader,
        ctx: &mut RequestContext,
        bound: Bound,
    ) -> Decision {
        let frame = match self.transcoder.request_to_frame(&bound, b"") {
            Ok(frame) => frame,
            Err(problem) => return Decision::Reject(problem),
        };
        let (Some(caller), Some(upstream)) = (crate::call::caller(), ctx.upstream.clone()) else {
            return Decision::Reject(
                Problem::new(ProblemType::NoHealthyUpstream)
                    .detail("The gateway cannot call this route's upstream"),
            );
        };
        let mut headers = vec![
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            ),
            (header::TE, HeaderValue::from_static("trailers")),
        ];
        let mut timeout = self.call_timeout;
        for (name, value) in &request.headers {
            let text = name.as_str();
            if NOT_COPIED.contains(&text) {
                continue;
            }
            if text == grpc::TIMEOUT.as_str() {
                if let Some(asked) = grpc::parse_timeout(value.as_bytes()) {
                    timeout = timeout.min(asked);
                }
            } else if text.starts_with("grpc-") {
                continue;
            }
            headers.push((name.clone(), value.clone()));
        }
        if let Some(name) = ctx.request_id_header.clone() {
            if !request.headers.contains_key(&name) {
                if let Ok(value) = HeaderValue::from_str(ctx.request_id()) {
                    headers.push((name, value));
                }
            }
        }
        let call = Call {
            upstream,
            method: http::Method::POST,
            path: self.transcoder.method(bound.binding).path.clone(),
            // The client's authority, as a proxied call would carry it.
            authority: request
                .uri
                .authority()
                .map(|authority| authority.as_str().to_string())
                .or_else(|| {
                    request
                        .headers
                        .get(header::HOST)
                        .and_then(|host| host.to_str().ok())
                        .map(str::to_string)
                }),
            headers,
            body: frame,
            timeout,
            max_body: CALL_MAX_BODY.max(self.max_message.saturating_add(5)),
        };
        match caller.call(call).await {
            Ok(reply) => self.answer(&bound, &reply, ctx.request_id()),
            Err(error) => Decision::Reject(call_failed(error)),
        }
    }

    /// The answer to the client for a whole reply of the filter's own call.
    pub fn answer(&self, bound: &Bound, reply: &Reply, request_id: &str) -> Decision {
        let grpc_answer = reply.status == 200
            && reply
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|value| grpc::is_grpc_content_type(value.as_bytes()));
        if !grpc_answer && !reply.headers.contains_key(grpc::STATUS) {
            return Decision::Reject(Problem::new(ProblemType::UpstreamUnavailable).detail(
                format!("The upstream answered with HTTP {}, not gRPC", reply.status),
            ));
        }
        let status = if reply.headers.contains_key(grpc::STATUS) {
            Status::from_headers(&reply.headers)
        } else {
            Status::from_headers(&reply.trailers)
        };
        let mode = Mode::of(self.transcoder.method(bound.binding), self.streaming);
        let mut writer = ReplyWriter::new(bound.binding, mode, self.max_message);
        let mut out = Vec::new();
        let status = match writer.push(&self.transcoder, &reply.body, &mut out) {
            Ok(()) => status,
            Err(error) => error,
        };
        if status.code != Code::Ok && writer.sent() == 0 {
            return Decision::Reject(status.problem());
        }
        writer.finish(status, request_id, &mut out);
        Decision::Respond(
            Response::new(200)
                .header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(mode.content_type()),
                )
                .body(out),
        )
    }
}

#[async_trait]
impl Filter for GrpcJson {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
            | Phases::REQUEST_BODY
            | Phases::RESPONSE
            | Phases::RESPONSE_BODY
            | Phases::RESPONSE_TRAILERS
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        match self.prepare(request) {
            Prepared::Pass => Some(Decision::Continue),
            Prepared::Reject(problem) => Some(Decision::Reject(problem)),
            // The async phase calls the upstream.
            Prepared::Call(_) => None,
            Prepared::Proxy(bound) => {
                self.rewrite_head(request, &bound);
                ctx.buffers_request_body = true;
                let state = State {
                    bound,
                    body: BytesMut::new(),
                    request_done: false,
                    chunked_ok: request.version >= http::Version::HTTP_11,
                    request_id: String::new(),
                    writer: None,
                    pending: None,
                    finished: false,
                };
                ctx.set_instance_state(self, state);
                Some(Decision::Continue)
            }
        }
    }

    async fn request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        match self.prepare(request) {
            Prepared::Call(bound) => self.call(request, ctx, bound).await,
            _ => self.try_request(request, ctx).unwrap_or(Decision::Continue),
        }
    }

    fn request_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) -> Result<(), Problem> {
        let limit = self.max_request;
        let Some(state) = ctx.instance_state::<_, State>(self) else {
            return Ok(());
        };
        if state.request_done {
            if body.is_none() {
                return Ok(());
            }
            // A retry replays the body from its start.
            state.body.clear();
            state.request_done = false;
        }
        if let Some(piece) = body.take() {
            if state.body.len() + piece.len() > limit {
                return Err(too_large(limit));
            }
            state.body.extend_from_slice(&piece);
        }
        if !end_of_stream {
            *body = Some(Bytes::new());
            return Ok(());
        }
        let frame = self
            .transcoder
            .request_to_frame(&state.bound, &state.body)?;
        state.request_done = true;
        *body = Some(frame);
        Ok(())
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        if ctx.own_answer {
            return;
        }
        if ctx.instance_state::<_, State>(self).is_none() {
            return;
        }
        let request_id = ctx.request_id().to_string();
        let Some(state) = ctx.instance_state::<_, State>(self) else {
            return;
        };
        let binding = state.bound.binding;
        let mode = Mode::of(self.transcoder.method(binding), self.streaming);
        state.request_id = request_id;
        let content_type = if response.headers.contains_key(grpc::STATUS) {
            // Trailers-only: the whole answer is known now, and it has no body the proxy could
            // replace, so it is answered in the upstream's place.
            let status = Status::from_headers(&response.headers);
            let (code, content_type, body) = if status.code == Code::Ok {
                let mut out = Vec::new();
                ReplyWriter::new(binding, mode, self.max_message).finish(
                    status,
                    &state.request_id,
                    &mut out,
                );
                (200, mode.content_type(), out)
            } else {
                let problem = status.problem();
                (
                    problem.status,
                    "application/problem+json",
                    problem.to_json(&state.request_id).into_bytes(),
                )
            };
            ctx.take_instance_state::<_, State>(self);
            let answer = Response::new(code)
                .header(header::CONTENT_TYPE, HeaderValue::from_static(content_type))
                .body(body);
            ctx.answer_instead = Some(Box::new(answer));
            return;
        } else if response.status.as_u16() == 200
            && response
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|value| grpc::is_grpc_content_type(value.as_bytes()))
        {
            state.writer = Some(ReplyWriter::new(binding, mode, self.max_message));
            mode.content_type()
        } else {
            // Not a gRPC answer: it passes through.
            ctx.take_instance_state::<_, State>(self);
            return;
        };
        let chunked_ok = state.chunked_ok;
        response
            .insert_header(header::CONTENT_TYPE, HeaderValue::from_static(content_type))
            .ok();
        for name in [
            header::CONTENT_LENGTH,
            header::CONTENT_ENCODING,
            HeaderName::from_static("grpc-encoding"),
            HeaderName::from_static("grpc-accept-encoding"),
            grpc::STATUS,
            grpc::MESSAGE,
            HeaderName::from_static("grpc-status-details-bin"),
            header::TRAILER,
        ] {
            response.remove_header(&name);
        }
        if chunked_ok {
            response
                .insert_header(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                )
                .ok();
        }
    }

    fn response_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) {
        let Some(state) = ctx.instance_state::<_, State>(self) else {
            return;
        };
        if let Some(pending) = state.pending.take() {
            *body = Some(pending);
            return;
        }
        if state.finished {
            *body = None;
            return;
        }
        let Some(writer) = state.writer.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        if let Some(piece) = body.take() {
            if let Err(status) = writer.push(&self.transcoder, &piece, &mut out) {
                writer.finish(status, &state.request_id, &mut out);
                state.finished = true;
            }
        }
        if end_of_stream && !state.finished {
            // No trailers came: the status is unknown.
            writer.finish(
                Status::from_headers(&http::HeaderMap::new()),
                &state.request_id,
                &mut out,
            );
            state.finished = true;
        }
        *body = (!out.is_empty()).then(|| Bytes::from(out));
    }

    fn response_trailers(
        &self,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestContext,
    ) -> Option<Bytes> {
        let state = ctx.instance_state::<_, State>(self)?;
        if state.finished {
            return Some(state.pending.take().unwrap_or_default());
        }
        let writer = state.writer.as_mut()?;
        let mut out = Vec::new();
        writer.finish(Status::from_headers(trailers), &state.request_id, &mut out);
        state.finished = true;
        Some(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests;
