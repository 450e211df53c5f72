//! A pool's circuit breaker. Closed, it lets requests through up to `max_requests` at once and
//! watches the failure rate over a sliding window and the failures in a row; past either
//! threshold it opens, and every
//! request gets a fast 503. After `open_duration` it is half-open: a few probe requests go
//! through, one at a time per slot; a passing probe closes it, a failing one opens it again for
//! twice as long (up to `max_open_duration`). Each probe has its own deadline, `open_duration`
//! (its attempt's connect and read timeouts are cut to it): a probe that hangs fails and frees
//! its slot rather than keeping the breaker half-open. The state is kept across config versions.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::config::model::BreakerConfig;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

const BUCKETS: usize = 10;

/// Requests and failures of one slice of the window.
#[derive(Default)]
struct Bucket {
    /// The slice this bucket counts (clock milliseconds / slice length).
    slice: AtomicU64,
    requests: AtomicU32,
    failures: AtomicU32,
}

#[derive(Default)]
pub struct Breaker {
    mode: AtomicU8,
    /// While open: clock milliseconds when it turns half-open.
    open_until: AtomicU64,
    /// Times it opened again from half-open since it was last closed.
    reopens: AtomicU32,
    probes: AtomicU32,
    /// Requests failed in a row while closed.
    failures_in_a_row: AtomicU32,
    /// Requests at the pool now, against `max_requests`.
    in_flight: AtomicU32,
    window: [Bucket; BUCKETS],
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The breaker is open (or half-open with every probe slot taken).
    Open,
    /// `max_requests` are under way.
    Full,
}

/// A request the breaker let through; hand it back with its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permit {
    probe: bool,
}

