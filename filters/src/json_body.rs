//! `json_body`: set, add, remove, rename and copy members of JSON request and response bodies,
//! named by JSON Pointers (RFC 6901), with literal or templated values.
//!
//! Only `application/json` and `+json` bodies are touched; any other body streams through
//! unbuffered. A body is held only when an operation applies to it, up to `max_body_bytes`
//! (its decoded size, for a compressed body).
//!
//! - **Request:** the filter asks the proxy to read the body whole (`buffers_request_body`), so
//!   a small body reaches the upstream rewritten with its new `Content-Length` (a large one
//!   goes chunked, see the proxy's `body` module). A body over the limit is answered with 413,
//!   one that is not JSON with 400; a gzip, deflate or br body is decoded and forwarded
//!   rewritten without its coding; another coding is answered with 415.
//! - **Response:** a body over the limit, one that is not JSON, and one that cannot be decoded
//!   (corrupted, or ending early) pass through byte for byte, counted in
//!   `gatehouse_transform_skipped_total{route,reason}`. A gzip, deflate or br body is decoded,
//!   rewritten and encoded again, or passed through as it is with `decode: false`. The rewritten
//!   body leaves only once the whole upstream body arrived intact: a body the upstream cuts
//!   short is never completed by the gateway.
//!
//! Templates are rendered once per body from the request head as it arrived (captured in the
//! request phase) and the context when the body is rewritten (so `${consumer.id}` is known
//! wherever the filter stands in the chain).

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue};
use pingora_http::{RequestHeader, ResponseHeader};
use prometheus::IntCounter;
use serde::Deserialize;
use serde_json::Value;

use crate::codec::{self, Coding, DecodeError, Decoder};
use crate::json_doc::Node;
use crate::metrics::Row;
use crate::template::{Captured, Reads, RequestSource, Template};
use crate::units::ByteSize;
use crate::{
    BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, Problem, ProblemType,
    RequestContext,
};

/// The default `max_body_bytes`: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1 << 20;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Operations on the request body the upstream receives, in order.
    #[serde(default)]
    pub request: Vec<Operation>,
    /// Operations on the response body the client gets, in order.
    #[serde(default)]
    pub response: Vec<Operation>,
    /// The largest body rewritten, decoded size for a compressed body (default 1 MiB). A
    /// larger request is answered with 413; a larger response passes through unchanged.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: ByteSize,
    /// Whether gzip, deflate and br responses are decoded to be rewritten (and encoded again);
    /// with `false` they pass through unchanged (counted as skipped, reason `encoded`).
    #[serde(default = "default_decode")]
    pub decode: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            request: Vec::new(),
            response: Vec::new(),
            max_body_bytes: default_max_body_bytes(),
            decode: true,
        }
    }
}

fn default_max_body_bytes() -> ByteSize {
    ByteSize(DEFAULT_MAX_BODY_BYTES)
}

fn default_decode() -> bool {
    true
}

/// One operation, in the style of JSON Patch (RFC 6902). `path` and `from` are JSON Pointers
/// (`/user/name`, `/items/0`, `/items/-` for the end of an array; `~1` stands for `/` and `~0`
/// for `~` in a name).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Operation {
    /// Writes `value` at `path`, replacing what is there; missing parent objects are created.
    Set { path: String, value: Value },
    /// Writes `value` at `path` only if nothing is there (into an array: inserts at the index,
    /// or appends with `-`); missing parent objects are created.
    Add { path: String, value: Value },
    /// Removes what is at `path`, if anything.
    Remove { path: String },
    /// Moves what is at `from` to `path` (replacing what is there), if `from` exists.
    Rename { from: String, path: String },
    /// Copies what is at `from` to `path` (replacing what is there), if `from` exists.
    Copy { from: String, path: String },
}

/// A JSON Pointer, parsed: its reference tokens, unescaped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pointer(Vec<String>);

