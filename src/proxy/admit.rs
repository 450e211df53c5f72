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

/// Framing an edge refuses although Pingora reads it, in an HTTP/1 request head (`raw`, as
/// received): a line ended by a bare LF, and `Transfer-Encoding` that is not exactly one
/// `chunked`, or that comes with `Content-Length` (Pingora drops the length and goes by the
/// chunks; a server behind another proxy may not). What Pingora refuses itself (differing or
/// malformed lengths, obs-fold, NUL or a bare CR in a value, whitespace before a colon,
/// `Transfer-Encoding` on HTTP/1.0, bad chunk sizes) never gets here.
pub fn check_framing(raw: &[u8], request: &RequestHeader) -> Result<(), Problem> {
    let refuse = |why: &str| {
        Err(Problem::new(ProblemType::BadRequest).detail(format!(
            "{why}: the request's framing is ambiguous, so it is refused"
        )))
    };
    let mut line_start = 0;
    let mut content_length = false;
    for end in memchr::memchr_iter(b'\n', raw) {
        if end == 0 || raw[end - 1] != b'\r' {
            return refuse("a line ends in a bare LF");
        }
        let line = &raw[line_start..end - 1];
        content_length |= line.len() > 15 && line[..15].eq_ignore_ascii_case(b"content-length:");
        line_start = end + 1;
    }
    let mut encodings = request
        .headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter();
    if let Some(encoding) = encodings.next() {
        if encodings.next().is_some()
            || !encoding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked")
        {
            return refuse("Transfer-Encoding other than exactly \"chunked\"");
        }
        if content_length {
            return refuse("Content-Length with Transfer-Encoding");
        }
    }
    Ok(())
}

/// The client's `Connection` options. A `close` in any `Connection` line ends the connection
/// after the answer (`true`). A header the client names there is its own hop-by-hop header and
/// is removed now, before any filter runs, so that no header a filter or the gateway writes for
/// the upstream can be removed by it later (`Host` is never removed). Only the standard
/// options stay in `Connection`. A client that names `Content-Length` or `Transfer-Encoding`
/// would have its body's framing removed (and its body read as the next request): refused.
pub fn connection_options(request: &mut RequestHeader) -> Result<bool, Problem> {
    let mut named: smallvec::SmallVec<[http::HeaderName; 4]> = smallvec::SmallVec::new();
    let mut kept = String::new();
    let mut close = false;
    for value in request.headers.get_all(http::header::CONNECTION) {
        for token in value.as_bytes().split(|byte| *byte == b',') {
            let token = token.trim_ascii();
            if token.is_empty() {
                continue;
            }
            if token.eq_ignore_ascii_case(b"close")
                || token.eq_ignore_ascii_case(b"keep-alive")
                || token.eq_ignore_ascii_case(b"upgrade")
            {
                close |= token.eq_ignore_ascii_case(b"close");
                if !kept.is_empty() {
                    kept.push_str(", ");
                }
                kept.push_str(&String::from_utf8_lossy(token).to_ascii_lowercase());
            } else if let Ok(name) = http::HeaderName::from_bytes(token) {
                if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
                    return Err(Problem::new(ProblemType::BadRequest).detail(format!(
                        "Connection names {name}: the request's framing is ambiguous, so it is refused"
                    )));
                }
                if name != http::header::HOST {
                    named.push(name);
                }
            }
        }
    }
    if !named.is_empty()
        || request
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .count()
            > 1
    {
        for name in &named {
            request.remove_header(name);
        }
        request.remove_header(&http::header::CONNECTION);
        if !kept.is_empty() {
            if let Ok(value) = http::HeaderValue::from_str(&kept) {
                request.insert_header(http::header::CONNECTION, value).ok();
            }
        }
    }
    Ok(close)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(lines: &[(&str, &str)]) -> RequestHeader {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        for (name, value) in lines {
            request.append_header(name.to_string(), *value).unwrap();
        }
        request
    }

    #[test]
    fn framing_refuses_bare_lf_and_anything_but_one_chunked() {
        let plain = request(&[("host", "a")]);
        assert!(check_framing(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &plain).is_ok());
        assert!(check_framing(b"GET / HTTP/1.1\r\nHost: a\n\r\n", &plain).is_err());
        assert!(check_framing(b"GET / HTTP/1.1\nHost: a\r\n\r\n", &plain).is_err());
        let chunked = request(&[("transfer-encoding", "Chunked ")]);
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked \r\n\r\n";
        assert!(check_framing(head, &chunked).is_ok());
        let with_length =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nCONTENT-LENGTH: 3\r\n\r\n";
        assert!(check_framing(with_length, &chunked).is_err());
        for encodings in [
            &["gzip, chunked"][..],
            &["chunked", "chunked"],
            &["identity"],
        ] {
            let lines: Vec<_> = encodings
                .iter()
                .map(|value| ("transfer-encoding", *value))
                .collect();
            assert!(check_framing(b"POST / HTTP/1.1\r\n\r\n", &request(&lines)).is_err());
        }
    }

    #[test]
    fn connection_options_count_every_line_and_remove_only_the_clients_headers() {
        let mut request = request(&[
            ("connection", "keep-alive"),
            ("connection", "CLOSE, x-hop, Host"),
            ("x-hop", "1"),
            ("host", "a"),
        ]);
        assert!(matches!(connection_options(&mut request), Ok(true)));
        assert!(request.headers.get("x-hop").is_none());
        assert_eq!(request.headers["host"], "a");
        assert_eq!(request.headers["connection"], "keep-alive, close");
        let mut upgrade = super::tests::request(&[("connection", "keep-alive, Upgrade")]);
        assert!(matches!(connection_options(&mut upgrade), Ok(false)));
        assert_eq!(upgrade.headers["connection"], "keep-alive, Upgrade");
        for framing in ["close, Content-Length", "Transfer-Encoding"] {
            let mut named = super::tests::request(&[("connection", framing)]);
            assert!(connection_options(&mut named).is_err(), "{framing}");
        }
    }
}
