//! The proxy's side of retries: Pingora calls `upstream_peer` again while the error says retry,
//! and Gatehouse decides, counting attempts itself. These hooks tell the route's policy
//! (`upstream::retry`) what Pingora reported, release the failed attempt, and wait the backoff.

use std::time::Instant;

use gatehouse_filters::{Problem, ProblemType};
use pingora_core::{Error, ErrorType, Result};
use pingora_proxy::Session;

use super::ctx::RequestCtx;
use super::{peer, respond};
use crate::upstream::retry::Failed;
pub use crate::upstream::retry::Reason;

/// Before an attempt: past the deadline, a 504; before a retry, its backoff.
pub async fn before_attempt(ctx: &mut RequestCtx) -> Result<()> {
    let now = Instant::now();
    if let Some(deadline) = ctx.upstream.deadline {
        if now >= deadline {
            return Err(respond::defer(
                ctx,
                Problem::new(ProblemType::UpstreamTimeout),
            ));
        }
    }
    if !std::mem::take(&mut ctx.upstream.retrying) {
        return Ok(());
    }
    let Some(route) = ctx.route() else {
        return Ok(());
    };
    let wait = route
        .retry
        .backoff(ctx.upstream.count, now, ctx.upstream.deadline);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    Ok(())
}

/// The connection to the target failed: nothing reached it.
pub fn connect_failed(
    session: &Session,
    ctx: &mut RequestCtx,
    mut error: Box<Error>,
) -> Box<Error> {
    peer::record(ctx, true, false);
    if let Some(trace) = ctx.trace.as_mut() {
        trace.end_attempt(Some(error.etype().as_str()));
    }
    let pool = ctx.upstream.current.as_ref().map(|attempt| attempt.pool);
    if let Some(pool) = pool {
        ctx.snapshot.upstreams[pool].shared.connect_errors.inc();
    }
    peer::release(ctx);
    error.set_retry(may_retry(session, ctx, Reason::ConnectFailure, pool));
    error
}

/// The exchange failed after the connection opened.
pub fn proxy_failed(
    session: &Session,
    ctx: &mut RequestCtx,
    mut error: Box<Error>,
    client_reused: bool,
) -> Box<Error> {
    if ctx.problem.is_some() {
        // The gateway's own decision (a refused body, an answer in the upstream's place): no
        // fault of the target, and nothing to try again.
        error.set_retry(false);
        return error;
    }
    if std::mem::take(&mut ctx.upstream.status_retry) {
        error.set_retry(true);
        return error;
    }
    let reason = match error.etype() {
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => Reason::Timeout,
        _ => Reason::Reset,
    };
    let replayable =
        session.req_header().method.is_idempotent() && !session.as_ref().retry_buffer_truncated();
    // A kept-alive connection the target had closed meanwhile: Pingora's own rule tries again
    // on a new connection, and it says nothing about the target.
    let stale_connection = client_reused && reason == Reason::Reset && replayable;
    if !stale_connection {
        peer::record(ctx, true, false);
    }
    let pool = ctx.upstream.current.as_ref().map(|attempt| attempt.pool);
    peer::release(ctx);
    let retry = if stale_connection {
        ctx.upstream.retrying = false;
        true
    } else {
        may_retry(session, ctx, reason, pool)
    };
    error.set_retry(retry);
    error
}

/// The response head arrived. A 5xx counts against the target; a retryable status is tried
/// again (the head has not gone to the client yet) while the policy allows.
pub fn response_head(session: &Session, status: u16, ctx: &mut RequestCtx) -> Result<()> {
    peer::record(ctx, status >= 500, true);
    let Some(route) = ctx.route() else {
        return Ok(());
    };
    let Some(reason) = route.retry.status_reason(status) else {
        return Ok(());
    };
    let pool = ctx.upstream.current.as_ref().map(|attempt| attempt.pool);
    if !may_retry(session, ctx, reason, pool) {
        return Ok(());
    }
    peer::release(ctx);
    ctx.upstream.status_retry = true;
    let mut error = Error::explain(
        ErrorType::HTTPStatus(status),
        "the upstream's answer is tried again",
    );
    error.set_retry(true);
    Err(error)
}

/// Whether the route's policy, the request and the pool's budget allow one more attempt.
fn may_retry(session: &Session, ctx: &mut RequestCtx, reason: Reason, pool: Option<usize>) -> bool {
    let Some(route) = ctx.route() else {
        return false;
    };
    let failed = Failed {
        reason,
        attempts: ctx.upstream.count,
        method: &session.req_header().method,
        replayable: !session.as_ref().retry_buffer_truncated(),
        deadline: ctx.upstream.deadline,
    };
    if !route.retry.allows(&failed, Instant::now()) {
        return false;
    }
    if let Some(pool) = pool.map(|pool| &ctx.snapshot.upstreams[pool]) {
        if !route.retry.take_budget(pool) {
            return false;
        }
    }
    route.metrics.retried(reason.label());
    if let Some(trace) = ctx.trace.as_ref().filter(|trace| trace.recording()) {
        trace.event(
            "retry",
            vec![
                opentelemetry::KeyValue::new("gatehouse.retry.reason", reason.label()),
                opentelemetry::KeyValue::new(
                    "gatehouse.retry.attempt",
                    i64::from(ctx.upstream.count + 1),
                ),
            ],
        );
    }
    ctx.upstream.retrying = true;
    true
}