impl Pointer {
    /// Parses `text` (RFC 6901). The whole document (`""`) is refused: an operation names a
    /// member or an element.
    pub fn parse(text: &str) -> Result<Pointer, String> {
        if text.is_empty() {
            return Err(
                "the empty pointer names the whole body; name a member, like \"/id\"".into(),
            );
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "\"{text}\" is not a JSON Pointer: it must start with \"/\", like \"/user/id\""
            ));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => token.push('~'),
                        Some('1') => token.push('/'),
                        _ => {
                            return Err(format!(
                                "\"{text}\" is not a JSON Pointer: \"~\" must be followed by 0 or 1 (\"~0\" is \"~\", \"~1\" is \"/\")"
                            ))
                        }
                    }
                } else {
                    token.push(c);
                }
            }
            tokens.push(token);
        }
        Ok(Pointer(tokens))
    }
}

/// A value to write: JSON as configured, with templates in its strings.
#[derive(Debug)]
enum Written {
    /// No string of it has a variable.
    Literal(Value),
    /// A string with variables, rendered to a JSON string.
    Template(Template),
    Array(Vec<Written>),
    Object(Vec<(String, Written)>),
}

impl Written {
    fn compile(
        value: &Value,
        scope: &crate::template::Scope<'_>,
        reads: &mut Reads,
    ) -> Result<Written, String> {
        Ok(match value {
            Value::String(text) if text.contains("${") => {
                let template = Template::parse_in(text, scope)?;
                template.collect_reads(reads);
                Written::Template(template)
            }
            Value::Array(items) => {
                let items = items
                    .iter()
                    .map(|item| Written::compile(item, scope, reads))
                    .collect::<Result<Vec<_>, _>>()?;
                if items.iter().all(|item| matches!(item, Written::Literal(_))) {
                    Written::Literal(value.clone())
                } else {
                    Written::Array(items)
                }
            }
            Value::Object(members) => {
                let members = members
                    .iter()
                    .map(|(name, member)| {
                        Ok((name.clone(), Written::compile(member, scope, reads)?))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                if members
                    .iter()
                    .all(|(_, member)| matches!(member, Written::Literal(_)))
                {
                    Written::Literal(value.clone())
                } else {
                    Written::Object(members)
                }
            }
            other => Written::Literal(other.clone()),
        })
    }

    fn render(&self, ctx: &mut RequestContext, source: &dyn RequestSource) -> Value {
        match self {
            Written::Literal(value) => value.clone(),
            Written::Template(template) => Value::String(template.render_from(ctx, source)),
            Written::Array(items) => {
                Value::Array(items.iter().map(|item| item.render(ctx, source)).collect())
            }
            Written::Object(members) => Value::Object(
                members
                    .iter()
                    .map(|(name, member)| (name.clone(), member.render(ctx, source)))
                    .collect(),
            ),
        }
    }
}

#[derive(Debug)]
enum Step {
    Write {
        path: Pointer,
        value: Written,
        replace: bool,
    },
    Remove(Pointer),
    Move {
        from: Pointer,
        path: Pointer,
        keep: bool,
    },
}

/// One side's operations, compiled.
#[derive(Debug, Default)]
pub struct Operations {
    steps: Vec<Step>,
    /// What their templates read from the request head.
    reads: Reads,
}

impl Operations {
    fn build(
        base: &str,
        operations: &[Operation],
        ctx: &BuildCtx,
        errors: &mut Vec<BuildError>,
    ) -> Operations {
        let scope = ctx.template_scope();
        let mut compiled = Operations::default();
        for (at, operation) in operations.iter().enumerate() {
            let here = |field: &str| format!("{base}[{at}].{field}");
            let pointer = |field: &str, text: &str, errors: &mut Vec<BuildError>| {
                match Pointer::parse(text) {
                    Ok(pointer) => Some(pointer),
                    Err(message) => {
                        errors.push(BuildError::new(here(field), message));
                        None
                    }
                }
            };
            let step = match operation {
                Operation::Set { path, value } | Operation::Add { path, value } => {
                    let replace = matches!(operation, Operation::Set { .. });
                    let path = pointer("path", path, errors);
                    let value = match Written::compile(value, &scope, &mut compiled.reads) {
                        Ok(value) => Some(value),
                        Err(message) => {
                            errors.push(BuildError::new(here("value"), message));
                            None
                        }
                    };
                    match (path, value) {
                        (Some(path), Some(value)) => Some(Step::Write {
                            path,
                            value,
                            replace,
                        }),
                        _ => None,
                    }
                }
                Operation::Remove { path } => pointer("path", path, errors).map(Step::Remove),
                Operation::Rename { from, path } | Operation::Copy { from, path } => {
                    let keep = matches!(operation, Operation::Copy { .. });
                    let from = pointer("from", from, errors);
                    let path = pointer("path", path, errors);
                    match (from, path) {
                        (Some(from), Some(path)) => Some(Step::Move { from, path, keep }),
                        _ => None,
                    }
                }
            };
            compiled.steps.extend(step);
        }
        compiled
    }

    fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Runs every operation on `document`, in order. An operation whose target cannot exist
    /// (a member of a string, an index past an array's end) does nothing.
    pub fn apply(
        &self,
        document: &mut Node<'_>,
        ctx: &mut RequestContext,
        source: &dyn RequestSource,
    ) {
        for step in &self.steps {
            match step {
                Step::Write {
                    path,
                    value,
                    replace,
                } => document.write(&path.0, Node::Value(value.render(ctx, source)), *replace),
                Step::Remove(path) => {
                    document.take(&path.0);
                }
                Step::Move { from, path, keep } => {
                    let moved = if *keep {
                        document.find(&from.0).map(|node| node.copy())
                    } else {
                        document.take(&from.0)
                    };
                    if let Some(moved) = moved {
                        document.write(&path.0, moved, true);
                    }
                }
            }
        }
    }

    /// `body` rewritten; `Err` when it is not JSON. Only the members on the operations' paths
    /// are parsed; the rest is copied as it came (see [`crate::json_doc`]).
    pub fn rewrite(
        &self,
        body: &[u8],
        ctx: &mut RequestContext,
        source: &dyn RequestSource,
    ) -> Result<Vec<u8>, serde_json::Error> {
        let mut document = Node::parse(body)?;
        self.apply(&mut document, ctx, source);
        let mut out = Vec::with_capacity(body.len() + 64);
        document.write_to(&mut out);
        Ok(out)
    }
}

/// Whether a `Content-Type` is JSON: `application/json`, or any `+json` type.
pub fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(Ok(text)) = content_type.map(|value| value.to_str()) else {
        return false;
    };
    let essence = text.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
        || (essence.len() > 5 && essence[essence.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// Why a response body passed through unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Skip {
    TooLarge,
    InvalidJson,
    DecodeError,
    Encoded,
    UnsupportedEncoding,
}

impl Skip {
    const ALL: [Skip; 5] = [
        Skip::TooLarge,
        Skip::InvalidJson,
        Skip::DecodeError,
        Skip::Encoded,
        Skip::UnsupportedEncoding,
    ];

    fn label(self) -> &'static str {
        match self {
            Skip::TooLarge => "too_large",
            Skip::InvalidJson => "invalid_json",
            Skip::DecodeError => "decode_error",
            Skip::Encoded => "encoded",
            Skip::UnsupportedEncoding => "unsupported_encoding",
        }
    }
}

/// The `json_body` filter.
pub struct JsonBody {
    request: Operations,
    response: Operations,
    limit: usize,
    decode: bool,
    /// `gatehouse_transform_skipped_total{route,reason}`, in the order of [`Skip::ALL`].
    skipped: Vec<Row<IntCounter>>,
}

/// A body being held: the pieces as they came (for a response that passes through after all,
/// and the body itself when it has no coding) and the decoder of its coding.
struct Held {
    coding: Coding,
    /// The decoder of a coded body; `None` without a coding.
    decoder: Option<Decoder>,
    pieces: Vec<Bytes>,
    length: usize,
    limit: usize,
}

impl Held {
    fn new(coding: Coding, limit: usize) -> Held {
        Held {
            coding,
            decoder: (coding != Coding::Identity).then(|| Decoder::new(coding, limit)),
            pieces: Vec::new(),
            length: 0,
            limit,
        }
    }

    /// Takes the next piece; an error once the body is over the limit or does not decode.
    fn push(&mut self, piece: Bytes) -> Result<(), DecodeError> {
        self.length += piece.len();
        let result = if self.length > self.limit {
            Err(DecodeError::TooLarge)
        } else {
            match &mut self.decoder {
                Some(decoder) => decoder.push(&piece),
                None => Ok(()),
            }
        };
        self.pieces.push(piece);
        result
    }

    /// The body as it came.
    fn original(&self) -> Bytes {
        match self.pieces.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut all = BytesMut::with_capacity(self.length);
                for piece in many {
                    all.extend_from_slice(piece);
                }
                all.freeze()
            }
        }
    }

