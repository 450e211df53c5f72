//! The proxy's request metrics: per-route request counts by upstream, status class and source,
//! the split of each request's time between the upstream and Gatehouse, bandwidth and retries,
//! whose rows a route takes once per Snapshot (so the request path increments an atomic
//! instead of looking labels up, and a removed route leaves `/metrics`); authentication
//! failures; upstream connection failures; and the build. Every family lives in the process's one registry, the one
//! `/metrics` renders; other components register theirs beside them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use gatehouse_filters::metrics::{Family, Row, SampledRow};
use gatehouse_filters::Metrics;
use prometheus::{Histogram, IntCounter};

/// The label used for requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "(none)";

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `reason` labels of `gatehouse_retries_total`.
pub const RETRY_REASONS: [&str; 5] = [
    "connect_failure",
    "reset",
    "timeout",
    "gateway_error",
    "status",
];

/// Buckets of the upstream's share: from a cache hit's fraction of a millisecond to a slow
/// report's minute.
const UPSTREAM_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Buckets of Gatehouse's own share: tens of microseconds on a plain route, milliseconds when a
/// filter waits on Redis or an identity provider.
const GATEWAY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Consumers a route with `metrics: {per_consumer: true}` labels by name; later ones share
/// [`OTHER_CONSUMERS`], so the label's cardinality is bounded whatever callers send.
pub const CONSUMER_LABELS: usize = 1000;
/// The label of consumers beyond [`CONSUMER_LABELS`].
pub const OTHER_CONSUMERS: &str = "(other)";
/// The label of requests no filter identified.
pub const ANONYMOUS: &str = "(anonymous)";

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Who answered a request: the upstream, or Gatehouse itself (a refusal, a 404, a 502 after
/// the upstream failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Upstream = 0,
    Gateway = 1,
}

/// What a finished request reports to its route's rows.
pub struct Outcome<'a> {
    pub status: u16,
    /// From the request head to the end of the response.
    pub total: std::time::Duration,
    /// The pool the request went to last, if it got as far as choosing one.
    pub pool: Option<usize>,
    pub source: Source,
    /// From the first attempt's start to the end of the upstream's response (or to the moment
    /// Gatehouse gave up on it), when an attempt was made.
    pub upstream: Option<std::time::Duration>,
    /// Body bytes read from the client and written to it.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub consumer: Option<&'a str>,
}

/// A route's rows: requests by upstream, status class and source; the time split between the
/// upstream and Gatehouse; bandwidth; retries; and, when the route asks, requests by consumer.
pub struct RouteMetrics {
    /// By pool the route may send to (its upstream first, then backup and split pools).
    pools: Vec<PoolRows>,
    duration: Row<Histogram>,
    gateway_duration: Row<Histogram>,
    /// Ingress, egress.
    bandwidth: [Row<IntCounter>; 2],
    retries: [Row<IntCounter>; 5],
    consumers: Option<ConsumerRows>,
    /// For a route with a mirror.
    pub mirror: Option<MirrorMetrics>,
}

struct PoolRows {
    pool: usize,
    /// By source, then status class.
    requests: [[Row<IntCounter>; 5]; 2],
    upstream_duration: Row<Histogram>,
}

/// `gatehouse_consumer_requests_total` rows of one route, made on a consumer's first request.
struct ConsumerRows {
    family: Family<IntCounter>,
    route: Arc<str>,
    /// Read-locked on every request, write-locked only for a consumer's first one.
    rows: RwLock<HashMap<Arc<str>, [Row<IntCounter>; 5]>>,
}

/// A route's mirror copies: sent (answered), failed, and dropped (no free slot, or a body too
/// large to copy).
pub struct MirrorMetrics {
    pub sent: Row<IntCounter>,
    pub failed: Row<IntCounter>,
    pub dropped: Row<IntCounter>,
}

fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