impl Permit {
    /// A half-open probe: its attempt's deadline is the breaker's `open_duration`.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

/// The breaker's state, for metrics and `/config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    /// `gatehouse_circuit_state`: 0 closed, 1 open, 2 half-open.
    pub fn code(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

impl Breaker {
    pub fn state(&self, now: u64) -> State {
        match self.mode.load(Ordering::Acquire) {
            OPEN if now >= self.open_until.load(Ordering::Acquire) => State::HalfOpen,
            OPEN => State::Open,
            HALF_OPEN => State::HalfOpen,
            _ => State::Closed,
        }
    }

    /// Lets a request through, or says why not.
    pub fn admit(&self, config: &BreakerConfig, now: u64) -> Result<Permit, Refusal> {
        let probe = match self.state(now) {
            State::Closed => false,
            State::Open => return Err(Refusal::Open),
            State::HalfOpen => {
                // The first request after the open period turns the breaker half-open.
                let _ = self.mode.compare_exchange(
                    OPEN,
                    HALF_OPEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                let taken = self.probes.fetch_add(1, Ordering::AcqRel);
                if taken >= config.half_open_probes {
                    self.probes.fetch_sub(1, Ordering::AcqRel);
                    return Err(Refusal::Open);
                }
                true
            }
        };
        let running = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if running >= config.max_requests {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            if probe {
                self.probes.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(Refusal::Full);
        }
        Ok(Permit { probe })
    }

    /// A request let through is over. Returns the state the breaker changed to, if it did.
    pub fn finish(
        &self,
        config: &BreakerConfig,
        permit: Permit,
        failed: bool,
        now: u64,
    ) -> Option<State> {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if permit.probe {
            self.probes.fetch_sub(1, Ordering::AcqRel);
            if self.mode.load(Ordering::Acquire) != HALF_OPEN {
                return None;
            }
            if failed {
                let reopens = self.reopens.fetch_add(1, Ordering::AcqRel) + 1;
                self.open(config, now, reopens);
                return Some(State::Open);
            }
            if self
                .mode
                .compare_exchange(HALF_OPEN, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.reopens.store(0, Ordering::Release);
                for bucket in &self.window {
                    bucket.requests.store(0, Ordering::Relaxed);
                    bucket.failures.store(0, Ordering::Relaxed);
                }
                return Some(State::Closed);
            }
            return None;
        }
        let in_a_row = if failed {
            self.failures_in_a_row.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.failures_in_a_row.store(0, Ordering::Release);
            0
        };
        if config
            .consecutive_failures
            .is_some_and(|limit| in_a_row >= limit)
        {
            return self.trip(config, now);
        }
        let rate = config.failure_rate.as_ref()?;
        let slice_ms = (rate.window.get().as_millis() as u64 / BUCKETS as u64).max(1);
        let slice = now / slice_ms;
        let bucket = &self.window[(slice % BUCKETS as u64) as usize];
        if bucket.slice.swap(slice, Ordering::AcqRel) != slice {
            bucket.requests.store(0, Ordering::Relaxed);
            bucket.failures.store(0, Ordering::Relaxed);
        }
        bucket.requests.fetch_add(1, Ordering::Relaxed);
        if !failed {
            return None;
        }
        bucket.failures.fetch_add(1, Ordering::Relaxed);
        let (mut requests, mut failures) = (0u64, 0u64);
        for bucket in &self.window {
            if slice.saturating_sub(bucket.slice.load(Ordering::Relaxed)) < BUCKETS as u64 {
                requests += u64::from(bucket.requests.load(Ordering::Relaxed));
                failures += u64::from(bucket.failures.load(Ordering::Relaxed));
            }
        }
        let tripped = requests >= u64::from(rate.min_requests)
            && failures as f64 >= rate.threshold.fraction() * requests as f64;
        if tripped {
            return self.trip(config, now);
        }
        None
    }

    /// Opens a closed breaker.
    fn trip(&self, config: &BreakerConfig, now: u64) -> Option<State> {
        if self
            .mode
            .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.failures_in_a_row.store(0, Ordering::Release);
            self.open(config, now, 0);
            return Some(State::Open);
        }
        None
    }

    /// A request let through ended without an outcome that says anything about the pool (the
    /// client went away): it only gives its place back.
    pub fn cancel(&self, permit: Permit) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if permit.probe {
            self.probes.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn open(&self, config: &BreakerConfig, now: u64, reopens: u32) {
        let length = config
            .open_duration
            .get()
            .saturating_mul(1 << reopens.min(16))
            .min(config.max_open_duration.get());
        self.open_until
            .store(now + length.as_millis() as u64, Ordering::Release);
        self.mode.store(OPEN, Ordering::Release);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::FailureRateConfig;
    use crate::config::units::{Duration, Percent};

    fn config() -> BreakerConfig {
        BreakerConfig {
            max_requests: 2,
            failure_rate: Some(FailureRateConfig {
                threshold: Percent(0.5),
                min_requests: 4,
                window: Duration::from_secs(10),
            }),
            consecutive_failures: None,
            open_duration: Duration::from_secs(1),
            max_open_duration: Duration::from_secs(3),
            half_open_probes: 1,
        }
    }

    #[test]
    fn opens_on_the_failure_rate_probes_when_half_open_and_backs_off() {
        let config = config();
        let breaker = Breaker::default();
        let mut now = 1_000;
        for failed in [false, false, true, true] {
            let permit = breaker.admit(&config, now).unwrap();
            breaker.finish(&config, permit, failed, now);
        }
        assert_eq!(breaker.state(now), State::Open);
        assert_eq!(breaker.admit(&config, now), Err(Refusal::Open));
        // Half-open after the open period: one probe at a time.
        now += 1_000;
        let probe = breaker.admit(&config, now).unwrap();
        assert_eq!(breaker.admit(&config, now), Err(Refusal::Open));
        // A failed probe opens it for twice as long.
        assert_eq!(breaker.finish(&config, probe, true, now), Some(State::Open));
        assert_eq!(breaker.state(now + 1_999), State::Open);
        assert_eq!(breaker.state(now + 2_000), State::HalfOpen);
        now += 2_000;
        let probe = breaker.admit(&config, now).unwrap();
        assert_eq!(
            breaker.finish(&config, probe, false, now),
            Some(State::Closed)
        );
        assert!(breaker.admit(&config, now).is_ok());
    }

    #[test]
    fn opens_after_failures_in_a_row_and_a_success_starts_the_count_again() {
        let config = BreakerConfig {
            failure_rate: None,
            consecutive_failures: Some(3),
            ..config()
        };
        let breaker = Breaker::default();
        for failed in [true, true, false, true, true] {
            let permit = breaker.admit(&config, 0).unwrap();
            assert_eq!(breaker.finish(&config, permit, failed, 0), None);
        }
        let permit = breaker.admit(&config, 0).unwrap();
        assert_eq!(breaker.finish(&config, permit, true, 0), Some(State::Open));
        assert_eq!(breaker.admit(&config, 0), Err(Refusal::Open));
    }

    #[test]
    fn max_requests_refuses_the_excess() {
        let config = config();
        let breaker = Breaker::default();
        let first = breaker.admit(&config, 0).unwrap();
        let _second = breaker.admit(&config, 0).unwrap();
        assert_eq!(breaker.admit(&config, 0), Err(Refusal::Full));
        breaker.finish(&config, first, false, 0);
        assert!(breaker.admit(&config, 0).is_ok());
    }
}