    /// The whole body, decoded.
    fn decoded(&mut self) -> Result<Bytes, DecodeError> {
        match self.decoder.take() {
            Some(decoder) => decoder.finish().map(Bytes::from),
            None => Ok(self.original()),
        }
    }
}

/// What the filter keeps about one request.
#[derive(Default)]
struct State {
    /// Request head values the templates read.
    captured: Captured,
    /// The request body being held, when the request side applies.
    request: Option<Held>,
    /// Whether the request was forwarded decoded (its `Content-Encoding` goes).
    request_decoded: bool,
    /// The response body being held, when the response side applies.
    response: Option<Held>,
    /// Whether the response may have a body (not an answer to HEAD).
    response_body_expected: bool,
    /// Whether the client speaks HTTP/1.1 (or later), so a rewritten response may be chunked.
    chunked_ok: bool,
}

impl JsonBody {
    fn state<'a>(&self, ctx: &'a mut RequestContext) -> Option<&'a mut State> {
        ctx.instance_state(self)
    }

    fn skip(&self, reason: Skip, ctx: &mut RequestContext) {
        ctx.transform_skipped = Some(reason.label());
        let at = Skip::ALL
            .iter()
            .position(|known| *known == reason)
            .expect("every reason has a row");
        self.skipped[at].inc();
    }
}

