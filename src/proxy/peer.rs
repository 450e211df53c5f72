//! Upstream choice and the life of each attempt. A request goes to its route's pool (or one of
//! its split's), or to the backup when that pool has no usable target or its breaker refuses.
//! The pool's balancer picks a target the request has not tried yet (a retry tries the backup's
//! before going back to one tried already); the attempt holds the
//! target's in-flight count and the breaker's permit until it ends, and its outcome feeds the
//! target's passive checks, latency and the breaker.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse_filters::util::cookie;
use gatehouse_filters::{Problem, ProblemType};
use http::HeaderValue;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use smallvec::SmallVec;

use super::ctx::RequestCtx;
use super::respond;
use crate::config::model::HashOn;
use crate::config::snapshot::Route;
use crate::upstream::breaker::{Permit, Refusal};
use crate::upstream::{clock, NameRecord, Pick, TargetState, UpstreamPool};

/// The upstream attempts of one request.
#[derive(Default)]
pub struct Attempts {
    /// The pool the request goes to: the route's upstream or one of its split's.
    pub pool: Option<usize>,
    /// Attempts started so far.
    pub count: u32,
    /// Targets tried, so that a retry goes elsewhere when it can.
    pub tried: SmallVec<[SocketAddr; 2]>,
    pub current: Option<Attempt>,
    /// The route's deadline for the whole exchange.
    pub deadline: Option<Instant>,
    /// The previous attempt failed and is tried again (the next one waits its backoff).
    pub retrying: bool,
    /// The failure being handled is a retry decided from the response status: it was counted
    /// already.
    pub status_retry: bool,
    /// The request reached Pingora's proxy phase (`upstream_peer`): a failure from here on
    /// closes the client's connection whatever `fail_to_proxy` says.
    pub proxying: bool,
    /// When the first attempt started, and (only for a route with `Server-Timing`) when an
    /// upstream's response head arrived: the upstream's share of the request's time.
    pub first_started: Option<Instant>,
    pub answered: Option<Instant>,
    /// The status of the last upstream response head: set once an upstream answered.
    pub status: Option<u16>,
}

/// One attempt at one target.
pub struct Attempt {
    pub pool: usize,
    pub target: Arc<TargetState>,
    pub started: Instant,
    permit: Option<Permit>,
    /// Whether it failed, once its outcome is known.
    failed: Option<bool>,
}

impl Route {
    /// The pool a new request goes to: one of the split's by its share, or the route's own.
    fn pick_pool(&self) -> usize {
        if self.split.is_empty() {
            return self.upstream;
        }
        let draw = fastrand::u32(..10_000);
        self.split
            .iter()
            .find(|(_, cumulative)| draw < *cumulative)
            .map_or(self.upstream, |(pool, _)| *pool)
    }
}

/// What `choose` found.
pub enum Choice {
    Peer(Box<HttpPeer>),
    /// The pool has no target yet because a host name has not had its first answer.
    AwaitingName(Arc<NameRecord>),
}

