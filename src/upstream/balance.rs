//! Load-balancing policies: round robin, smooth weighted round robin, least outstanding
//! requests (weight-aware), consistent hashing (ketama) by header, cookie or client IP, and
//! peak EWMA (the lower of two random targets' latency times outstanding requests). Each picks
//! among the targets a request may use (healthy, not ejected, not tried yet), so a policy keeps
//! its order over the rest when some drop out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use pingora_ketama::{Bucket, Continuum};
use smallvec::SmallVec;

use super::Target;
use crate::config::model::Balance;

/// The bytes a consistent-hash pool hashes for one request.
pub type HashKey<'a> = &'a [u8];

pub enum Balancer {
    RoundRobin {
        next: AtomicUsize,
    },
    /// A precomputed smooth weighted round-robin schedule (as nginx orders it), walked with one
    /// atomic counter.
    Weighted {
        schedule: Vec<u32>,
        next: AtomicUsize,
    },
    LeastRequests {
        next: AtomicUsize,
    },
    ConsistentHash {
        ring: Continuum,
        addresses: Vec<SocketAddr>,
        fallback: AtomicUsize,
    },
    PeakEwma,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Balancer::RoundRobin { .. } => "round_robin",
            Balancer::Weighted { .. } => "weighted",
            Balancer::LeastRequests { .. } => "least_requests",
            Balancer::ConsistentHash { .. } => "consistent_hash",
            Balancer::PeakEwma => "peak_ewma",
        })
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// nginx's smooth weighted round robin, unrolled into one full cycle.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights
        .iter()
        .map(|weight| i64::from(weight / divisor))
        .collect();
    let total: i64 = weights.iter().sum();
    // Bound the schedule's length; very large weights are scaled down proportionally.
    let scale = if total > 10_000 {
        total as f64 / 10_000.0
    } else {
        1.0
    };
    let weights: Vec<i64> = weights
        .iter()
        .map(|weight| ((*weight as f64 / scale).round() as i64).max(1))
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for index in 0..weights.len() {
            current[index] += weights[index];
            if current[index] > current[best] {
                best = index;
            }
        }
        current[best] -= total;
        schedule.push(best as u32);
    }
    schedule
}

impl Balancer {
    pub fn new(policy: Balance, targets: &[Target]) -> Balancer {
        match policy {
            Balance::RoundRobin => Balancer::RoundRobin {
                next: AtomicUsize::new(0),
            },
            Balance::Weighted => Balancer::Weighted {
                schedule: smooth_schedule(
                    &targets
                        .iter()
                        .map(|target| target.weight)
                        .collect::<Vec<_>>(),
                ),
                next: AtomicUsize::new(0),
            },
            Balance::LeastRequests => Balancer::LeastRequests {
                next: AtomicUsize::new(0),
            },
            Balance::ConsistentHash => {
                let buckets: Vec<Bucket> = targets
                    .iter()
                    .map(|target| Bucket::new(target.state.address, target.weight))
                    .collect();
                Balancer::ConsistentHash {
                    ring: Continuum::new(&buckets),
                    addresses: targets.iter().map(|target| target.state.address).collect(),
                    fallback: AtomicUsize::new(0),
                }
            }
            Balance::PeakEwma => Balancer::PeakEwma,
        }
    }

    /// The target for a request, among those `allowed`; `None` when none is.
    pub fn pick(
        &self,
        targets: &[Target],
        key: Option<HashKey<'_>>,
        allowed: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let count = targets.len();
        if count == 0 {
            return None;
        }
        // The first allowed target from `start` on, in order.
        let scan = |start: usize| {
            (0..count)
                .map(|step| (start + step) % count)
                .find(|&index| allowed(index))
        };
        match self {
            Balancer::RoundRobin { next } => scan(next.fetch_add(1, Ordering::Relaxed)),
            Balancer::Weighted { schedule, next } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..schedule.len())
                    .map(|step| schedule[(start + step) % schedule.len()] as usize)
                    .find(|&index| allowed(index))
                    .or_else(|| scan(0))
            }
            Balancer::LeastRequests { next } => {
                // Start the scan at a rotating offset so ties spread evenly.
                let start = next.fetch_add(1, Ordering::Relaxed);
                let mut best = None;
                let mut best_load = u64::MAX;
                for step in 0..count {
                    let index = (start + step) % count;
                    if !allowed(index) {
                        continue;
                    }
                    let target = &targets[index];
                    // Compare in_flight / weight without division.
                    let load = (target.state.in_flight.load(Ordering::Relaxed) as u64 + 1)
                        * 1_000_000
                        / u64::from(target.weight);
                    if load < best_load {
                        best_load = load;
                        best = Some(index);
                    }
                }
                best
            }
            Balancer::ConsistentHash {
                ring,
                addresses,
                fallback,
            } => match key {
                Some(key) => {
                    // The key's point on the ring, then the next points clockwise: a target
                    // that drops out only moves its own keys.
                    let mut point = ring.node_idx(key);
                    let mut seen = 0;
                    while seen < addresses.len() * 200 {
                        let address = ring.get_addr(&mut point)?;
                        seen += 1;
                        if let Some(index) = addresses.iter().position(|known| known == address) {
                            if allowed(index) {
                                return Some(index);
                            }
                        }
                    }
                    scan(0)
                }
                // No key (header or cookie absent): spread the request round robin.
                None => scan(fallback.fetch_add(1, Ordering::Relaxed)),
            },
            Balancer::PeakEwma => {
                let candidates: SmallVec<[usize; 8]> =
                    (0..count).filter(|&index| allowed(index)).collect();
                let cost = |index: usize| {
                    let state = &targets[index].state;
                    // A target with no latency yet is tried before the others are compared.
                    (state.latency() + 1.0) * (state.in_flight.load(Ordering::Relaxed) as f64 + 1.0)
                        / f64::from(targets[index].weight)
                };
                match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0]),
                    len => {
                        let first = fastrand::usize(..len);
                        let mut second = fastrand::usize(..len - 1);
                        if second >= first {
                            second += 1;
                        }
                        let (first, second) = (candidates[first], candidates[second]);
                        Some(if cost(second) < cost(first) {
                            second
                        } else {
                            first
                        })
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_schedule_interleaves_by_weight() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[2, 2]), vec![0, 1]);
        let schedule = smooth_schedule(&[3, 1]);
        assert_eq!(schedule.iter().filter(|index| **index == 0).count(), 3);
    }
}
