//! What a finished request leaves behind: its upstream attempt released, its route's metrics,
//! the authentication failure it met, the filters' log phase, and its access log line.

use std::time::Instant;

use gatehouse_filters::Phases;
use pingora_core::Error;
use pingora_proxy::Session;

use super::ctx::RequestCtx;
use super::{deadline, peer};
use crate::telemetry::access_log;
use crate::telemetry::metrics::RequestMetrics;

pub fn finish(
    session: &Session,
    error: Option<&Error>,
    ctx: &mut RequestCtx,
    metrics: &RequestMetrics,
) {
    let now = Instant::now();
    deadline::request_done(now);
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
    route_metrics.observe(status, elapsed.as_secs_f64());
    if let Some((method, reason)) = ctx.shared.auth_failure {
        metrics.auth_failure(method, reason);
    }
    let chain = ctx.chain();
    if chain.wants(Phases::LOG) {
        chain.log(&ctx.shared);
    }
    if access_log::wanted() {
        let request = session.req_header();
        let line = serde_json::json!({
            "ts": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "request_id": ctx.shared.request_id(),
            "client": ctx.shared.client_addr.map(|address| address.to_string()),
            "method": request.method.as_str(),
            "host": request.headers.get(http::header::HOST).and_then(|host| host.to_str().ok()),
            "path": request.uri.path(),
            "status": status,
            "route": ctx.shared.route.as_deref(),
            "upstream": ctx.shared.upstream.as_deref(),
            "duration_ms": (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            "bytes_in": ctx.shared.request_body_bytes,
            "error": error.map(|error| error.etype().as_str()),
        });
        access_log::write(line.to_string());
    }
}
