//! `grpc_web`: browsers call gRPC services through the gateway. A gRPC-Web request
//! (`application/grpc-web[+proto]`, binary, or `application/grpc-web-text[+proto]`, base64)
//! reaches the upstream as plain gRPC (`application/grpc`, `te: trailers`, the text body
//! decoded), and the upstream's answer goes back as gRPC-Web: the same framing, with the
//! upstream's HTTP/2 trailers written as a last frame (flag `0x80`) of `name:value\r\n` lines,
//! and in text mode the whole body base64-encoded.
//!
//! Text mode decodes the request's base64 as it arrives, one 4-character quantum at a time; a
//! padded quantum may sit anywhere (clients send one padded chunk per message). The answer is
//! encoded 3 bytes at a time, the last 1 or 2 bytes of a piece held for the next one, except
//! where a piece ends a message: there the base64 is closed with its padding, so a message of a
//! stream reaches the client whole without waiting for the next one. The trailer frame is
//! encoded with whatever is still held, padded, as the body's last chunk.
//!
//! Requests of any other content type (plain gRPC, REST) pass untouched. A trailers-only answer
//! (`grpc-status` in the head) keeps its status in the head, where gRPC-Web clients read it. An
//! answer that ends with neither trailers nor a status in its head gets a last frame saying
//! `grpc-status: 2` (UNKNOWN). An answer of the gateway's own (a refusal, a problem document)
//! gets `grpc-status` and `grpc-message` headers for its HTTP status, so a gRPC-Web client sees
//! a gRPC code.
//!
//! CORS is the `cors` filter's: a browser reads `grpc-status` and `grpc-message` from the head
//! of a trailers-only answer only if that filter's `expose_headers` lists them, and its
//! `allow_headers` must admit the request headers gRPC-Web clients send (`content-type`,
//! `x-grpc-web`, `x-user-agent`, `grpc-timeout`).

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, TE, TRANSFER_ENCODING};
use http::{HeaderName, HeaderValue};
use pingora_http::{RequestHeader, ResponseHeader};
use serde::Deserialize;

use crate::grpc::{self, Code, TRAILER_FLAG};
use crate::{
    BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, Problem, ProblemType,
    RequestContext, Stage,
};

/// The filter has no settings: `{}`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {}

pub struct GrpcWeb {
    /// Per-request state is told apart by the filter's address, which a zero-sized filter
    /// would share with every other instance behind a `Box`.
    _sized: u8,
}

impl FilterKind for GrpcWeb {
    const KIND: &'static str = "grpc_web";
    type Config = Config;

    fn build(_config: Config, _ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        Ok(GrpcWeb { _sized: 0 })
    }
}

/// `x-grpc-web`, which gRPC-Web clients send and a gRPC server has no use for.
const X_GRPC_WEB: HeaderName = HeaderName::from_static("x-grpc-web");

/// What the status of an answer that ended without one says.
const MISSING_STATUS: &str = "the upstream ended the call without a status";

/// How the client frames its bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `application/grpc-web`: length-prefixed frames as in gRPC.
    Binary,
    /// `application/grpc-web-text`: the same frames, base64-encoded.
    Text,
}

/// A gRPC-Web request's state, kept per filter instance.
struct Call {
    mode: Mode,
    /// The content type's `+proto`-style suffix (`+proto` when the client named none), for the
    /// answer's content type when the upstream names none either.
    suffix: String,
    /// Whether the client speaks HTTP/1.1, so an answer of unknown length may be chunked.
    chunked_ok: bool,
    /// Base64 of the request body not yet decoded (text mode).
    decoder: TextDecoder,
    /// How the answer is being converted.
    reply: Reply,
}

#[derive(Debug)]
enum Reply {
    /// No answer yet.
    Pending,
    /// An answer left as it is: not gRPC, or the gateway's own.
    Untouched,
    /// An upstream gRPC answer being converted.
    Converting(Converting),
    /// The last piece of the answer was written.
    Done,
}

#[derive(Debug, Default)]
struct Converting {
    /// The head carried `grpc-status` (a trailers-only answer): no trailer frame follows.
    status_in_head: bool,
    /// Where the body is in its frames, so text mode can close its base64 at a frame's end.
    frames: FrameCursor,
    /// Bytes not yet base64-encoded (text mode).
    encoder: TextEncoder,
}