impl RouteMetrics {
    /// The rows of route `route`, which sends to `pools` (index and name; its own upstream
    /// first). `per_consumer` adds requests by consumer.
    pub fn new(
        metrics: &Metrics,
        route: &str,
        pools: &[(usize, &str)],
        per_consumer: bool,
    ) -> RouteMetrics {
        let requests = metrics.counters(
            "gatehouse_requests_total",
            "Requests served, by route, upstream, status class and source (upstream: the upstream's answer; gateway: an answer of Gatehouse's own, such as 401, 404, 429 or 502)",
            &["route", "upstream", "status_class", "source"],
        );
        let duration = metrics.histograms(
            "gatehouse_request_duration_seconds",
            "Time from request head to the end of the response, by route",
            &["route"],
            DURATION_BUCKETS,
        );
        let upstream_duration = metrics.histograms(
            "gatehouse_upstream_duration_seconds",
            "Time from the first upstream attempt to the end of the upstream's response, or to the moment Gatehouse gave up on it (retries and their backoff included), by route and upstream",
            &["route", "upstream"],
            UPSTREAM_BUCKETS,
        );
        let gateway_duration = metrics.histograms(
            "gatehouse_gateway_duration_seconds",
            "Time a request spent in Gatehouse itself: its whole time less the upstream's share, by route",
            &["route"],
            GATEWAY_BUCKETS,
        );
        let bandwidth = metrics.counters(
            "gatehouse_bandwidth_bytes_total",
            "Body bytes read from clients (ingress) and written to them (egress), by route",
            &["route", "direction"],
        );
        let retries = metrics.counters(
            "gatehouse_retries_total",
            "Upstream attempts tried again, by route and reason",
            &["route", "reason"],
        );
        let pools = pools
            .iter()
            .map(|&(pool, name)| PoolRows {
                pool,
                requests: ["upstream", "gateway"].map(|source| {
                    STATUS_CLASSES.map(|class| requests.row(&[route, name, class, source]))
                }),
                upstream_duration: upstream_duration.row(&[route, name]),
            })
            .collect();
        let consumers = per_consumer.then(|| ConsumerRows {
            family: metrics.counters(
                "gatehouse_consumer_requests_total",
                "Requests by route, consumer and status class, on routes with metrics.per_consumer",
                &["route", "consumer", "status_class"],
            ),
            route: route.into(),
            rows: RwLock::new(HashMap::new()),
        });
        RouteMetrics {
            pools,
            duration: duration.row(&[route]),
            gateway_duration: gateway_duration.row(&[route]),
            bandwidth: ["ingress", "egress"].map(|direction| bandwidth.row(&[route, direction])),
            retries: RETRY_REASONS.map(|reason| retries.row(&[route, reason])),
            consumers,
            mirror: None,
        }
    }

    /// The rows of a route that mirrors its requests.
    pub fn with_mirror(mut self, metrics: &Metrics, route: &str) -> RouteMetrics {
        let copies = metrics.counters(
            "gatehouse_mirror_requests_total",
            "Copies of requests sent to a route's mirror, by route and result (sent, failed, dropped)",
            &["route", "result"],
        );
        self.mirror = Some(MirrorMetrics {
            sent: copies.row(&[route, "sent"]),
            failed: copies.row(&[route, "failed"]),
            dropped: copies.row(&[route, "dropped"]),
        });
        self
    }

    /// The rows of requests that match no route: their upstream is `(none)` too.
    pub fn unmatched(metrics: &Metrics) -> RouteMetrics {
        RouteMetrics::new(
            metrics,
            UNMATCHED_ROUTE,
            &[(usize::MAX, UNMATCHED_ROUTE)],
            false,
        )
    }

    /// A retry, by one of [`RETRY_REASONS`].
    pub fn retried(&self, reason: &str) {
        if let Some(index) = RETRY_REASONS.iter().position(|known| *known == reason) {
            self.retries[index].inc();
        }
    }

    pub fn observe(&self, outcome: &Outcome<'_>) {
        let class = class_index(outcome.status);
        let rows = outcome
            .pool
            .and_then(|pool| self.pools.iter().find(|rows| rows.pool == pool))
            .or(self.pools.first());
        if let Some(rows) = rows {
            rows.requests[outcome.source as usize][class].inc();
            if let Some(upstream) = outcome.upstream {
                rows.upstream_duration.observe(upstream.as_secs_f64());
            }
        }
        self.duration.observe(outcome.total.as_secs_f64());
        let own = outcome
            .total
            .saturating_sub(outcome.upstream.unwrap_or_default());
        self.gateway_duration.observe(own.as_secs_f64());
        if outcome.bytes_in > 0 {
            self.bandwidth[0].inc_by(outcome.bytes_in);
        }
        if outcome.bytes_out > 0 {
            self.bandwidth[1].inc_by(outcome.bytes_out);
        }
        if let Some(consumers) = &self.consumers {
            consumers.count(outcome.consumer, class);
        }
    }
}

