//! Answers of our own: a filter's response or a problem document, written with the response
//! phase of the filters the request reached; and Pingora's errors mapped to problems.

use gatehouse_filters::{Decision, Problem, ProblemType, Response};
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, Session};

use super::ctx::RequestCtx;

/// How long the rest of a gRPC call's request is read after our own answer.
const GRPC_DRAIN: std::time::Duration = std::time::Duration::from_millis(100);

/// Writes a complete response of our own. Returns `Ok(true)`: the request is answered.
pub async fn respond(
    session: &mut Session,
    ctx: &mut RequestCtx,
    response: Response,
) -> Result<bool> {
    let mut header = ResponseHeader::build(response.status, Some(response.headers.len() + 2))?;
    for (name, value) in response.headers {
        header.append_header(name, value)?;
    }
    // A 204 has no body and must not say how long it is (RFC 9110, section 8.6).
    if response.status != 204 {
        header.insert_header(http::header::CONTENT_LENGTH, response.body.len())?;
    }
    ctx.shared.status = Some(response.status);
    ctx.shared.own_answer = true;
    let RequestCtx {
        snapshot,
        shared,
        route,
        reached,
        ..
    } = ctx;
    snapshot
        .chain(*route)
        .response(&mut header, shared, *reached);
    if let Some(value) = super::timing::value(ctx, std::time::Instant::now()) {
        header.insert_header(super::timing::HEADER, value)?;
    }
    let end = response.body.is_empty();
    match session.as_downstream_mut() {
        // Pingora's own write keeps an HTTP/2 stream open after the head (its end flag is not
        // passed on), and a stream then closed by an empty DATA frame is not the trailers-only
        // answer gRPC clients look for: the head itself ends the stream.
        pingora_core::protocols::http::ServerSession::H2(stream) if end => {
            stream.write_response_header(Box::new(header), true)?;
        }
        _ => session.write_response_header(Box::new(header), end).await?,
    }
    if !end {
        session
            .write_response_body(Some(response.body), true)
            .await?;
    }
    if ctx.grpc.is_some() && session.as_downstream().is_http2() {
        // The rest of the call's request is read (briefly): an HTTP/2 stream dropped while its
        // client still sends is reset with CANCEL, and a gRPC client then reports CANCELLED
        // rather than the status it was just given.
        // Boxed, so that every answer's future does not carry room for it.
        let drain = Box::pin(session.as_downstream_mut().drain_request_body());
        let _ = tokio::time::timeout(GRPC_DRAIN, drain).await;
    }
    Ok(true)
}

/// Answers with a problem document, the request id in the body and in its header; a gRPC
/// client gets the problem as a gRPC status instead.
pub async fn problem(
    session: &mut Session,
    ctx: &mut RequestCtx,
    problem: Problem,
) -> Result<bool> {
    let header = ctx.request_id_header().clone();
    let response = match ctx.grpc {
        // A gRPC client reads a status, not a document: a trailers-only answer.
        Some(wire) => {
            let (response, code) =
                problem.into_grpc_response(ctx.shared.request_id(), &header, wire.content_type());
            ctx.grpc_status = Some(code);
            response
        }
        None => problem.into_response(ctx.shared.request_id(), &header),
    };
    respond(session, ctx, response).await
}

/// Answers with what a filter decided; `Ok(false)` when it let the request go on.
pub async fn decision(
    session: &mut Session,
    ctx: &mut RequestCtx,
    decision: Decision,
) -> Result<bool> {
    match decision {
        Decision::Continue => Ok(false),
        Decision::Respond(response) => respond(session, ctx, response).await,
        Decision::Reject(refusal) => problem(session, ctx, refusal).await,
    }
}

/// Hands a problem decided in a phase that cannot answer itself (a body phase) to Pingora's
/// error path; `fail` answers with it.
pub fn defer(ctx: &mut RequestCtx, problem: Problem) -> Box<Error> {
    let status = problem.status;
    ctx.problem = Some(problem);
    Error::explain(ErrorType::HTTPStatus(status), "answered by gateway")
}

/// The problem a client sees for a Pingora error.
fn problem_for(error: &Error) -> Problem {
    match error.etype() {
        ErrorType::HTTPStatus(status) => Problem::failure(*status),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if error.esource() == &ErrorSource::Upstream =>
        {
            Problem::new(ProblemType::UpstreamTimeout)
        }
        _ => match error.esource() {
            ErrorSource::Upstream => Problem::new(ProblemType::UpstreamUnavailable),
            ErrorSource::Downstream => Problem::new(ProblemType::BadRequest),
            ErrorSource::Internal | ErrorSource::Unset => Problem::new(ProblemType::InternalError),
        },
    }
}

/// Answers a request the proxy failed: with the problem a phase deferred, or the one the error
/// maps to. Nothing is written to a client that is gone or already has a response head.
///
/// The client's connection stays open when the request was read whole, the failure was not the
/// client's and it came before the proxy phase (a filter's error): the next request may use it.
/// Otherwise the answer says `Connection: close`, and the connection is closed, as it says:
/// after a failure in the proxy phase (an upstream that refused, timed out or broke off, an
/// open breaker, no healthy target) Pingora does not keep the client's connection.
pub async fn fail(session: &mut Session, error: &Error, ctx: &mut RequestCtx) -> FailToProxy {
    let problem = ctx.problem.take().unwrap_or_else(|| {
        // An upstream that fails once the deadline has passed (a gRPC service giving up on a
        // call at the deadline it was told, say) failed the request by taking too long.
        let late = ctx
            .upstream
            .deadline
            .is_some_and(|deadline| std::time::Instant::now() >= deadline);
        if late && error.esource() == &ErrorSource::Upstream {
            Problem::new(ProblemType::UpstreamTimeout)
        } else {
            problem_for(error)
        }
    });
    let client_gone = matches!(
        error.etype(),
        ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
    ) && error.esource() == &ErrorSource::Downstream;
    let status = problem.status;
    let unanswered = session.response_written().is_none();
    // An HTTP/2 stream is never reused: "reusable" there has Pingora end the stream in order
    // once it is answered (a stream whose answer was cut off is reset instead). An answer a
    // filter gave in the upstream's place ends an exchange that was complete.
    let reusable = if session.as_downstream().is_http2() {
        !client_gone && unanswered
    } else {
        !client_gone
            && unanswered
            && error.esource() != &ErrorSource::Downstream
            && session.is_body_done()
            && (!ctx.upstream.proxying || ctx.answered_instead)
    };
    if !reusable {
        session.set_keepalive(None);
    }
    if !client_gone && unanswered {
        if let Err(write_error) = self::problem(session, ctx, problem).await {
            tracing::debug!(error = %write_error, "could not write the error response");
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: false,
            };
        }
    }
    FailToProxy {
        error_code: if client_gone { 0 } else { status },
        can_reuse_downstream: reusable,
    }
}