/// The gRPC-Web mode and suffix of a request content type; `None` for anything else.
fn web_mode(content_type: &[u8]) -> Option<(Mode, String)> {
    let text = std::str::from_utf8(content_type).ok()?;
    let essence = text.split(';').next().unwrap_or_default().trim();
    let lower = essence.to_ascii_lowercase();
    let (mode, rest) = if let Some(rest) = lower.strip_prefix("application/grpc-web-text") {
        (Mode::Text, rest)
    } else if let Some(rest) = lower.strip_prefix("application/grpc-web") {
        (Mode::Binary, rest)
    } else {
        return None;
    };
    match rest {
        "" => Some((mode, String::new())),
        suffix if suffix.len() > 1 && suffix.starts_with('+') => Some((mode, suffix.to_string())),
        _ => None,
    }
}

/// Whether a response content type is plain gRPC's (`application/grpc`, `application/grpc+x`,
/// with or without parameters), and its suffix.
fn grpc_suffix(content_type: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(content_type).ok()?;
    let essence = text.split(';').next().unwrap_or_default().trim();
    let lower = essence.to_ascii_lowercase();
    let rest = lower.strip_prefix("application/grpc")?;
    match rest {
        "" => Some(String::new()),
        suffix if suffix.len() > 1 && suffix.starts_with('+') => Some(suffix.to_string()),
        _ => None,
    }
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("application/grpc"))
}

/// The trailer frame for `trailers`: `grpc-status` first (UNKNOWN when they have none), then
/// every other trailer, one `name:value\r\n` line each.
fn trailer_frame(trailers: &http::HeaderMap) -> Vec<u8> {
    let mut block = Vec::new();
    let mut line = |name: &str, value: &[u8]| {
        block.extend_from_slice(name.as_bytes());
        block.push(b':');
        block.extend_from_slice(value);
        block.extend_from_slice(b"\r\n");
    };
    let status = trailers.get(grpc::STATUS);
    match status {
        Some(status) => line(grpc::STATUS.as_str(), status.as_bytes()),
        None => {
            line(grpc::STATUS.as_str(), Code::Unknown.as_str().as_bytes());
            line(
                grpc::MESSAGE.as_str(),
                grpc::encode_message(MISSING_STATUS).as_bytes(),
            );
        }
    }
    for (name, value) in trailers {
        if name == grpc::STATUS || (status.is_none() && name == grpc::MESSAGE) {
            continue;
        }
        line(name.as_str(), value.as_bytes());
    }
    let mut frame = BytesMut::new();
    grpc::encode_frame(TRAILER_FLAG, &block, &mut frame);
    frame.to_vec()
}

/// Decodes a base64 body piece by piece, however the pieces cut it. Each 4-character quantum is
/// decoded as soon as it is whole; a padded quantum ends one base64 chunk and another may
/// follow (gRPC-Web text clients send one per message).
#[derive(Debug, Default)]
struct TextDecoder {
    held: [u8; 4],
    len: usize,
}

#[derive(Debug)]
struct InvalidBase64;

impl TextDecoder {
    /// Decodes what `piece` completes into `out`.
    fn push(&mut self, mut piece: &[u8], out: &mut Vec<u8>) -> Result<(), InvalidBase64> {
        if self.len > 0 {
            let take = (4 - self.len).min(piece.len());
            self.held[self.len..self.len + take].copy_from_slice(&piece[..take]);
            self.len += take;
            piece = &piece[take..];
            if self.len < 4 {
                return Ok(());
            }
            self.len = 0;
            decode_quanta(&self.held, out)?;
        }
        let whole = piece.len() / 4 * 4;
        decode_quanta(&piece[..whole], out)?;
        let rest = &piece[whole..];
        self.held[..rest.len()].copy_from_slice(rest);
        self.len = rest.len();
        Ok(())
    }

    /// At the end of the body: an error if it stopped inside a quantum.
    fn finish(&self) -> Result<(), InvalidBase64> {
        if self.len == 0 {
            Ok(())
        } else {
            Err(InvalidBase64)
        }
    }
}

/// Decodes whole quanta (a multiple of 4 characters), any of which may be padded.
fn decode_quanta(mut data: &[u8], out: &mut Vec<u8>) -> Result<(), InvalidBase64> {
    while !data.is_empty() {
        let Some(pad) = data.iter().position(|&byte| byte == b'=') else {
            return STANDARD.decode_vec(data, out).map_err(|_| InvalidBase64);
        };
        let quantum = pad / 4 * 4;
        if quantum > 0 {
            STANDARD
                .decode_vec(&data[..quantum], out)
                .map_err(|_| InvalidBase64)?;
        }
        STANDARD
            .decode_vec(&data[quantum..quantum + 4], out)
            .map_err(|_| InvalidBase64)?;
        data = &data[quantum + 4..];
    }
    Ok(())
}

