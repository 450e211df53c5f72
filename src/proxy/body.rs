//! Request bodies a filter rewrites whole (`buffers_request_body`, as `json_body` does).
//!
//! Pingora sends the upstream the request head before the body, so a rewritten body can carry
//! its new `Content-Length` only if it is read before the head leaves. A body that declares a
//! length within Pingora's replay buffer (`READ_AHEAD_MAX`) is read in the request phase,
//! through the chain's body phase; Pingora then hands the buffered body to
//! `request_body_filter` as the whole body, and it is swapped for the rewritten one (on every
//! attempt, so a retry sends it again). The upstream gets the new `Content-Length` and no
//! `Transfer-Encoding`, and a body the filter refuses (too large, not JSON) is answered before
//! any upstream sees the request.
//!
//! A longer or chunked body cannot be replayed once read (Pingora forwards only what it still
//! buffers), so it streams through the chain's body phase as usual and the upstream gets the
//! rewritten body chunked, without a `Content-Length`; a refusal then ends the upstream request
//! unfinished.

use bytes::{Bytes, BytesMut};
use gatehouse_filters::Problem;
use pingora_core::Result;
use pingora_http::RequestHeader;
use pingora_proxy::Session;

use super::{admit, RequestCtx};

/// The longest declared body read before the head is sent: Pingora's replay buffer.
pub const READ_AHEAD_MAX: u64 = 64 * 1024;

/// Reads the body whole before the upstream sees the head, if a filter rewrites it and its
/// declared length fits the replay buffer. `Ok(Some(problem))`: answer with it.
pub async fn read_ahead(session: &mut Session, ctx: &mut RequestCtx) -> Result<Option<Problem>> {
    if !ctx.shared.buffers_request_body {
        return Ok(None);
    }
    let declared = declared_length(session.req_header());
    if !declared.is_some_and(|length| length > 0 && length <= READ_AHEAD_MAX)
        || session
            .req_header()
            .headers
            .contains_key(http::header::TRANSFER_ENCODING)
    {
        return Ok(None);
    }
    session.as_mut().enable_retry_buffering();
    let mut rewritten = BytesMut::new();
    loop {
        let mut piece = session.as_mut().read_request_body().await?;
        let end = piece.is_none() || session.as_mut().is_body_done();
        if let Some(piece) = &piece {
            if let Err(refusal) = admit::count_body(
                &mut ctx.shared.request_body_bytes,
                piece.len(),
                &ctx.snapshot.limits,
            ) {
                return Ok(Some(refusal));
            }
        }
        let chain = ctx.snapshot.chain(ctx.route);
        if let Err(refusal) = chain.request_body(&mut piece, end, &mut ctx.shared) {
            return Ok(Some(refusal));
        }
        if let Some(piece) = piece {
            rewritten.extend_from_slice(&piece);
        }
        if end {
            ctx.request_body = Some(rewritten.freeze());
            return Ok(None);
        }
    }
}

/// The body for the upstream in place of the piece Pingora forwards, when it was read ahead:
/// the rewritten body with the last piece (Pingora's buffered copy of the whole body).
pub fn replace(ctx: &RequestCtx, body: &mut Option<Bytes>, end_of_stream: bool) -> bool {
    let Some(rewritten) = &ctx.request_body else {
        return false;
    };
    *body = if end_of_stream && !rewritten.is_empty() {
        Some(rewritten.clone())
    } else if end_of_stream {
        None
    } else {
        Some(Bytes::new())
    };
    true
}

/// The upstream request's framing for a rewritten body: its new length when it was read
/// ahead, else chunked (Pingora adds `Transfer-Encoding` when no length is given).
pub fn frame(request: &mut RequestHeader, ctx: &RequestCtx) {
    if let Some(rewritten) = &ctx.request_body {
        request.remove_header(&http::header::TRANSFER_ENCODING);
        request
            .insert_header(http::header::CONTENT_LENGTH, rewritten.len())
            .ok();
    } else if ctx.shared.buffers_request_body {
        request.remove_header(&http::header::CONTENT_LENGTH);
    }
}

fn declared_length(request: &RequestHeader) -> Option<u64> {
    request
        .headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
