//! Whether a failed attempt is tried again, and when. Pingora calls `upstream_peer` again while
//! the error says retry; Gatehouse decides, counting attempts itself:
//!
//! - a failed connection (nothing reached the upstream) may be retried for any method;
//! - a reset or a timeout, or a retryable status, only for the route's `retry.methods`, and only
//!   while the request body can still be replayed (Pingora keeps its first 64 KiB);
//! - never past `attempts`, past the route's deadline, or beyond the pool's retry budget;
//! - each retry waits a random backoff (full jitter) and goes to another target when the pool
//!   has one.

use std::time::{Duration, Instant};

use gatehouse_filters::{Problem, ProblemType};
use pingora_core::{Error, ErrorType, Result};
use pingora_proxy::Session;

use super::ctx::RequestCtx;
use super::{peer, respond};
use crate::upstream::clock;

/// Why an attempt is tried again; the `reason` label of `gatehouse_retries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    ConnectFailure,
    Reset,
    Timeout,
    GatewayError,
    Status,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::ConnectFailure,
        Reason::Reset,
        Reason::Timeout,
        Reason::GatewayError,
        Reason::Status,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::ConnectFailure => "connect_failure",
            Reason::Reset => "reset",
            Reason::Timeout => "timeout",
            Reason::GatewayError => "gateway_error",
            Reason::Status => "status",
        }
    }
}

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
    let policy = &route.retry;
    if policy.backoff_max.is_zero() {
        return Ok(());
    }
    let retries = ctx.upstream.count.saturating_sub(1).min(16);
    let ceiling = policy
        .backoff_base
        .saturating_mul(1 << retries)
        .min(policy.backoff_max);
    let mut wait = ceiling.mul_f64(fastrand::f64());
    if let Some(deadline) = ctx.upstream.deadline {
        wait = wait.min(deadline.saturating_duration_since(now));
    }
    if wait > Duration::ZERO {
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
    let pool = ctx.upstream.current.as_ref().map(|attempt| attempt.pool);
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
    let policy = &route.retry;
    let reason = if policy.on_gateway_error && matches!(status, 502..=504) {
        Reason::GatewayError
    } else if policy.statuses.contains(&status) {
        Reason::Status
    } else {
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
    let policy = &route.retry;
    let enabled = match reason {
        Reason::ConnectFailure => policy.on_connect_failure,
        Reason::Reset => policy.on_reset,
        Reason::Timeout => policy.on_timeout,
        Reason::GatewayError => policy.on_gateway_error,
        Reason::Status => true,
    };
    if !enabled || ctx.upstream.count >= policy.attempts {
        return false;
    }
    if reason != Reason::ConnectFailure
        && (!policy.methods.contains(&session.req_header().method)
            || session.as_ref().retry_buffer_truncated())
    {
        return false;
    }
    if ctx
        .upstream
        .deadline
        .is_some_and(|deadline| Instant::now() >= deadline)
    {
        return false;
    }
    if let Some(pool) = pool.map(|pool| &ctx.snapshot.upstreams[pool]) {
        let budget = match policy.budget_percent {
            None => std::borrow::Cow::Borrowed(&pool.retry_budget),
            Some(share) => std::borrow::Cow::Owned(crate::config::model::RetryBudgetConfig {
                percent: crate::config::units::Percent(share),
                ..pool.retry_budget.clone()
            }),
        };
        if !pool.shared.budget.try_retry(&budget, clock::now()) {
            pool.shared.budget_exhausted.inc();
            return false;
        }
    }
    route.metrics.retried(reason.label());
    ctx.upstream.retrying = true;
    true
}

#[cfg(test)]
mod tests {
    use super::Reason;
    use crate::telemetry::metrics::RETRY_REASONS;

    #[test]
    fn every_reason_has_its_metric_label() {
        let labels: Vec<_> = Reason::ALL.iter().map(|reason| reason.label()).collect();
        assert_eq!(labels, RETRY_REASONS);
    }
}
