//! What Gatehouse knows about one target, kept across config versions (a reload that keeps a
//! target keeps its state): its health from active probes, its passive ejection, its outstanding
//! requests and its recent latency.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gatehouse_filters::metrics::{Row, SampledRow};
use prometheus::IntCounter;

use super::clock;
use crate::config::model::OutlierConfig;

pub struct TargetState {
    pub pool: Arc<str>,
    pub address: SocketAddr,
    /// What active probes last decided (true while the pool has no health check).
    healthy: AtomicBool,
    /// Set until the first probe has passed, for a target that started unhealthy: one passing
    /// probe is then enough, the healthy threshold is for recoveries.
    awaiting_first_pass: AtomicBool,
    passed_in_a_row: AtomicU32,
    failed_in_a_row: AtomicU32,
    /// Passive checks: requests failed in a row, and the ejection they caused.
    request_failures_in_a_row: AtomicU32,
    /// Clock milliseconds until which the target is ejected (0: not ejected).
    ejected_until: AtomicU64,
    /// Ejections so far; each repeat doubles the next one. Forgotten once the target has served
    /// without an ejection for `max_ejection_time`.
    ejections: AtomicU32,
    /// Requests sent to this target and not yet finished.
    pub in_flight: AtomicUsize,
    /// Peak-sensitive moving average of response latency, in microseconds (f64 bits), and
    /// when it was last updated (clock milliseconds).
    latency: AtomicU64,
    latency_updated: AtomicU64,
    /// Why the target is in its state, for `/config`.
    reason: Mutex<String>,
    ejections_total: Row<IntCounter>,
    /// Keeps `gatehouse_upstream_target_healthy` exported for as long as the state lives.
    healthy_row: OnceLock<SampledRow>,
}

impl std::fmt::Debug for TargetState {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TargetState")
            .field("pool", &self.pool)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// An ejection that just started, for the log.
pub struct Ejection {
    pub length: Duration,
    pub count: u32,
}

impl TargetState {
    pub(super) fn new(
        pool: Arc<str>,
        address: SocketAddr,
        healthy: bool,
        metrics: &gatehouse_filters::Metrics,
    ) -> Arc<TargetState> {
        let label = address.to_string();
        let ejections_total = metrics
            .counters(
                "gatehouse_upstream_ejections_total",
                "Targets ejected by outlier detection, by upstream and target",
                &["upstream", "target"],
            )
            .row(&[&pool, &label]);
        let state = Arc::new(TargetState {
            pool: pool.clone(),
            address,
            healthy: AtomicBool::new(healthy),
            awaiting_first_pass: AtomicBool::new(!healthy),
            passed_in_a_row: AtomicU32::new(0),
            failed_in_a_row: AtomicU32::new(0),
            request_failures_in_a_row: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            latency: AtomicU64::new(0f64.to_bits()),
            latency_updated: AtomicU64::new(0),
            reason: Mutex::new(
                if healthy {
                    "new target"
                } else {
                    "new target; waiting for its first passing probe"
                }
                .into(),
            ),
            ejections_total,
            healthy_row: OnceLock::new(),
        });
        // The gauge reads the state it belongs to, so it must not keep it alive.
        let weak = Arc::downgrade(&state);
        let row = metrics
            .sampled(
                "gatehouse_upstream_target_healthy",
                "Whether a target gets traffic: healthy by its probes and not ejected (1) or not (0)",
                &["upstream", "target"],
            )
            .row(&[&pool, &label], move || {
                weak.upgrade()
                    .map_or(0, |state| i64::from(state.usable(true, clock::now())))
            });
        let _ = state.healthy_row.set(row);
        state
    }

