//! `Server-Timing` on responses whose route (or `telemetry.server_timing`) asks for it: the
//! milliseconds spent in Gatehouse and waiting for the upstream's response head.

use std::time::{Duration, Instant};

use super::ctx::RequestCtx;

/// The header's name.
pub const HEADER: &str = "server-timing";

/// Whether the request's route (or, unmatched, the global switch) asks for the header: a flag
/// compiled once per config, so a request that does not ask reads no clock for it.
pub fn wanted(ctx: &RequestCtx) -> bool {
    match ctx.route() {
        Some(route) => route.server_timing,
        None => ctx.snapshot.config.telemetry.server_timing,
    }
}

/// The header value at `now`, if the request's route wants one. The upstream's share runs from
/// the first attempt's start to the response head that answered (retries and their backoff
/// included); the gateway's share is the rest. An answer of Gatehouse's own has no upstream
/// share.
pub fn value(ctx: &RequestCtx, now: Instant) -> Option<String> {
    if !wanted(ctx) {
        return None;
    }
    let total = now.saturating_duration_since(ctx.shared.started);
    let upstream = match (ctx.upstream.first_started, ctx.upstream.answered) {
        (Some(start), Some(head)) if !ctx.shared.own_answer => {
            Some(head.saturating_duration_since(start))
        }
        _ => None,
    };
    let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
    Some(match upstream {
        Some(upstream) => format!(
            "gateway;dur={:.3}, upstream;dur={:.3}",
            ms(total.saturating_sub(upstream)),
            ms(upstream)
        ),
        None => format!("gateway;dur={:.3}", ms(total)),
    })
}
