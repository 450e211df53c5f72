//! Prometheus metrics. Per-route counters are resolved once per Snapshot, so the request path
//! increments an atomic instead of looking labels up.

use once_cell::sync::Lazy;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::config::Snapshot;

/// The label used for requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "(none)";

pub struct Metrics {
    pub registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    config_reloads: IntCounterVec,
    config_version: IntGauge,
    config_applied_at: IntGauge,
    pub access_log_dropped: IntCounter,
    auth_failures: IntCounterVec,
}

pub static METRICS: Lazy<Metrics> = Lazy::new(|| {
    let registry = Registry::new();
    let requests = IntCounterVec::new(
        Opts::new(
            "gatehouse_requests_total",
            "Requests served, by route and status class",
        ),
        &["route", "status_class"],
    )
    .expect("valid metric");
    let duration = HistogramVec::new(
        HistogramOpts::new(
            "gatehouse_request_duration_seconds",
            "Time from request head to the end of the response, by route",
        )
        .buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]),
        &["route"],
    )
    .expect("valid metric");
    let config_reloads = IntCounterVec::new(
        Opts::new(
            "gatehouse_config_reloads_total",
            "Config reloads, by result (applied or rejected)",
        ),
        &["result"],
    )
    .expect("valid metric");
    let config_version = IntGauge::new("gatehouse_config_version", "Version of the live config")
        .expect("valid metric");
    let config_applied_at = IntGauge::new(
        "gatehouse_config_applied_timestamp_seconds",
        "When the live config was applied (Unix time)",
    )
    .expect("valid metric");
    let access_log_dropped = IntCounter::new(
        "gatehouse_access_log_dropped_total",
        "Access log lines dropped because the writer fell behind",
    )
    .expect("valid metric");
    let auth_failures = IntCounterVec::new(
        Opts::new(
            "gatehouse_auth_failures_total",
            "Requests refused by authentication, by method and reason",
        ),
        &["method", "reason"],
    )
    .expect("valid metric");
    for collector in [
        Box::new(auth_failures.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(requests.clone()),
        Box::new(duration.clone()),
        Box::new(config_reloads.clone()),
        Box::new(config_version.clone()),
        Box::new(config_applied_at.clone()),
        Box::new(access_log_dropped.clone()),
    ] {
        registry
            .register(collector)
            .expect("metric registered once");
    }
    Metrics {
        registry,
        requests,
        duration,
        config_reloads,
        config_version,
        config_applied_at,
        access_log_dropped,
        auth_failures,
    }
});

pub fn record_auth_failure(method: &str, reason: &str) {
    METRICS
        .auth_failures
        .with_label_values(&[method, reason])
        .inc();
}

/// A route's counters and histogram, resolved once.
#[derive(Clone)]
pub struct RouteMetrics {
    by_class: [IntCounter; 5],
    duration: Histogram,
}