impl FilterKind for JsonBody {
    const KIND: &'static str = "json_body";
    type Config = Config;

    fn build(config: Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        if config.request.is_empty() && config.response.is_empty() {
            errors.push(BuildError::new(
                "",
                "give `request` or `response` operations (set, add, remove, rename, copy)",
            ));
        }
        if config.max_body_bytes.0 == 0 {
            errors.push(BuildError::new("max_body_bytes", "must be above 0"));
        }
        if let Some(server) = ctx.server_max_body_bytes {
            if !config.request.is_empty() && config.max_body_bytes.0 > server {
                errors.push(BuildError::new(
                    "max_body_bytes",
                    format!(
                        "{} is above the server's limits.max_body_bytes ({}), which a request body never passes",
                        config.max_body_bytes, ByteSize(server)
                    ),
                ));
            }
        }
        let request = Operations::build("request", &config.request, ctx, &mut errors);
        let response = Operations::build("response", &config.response, ctx, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let family = ctx.metrics.counters(
            "gatehouse_transform_skipped_total",
            "Bodies a transform filter passed through unchanged, by route and reason",
            &["route", "reason"],
        );
        let skipped = Skip::ALL
            .iter()
            .map(|reason| family.row(&[ctx.route_label(), reason.label()]))
            .collect();
        Ok(JsonBody {
            request,
            response,
            limit: usize::try_from(config.max_body_bytes.0).unwrap_or(usize::MAX),
            decode: config.decode,
            skipped,
        })
    }
}

/// Whether the request head announces a body.
fn has_body(request: &RequestHeader) -> bool {
    if request.headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    declared_length(&request.headers).is_some_and(|length| length > 0)
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

#[async_trait]
impl Filter for JsonBody {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn phases(&self) -> Phases {
        let mut phases = Phases::REQUEST;
        if !self.request.is_empty() {
            phases = phases | Phases::REQUEST_BODY | Phases::UPSTREAM_REQUEST;
        }
        if !self.response.is_empty() {
            phases = phases | Phases::RESPONSE | Phases::RESPONSE_BODY;
        }
        phases
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        let mut state = State {
            response_body_expected: request.method != http::Method::HEAD,
            chunked_ok: request.version >= http::Version::HTTP_11,
            ..State::default()
        };
        let mut reads = self.request.reads.clone();
        reads.merge(&self.response.reads);
        if !reads.is_empty() {
            state.captured = reads.capture(request);
        }
        if !self.request.is_empty()
            && is_json(request.headers.get(header::CONTENT_TYPE))
            && has_body(request)
        {
            let Some(coding) = Coding::from_header(request.headers.get(header::CONTENT_ENCODING))
            else {
                return Some(Decision::Reject(
                    Problem::new(ProblemType::UnsupportedMediaType).detail(
                        "This route rewrites JSON request bodies, which may be sent as they are or with gzip, deflate or br",
                    ),
                ));
            };
            if coding == Coding::Identity
                && declared_length(&request.headers)
                    .is_some_and(|length| length > self.limit as u64)
            {
                return Some(Decision::Reject(too_large(self.limit)));
            }
            state.request = Some(Held::new(coding, self.limit));
            state.request_decoded = coding != Coding::Identity;
            ctx.buffers_request_body = true;
        }
        ctx.set_instance_state(self, state);
        Some(Decision::Continue)
    }

    fn request_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) -> Result<(), Problem> {
        let limit = self.limit;
        let Some(state) = self.state(ctx) else {
            return Ok(());
        };
        let Some(held) = state.request.as_mut() else {
            return Ok(());
        };
        if let Some(piece) = body.take() {
            held.push(piece).map_err(|error| match error {
                DecodeError::TooLarge => too_large(limit),
                DecodeError::Invalid => undecodable(held.coding),
            })?;
        }
        if !end_of_stream {
            *body = Some(Bytes::new());
            return Ok(());
        }
        let mut held = state.request.take().expect("held above");
        let coding = held.coding;
        let decoded = held.decoded().map_err(|error| match error {
            DecodeError::TooLarge => too_large(limit),
            DecodeError::Invalid => undecodable(coding),
        })?;
        if decoded.is_empty() {
            // No body after all (a chunked body of no bytes): nothing to rewrite.
            *body = None;
            return Ok(());
        }
        let captured = std::mem::take(&mut state.captured);
        let rewritten = self
            .request
            .rewrite(&decoded, ctx, &captured)
            .map_err(|error| {
                Problem::new(ProblemType::BadRequest)
                    .detail(format!("The request body is not valid JSON: {error}"))
            })?;
        if let Some(state) = self.state(ctx) {
            state.captured = captured;
        }
        *body = Some(Bytes::from(rewritten));
        Ok(())
    }

    fn upstream_request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) {
        if self.state(ctx).is_some_and(|state| state.request_decoded) {
            request.remove_header(&header::CONTENT_ENCODING);
        }
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        let limit = self.limit;
        let decode = self.decode;
        if ctx.own_answer {
            return;
        }
        let Some(state) = self.state(ctx) else {
            return;
        };
        let status = response.status.as_u16();
        if !state.response_body_expected
            || matches!(status, 100..=199 | 204 | 206 | 304)
            || !is_json(response.headers.get(header::CONTENT_TYPE))
        {
            return;
        }
        let chunked_ok = state.chunked_ok;
        let coding = match Coding::from_header(response.headers.get(header::CONTENT_ENCODING)) {
            Some(coding) => coding,
            None => {
                self.skip(Skip::UnsupportedEncoding, ctx);
                return;
            }
        };
        if coding != Coding::Identity && !decode {
            self.skip(Skip::Encoded, ctx);
            return;
        }
        if declared_length(&response.headers).is_some_and(|length| length > limit as u64) {
            self.skip(Skip::TooLarge, ctx);
            return;
        }
        if let Some(state) = self.state(ctx) {
            state.response = Some(Held::new(coding, limit));
        }
        // The rewritten body's length is known only at its end.
        response.remove_header(&header::CONTENT_LENGTH);
        if chunked_ok {
            response
                .insert_header(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                )
                .ok();
        }
        // Another representation: a strong validator of the upstream's no longer holds.
        if let Some(etag) = response.headers.get(header::ETAG).cloned() {
            if !etag.as_bytes().starts_with(b"W/") {
                let mut weak = b"W/".to_vec();
                weak.extend_from_slice(etag.as_bytes());
                match HeaderValue::from_bytes(&weak) {
                    Ok(weak) => {
                        response.insert_header(header::ETAG, weak).ok();
                    }
                    Err(_) => {
                        response.remove_header(&header::ETAG);
                    }
                }
            }
        }
    }

