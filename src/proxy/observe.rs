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
use opentelemetry::KeyValue;

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
    let source = match ctx.upstream.status {
        Some(_) if !ctx.shared.own_answer => Source::Upstream,
        _ => Source::Gateway,
    };
    // The upstream's share: from the first attempt to the end of the exchange (the body is
    // streamed, so the upstream's last byte and the client's are moments apart), or to the
    // moment Gatehouse gave up on it.
    let upstream = ctx
        .upstream
        .first_started
        .map(|start| now.saturating_duration_since(start));
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
    if ctx.grpc.is_some() || ctx.grpc_status.is_some() {
        // A call that ended with no status at all (broken off) is, to its client, UNKNOWN.
        let code = ctx
            .grpc_status
            .unwrap_or(gatehouse_filters::grpc::Code::Unknown);
        let route = ctx
            .shared
            .route
            .as_deref()
            .unwrap_or(crate::telemetry::metrics::UNMATCHED_ROUTE);
        metrics.grpc_call(route, code);
    }
    if let Some((method, reason)) = ctx.shared.auth_failure {
        metrics.auth_failure(method, reason);
    }
    let chain = ctx.chain();
    if chain.wants(Phases::LOG) {
        chain.log(&ctx.shared);
    }
    let trace_ids = ctx.trace.as_mut().and_then(|trace| {
        let recording = trace.recording();
        let ids = trace.ids();
        if let Some(reason) = ctx.shared.transform_skipped.filter(|_| recording) {
            trace.event(
                "transform_skipped",
                vec![KeyValue::new("gatehouse.transform.reason", reason)],
            );
        }
        let (name, attributes) = if recording {
            server_span(session, &ctx.shared, &ctx.snapshot, last_pool, source)
        } else {
            (String::new(), Vec::new())
        };
        trace.finish(name, status, attributes);
        ids
    });
    if access_log::wanted() {
        let summary = Summary {
            status,
            total: elapsed,
            upstream,
            pool: last_pool,
            source,
            trace_ids,
        };
        // The id is made now if no filter made one, so the line can borrow it.
        ctx.shared.request_id();
        let ctx = &*ctx;
        access_log::write_with(|buffer| write_line(buffer, session, error, ctx, &summary));
    }
}

/// The filters' decisions on the request so far, as events of its SERVER span: how it was
/// authenticated (or why not) and what the rate limit said.
pub fn decisions(ctx: &RequestCtx) {
    let Some(trace) = ctx.trace.as_ref().filter(|trace| trace.recording()) else {
        return;
    };
    let shared = &ctx.shared;
    match (shared.auth_failure, shared.auth_method) {
        (Some((method, reason)), _) => trace.event(
            "auth",
            vec![
                KeyValue::new("gatehouse.auth.method", method),
                KeyValue::new("gatehouse.auth.result", reason),
            ],
        ),
        (None, Some(method)) => trace.event(
            "auth",
            vec![
                KeyValue::new("gatehouse.auth.method", method),
                KeyValue::new("gatehouse.auth.result", "ok"),
            ],
        ),
        (None, None) => {}
    }
    if let Some(note) = &shared.rate_limit {
        trace.event(
            "rate_limit",
            vec![
                KeyValue::new("gatehouse.rate_limit.policy", note.policy.to_string()),
                KeyValue::new("gatehouse.rate_limit.result", note.result.as_str()),
                KeyValue::new("gatehouse.rate_limit.remaining", note.remaining as i64),
            ],
        );
    }
}

/// Starts the CLIENT span of the attempt `choose` just set up.
pub fn attempt_started(request: &pingora_http::RequestHeader, ctx: &mut RequestCtx) {
    let Some(trace) = ctx.trace.as_mut() else {
        return;
    };
    let attributes = match (&ctx.upstream.current, trace.recording()) {
        (Some(attempt), true) => {
            let mut attributes = vec![
                KeyValue::new("http.request.method", request.method.as_str().to_string()),
                KeyValue::new("server.address", attempt.target.address.ip().to_string()),
                KeyValue::new("server.port", i64::from(attempt.target.address.port())),
                KeyValue::new(
                    "gatehouse.upstream",
                    ctx.snapshot.upstreams[attempt.pool].name.to_string(),
                ),
            ];
            if ctx.upstream.count > 1 {
                attributes.push(KeyValue::new(
                    "http.request.resend_count",
                    i64::from(ctx.upstream.count - 1),
                ));
            }
            attributes
        }
        _ => Vec::new(),
    };
    trace.attempt(&request.method, attributes);
}