impl ConsumerRows {
    fn count(&self, consumer: Option<&str>, class: usize) {
        let name = consumer.unwrap_or(ANONYMOUS);
        if let Some(row) = self.rows.read().expect("consumer metrics lock").get(name) {
            row[class].inc();
            return;
        }
        let mut rows = self.rows.write().expect("consumer metrics lock");
        let key: Arc<str> = if rows.len() < CONSUMER_LABELS || consumer.is_none() {
            name.into()
        } else {
            OTHER_CONSUMERS.into()
        };
        let route = &*self.route;
        let row = rows
            .entry(key.clone())
            .or_insert_with(|| STATUS_CLASSES.map(|class| self.family.row(&[route, &key, class])));
        row[class].inc();
    }
}

/// Metrics the proxy records per request, beyond its route's, and the build it runs.
#[derive(Clone)]
pub struct RequestMetrics {
    auth_failures: Family<IntCounter>,
    grpc_calls: Family<IntCounter>,
    websocket_upgrades: Family<IntCounter>,
    websocket_closes: Family<IntCounter>,
    _websocket_open: Arc<SampledRow>,
    _build: Arc<SampledRow>,
}

/// The commit this binary was built from (see `src/build.rs`).
pub const COMMIT: &str = env!("GATEHOUSE_COMMIT");

impl RequestMetrics {
    pub fn new(metrics: &Metrics) -> RequestMetrics {
        let build = metrics
            .sampled(
                "gatehouse_build_info",
                "Always 1: the version and commit of the running binary",
                &["version", "commit"],
            )
            .row(&[env!("CARGO_PKG_VERSION"), COMMIT], || 1);
        RequestMetrics {
            auth_failures: metrics.counters(
                "gatehouse_auth_failures_total",
                "Requests refused by authentication, by method and reason",
                &["method", "reason"],
            ),
            grpc_calls: metrics.counters(
                "gatehouse_grpc_requests_total",
                "gRPC calls (gRPC, gRPC-Web and transcoded), by route and the grpc-status the \
                 client got (its canonical name)",
                &["route", "grpc_status"],
            ),
            websocket_upgrades: metrics.counters(
                "gatehouse_websocket_upgrades_total",
                "WebSocket connections opened (the upstream's 101 relayed), by route",
                &["route"],
            ),
            websocket_closes: metrics.counters(
                "gatehouse_websocket_closed_total",
                "WebSocket connections ended, by route and why: client_closed, upstream_closed, \
                 idle_timeout, max_lifetime, shutdown",
                &["route", "reason"],
            ),
            _websocket_open: Arc::new(
                metrics
                    .sampled(
                        "gatehouse_websocket_connections",
                        "WebSocket connections open now",
                        &[],
                    )
                    .row(&[], || {
                        crate::proxy::websocket::OPEN.load(std::sync::atomic::Ordering::Relaxed)
                    }),
            ),
            _build: Arc::new(build),
        }
    }

    /// A WebSocket connection opened on `route`.
    pub fn websocket_opened(&self, route: &str) {
        self.websocket_upgrades.with_labels(&[route]).inc();
    }

    /// A WebSocket connection on `route` ended, for `reason`.
    pub fn websocket_closed(&self, route: &str, reason: &str) {
        self.websocket_closes.with_labels(&[route, reason]).inc();
    }

    /// A gRPC call ended with `code`.
    pub fn grpc_call(&self, route: &str, code: gatehouse_filters::grpc::Code) {
        self.grpc_calls.with_labels(&[route, code.name()]).inc();
    }

    /// An authentication failure; methods and reasons are a small fixed set named by filters.
    pub fn auth_failure(&self, method: &str, reason: &str) {
        self.auth_failures.with_labels(&[method, reason]).inc();
    }
}