    fn response_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) {
        let Some(state) = self.state(ctx) else {
            return;
        };
        let Some(held) = state.response.as_mut() else {
            return;
        };
        if let Some(piece) = body.take() {
            if let Err(error) = held.push(piece) {
                // Pass everything through as it came, this piece and the rest.
                *body = Some(held.original());
                state.response = None;
                self.skip(
                    match error {
                        DecodeError::TooLarge => Skip::TooLarge,
                        DecodeError::Invalid => Skip::DecodeError,
                    },
                    ctx,
                );
                return;
            }
        }
        if !end_of_stream {
            return;
        }
        let mut held = state.response.take().expect("held above");
        let coding = held.coding;
        let decoded = match held.decoded() {
            Ok(decoded) => decoded,
            Err(error) => {
                *body = Some(held.original());
                self.skip(
                    match error {
                        DecodeError::TooLarge => Skip::TooLarge,
                        DecodeError::Invalid => Skip::DecodeError,
                    },
                    ctx,
                );
                return;
            }
        };
        let captured = std::mem::take(&mut state.captured);
        match self.response.rewrite(&decoded, ctx, &captured) {
            Ok(rewritten) if coding == Coding::Identity => *body = Some(Bytes::from(rewritten)),
            Ok(rewritten) => *body = Some(Bytes::from(codec::encode(coding, &rewritten))),
            Err(_) => {
                *body = Some(held.original());
                self.skip(Skip::InvalidJson, ctx);
            }
        }
    }
}

