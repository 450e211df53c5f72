//! What a finished request leaves behind: its upstream attempt released, its route's metrics,
//! the authentication failure it met, the filters' log phase, and its access log line.

use std::time::{Duration, Instant};

use gatehouse_filters::Phases;
use pingora_core::Error;
use pingora_proxy::Session;

use super::ctx::RequestCtx;
use super::{deadline, peer};
use crate::telemetry::access_log;
use crate::telemetry::metrics::{Outcome, RequestMetrics, Source};

pub fn finish(
    session: &Session,
    error: Option<&Error>,
    ctx: &mut RequestCtx,
    metrics: &RequestMetrics,
) {
    let now = Instant::now();
    deadline::request_done(now);
    let last_pool = ctx
        .upstream
        .current
        .as_ref()
        .map(|attempt| attempt.pool)
        .or(ctx.upstream.pool);
    peer::release(ctx);
    let status = session
        .response_written()
        .map(|response| response.status.as_u16())
        .or(ctx.shared.status)
        .unwrap_or(if error.is_some() { 502 } else { 0 });
    ctx.shared.status = Some(status);
    let elapsed = now.saturating_duration_since(ctx.shared.started);
    let route_metrics = match ctx.route() {
        Some(route) => &route.metrics,
        None => &ctx.snapshot.unmatched_metrics,
    };
    // The upstream's answer, unless Gatehouse answered instead (a refusal, or a 502 after the
    // upstream failed).
    let source = match ctx.upstream.answered {
        Some(_) if !ctx.shared.own_answer => Source::Upstream,
        _ => Source::Gateway,
    };
    // The upstream's share: from the first attempt to the end of its answer, or, when it did
    // not answer, to the moment Gatehouse gave up on it.
    let upstream = ctx.upstream.first_started.map(|start| {
        let end = match source {
            Source::Upstream => ctx.upstream.finished.unwrap_or(now),
            Source::Gateway => now,
        };
        end.saturating_duration_since(start)
    });
    route_metrics.observe(&Outcome {
        status,
        total: elapsed,
        pool: last_pool,
        source,
        upstream,
        bytes_in: ctx.shared.request_body_bytes,
        bytes_out: session.as_ref().body_bytes_sent() as u64,
        consumer: ctx
            .shared
            .consumer
            .as_ref()
            .map(|consumer| consumer.id.as_ref()),
    });
    if let Some((method, reason)) = ctx.shared.auth_failure {
        metrics.auth_failure(method, reason);
    }
    let chain = ctx.chain();
    if chain.wants(Phases::LOG) {
        chain.log(&ctx.shared);
    }
    if access_log::wanted() {
        let times = Times {
            total: elapsed,
            upstream,
        };
        let line = line(session, error, ctx, status, times, last_pool, source);
        access_log::write(line.to_string());
    }
}

/// A request's whole time, and the upstream's share of it.
struct Times {
    total: Duration,
    upstream: Option<Duration>,
}

/// The access log line of a finished request. Never written: credentials (`Authorization`,
/// `Proxy-Authorization`, API-key headers), cookies, the query string and bodies; only the
/// path, and the user agent of the request's headers.
fn line(
    session: &Session,
    error: Option<&Error>,
    ctx: &mut RequestCtx,
    status: u16,
    Times { total, upstream }: Times,
    pool: Option<usize>,
    source: Source,
) -> serde_json::Value {
    let request = session.req_header();
    let ms = |duration: Duration| (duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
    let request_id = ctx.shared.request_id().to_owned();
    let ctx = &*ctx;
    let shared = &ctx.shared;
    let auth = match (shared.auth_failure, shared.auth_method) {
        (Some((method, reason)), _) => serde_json::json!({ "method": method, "result": reason }),
        (None, Some(method)) => serde_json::json!({ "method": method, "result": "ok" }),
        (None, None) => serde_json::Value::Null,
    };
    let rate_limit = shared.rate_limit.as_ref().map(|note| {
        serde_json::json!({
            "policy": &*note.policy,
            "result": note.result.as_str(),
            "remaining": note.remaining,
        })
    });
    serde_json::json!({
        "ts": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
        "request_id": request_id,
        "client": shared.client_addr.map(|address| address.to_string()),
        "method": request.method.as_str(),
        "host": request.headers.get(http::header::HOST).and_then(|host| host.to_str().ok()),
        "path": request.uri.path(),
        "user_agent": request
            .headers
            .get(http::header::USER_AGENT)
            .and_then(|agent| agent.to_str().ok()),
        "status": status,
        "source": match source {
            Source::Upstream => "upstream",
            Source::Gateway => "gateway",
        },
        "route": shared.route.as_deref(),
        // The pool the last attempt went to (a backup or a split's), else the route's.
        "upstream": pool
            .and_then(|pool| ctx.snapshot.upstreams.get(pool))
            .map(|pool| &*pool.name)
            .or(shared.upstream.as_deref()),
        "upstream_addr": ctx.upstream.tried.last().map(ToString::to_string),
        "upstream_status": ctx.upstream.status,
        "attempts": ctx.upstream.count,
        "retries": ctx.upstream.count.saturating_sub(1),
        "consumer": shared.consumer.as_ref().map(|consumer| &*consumer.id),
        "auth": auth,
        "rate_limit": rate_limit,
        "duration_ms": ms(total),
        "upstream_ms": upstream.map(ms),
        "gateway_ms": ms(total.saturating_sub(upstream.unwrap_or_default())),
        "bytes_in": shared.request_body_bytes,
        "bytes_out": session.as_ref().body_bytes_sent(),
        "error": error.map(|error| error.etype().as_str()),
    })
}