/// Encodes a body as base64 piece by piece: whole 3-byte groups as they arrive, the last 0 to 2
/// bytes padded when told to flush.
#[derive(Debug, Default)]
struct TextEncoder {
    held: [u8; 3],
    len: usize,
}

impl TextEncoder {
    fn push(&mut self, mut piece: &[u8], flush: bool, out: &mut String) {
        if self.len > 0 {
            let take = (3 - self.len).min(piece.len());
            self.held[self.len..self.len + take].copy_from_slice(&piece[..take]);
            self.len += take;
            piece = &piece[take..];
            if self.len == 3 || flush {
                // With `flush` and fewer than 3 held, `piece` is empty: this is the padded end.
                STANDARD.encode_string(&self.held[..self.len], out);
                self.len = 0;
            }
        }
        let whole = if flush {
            piece.len()
        } else {
            piece.len() / 3 * 3
        };
        STANDARD.encode_string(&piece[..whole], out);
        let rest = &piece[whole..];
        self.held[..rest.len()].copy_from_slice(rest);
        self.len = rest.len();
    }
}

/// Follows a body through its length-prefixed frames.
#[derive(Debug, Default)]
struct FrameCursor {
    /// Bytes of the current frame's 5-byte prefix seen so far.
    prefix_seen: usize,
    length: [u8; 4],
    /// Bytes of the current frame's data still to come.
    remaining: usize,
}

impl FrameCursor {
    /// Moves past `piece`; whether the body is then at a frame's end.
    fn advance(&mut self, mut piece: &[u8]) -> bool {
        while !piece.is_empty() {
            if self.remaining > 0 {
                let skip = self.remaining.min(piece.len());
                self.remaining -= skip;
                piece = &piece[skip..];
                continue;
            }
            if self.prefix_seen > 0 {
                self.length[self.prefix_seen - 1] = piece[0];
            }
            self.prefix_seen += 1;
            piece = &piece[1..];
            if self.prefix_seen == 5 {
                self.prefix_seen = 0;
                self.remaining = u32::from_be_bytes(self.length) as usize;
            }
        }
        self.prefix_seen == 0 && self.remaining == 0
    }
}

fn invalid_base64() -> Problem {
    Problem::new(ProblemType::BadRequest)
        .detail("The gRPC-Web text request body is not valid base64")
}

impl GrpcWeb {
    fn call<'a>(&self, ctx: &'a mut RequestContext) -> Option<&'a mut Call> {
        ctx.instance_state::<_, Call>(self)
    }
}

#[async_trait]
impl Filter for GrpcWeb {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn stage(&self) -> Stage {
        Stage::Main
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
            | Phases::REQUEST_BODY
            | Phases::UPSTREAM_REQUEST
            | Phases::RESPONSE
            | Phases::RESPONSE_BODY
            | Phases::RESPONSE_TRAILERS
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        let Some((mode, suffix)) = request
            .headers
            .get(CONTENT_TYPE)
            .and_then(|value| web_mode(value.as_bytes()))
        else {
            return Some(Decision::Continue);
        };
        let content_type = header_value(&format!("application/grpc{suffix}"));
        request.insert_header(CONTENT_TYPE, content_type).ok();
        request
            .insert_header(TE, HeaderValue::from_static("trailers"))
            .ok();
        request.remove_header(&X_GRPC_WEB);
        if mode == Mode::Text {
            // Decoded before the upstream sees the head (when its length is known and within
            // the proxy's read-ahead): a body that is not base64 is refused with nothing sent.
            ctx.buffers_request_body = true;
        }
        let call = Call {
            mode,
            suffix: if suffix.is_empty() {
                "+proto".to_string()
            } else {
                suffix
            },
            chunked_ok: request.version == http::Version::HTTP_11,
            decoder: TextDecoder::default(),
            reply: Reply::Pending,
        };
        ctx.set_instance_state(self, call);
        Some(Decision::Continue)
    }