/// The SERVER span's name (`GET orders`, `GET unmatched` for a 404) and attributes, following
/// the OpenTelemetry HTTP conventions, plus Gatehouse's own.
fn server_span(
    session: &Session,
    shared: &gatehouse_filters::RequestContext,
    snapshot: &crate::config::Snapshot,
    pool: Option<usize>,
    source: Source,
) -> (String, Vec<KeyValue>) {
    let request = session.req_header();
    let route = shared.route.as_deref();
    let name = format!("{} {}", request.method, route.unwrap_or("unmatched"));
    let mut attributes = vec![
        KeyValue::new("http.request.method", request.method.as_str().to_string()),
        KeyValue::new("url.path", request.uri.path().to_string()),
        KeyValue::new(
            "url.scheme",
            if shared.client_tls { "https" } else { "http" },
        ),
        KeyValue::new(
            "network.protocol.version",
            match request.version {
                http::Version::HTTP_2 => "2",
                http::Version::HTTP_10 => "1.0",
                _ => "1.1",
            },
        ),
        KeyValue::new("gatehouse.config_version", snapshot.version as i64),
        KeyValue::new(
            "gatehouse.source",
            match source {
                Source::Upstream => "upstream",
                Source::Gateway => "gateway",
            },
        ),
    ];
    if let Some(client) = shared.client_addr {
        attributes.push(KeyValue::new("client.address", client.to_string()));
    }
    if let Some(agent) = request
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|agent| agent.to_str().ok())
    {
        attributes.push(KeyValue::new("user_agent.original", agent.to_string()));
    }
    if let Some(host) = request
        .headers
        .get(http::header::HOST)
        .and_then(|host| host.to_str().ok())
    {
        attributes.push(KeyValue::new("server.address", host.to_string()));
    }
    if let Some(route) = route {
        attributes.push(KeyValue::new("gatehouse.route", route.to_string()));
    }
    if let Some(name) = pool
        .and_then(|pool| snapshot.upstreams.get(pool))
        .map(|pool| pool.name.to_string())
        .or_else(|| shared.upstream.as_deref().map(str::to_string))
    {
        attributes.push(KeyValue::new("gatehouse.upstream", name));
    }
    if let Some(consumer) = &shared.consumer {
        attributes.push(KeyValue::new("gatehouse.consumer", consumer.id.to_string()));
    }
    (name, attributes)
}

/// What `finish` worked out about a request, for its access log line.
struct Summary {
    status: u16,
    /// The whole time, and the upstream's share of it.
    total: Duration,
    upstream: Option<Duration>,
    /// The pool of the last attempt.
    pool: Option<usize>,
    source: Source,
    /// The SERVER span's trace and span ids.
    trace_ids: Option<([u8; 16], [u8; 8])>,
}

/// Writes the access log line of a finished request into `out`, without its newline. Never
/// written: credentials (`Authorization`, `Proxy-Authorization`, API-key headers), cookies,
/// the query string and bodies; only the path, and the user agent and host of the request's
/// headers. Written by hand, keys in a fixed order: a serializer costs several times more
/// per line, mostly in escaping keys and values that need none.
fn write_line(
    out: &mut Vec<u8>,
    session: &Session,
    error: Option<&Error>,
    ctx: &RequestCtx,
    summary: &Summary,
) {
    let request = session.req_header();
    let shared = &ctx.shared;
    let header = |name: http::header::HeaderName| {
        request
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    let mut line = crate::telemetry::json_line::Line::new(out);
    line.timestamp("ts", std::time::SystemTime::now());
    line.str("request_id", shared.request_id_if_set());
    match &summary.trace_ids {
        Some((trace, span)) => {
            line.hex("trace_id", trace);
            line.hex("span_id", span);
        }
        None => {
            line.null("trace_id");
            line.null("span_id");
        }
    }
    line.ip("client", shared.client_addr);
    line.str("method", Some(request.method.as_str()));
    line.str("host", header(http::header::HOST));
    line.str("path", Some(request.uri.path()));
    line.str("user_agent", header(http::header::USER_AGENT));
    line.number("status", Some(u64::from(summary.status)));
    line.str(
        "source",
        Some(match summary.source {
            Source::Upstream => "upstream",
            Source::Gateway => "gateway",
        }),
    );
    line.str("route", shared.route.as_deref());
    // The pool the last attempt went to (a backup or a split's), else the route's.
    line.str(
        "upstream",
        summary
            .pool
            .and_then(|pool| ctx.snapshot.upstreams.get(pool))
            .map(|pool| &*pool.name)
            .or(shared.upstream.as_deref()),
    );
    line.socket("upstream_addr", ctx.upstream.tried.last().copied());
    line.number("upstream_status", ctx.upstream.status.map(u64::from));
    line.number("attempts", Some(u64::from(ctx.upstream.count)));
    line.number(
        "retries",
        Some(u64::from(ctx.upstream.count.saturating_sub(1))),
    );
    line.str(
        "consumer",
        shared.consumer.as_ref().map(|consumer| &*consumer.id),
    );
    let auth = match (shared.auth_failure, shared.auth_method) {
        (Some((method, result)), _) => Some((method, result)),
        (None, Some(method)) => Some((method, "ok")),
        (None, None) => None,
    };
    match auth {
        Some((method, result)) => {
            let mut auth = line.object("auth");
            auth.str("method", Some(method));
            auth.str("result", Some(result));
            auth.end();
        }
        None => line.null("auth"),
    }
    match &shared.rate_limit {
        Some(note) => {
            let mut rate_limit = line.object("rate_limit");
            rate_limit.str("policy", Some(&note.policy));
            rate_limit.str("result", Some(note.result.as_str()));
            rate_limit.number("remaining", Some(note.remaining));
            rate_limit.end();
        }
        None => line.null("rate_limit"),
    }
    line.millis("duration_ms", Some(summary.total));
    line.millis("upstream_ms", summary.upstream);
    line.millis(
        "gateway_ms",
        Some(
            summary
                .total
                .saturating_sub(summary.upstream.unwrap_or_default()),
        ),
    );
    line.number("bytes_in", Some(shared.request_body_bytes));
    line.number("bytes_out", Some(session.as_ref().body_bytes_sent() as u64));
    line.str("error", error.map(|error| error.etype().as_str()));
    line.end();
}
