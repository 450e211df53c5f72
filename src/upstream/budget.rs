//! A pool's retry budget, kept across config versions, so a failing pool is never hammered by
//! retry storms however many routes and clients retry to it. Over the last ten seconds, retries
//! may add `percent` of the requests plus `min_per_second` for each second of traffic: the time
//! from the first to the last request the window holds. So over any run of up to ten seconds,
//! retries stay within `percent` of its requests plus `min_per_second` per second of the run
//! (retries still going after the run earn nothing more). Whatever the traffic, `min_per_second`
//! retries are always allowed in the window: a lone request after a quiet spell may use every
//! attempt its route allows.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::config::model::RetryBudgetConfig;

const SLICES: u64 = 10;
const SLICE_MS: u64 = 1_000;

struct Slice {
    /// The second this slice counts (clock milliseconds / 1000); `u64::MAX` before first use.
    second: AtomicU64,
    /// Clock milliseconds of its first and last request (`u64::MAX` and 0 while it has none).
    first: AtomicU64,
    last: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl Default for Slice {
    fn default() -> Self {
        Slice {
            second: AtomicU64::new(u64::MAX),
            first: AtomicU64::new(u64::MAX),
            last: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            retries: AtomicU32::new(0),
        }
    }
}

#[derive(Default)]
pub struct RetryBudget {
    slices: [Slice; SLICES as usize],
}

impl RetryBudget {
    fn slice(&self, now: u64) -> &Slice {
        let second = now / SLICE_MS;
        let slice = &self.slices[(second % SLICES) as usize];
        if slice.second.swap(second, Ordering::AcqRel) != second {
            slice.first.store(u64::MAX, Ordering::Relaxed);
            slice.last.store(0, Ordering::Relaxed);
            slice.requests.store(0, Ordering::Relaxed);
            slice.retries.store(0, Ordering::Relaxed);
        }
        slice
    }

    /// A first attempt: it earns the pool retries.
    pub fn request(&self, now: u64) {
        let slice = self.slice(now);
        slice.first.fetch_min(now, Ordering::Relaxed);
        slice.last.fetch_max(now, Ordering::Relaxed);
        slice.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a retry from the budget, if there is one left.
    pub fn try_retry(&self, config: &RetryBudgetConfig, now: u64) -> bool {
        let current = self.slice(now);
        let second = now / SLICE_MS;
        let (mut requests, mut earlier_retries) = (0u64, 0u64);
        let (mut first, mut last) = (u64::MAX, 0u64);
        for slice in &self.slices {
            let slice_second = slice.second.load(Ordering::Relaxed);
            if slice_second > second || second - slice_second >= SLICES {
                continue;
            }
            let slice_requests = slice.requests.load(Ordering::Relaxed);
            requests += u64::from(slice_requests);
            if !std::ptr::eq(slice, current) {
                earlier_retries += u64::from(slice.retries.load(Ordering::Relaxed));
            }
            if slice_requests > 0 {
                // Within its own second, even while another thread is taking the slice over.
                let range = slice_second * SLICE_MS..(slice_second + 1) * SLICE_MS;
                let slice_first = slice.first.load(Ordering::Relaxed);
                let slice_last = slice.last.load(Ordering::Relaxed);
                if range.contains(&slice_first) {
                    first = first.min(slice_first);
                }
                if range.contains(&slice_last) {
                    last = last.max(slice_last);
                }
            }
        }
        let traffic_ms = last.saturating_sub(first);
        let floor = f64::from(config.min_per_second) * traffic_ms as f64 / SLICE_MS as f64;
        let allowed = (config.percent.fraction() * requests as f64 + floor)
            .max(f64::from(config.min_per_second));
        // Compare and swap, so that retries asking at once cannot together pass the budget.
        let mut current_retries = current.retries.load(Ordering::Relaxed);
        loop {
            if (earlier_retries + u64::from(current_retries) + 1) as f64 > allowed {
                return false;
            }
            match current.retries.compare_exchange_weak(
                current_retries,
                current_retries + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => current_retries = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::Percent;

    fn config(percent: f64, min_per_second: u32) -> RetryBudgetConfig {
        RetryBudgetConfig {
            percent: Percent(percent),
            min_per_second,
        }
    }

    #[test]
    fn retries_stay_within_the_share_of_requests_and_the_floor() {
        let config = config(0.2, 1);
        let budget = RetryBudget::default();
        let now = 100_000;
        for _ in 0..100 {
            budget.request(now);
        }
        // 20 % of 100 requests; no time has passed, so no floor beyond the minimum.
        let granted = (0..100).filter(|_| budget.try_retry(&config, now)).count();
        assert_eq!(granted, 20);
        // Two seconds on, with traffic: their share (2) and two seconds of traffic (2).
        for _ in 0..10 {
            budget.request(now + 2_000);
        }
        let granted = (0..100)
            .filter(|_| budget.try_retry(&config, now + 2_000))
            .count();
        assert_eq!(granted, 4);
        // Eleven seconds after that the window has moved on: the minimum is left.
        let later = now + 13_000;
        let granted = (0..100)
            .filter(|_| budget.try_retry(&config, later))
            .count();
        assert_eq!(granted, 1);
    }

    #[test]
    fn the_floor_follows_the_time_of_traffic_not_the_seconds_it_touches() {
        let config = config(0.0, 10);
        let budget = RetryBudget::default();
        // A run of 4 s that starts half-way through a second touches five of them.
        let start = 100_500;
        let mut granted = 0;
        for step in 0..=400 {
            let now = start + step * 10;
            budget.request(now);
            granted += usize::from(budget.try_retry(&config, now));
        }
        assert_eq!(granted, 40);
        // Retries still going after the run earn nothing more.
        let tail = (0..100)
            .filter(|_| budget.try_retry(&config, start + 4_200))
            .count();
        assert_eq!(tail, 0);
        assert!(!RetryBudget::default().try_retry(&self::config(0.2, 0), start));
    }

    #[test]
    fn a_lone_request_may_use_the_minimum() {
        let config = config(0.2, 10);
        let budget = RetryBudget::default();
        budget.request(4_000);
        let granted = (0..100)
            .filter(|_| budget.try_retry(&config, 4_050))
            .count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn slices_never_used_earn_no_floor_on_a_young_clock() {
        // The clock starts with the process: in its first ten seconds slices not yet used must
        // not pass for second 0.
        let config = config(0.0, 10);
        let budget = RetryBudget::default();
        budget.request(1_000);
        budget.request(4_500);
        let granted = (0..100)
            .filter(|_| budget.try_retry(&config, 4_500))
            .count();
        assert_eq!(granted, 35, "3.5 s of traffic earns 35 retries");
    }

    #[test]
    fn retries_asking_at_once_never_pass_the_budget() {
        let config = config(0.2, 10);
        let budget = std::sync::Arc::new(RetryBudget::default());
        for _ in 0..1_000 {
            budget.request(50_000);
        }
        let granted: usize = (0..4)
            .map(|_| {
                let budget = budget.clone();
                let config = config.clone();
                std::thread::spawn(move || {
                    (0..1_000)
                        .filter(|_| budget.try_retry(&config, 50_000))
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .sum();
        assert_eq!(granted, 200);
    }
}
