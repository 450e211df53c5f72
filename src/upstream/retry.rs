//! The retry policy: whether a failed attempt may be tried again, and how long to wait first.
//! The proxy's hooks (`proxy::retry`) tell it what Pingora reported; the rules are here:
//!
//! - a failed connection (nothing reached the upstream) may be retried for any method;
//! - a reset or a timeout, or a retryable status, only for the route's `retry.methods`, and only
//!   while the request body can still be replayed (Pingora keeps its first 64 KiB);
//! - never past `attempts`, past the route's deadline, or beyond the pool's retry budget;
//! - each retry waits a random backoff (full jitter), never past the deadline.

use std::time::{Duration, Instant};

use http::Method;

use super::UpstreamPool;
use crate::config::snapshot::RetryPolicy;

/// Why an attempt is tried again; the `reason` label of `gatehouse_retries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    ConnectFailure,
    Reset,
    Timeout,
    GatewayError,
    Status,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::ConnectFailure,
        Reason::Reset,
        Reason::Timeout,
        Reason::GatewayError,
        Reason::Status,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::ConnectFailure => "connect_failure",
            Reason::Reset => "reset",
            Reason::Timeout => "timeout",
            Reason::GatewayError => "gateway_error",
            Reason::Status => "status",
        }
    }
}

/// The request whose attempt failed, as the policy sees it.
pub struct Failed<'a> {
    pub reason: Reason,
    /// Attempts made so far, the failed one included.
    pub attempts: u32,
    pub method: &'a Method,
    /// Whether the request body can still be sent again whole.
    pub replayable: bool,
    pub deadline: Option<Instant>,
}

impl RetryPolicy {
    /// Whether the policy tries `failed` again (the pool's budget aside).
    pub fn allows(&self, failed: &Failed<'_>, now: Instant) -> bool {
        let enabled = match failed.reason {
            Reason::ConnectFailure => self.on_connect_failure,
            Reason::Reset => self.on_reset,
            Reason::Timeout => self.on_timeout,
            Reason::GatewayError => self.on_gateway_error,
            Reason::Status => true,
        };
        if !enabled || failed.attempts >= self.attempts {
            return false;
        }
        if failed.reason != Reason::ConnectFailure
            && (!self.methods.contains(failed.method) || !failed.replayable)
        {
            return false;
        }
        failed.deadline.is_none_or(|deadline| now < deadline)
    }

    /// Why a response with `status` is tried again, if it is.
    pub fn status_reason(&self, status: u16) -> Option<Reason> {
        if self.on_gateway_error && matches!(status, 502..=504) {
            Some(Reason::GatewayError)
        } else if self.statuses.contains(&status) {
            Some(Reason::Status)
        } else {
            None
        }
    }

    /// The wait before the next attempt, after `attempts` made: full jitter up to
    /// `backoff_base` doubled per retry, at most `backoff_max`, never past `deadline`.
    pub fn backoff(&self, attempts: u32, now: Instant, deadline: Option<Instant>) -> Duration {
        if self.backoff_max.is_zero() {
            return Duration::ZERO;
        }
        let retries = attempts.saturating_sub(1).min(16);
        let ceiling = self
            .backoff_base
            .saturating_mul(1 << retries)
            .min(self.backoff_max);
        let wait = ceiling.mul_f64(fastrand::f64());
        match deadline {
            Some(deadline) => wait.min(deadline.saturating_duration_since(now)),
            None => wait,
        }
    }

    /// Takes one retry from `pool`'s budget (with this route's share when it sets one); a
    /// refusal is counted in `gatehouse_retry_budget_exhausted_total`.
    pub fn take_budget(&self, pool: &UpstreamPool) -> bool {
        let budget = match self.budget_percent {
            None => std::borrow::Cow::Borrowed(&pool.retry_budget),
            Some(share) => std::borrow::Cow::Owned(crate::config::model::RetryBudgetConfig {
                percent: crate::config::units::Percent(share),
                ..pool.retry_budget.clone()
            }),
        };
        if pool.shared.budget.try_retry(&budget, super::clock::now()) {
            true
        } else {
            pool.shared.budget_exhausted.inc();
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::RETRY_REASONS;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            attempts: 3,
            on_reset: true,
            on_timeout: false,
            on_gateway_error: true,
            statuses: vec![429],
            methods: vec![Method::GET],
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            ..RetryPolicy::connect_failures_once()
        }
    }

    fn failed(reason: Reason, attempts: u32, method: &Method, replayable: bool) -> Failed<'_> {
        Failed {
            reason,
            attempts,
            method,
            replayable,
            deadline: None,
        }
    }

    #[test]
    fn every_reason_has_its_metric_label() {
        let labels: Vec<_> = Reason::ALL.iter().map(|reason| reason.label()).collect();
        assert_eq!(labels, RETRY_REASONS);
    }

    #[test]
    fn the_policy_names_what_is_tried_again() {
        let policy = policy();
        let now = Instant::now();
        let (get, post) = (Method::GET, Method::POST);
        // A failed connection reached nobody: any method, any body.
        assert!(policy.allows(&failed(Reason::ConnectFailure, 1, &post, false), now));
        // Past the connection, only the listed methods with a body that can be sent again.
        assert!(policy.allows(&failed(Reason::Reset, 1, &get, true), now));
        assert!(!policy.allows(&failed(Reason::Reset, 1, &post, true), now));
        assert!(!policy.allows(&failed(Reason::Reset, 1, &get, false), now));
        // Reasons the policy does not name, and attempts used up.
        assert!(!policy.allows(&failed(Reason::Timeout, 1, &get, true), now));
        assert!(!policy.allows(&failed(Reason::Reset, 3, &get, true), now));
        // Past the deadline, nothing.
        let mut late = failed(Reason::ConnectFailure, 1, &get, true);
        late.deadline = Some(now);
        assert!(!policy.allows(&late, now));
        assert_eq!(policy.status_reason(503), Some(Reason::GatewayError));
        assert_eq!(policy.status_reason(429), Some(Reason::Status));
        assert_eq!(policy.status_reason(500), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling_and_stops_at_the_deadline() {
        let policy = policy();
        let now = Instant::now();
        for _ in 0..200 {
            assert!(policy.backoff(1, now, None) <= Duration::from_millis(25));
            assert!(policy.backoff(2, now, None) <= Duration::from_millis(50));
            assert!(policy.backoff(30, now, None) <= Duration::from_millis(250));
            let deadline = now + Duration::from_millis(5);
            assert!(policy.backoff(30, now, Some(deadline)) <= Duration::from_millis(5));
        }
        let none = RetryPolicy::connect_failures_once();
        assert_eq!(none.backoff(2, now, None), Duration::ZERO);
    }
}
