//! Our own limits, checked before anything else looks at a request: the request target's
//! length, the header count and size, the declared body length, and the body bytes as they
//! stream. (The total deadline for a request head is the connection wrapper's, `deadline`.)

use gatehouse_filters::{Problem, ProblemType};
use pingora_http::RequestHeader;

use crate::config::snapshot::Limits;

/// Whether the request head is within the limits.
pub fn check_head(request: &RequestHeader, limits: &Limits) -> Result<(), Problem> {
    let uri_length = request
        .uri
        .path_and_query()
        .map(|target| target.as_str().len())
        .unwrap_or(0);
    if uri_length > limits.max_uri_bytes {
        return Err(Problem::new(ProblemType::UriTooLong));
    }
    if request.headers.len() > limits.max_headers || header_bytes(request) > limits.max_header_bytes
    {
        return Err(Problem::new(ProblemType::HeaderFieldsTooLarge));
    }
    let declared_length = request
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > limits.max_body_bytes) {
        return Err(Problem::new(ProblemType::ContentTooLarge));
    }
    Ok(())
}

/// Counts a piece of the body; past the limit the request is answered with 413 (a chunked body
/// declares no length, so it is cut off as it arrives).
pub fn count_body(received: &mut u64, chunk: usize, limits: &Limits) -> Result<(), Problem> {
    *received += chunk as u64;
    if *received > limits.max_body_bytes {
        return Err(Problem::new(ProblemType::ContentTooLarge));
    }
    Ok(())
}

/// A new attempt: Pingora replays the body read so far, which is counted again (and copied
/// again for a mirror); a body read ahead and rewritten was counted once and is not replayed
/// through the chain.
pub fn restart_body(ctx: &mut super::RequestCtx) {
    if ctx.request_body.is_none() {
        ctx.shared.request_body_bytes = 0;
    }
    super::mirror::restart_body(ctx);
}

fn header_bytes(request: &RequestHeader) -> usize {
    request
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}
