//! The proxy's request metrics: per-route request counts by status class and latency
//! histograms, whose rows a route takes once per Snapshot (so the request path increments an
//! atomic instead of looking labels up, and a removed route leaves `/metrics`), and
//! authentication failures. Every family lives in the process's one registry, the one
//! `/metrics` renders; other components register theirs beside them.

use gatehouse_filters::metrics::{Family, Row};
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

/// A route's counters and histogram.
pub struct RouteMetrics {
    by_class: [Row<IntCounter>; 5],
    duration: Row<Histogram>,
    retries: [Row<IntCounter>; 5],
    /// For a route with a mirror.
    pub mirror: Option<MirrorMetrics>,
}

/// A route's mirror copies: sent (answered), failed, and dropped (no free slot, or a body too
/// large to copy).
pub struct MirrorMetrics {
    pub sent: Row<IntCounter>,
    pub failed: Row<IntCounter>,
    pub dropped: Row<IntCounter>,
}

impl RouteMetrics {
    pub fn new(metrics: &Metrics, route: &str) -> RouteMetrics {
        let requests = metrics.counters(
            "gatehouse_requests_total",
            "Requests served, by route and status class",
            &["route", "status_class"],
        );
        let duration = metrics.histograms(
            "gatehouse_request_duration_seconds",
            "Time from request head to the end of the response, by route",
            &["route"],
            DURATION_BUCKETS,
        );
        let retries = metrics.counters(
            "gatehouse_retries_total",
            "Upstream attempts tried again, by route and reason",
            &["route", "reason"],
        );
        RouteMetrics {
            by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|class| requests.row(&[route, class])),
            duration: duration.row(&[route]),
            retries: RETRY_REASONS.map(|reason| retries.row(&[route, reason])),
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

    /// The rows of requests that match no route.
    pub fn unmatched(metrics: &Metrics) -> RouteMetrics {
        RouteMetrics::new(metrics, UNMATCHED_ROUTE)
    }

    /// A retry, by one of [`RETRY_REASONS`].
    pub fn retried(&self, reason: &str) {
        if let Some(index) = RETRY_REASONS.iter().position(|known| *known == reason) {
            self.retries[index].inc();
        }
    }

    pub fn observe(&self, status: u16, seconds: f64) {
        let class = match status {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }
}

/// Metrics the proxy records per request, beyond its route's.
#[derive(Clone)]
pub struct RequestMetrics {
    auth_failures: Family<IntCounter>,
}

impl RequestMetrics {
    pub fn new(metrics: &Metrics) -> RequestMetrics {
        RequestMetrics {
            auth_failures: metrics.counters(
                "gatehouse_auth_failures_total",
                "Requests refused by authentication, by method and reason",
                &["method", "reason"],
            ),
        }
    }

    /// An authentication failure; methods and reasons are a small fixed set named by filters.
    pub fn auth_failure(&self, method: &str, reason: &str) {
        self.auth_failures.with_labels(&[method, reason]).inc();
    }
}
