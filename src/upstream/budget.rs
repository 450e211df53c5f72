//! A pool's retry budget: over the last ten seconds, retries may add `percent` of the requests
//! plus `min_per_second` for each of those seconds that saw traffic, so a failing pool is never
//! hammered by retry storms, however many routes and clients retry to it. Over any run, retries
//! stay within `percent` of the requests plus `min_per_second` per second. Kept across config
//! versions.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::config::model::RetryBudgetConfig;

const SLICES: u64 = 10;
const SLICE_MS: u64 = 1_000;

#[derive(Default)]
struct Slice {
    /// The second this slice counts (clock milliseconds / 1000).
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
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
            slice.requests.store(0, Ordering::Relaxed);
            slice.retries.store(0, Ordering::Relaxed);
        }
        slice
    }

    /// A first attempt: it earns the pool retries.
    pub fn request(&self, now: u64) {
        self.slice(now).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes a retry from the budget, if there is one left.
    pub fn try_retry(&self, config: &RetryBudgetConfig, now: u64) -> bool {
        let current = self.slice(now);
        let second = now / SLICE_MS;
        let (mut requests, mut retries, mut seconds) = (0u64, 0u64, 0u64);
        for slice in &self.slices {
            if second.saturating_sub(slice.second.load(Ordering::Relaxed)) < SLICES {
                let (slice_requests, slice_retries) = (
                    slice.requests.load(Ordering::Relaxed),
                    slice.retries.load(Ordering::Relaxed),
                );
                requests += u64::from(slice_requests);
                retries += u64::from(slice_retries);
                seconds += u64::from(slice_requests > 0 || slice_retries > 0);
            }
        }
        // The second asking counts as one with traffic.
        let seconds = seconds.max(1);
        let allowed = config.percent.fraction() * requests as f64
            + f64::from(config.min_per_second) * seconds as f64;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        current.retries.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::Percent;

    #[test]
    fn retries_stay_within_the_share_of_requests_and_the_floor() {
        let config = RetryBudgetConfig {
            percent: Percent(0.2),
            min_per_second: 1,
        };
        let budget = RetryBudget::default();
        let now = 100_000;
        for _ in 0..100 {
            budget.request(now);
        }
        // 20 % of 100 requests, plus 1 for the one second with traffic.
        let granted = (0..100).filter(|_| budget.try_retry(&config, now)).count();
        assert_eq!(granted, 21);
        // Two seconds on, with traffic in each: one more second's floor and their share.
        for _ in 0..10 {
            budget.request(now + 2_000);
        }
        let granted = (0..100)
            .filter(|_| budget.try_retry(&config, now + 2_000))
            .count();
        assert_eq!(granted, 3);
        // Eleven seconds after that the window has moved on: one second's floor is left.
        let later = now + 13_000;
        let granted = (0..100)
            .filter(|_| budget.try_retry(&config, later))
            .count();
        assert_eq!(granted, 1);
    }
}