    /// Whether the target may get traffic: healthy by its probes (when `checked`) and not
    /// ejected.
    pub fn usable(&self, checked: bool, now: u64) -> bool {
        (!checked || self.healthy.load(Ordering::Relaxed)) && !self.ejected(now)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn ejected(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now < until
    }

    pub fn reason(&self) -> String {
        self.reason
            .lock()
            .map(|reason| reason.clone())
            .unwrap_or_default()
    }

    fn set_reason(&self, reason: String) {
        if let Ok(mut current) = self.reason.lock() {
            *current = reason;
        }
    }

    /// Counts an active probe's result; returns the new health when it changed.
    pub fn record_probe(
        &self,
        passed: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
        detail: &str,
    ) -> Option<bool> {
        if passed {
            self.failed_in_a_row.store(0, Ordering::Relaxed);
            let passes = self.passed_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
            let first = self.awaiting_first_pass.swap(false, Ordering::Relaxed);
            if !self.healthy.load(Ordering::Relaxed) && (first || passes >= healthy_threshold) {
                self.healthy.store(true, Ordering::Relaxed);
                // The probes saw it go down and come back: an ejection from the same outage is
                // over too (a target that stays healthy by its probes keeps its ejection).
                let now = clock::now();
                let lifted = self.ejected(now);
                if lifted {
                    self.ejected_until.store(now, Ordering::Relaxed);
                    self.request_failures_in_a_row.store(0, Ordering::Relaxed);
                }
                self.set_reason(format!(
                    "healthy: {passes} passing probe(s) in a row{}",
                    if lifted {
                        "; its ejection is lifted"
                    } else {
                        ""
                    }
                ));
                return Some(true);
            }
        } else {
            self.passed_in_a_row.store(0, Ordering::Relaxed);
            let failures = self.failed_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
            if self.healthy.load(Ordering::Relaxed) && failures >= unhealthy_threshold {
                self.healthy.store(false, Ordering::Relaxed);
                self.set_reason(format!(
                    "unhealthy: {failures} failed probe(s) in a row, the last: {detail}"
                ));
                return Some(false);
            }
        }
        None
    }

    /// Counts a request's outcome for passive checks. A failure may eject the target, when
    /// `may_eject` (the pool's ejection limit) allows; returns the ejection it started.
    pub fn record_request(
        &self,
        failed: bool,
        outlier: &OutlierConfig,
        now: u64,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Ejection> {
        if !failed {
            self.request_failures_in_a_row.store(0, Ordering::Relaxed);
            return None;
        }
        let failures = self
            .request_failures_in_a_row
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if failures < outlier.consecutive_failures || self.ejected(now) || !may_eject() {
            return None;
        }
        let max = outlier.max_ejection_time.get();
        // A target that has served for a whole maximum ejection since its last one is forgiven
        // its past ones.
        let last_until = self.ejected_until.load(Ordering::Relaxed);
        if last_until != 0 && now.saturating_sub(last_until) > max.as_millis() as u64 {
            self.ejections.store(0, Ordering::Relaxed);
        }
        let count = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = outlier
            .base_ejection_time
            .get()
            .saturating_mul(1 << (count - 1).min(16))
            .min(max);
        self.ejected_until
            .store(now + length.as_millis().max(1) as u64, Ordering::Relaxed);
        self.request_failures_in_a_row.store(0, Ordering::Relaxed);
        self.ejections_total.inc();
        self.set_reason(format!(
            "ejected for {}: {failures} failed requests in a row (ejection {count})",
            humantime::format_duration(length)
        ));
        Some(Ejection { length, count })
    }

    /// Records a response's latency into the peak-sensitive moving average: a slower answer
    /// raises it at once, faster ones bring it down over about ten seconds.
    pub fn observe_latency(&self, latency: Duration, now: u64) {
        const DECAY_MS: f64 = 10_000.0;
        let sample = latency.as_secs_f64() * 1e6;
        let previous = f64::from_bits(self.latency.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.latency_updated.swap(now, Ordering::Relaxed)) as f64;
        let next = if sample > previous {
            sample
        } else {
            let weight = (-elapsed / DECAY_MS).exp();
            previous * weight + sample * (1.0 - weight)
        };
        self.latency.store(next.to_bits(), Ordering::Relaxed);
    }

    /// The moving average of latency, in microseconds (0 before the first response).
    pub fn latency(&self) -> f64 {
        f64::from_bits(self.latency.load(Ordering::Relaxed))
    }

    /// What `/config` shows about the target.
    pub fn report(&self, checked: bool, weight: u32, now: u64) -> serde_json::Value {
        let until = self.ejected_until.load(Ordering::Relaxed);
        serde_json::json!({
            "address": self.address.to_string(),
            "weight": weight,
            "usable": self.usable(checked, now),
            "healthy": if checked { Some(self.healthy()) } else { None },
            "ejected_for_ms": if self.ejected(now) { Some(until - now) } else { None },
            "in_flight": self.in_flight.load(Ordering::Relaxed),
            "latency_ms": (self.latency() / 10.0).round() / 100.0,
            "reason": self.reason(),
        })
    }
}