fn too_large(limit: usize) -> Problem {
    Problem::new(ProblemType::ContentTooLarge).detail(format!(
        "This route rewrites JSON request bodies of at most {} (decoded)",
        ByteSize(limit as u64)
    ))
}

fn undecodable(coding: Coding) -> Problem {
    Problem::new(ProblemType::BadRequest).detail(format!(
        "The request body is not valid {}",
        match coding {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate (zlib)",
            Coding::Brotli => "br",
            Coding::Identity => "JSON",
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn build(config: serde_json::Value) -> Result<JsonBody, Vec<BuildError>> {
        JsonBody::build(
            serde_json::from_value(config).unwrap(),
            &BuildCtx::default(),
        )
    }

    fn rewrite(operations: serde_json::Value, body: &str) -> String {
        let filter = build(serde_json::json!({ "request": operations })).unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        ctx.consumer = Some(crate::Consumer::new("acme"));
        let out = filter
            .request
            .rewrite(body.as_bytes(), &mut ctx, &Captured::default())
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn pointers_follow_rfc_6901() {
        assert_eq!(
            Pointer::parse("/a~1b/m~0n/0").unwrap().0,
            ["a/b", "m~n", "0"]
        );
        assert_eq!(Pointer::parse("/").unwrap().0, [""]);
        assert!(Pointer::parse("a").is_err());
        assert!(Pointer::parse("").is_err());
        assert!(Pointer::parse("/a~").is_err());
        assert!(Pointer::parse("/a~2").is_err());
        use crate::json_doc::index;
        assert_eq!(index("01", 5), None);
        assert_eq!(index("1", 5), Some(1));
        assert_eq!(index("5", 5), None);
        assert_eq!(index("-1", 5), None);
    }

    #[test]
    fn each_operation_does_what_json_patch_users_expect() {
        let ops = serde_json::json!([
            { "op": "set", "path": "/a", "value": 2 },
            { "op": "set", "path": "/new/deep", "value": "${consumer.id}" },
            { "op": "add", "path": "/b", "value": "not replaced" },
            { "op": "add", "path": "/c", "value": [1, { "who": "${consumer.id}" }] },
            { "op": "add", "path": "/list/1", "value": "inserted" },
            { "op": "set", "path": "/list/0", "value": "replaced" },
            { "op": "add", "path": "/list/-", "value": "appended" },
            { "op": "remove", "path": "/gone" },
            { "op": "remove", "path": "/missing/deeper" },
            { "op": "rename", "from": "/old", "path": "/renamed" },
            { "op": "rename", "from": "/absent", "path": "/never" },
            { "op": "copy", "from": "/a", "path": "/copies/a" },
            { "op": "set", "path": "/text/inside", "value": 1 },
            { "op": "set", "path": "/list/9/x", "value": 1 },
        ]);
        let out = rewrite(
            ops,
            r#"{"a":1,"b":"kept","list":["x","y"],"gone":true,"old":{"v":1},"text":"s"}"#,
        );
        assert_eq!(
            out,
            r#"{"a":2,"b":"kept","list":["replaced","inserted","y","appended"],"text":"s","new":{"deep":"acme"},"c":[1,{"who":"acme"}],"renamed":{"v":1},"copies":{"a":2}}"#
        );
    }

    #[test]
    fn a_body_that_is_not_an_object_is_left_as_it_is_where_no_target_exists() {
        let ops = serde_json::json!([{ "op": "set", "path": "/a", "value": 1 }]);
        assert_eq!(rewrite(ops.clone(), "[1,2]"), "[1,2]");
        assert_eq!(rewrite(ops, "\"text\""), "\"text\"");
    }

    #[test]
    fn content_types_are_json_only_when_they_say_so() {
        let json = |text: &str| is_json(Some(&HeaderValue::from_str(text).unwrap()));
        assert!(json("application/json"));
        assert!(json("Application/JSON; charset=utf-8"));
        assert!(json("application/problem+json"));
        assert!(!json("application/jsonp"));
        assert!(!json("text/plain"));
        assert!(!json("+json"));
        assert!(!is_json(None));
    }

    #[test]
    fn build_errors_name_their_paths() {
        let errors = build(serde_json::json!({
            "max_body_bytes": 0,
            "request": [{ "op": "set", "path": "nope", "value": "${nowhere}" }],
            "response": [{ "op": "copy", "from": "/a~", "path": "/b" }],
        }))
        .err()
        .unwrap();
        let paths: Vec<_> = errors.iter().map(|error| error.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "max_body_bytes",
                "request[0].path",
                "request[0].value",
                "response[0].from"
            ]
        );
        assert!(build(serde_json::json!({})).is_err());
        let over_server = JsonBody::build(
            serde_json::from_value(serde_json::json!({
                "max_body_bytes": "2MiB",
                "request": [{ "op": "remove", "path": "/a" }],
            }))
            .unwrap(),
            &BuildCtx {
                server_max_body_bytes: Some(1 << 20),
                ..BuildCtx::default()
            },
        );
        assert_eq!(over_server.err().unwrap()[0].path, "max_body_bytes");
    }
}
