//! Load-balancing policies: round robin, smooth weighted round robin, least outstanding
//! requests (weight-aware), and consistent hashing (ketama) by header, cookie or client IP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use pingora_ketama::{Bucket, Continuum};

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
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Balancer::RoundRobin { .. } => "round_robin",
            Balancer::Weighted { .. } => "weighted",
            Balancer::LeastRequests { .. } => "least_requests",
            Balancer::ConsistentHash { .. } => "consistent_hash",
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
                    .map(|target| Bucket::new(target.address, target.weight))
                    .collect();
                Balancer::ConsistentHash {
                    ring: Continuum::new(&buckets),
                    addresses: targets.iter().map(|target| target.address).collect(),
                    fallback: AtomicUsize::new(0),
                }
            }
        }
    }

    pub fn select(&self, targets: &[Target], key: Option<HashKey<'_>>) -> usize {
        let count = targets.len();
        if count == 1 {
            return 0;
        }
        match self {
            Balancer::RoundRobin { next } => next.fetch_add(1, Ordering::Relaxed) % count,
            Balancer::Weighted { schedule, next } => {
                schedule[next.fetch_add(1, Ordering::Relaxed) % schedule.len()] as usize
            }
            Balancer::LeastRequests { next } => {
                // Start the scan at a rotating offset so ties spread evenly.
                let start = next.fetch_add(1, Ordering::Relaxed);
                let mut best = start % count;
                let mut best_load = u64::MAX;
                for step in 0..count {
                    let index = (start + step) % count;
                    let target = &targets[index];
                    // Compare in_flight / weight without division.
                    let load = (target.in_flight.load(Ordering::Relaxed) as u64 + 1) * 1_000_000
                        / u64::from(target.weight);
                    if load < best_load {
                        best_load = load;
                        best = index;
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
                    let mut index = ring.node_idx(key);
                    ring.get_addr(&mut index)
                        .and_then(|address| addresses.iter().position(|known| known == address))
                        .unwrap_or(0)
                }
                // No key (header or cookie absent): spread the request round robin.
                None => fallback.fetch_add(1, Ordering::Relaxed) % count,
            },
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