/// The peer for the next attempt of this request.
pub fn choose(request: &RequestHeader, ctx: &mut RequestCtx, may_wait: bool) -> Result<Choice> {
    let Some(route_index) = ctx.route else {
        return Err(Error::explain(ErrorType::InternalError, "no route"));
    };
    let started = Instant::now();
    let now = clock::now();
    let RequestCtx {
        snapshot,
        shared,
        upstream,
        trace,
        grpc,
        ..
    } = ctx;
    let route = &snapshot.routes[route_index];
    let primary = *upstream.pool.get_or_insert_with(|| route.pick_pool());
    if upstream.count == 0 {
        upstream.deadline = route.timeout.map(|timeout| started + timeout);
        // A gRPC client's deadline bounds the exchange too, counted from its request's arrival.
        if grpc.is_some() {
            let client = request
                .headers
                .get(gatehouse_filters::grpc::TIMEOUT)
                .and_then(|value| gatehouse_filters::grpc::parse_timeout(value.as_bytes()))
                .map(|timeout| shared.started + timeout);
            upstream.deadline = match (upstream.deadline, client) {
                (Some(route), Some(client)) => Some(route.min(client)),
                (route, client) => route.or(client),
            };
        }
    }
    let remaining = upstream.deadline.map_or(Duration::MAX, |deadline| {
        deadline.saturating_duration_since(started)
    });
    let mut refusal = None;
    // A retry goes to a target not tried yet, in the route's pool and then in its backup, and
    // only then to one tried before.
    let pools = std::iter::once(primary).chain(route.backup);
    let passes = if upstream.tried.is_empty() { 1 } else { 2 };
    let order = [false, true]
        .into_iter()
        .take(passes)
        .flat_map(|again| pools.clone().map(move |pool| (pool, again)));
    for (pool_index, again) in order {
        let pool = &snapshot.upstreams[pool_index];
        let key = hash_key(pool, request, shared.client_addr);
        let Some(pick) = pool.select(key.as_deref(), &upstream.tried, again, now) else {
            if may_wait && pool_index == primary {
                if let Some(record) = pool.awaiting_name() {
                    return Ok(Choice::AwaitingName(record.clone()));
                }
            }
            refusal.get_or_insert(ProblemType::NoHealthyUpstream);
            continue;
        };
        let permit = match &pool.breaker {
            None => None,
            Some(config) => match pool.shared.breaker.admit(config, now) {
                Ok(permit) => Some(permit),
                Err(refusal_kind @ (Refusal::Open | Refusal::Full)) => {
                    refusal = Some(ProblemType::CircuitOpen);
                    if let Some(trace) = trace.as_ref().filter(|trace| trace.recording()) {
                        trace.event(
                            "circuit_open",
                            vec![
                                opentelemetry::KeyValue::new(
                                    "gatehouse.upstream",
                                    pool.name.to_string(),
                                ),
                                opentelemetry::KeyValue::new(
                                    "gatehouse.circuit.state",
                                    match refusal_kind {
                                        Refusal::Open => "open",
                                        Refusal::Full => "max_requests",
                                    },
                                ),
                            ],
                        );
                    }
                    continue;
                }
            },
        };
        if upstream.count == 0 {
            pool.shared.budget.request(now);
        }
        let Pick {
            state,
            mut peer,
            host,
        } = pick;
        shared.target_host = Some(host);
        state
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        upstream.tried.push(state.address);
        upstream.count += 1;
        upstream.first_started.get_or_insert(started);
        upstream.current = Some(Attempt {
            pool: pool_index,
            target: state,
            started,
            permit,
            failed: None,
        });
        // A half-open probe has its own deadline: the breaker's open period.
        let limit = match (&permit, &pool.breaker) {
            (Some(permit), Some(config)) if permit.is_probe() => {
                remaining.min(config.open_duration.get())
            }
            _ => remaining,
        };
        // Only the WebSocket tunnel (`websocket`) ever hands an upstream an upgrade request;
        // a proxied request's `Upgrade` never goes on (Pingora's default would complete a
        // WebSocket handshake by itself).
        peer.options.http_upstream_request_policy =
            pingora_core::upstreams::peer::HttpUpstreamRequestPolicy::deny_upgrades();
        peer.options.connection_timeout = Some(pool.connect_timeout.min(limit));
        peer.options.read_timeout = Some(
            route
                .retry
                .per_try_timeout
                .unwrap_or(pool.read_timeout)
                .min(limit),
        );
        return Ok(Choice::Peer(peer));
    }
    let problem = Problem::new(refusal.unwrap_or(ProblemType::NoHealthyUpstream));
    Err(respond::defer(ctx, problem))
}

/// Tells a gRPC upstream the time left (`grpc-timeout`): the client's deadline, or the route's
/// when that comes first, so the service stops working on a call nobody waits for.
pub fn tell_deadline(request: &mut RequestHeader, ctx: &RequestCtx) {
    if let Some(deadline) = ctx.upstream.deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let value = gatehouse_filters::grpc::format_timeout(left.max(Duration::from_millis(1)));
        request
            .insert_header(gatehouse_filters::grpc::TIMEOUT, value)
            .ok();
    }
}

/// The bytes a consistent-hash pool hashes for this request.
fn hash_key<'a>(
    pool: &UpstreamPool,
    request: &'a RequestHeader,
    client: Option<std::net::IpAddr>,
) -> Option<Cow<'a, [u8]>> {
    match pool.hash_on.as_ref()? {
        HashOn::Header(name) => request
            .headers
            .get(name.as_str())
            .map(|value| Cow::Borrowed(HeaderValue::as_bytes(value))),
        HashOn::Cookie(name) => cookie(request, name).map(|value| Cow::Borrowed(value.as_bytes())),
        HashOn::ClientIp(_) => client.map(|address| Cow::Owned(address.to_string().into_bytes())),
    }
}

/// Records the current attempt's outcome: for the target's passive checks and latency (a
/// response head, whatever its status, says how fast the target answered).
pub fn record(ctx: &mut RequestCtx, failed: bool, answered: bool) {
    let Some(attempt) = ctx.upstream.current.as_mut() else {
        return;
    };
    attempt.failed = Some(failed);
    let pool = &ctx.snapshot.upstreams[attempt.pool];
    let state = &attempt.target;
    let now = clock::now();
    if answered {
        state.observe_latency(attempt.started.elapsed(), now);
    }
    if let Some(outlier) = &pool.outlier {
        if let Some(ejection) =
            state.record_request(failed, outlier, now, || pool.may_eject(outlier, now))
        {
            tracing::warn!(
                upstream = %pool.name,
                target = %state.address,
                ejection = ejection.count,
                seconds = ejection.length.as_secs_f64(),
                "target ejected after failed requests"
            );
        }
    }
}

/// Ends the current attempt: its target's in-flight count and the breaker's permit go back,
/// the breaker counting its outcome.
pub fn release(ctx: &mut RequestCtx) {
    let Some(attempt) = ctx.upstream.current.take() else {
        return;
    };
    let pool = &ctx.snapshot.upstreams[attempt.pool];
    attempt
        .target
        .in_flight
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    if let (Some(config), Some(permit)) = (&pool.breaker, attempt.permit) {
        match attempt.failed {
            Some(failed) => {
                if let Some(state) =
                    pool.shared
                        .breaker
                        .finish(config, permit, failed, clock::now())
                {
                    tracing::warn!(upstream = %pool.name, state = state.as_str(), "circuit breaker changed state");
                }
            }
            None => pool.shared.breaker.cancel(permit),
        }
    }
}