    /// The decoded text body is shorter than the client's: the upstream gets it streamed. (Its
    /// length stays on the client's request, which Pingora reads the body by.)
    fn upstream_request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) {
        if ctx
            .instance_state::<_, Call>(self)
            .is_some_and(|call| call.mode == Mode::Text)
        {
            request.remove_header(&CONTENT_LENGTH);
        }
    }

    fn request_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) -> Result<(), Problem> {
        // A retry replays the body from its start (and restarts the proxy's count): a first
        // piece starts the decoding afresh.
        let first_piece = body
            .as_ref()
            .is_some_and(|piece| !piece.is_empty() && ctx.request_body_bytes == piece.len() as u64);
        let Some(call) = self.call(ctx) else {
            return Ok(());
        };
        if call.mode != Mode::Text {
            return Ok(());
        }
        if first_piece {
            call.decoder = TextDecoder::default();
        }
        let mut decoded = Vec::new();
        if let Some(piece) = body.as_ref() {
            call.decoder
                .push(piece, &mut decoded)
                .map_err(|_| invalid_base64())?;
        }
        if end_of_stream {
            call.decoder.finish().map_err(|_| invalid_base64())?;
        }
        *body = (!decoded.is_empty()).then(|| Bytes::from(decoded));
        Ok(())
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        let own_answer = ctx.own_answer;
        let Some(call) = self.call(ctx) else {
            return;
        };
        if own_answer {
            // A refusal of the gateway's (a problem document, written whole): its body stays,
            // and the head tells a gRPC-Web client the gRPC code of its status.
            call.reply = Reply::Untouched;
            if !response.headers.contains_key(grpc::STATUS) {
                let status = response.status.as_u16();
                let code = Code::for_http_status(status);
                let message = grpc::encode_message(&format!(
                    "the gateway answered HTTP {status} ({})",
                    response
                        .status
                        .canonical_reason()
                        .unwrap_or("no reason phrase")
                ));
                response
                    .insert_header(grpc::STATUS, HeaderValue::from_static(code.as_str()))
                    .ok();
                response
                    .insert_header(grpc::MESSAGE, header_value(&message))
                    .ok();
            }
            return;
        }
        let Some(upstream_suffix) = response
            .headers
            .get(CONTENT_TYPE)
            .and_then(|value| grpc_suffix(value.as_bytes()))
        else {
            call.reply = Reply::Untouched;
            return;
        };
        let suffix = if upstream_suffix.is_empty() {
            call.suffix.as_str()
        } else {
            upstream_suffix.as_str()
        };
        let content_type = match call.mode {
            Mode::Binary => format!("application/grpc-web{suffix}"),
            Mode::Text => format!("application/grpc-web-text{suffix}"),
        };
        response
            .insert_header(CONTENT_TYPE, header_value(&content_type))
            .ok();
        // The body changes (trailers become its last frame, text mode encodes it): its length
        // is known only at its end.
        response.remove_header(&CONTENT_LENGTH);
        if call.chunked_ok {
            response
                .insert_header(TRANSFER_ENCODING, HeaderValue::from_static("chunked"))
                .ok();
        }
        call.reply = Reply::Converting(Converting {
            status_in_head: response.headers.contains_key(grpc::STATUS),
            ..Converting::default()
        });
    }

    fn response_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestContext,
    ) {
        let Some(call) = self.call(ctx) else {
            return;
        };
        let Reply::Converting(converting) = &mut call.reply else {
            return;
        };
        let piece = body.take().unwrap_or_default();
        let at_frame_end = converting.frames.advance(&piece);
        let ending = (end_of_stream && !converting.status_in_head)
            .then(|| trailer_frame(&http::HeaderMap::new()));
        let out = match call.mode {
            Mode::Binary => match ending {
                None => piece,
                Some(frame) => {
                    let mut out = BytesMut::with_capacity(piece.len() + frame.len());
                    out.extend_from_slice(&piece);
                    out.extend_from_slice(&frame);
                    out.freeze()
                }
            },
            Mode::Text => {
                let mut out = String::new();
                match ending {
                    None => converting.encoder.push(
                        &piece,
                        // A frame's end is the end of a message the client can read now.
                        at_frame_end || end_of_stream,
                        &mut out,
                    ),
                    Some(frame) => {
                        converting.encoder.push(&piece, false, &mut out);
                        converting.encoder.push(&frame, true, &mut out);
                    }
                }
                Bytes::from(out)
            }
        };
        if end_of_stream {
            call.reply = Reply::Done;
        }
        *body = (!out.is_empty()).then_some(out);
    }

    fn response_trailers(
        &self,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestContext,
    ) -> Option<Bytes> {
        let call = self.call(ctx)?;
        let Reply::Converting(converting) = &mut call.reply else {
            return None;
        };
        let frame = trailer_frame(trailers);
        let last = match call.mode {
            Mode::Binary => Bytes::from(frame),
            Mode::Text => {
                let mut out = String::new();
                converting.encoder.push(&frame, true, &mut out);
                Bytes::from(out)
            }
        };
        call.reply = Reply::Done;
        Some(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    /// A filter where the chain keeps it (its state is told apart by its address).
    fn filter() -> Arc<GrpcWeb> {
        let config = serde_json::from_value(serde_json::json!({})).unwrap();
        Arc::new(GrpcWeb::build(config, &BuildCtx::default()).unwrap())
    }

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build("POST", b"/pkg.Service/Method", None).unwrap();
        for (name, value) in headers {
            request
                .append_header(name.to_string(), value.to_string())
                .unwrap();
        }
        request
    }

    fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
        headers.get(name).map(|value| value.to_str().unwrap())
    }

    /// A filter and a context after the request head of `content_type`.
    fn started(content_type: &str) -> (Arc<GrpcWeb>, RequestContext, RequestHeader) {
        let filter = filter();
        let mut ctx = RequestContext::new(Instant::now());
        let mut request = request(&[
            ("content-type", content_type),
            ("content-length", "20"),
            ("x-grpc-web", "1"),
            ("x-user-agent", "grpc-web-javascript/0.1"),
        ]);
        assert!(matches!(
            filter.try_request(&mut request, &mut ctx),
            Some(Decision::Continue)
        ));
        (filter, ctx, request)
    }

    fn upstream_head(extra: &[(&str, &str)]) -> ResponseHeader {
        let mut response = ResponseHeader::build(200, None).unwrap();
        response
            .append_header("content-type", "application/grpc")
            .unwrap();
        for (name, value) in extra {
            response
                .append_header(name.to_string(), value.to_string())
                .unwrap();
        }
        response
    }

    fn frames(messages: &[&[u8]]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for message in messages {
            grpc::encode_frame(0, message, &mut out);
        }
        out.to_vec()
    }

    /// Feeds the request body in `pieces`; the decoded body.
    fn send(
        filter: &GrpcWeb,
        ctx: &mut RequestContext,
        pieces: &[&[u8]],
    ) -> Result<Vec<u8>, Problem> {
        let mut out = Vec::new();
        for (index, piece) in pieces.iter().enumerate() {
            let mut body = Some(Bytes::copy_from_slice(piece));
            filter.request_body(&mut body, index + 1 == pieces.len(), ctx)?;
            out.extend_from_slice(body.as_deref().unwrap_or_default());
        }
        Ok(out)
    }

    /// Feeds the response body in `pieces`, the last with `end_of_stream` unless trailers
    /// follow; what the client gets.
    fn answer(
        filter: &GrpcWeb,
        ctx: &mut RequestContext,
        pieces: &[&[u8]],
        trailers: Option<&[(&str, &str)]>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        for (index, piece) in pieces.iter().enumerate() {
            let mut body = Some(Bytes::copy_from_slice(piece));
            let end = trailers.is_none() && index + 1 == pieces.len();
            filter.response_body(&mut body, end, ctx);
            out.extend_from_slice(body.as_deref().unwrap_or_default());
        }
        if let Some(trailers) = trailers {
            let mut map = http::HeaderMap::new();
            for (name, value) in trailers {
                map.append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            let last = filter.response_trailers(&mut map, ctx).unwrap();
            out.extend_from_slice(&last);
        }
        out
    }

    #[test]
    fn a_binary_unary_call_goes_through_with_its_trailers_as_a_last_frame() {
        let (filter, mut ctx, request) = started("application/grpc-web+proto");
        assert_eq!(
            header(&request.headers, "content-type"),
            Some("application/grpc+proto")
        );
        assert_eq!(header(&request.headers, "te"), Some("trailers"));
        assert_eq!(header(&request.headers, "x-grpc-web"), None);
        assert_eq!(
            header(&request.headers, "x-user-agent"),
            Some("grpc-web-javascript/0.1")
        );
        // The binary body keeps its length.
        assert_eq!(header(&request.headers, "content-length"), Some("20"));
        let body = frames(&[b"request"]);
        assert_eq!(send(&filter, &mut ctx, &[&body]).unwrap(), body);

        let mut response = upstream_head(&[("content-length", "12")]);
        filter.response(&mut response, &mut ctx);
        assert_eq!(
            header(&response.headers, "content-type"),
            Some("application/grpc-web+proto")
        );
        assert_eq!(header(&response.headers, "content-length"), None);
        assert_eq!(
            header(&response.headers, "transfer-encoding"),
            Some("chunked")
        );
        let body = frames(&[b"response"]);
        let got = answer(
            &filter,
            &mut ctx,
            &[&body[..3], &body[3..]],
            Some(&[
                ("grpc-status", "0"),
                ("grpc-message", "fine"),
                ("x-extra", "a"),
            ]),
        );
        let block = b"grpc-status:0\r\ngrpc-message:fine\r\nx-extra:a\r\n";
        let mut expected = body.clone();
        expected.push(0x80);
        expected.extend_from_slice(&(block.len() as u32).to_be_bytes());
        expected.extend_from_slice(block);
        assert_eq!(got, expected);
    }

    #[test]
    fn plain_grpc_keeps_no_suffix_and_the_answer_says_proto() {
        let (filter, mut ctx, request) = started("application/grpc-web");
        assert_eq!(
            header(&request.headers, "content-type"),
            Some("application/grpc")
        );
        let mut response = upstream_head(&[]);
        filter.response(&mut response, &mut ctx);
        assert_eq!(
            header(&response.headers, "content-type"),
            Some("application/grpc-web+proto")
        );
    }

    #[test]
    fn a_text_request_is_decoded_however_the_pieces_cut_it() {
        let body = frames(&[b"a message of some length", b"and another"]);
        let text = STANDARD.encode(&body);
        let (filter, mut ctx, mut request) = started("application/grpc-web-text");
        assert_eq!(
            header(&request.headers, "content-type"),
            Some("application/grpc")
        );
        // The client's length stays (Pingora reads the body by it); the upstream's goes.
        assert!(header(&request.headers, "content-length").is_some());
        filter.upstream_request(&mut request, &mut ctx);
        assert_eq!(header(&request.headers, "content-length"), None);
        for first in 0..=text.len() {
            for second in first..=text.len() {
                let (filter, mut ctx, _) = started("application/grpc-web-text+proto");
                let pieces = [
                    &text.as_bytes()[..first],
                    &text.as_bytes()[first..second],
                    &text.as_bytes()[second..],
                ];
                assert_eq!(
                    send(&filter, &mut ctx, &pieces).unwrap(),
                    body,
                    "cut at {first}, {second}"
                );
            }
        }
    }

    #[test]
    fn concatenated_padded_chunks_decode_as_one_body() {
        // Each message its own base64 chunk, both padded (lengths 1 and 2 mod 3).
        let first = frames(&[b"abc"]);
        let second = frames(&[b"hello"]);
        assert_eq!(first.len() % 3, 2);
        assert_eq!(second.len() % 3, 1);
        let text = format!("{}{}", STANDARD.encode(&first), STANDARD.encode(&second));
        assert!(text.contains("=A") || text.contains("=="), "{text}");
        let whole = [first, second].concat();
        for cut in 0..=text.len() {
            let (filter, mut ctx, _) = started("application/grpc-web-text");
            let pieces = [&text.as_bytes()[..cut], &text.as_bytes()[cut..]];
            assert_eq!(
                send(&filter, &mut ctx, &pieces).unwrap(),
                whole,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn invalid_base64_is_refused_with_400() {
        for text in [&b"AAAA!AAA"[..], b"AA=A", b"A===", b"AAAAAA", b"AAAAB="] {
            let (filter, mut ctx, _) = started("application/grpc-web-text");
            let problem = send(&filter, &mut ctx, &[text]).unwrap_err();
            assert_eq!(problem.status, 400, "{text:?}");
            assert_eq!(problem.kind, ProblemType::BadRequest);
            assert!(problem.detail.unwrap().contains("base64"));
        }
        // A binary body is not base64 and passes as it is.
        let (filter, mut ctx, _) = started("application/grpc-web");
        assert_eq!(send(&filter, &mut ctx, &[b"AA=A"]).unwrap(), b"AA=A");
    }

    #[test]
    fn a_retry_decodes_the_replayed_body_from_its_start() {
        let text = STANDARD.encode(frames(&[b"retried"]));
        let (filter, mut ctx, _) = started("application/grpc-web-text");
        // A first attempt read 5 characters (one left over) before it failed.
        ctx.request_body_bytes = 5;
        let mut body = Some(Bytes::copy_from_slice(&text.as_bytes()[..5]));
        filter.request_body(&mut body, false, &mut ctx).unwrap();
        // The replay starts over, and so does the proxy's count.
        ctx.request_body_bytes = text.len() as u64;
        let mut body = Some(Bytes::copy_from_slice(text.as_bytes()));
        filter.request_body(&mut body, true, &mut ctx).unwrap();
        assert_eq!(body.unwrap(), frames(&[b"retried"]));
    }

    #[test]
    fn a_text_answer_is_the_base64_of_the_binary_one_however_the_pieces_cut_it_within_a_message() {
        let body = frames(&[b"a response message, long enough to cut anywhere"]);
        let trailers: &[(&str, &str)] = &[("grpc-status", "0")];
        let binary = {
            let (filter, mut ctx, _) = started("application/grpc-web");
            filter.response(&mut upstream_head(&[]), &mut ctx);
            answer(&filter, &mut ctx, &[&body], Some(trailers))
        };
        for cut in 0..=body.len() {
            let (filter, mut ctx, _) = started("application/grpc-web-text");
            let mut response = upstream_head(&[]);
            filter.response(&mut response, &mut ctx);
            assert_eq!(
                header(&response.headers, "content-type"),
                Some("application/grpc-web-text+proto")
            );
            // The body alone, ended without trailers, gets a status frame appended.
            let got = answer(&filter, &mut ctx, &[&body[..cut], &body[cut..]], None);
            let status = trailer_frame(&http::HeaderMap::new());
            let expected = if cut == body.len() {
                // The first piece ended the message, so its base64 was closed there.
                STANDARD.encode(&body) + &STANDARD.encode(&status)
            } else {
                STANDARD.encode([&body[..], &status].concat())
            };
            assert_eq!(got, expected.as_bytes(), "cut at {cut}");
            // With trailers: the body's last piece ends its last message, so its base64 is
            // closed there, and the trailer frame follows as a padded chunk of its own; read
            // the way clients read (chunk after chunk), it is the binary answer.
            let (filter, mut ctx, _) = started("application/grpc-web-text");
            filter.response(&mut upstream_head(&[]), &mut ctx);
            let got = answer(
                &filter,
                &mut ctx,
                &[&body[..cut], &body[cut..]],
                Some(trailers),
            );
            let trailer = &binary[body.len()..];
            let expected = STANDARD.encode(&body) + &STANDARD.encode(trailer);
            assert_eq!(got, expected.as_bytes(), "cut at {cut}");
            let mut decoded = Vec::new();
            let mut decoder = TextDecoder::default();
            decoder.push(&got, &mut decoded).unwrap();
            decoder.finish().unwrap();
            assert_eq!(decoded, binary, "cut at {cut}");
            // Trailers that cut a message short: the bytes held and the trailer frame are
            // encoded together, as one padded chunk.
            if cut > 0 && cut < body.len() {
                let (filter, mut ctx, _) = started("application/grpc-web-text");
                filter.response(&mut upstream_head(&[]), &mut ctx);
                let got = answer(&filter, &mut ctx, &[&body[..cut]], Some(trailers));
                let expected = STANDARD.encode([&body[..cut], trailer].concat());
                assert_eq!(got, expected.as_bytes(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn a_text_answer_closes_its_base64_at_each_message_end() {
        // A stream's message reaches the client whole as soon as it arrives; the client decodes
        // the padded chunks one after the other.
        let first = frames(&[b"first"]);
        let second = frames(&[b"second!"]);
        assert_ne!(first.len() % 3, 0);
        let (filter, mut ctx, _) = started("application/grpc-web-text");
        filter.response(&mut upstream_head(&[]), &mut ctx);
        let mut body = Some(Bytes::from(first.clone()));
        filter.response_body(&mut body, false, &mut ctx);
        assert_eq!(body.unwrap(), STANDARD.encode(&first));
        let got = answer(&filter, &mut ctx, &[&second], Some(&[("grpc-status", "0")]));
        let mut map = http::HeaderMap::new();
        map.insert(grpc::STATUS, HeaderValue::from_static("0"));
        let rest = [second, trailer_frame(&map)].concat();
        assert_eq!(got, STANDARD.encode(&rest).as_bytes());
    }

    #[test]
    fn a_trailers_only_answer_keeps_its_status_in_the_head() {
        for content_type in ["application/grpc-web", "application/grpc-web-text"] {
            let (filter, mut ctx, _) = started(content_type);
            let mut response = upstream_head(&[
                ("grpc-status", "7"),
                ("grpc-message", "denied"),
                ("content-length", "0"),
            ]);
            filter.response(&mut response, &mut ctx);
            assert_eq!(header(&response.headers, "grpc-status"), Some("7"));
            assert_eq!(header(&response.headers, "grpc-message"), Some("denied"));
            assert_eq!(header(&response.headers, "content-length"), None);
            assert!(header(&response.headers, "content-type")
                .unwrap()
                .starts_with("application/grpc-web"));
            let mut body = None;
            filter.response_body(&mut body, true, &mut ctx);
            assert_eq!(body, None, "{content_type}");
        }
    }

    #[test]
    fn trailers_without_a_status_say_unknown() {
        let (filter, mut ctx, _) = started("application/grpc-web");
        filter.response(&mut upstream_head(&[]), &mut ctx);
        let got = answer(
            &filter,
            &mut ctx,
            &[],
            Some(&[("grpc-message", "lost"), ("x-other", "1")]),
        );
        let block = b"grpc-status:2\r\ngrpc-message:the upstream ended the call without a status\r\nx-other:1\r\n";
        assert_eq!(
            &got[..5],
            [&[0x80][..], &(block.len() as u32).to_be_bytes()].concat()
        );
        assert_eq!(&got[5..], block);
    }

    #[test]
    fn other_requests_and_answers_are_left_alone() {
        let filter = filter();
        for content_type in [
            "application/json",
            "application/grpc",
            "application/grpc+proto",
            "application/grpc-webx",
            "application/grpc-web+",
        ] {
            let mut ctx = RequestContext::new(Instant::now());
            let mut request = request(&[
                ("content-type", content_type),
                ("content-length", "4"),
                ("x-grpc-web", "1"),
            ]);
            let before = format!("{:?}", request.headers);
            assert!(matches!(
                filter.try_request(&mut request, &mut ctx),
                Some(Decision::Continue)
            ));
            assert_eq!(format!("{:?}", request.headers), before, "{content_type}");
            let mut body = Some(Bytes::from_static(b"AA=A"));
            filter.request_body(&mut body, true, &mut ctx).unwrap();
            assert_eq!(body.unwrap(), "AA=A");
            let mut response = upstream_head(&[("content-length", "4")]);
            filter.response(&mut response, &mut ctx);
            assert_eq!(
                header(&response.headers, "content-type"),
                Some("application/grpc")
            );
            assert_eq!(header(&response.headers, "content-length"), Some("4"));
            let mut body = Some(Bytes::from_static(b"data"));
            filter.response_body(&mut body, true, &mut ctx);
            assert_eq!(body.unwrap(), "data");
            let mut trailers = http::HeaderMap::new();
            assert_eq!(filter.response_trailers(&mut trailers, &mut ctx), None);
        }
        // A gRPC-Web request whose upstream does not answer gRPC: the answer passes as it is.
        let (filter, mut ctx, _) = started("application/grpc-web-text");
        let mut response = ResponseHeader::build(502, None).unwrap();
        response.append_header("content-type", "text/html").unwrap();
        response.append_header("content-length", "4").unwrap();
        filter.response(&mut response, &mut ctx);
        assert_eq!(header(&response.headers, "content-length"), Some("4"));
        let mut body = Some(Bytes::from_static(b"oops"));
        filter.response_body(&mut body, true, &mut ctx);
        assert_eq!(body.unwrap(), "oops");
    }

    #[test]
    fn the_gateways_own_answers_carry_a_grpc_status() {
        let (filter, mut ctx, _) = started("application/grpc-web");
        ctx.own_answer = true;
        let mut response = ResponseHeader::build(401, None).unwrap();
        response
            .append_header("content-type", "application/problem+json")
            .unwrap();
        filter.response(&mut response, &mut ctx);
        assert_eq!(header(&response.headers, "grpc-status"), Some("16"));
        assert_eq!(
            header(&response.headers, "grpc-message"),
            Some("the gateway answered HTTP 401 (Unauthorized)")
        );
        assert_eq!(
            header(&response.headers, "content-type"),
            Some("application/problem+json")
        );
    }

    #[test]
    fn the_config_is_empty() {
        let errors = crate::Registry::builtin()
            .build(
                "grpc_web",
                &serde_json::json!({"max": 1}),
                &BuildCtx::default(),
            )
            .err()
            .unwrap();
        assert!(errors[0].message.contains("unknown field"), "{errors:?}");
        assert!(crate::Registry::builtin()
            .build("grpc_web", &serde_json::Value::Null, &BuildCtx::default())
            .is_ok());
    }
}