impl RouteMetrics {
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

pub fn route_metrics(route: &str) -> RouteMetrics {
    let metrics = &*METRICS;
    RouteMetrics {
        by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .map(|class| metrics.requests.with_label_values(&[route, class])),
        duration: metrics.duration.with_label_values(&[route]),
    }
}

pub fn record_config_applied(snapshot: &Snapshot) {
    let metrics = &*METRICS;
    metrics.config_reloads.with_label_values(&["applied"]).inc();
    metrics.config_version.set(snapshot.version as i64);
    let applied = snapshot
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or_default();
    metrics.config_applied_at.set(applied);
}

pub fn record_config_rejected() {
    METRICS
        .config_reloads
        .with_label_values(&["rejected"])
        .inc();
}

fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Rows of a (policy, label) counter registry, sorted.
fn labelled_rows(
    registry: &std::sync::Mutex<gatehouse_filters::rate_limit::DecisionCounters>,
) -> Vec<(String, &'static str, u64)> {
    use std::sync::atomic::Ordering;
    let mut rows: Vec<_> = registry
        .lock()
        .map(|counters| {
            counters
                .iter()
                .map(|((policy, label), count)| {
                    (policy.clone(), *label, count.load(Ordering::Relaxed))
                })
                .collect()
        })
        .unwrap_or_default();
    rows.sort();
    rows
}

/// The Prometheus text exposition of every metric, with the state of the current config's
/// Redis server when it has one.
pub fn render(
    redis: Option<&gatehouse_filters::shared::Redis>,
    postgres: Option<&crate::config::postgres::SourceState>,
) -> Vec<u8> {
    use std::fmt::Write;
    use std::sync::atomic::Ordering;
    let mut buffer = Vec::new();
    let families = METRICS.registry.gather();
    TextEncoder::new().encode(&families, &mut buffer).ok();
    let counters = [
        (
            "gatehouse_jwks_refreshes_total",
            "JWKS key-set fetches that succeeded",
            &gatehouse_filters::jwt::jwks::REFRESHES,
        ),
        (
            "gatehouse_jwks_refresh_failures_total",
            "JWKS key-set fetches that failed (the stale keys were kept)",
            &gatehouse_filters::jwt::jwks::REFRESH_FAILURES,
        ),
    ];
    let mut text = String::new();
    let families = [
        (
            "gatehouse_ratelimit_decisions_total",
            "Rate-limit decisions, by policy and result",
            "result",
            &*gatehouse_filters::rate_limit::DECISIONS,
        ),
        (
            "gatehouse_ratelimit_fallback_total",
            "Rate-limit decisions made without Redis (it did not answer in time), by policy and failure mode",
            "mode",
            &*gatehouse_filters::rate_limit::FALLBACKS,
        ),
    ];
    for (name, help, label, registry) in families {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} counter");
        for (policy, value, count) in labelled_rows(registry) {
            let _ = writeln!(
                text,
                "{name}{{policy=\"{}\",{label}=\"{value}\"}} {count}",
                escape_label(&policy)
            );
        }
    }
    for (name, help, counter) in counters {
        let _ = writeln!(
            text,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    if let Some(redis) = redis {
        let status = redis.status();
        let url = escape_label(&status.url);
        let _ = writeln!(
            text,
            "# HELP gatehouse_redis_up Whether Redis answers commands (1) or not (0)\n# TYPE gatehouse_redis_up gauge\ngatehouse_redis_up{{url=\"{url}\"}} {}",
            u8::from(status.state == "up")
        );
        let _ = writeln!(
            text,
            "# HELP gatehouse_redis_commands_total Redis commands, by outcome\n# TYPE gatehouse_redis_commands_total counter\ngatehouse_redis_commands_total{{url=\"{url}\",outcome=\"ok\"}} {}\ngatehouse_redis_commands_total{{url=\"{url}\",outcome=\"failed\"}} {}",
            status.commands_ok, status.commands_failed
        );
    }
    if let Some(state) = postgres {
        let applied = state.applied_version.load(Ordering::Relaxed);
        let _ = writeln!(
            text,
            "# HELP gatehouse_config_source_up Whether the config database is connected (1) or not (0)\n# TYPE gatehouse_config_source_up gauge\ngatehouse_config_source_up{{source=\"postgres\"}} {}",
            u8::from(state.up.load(Ordering::Relaxed))
        );
        let _ = writeln!(
            text,
            "# HELP gatehouse_config_database_version The config_versions id this node serves\n# TYPE gatehouse_config_database_version gauge\ngatehouse_config_database_version {applied}"
        );
        let _ = writeln!(
            text,
            "# HELP gatehouse_config_database_versions_behind Versions committed in the database that this node does not serve yet\n# TYPE gatehouse_config_database_versions_behind gauge\ngatehouse_config_database_versions_behind {}",
            state.versions_behind()
        );
    }
    buffer.extend_from_slice(text.as_bytes());
    buffer
}
