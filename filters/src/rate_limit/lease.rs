//! Leasing for the `redis` backend: a node takes up to `lease.tokens` from the Redis bucket in
//! one call and spends them locally, so most requests cost no round trip. When fewer than half
//! a lease is left it fetches the next one in the background. Tokens are always taken from Redis
//! before they are spent, so the cluster never admits more than the bucket gave out; a lease only
//! moves admissions later in time. A node holds less than `1.5 * lease.tokens` per key, so in any
//! interval of length T the cluster admits at most `capacity + rate * T + 1.5 * nodes *
//! lease.tokens` per key; leased tokens a node does not spend within `lease.max_age` are dropped
//! (admitting less, never more).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::key::BucketKey;
use super::local::{Verdict, SHARDS};
use super::redis::{verdict, RedisCall};

/// Tokens a node holds from Redis for one key.
#[derive(Clone, Copy, Debug)]
struct Held {
    tokens: f64,
    /// When the lease was taken; past `max_age` the rest is dropped.
    taken: Instant,
    /// Tokens Redis had left at that time, for the `RateLimit` header.
    remote: f64,
    /// A lease request for this key is under way: others on this node wait for it, so a node
    /// holds at most one lease per key.
    refilling: bool,
    /// Redis said the bucket cannot have the cost before then.
    empty_until: Option<Instant>,
}

impl Held {
    fn empty(now: Instant) -> Held {
        Held {
            tokens: 0.0,
            taken: now,
            remote: 0.0,
            refilling: false,
            empty_until: None,
        }
    }
}

struct LeaseSlot {
    held: Mutex<lru::LruCache<BucketKey, Held, rustc_hash::FxBuildHasher>>,
    /// Woken whenever a refill of a key of this shard ends.
    refilled: tokio::sync::Notify,
}

pub(super) struct Leasing {
    /// Below this many held tokens a node fetches its next lease in the background, so requests
    /// keep spending local tokens meanwhile.
    low_water: f64,
    max_age: Duration,
    shards: Vec<LeaseSlot>,
}

/// Ends a refill that did not finish (its request was cancelled): the key is free to be
/// refilled again and its waiters wake up.
struct RefillUnderWay<'a> {
    slot: &'a LeaseSlot,
    key: BucketKey,
    done: bool,
}

impl Drop for RefillUnderWay<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(mut held) = self.slot.held.lock() {
            if let Some(lease) = held.peek_mut(&self.key) {
                lease.refilling = false;
            }
        }
        self.slot.refilled.notify_waiters();
    }
}

impl Leasing {
    pub(super) fn new(lease_tokens: u64, cost: u64, max_age: Duration, max_keys: usize) -> Leasing {
        let per_shard = NonZeroUsize::new((max_keys / SHARDS).max(1)).expect("at least one");
        Leasing {
            low_water: (lease_tokens as f64 / 2.0).max(cost as f64),
            max_age,
            shards: (0..SHARDS)
                .map(|_| LeaseSlot {
                    held: Mutex::new(lru::LruCache::with_hasher(per_shard, Default::default())),
                    refilled: tokio::sync::Notify::new(),
                })
                .collect(),
        }
    }

    fn slot(&self, key: &BucketKey) -> &LeaseSlot {
        &self.shards[key.shard(SHARDS)]
    }

    /// A decision from the held lease, refilled from Redis when it is empty; `Err` when Redis
    /// could not be asked.
    pub(super) async fn take(
        self: &Arc<Self>,
        call: &Arc<RedisCall>,
        key: BucketKey,
        remote: &str,
        now: Instant,
    ) -> Result<Verdict, ()> {
        let slot = self.slot(&key);
        let cost = call.cost;
        // Requests that find the lease empty while it is being refilled wait for that refill
        // (one Redis call per lease, not one per request), at most one command deadline.
        let deadline = now + call.redis.command_timeout + crate::shared::SCHEDULING_GRACE;
        loop {
            let refill_under_way = {
                let mut held = slot.held.lock().expect("rate-limit lease shard lock");
                let now = Instant::now();
                let lease = held.get_or_insert_mut(key, || Held::empty(now));
                if now.saturating_duration_since(lease.taken) > self.max_age {
                    lease.tokens = 0.0;
                }
                if lease.tokens >= cost {
                    lease.tokens -= cost;
                    let remaining = lease.remote + lease.tokens;
                    let prefetch = lease.tokens < self.low_water
                        && !lease.refilling
                        && lease.empty_until.is_none_or(|until| now >= until)
                        && call.redis.available();
                    if prefetch {
                        lease.refilling = true;
                    }
                    drop(held);
                    if prefetch {
                        let call = call.clone();
                        let leasing = self.clone();
                        let remote = remote.to_string();
                        crate::shared::IO.spawn(async move {
                            let answer = call.take(&remote, true).await;
                            let _ = leasing.finish_refill(key, answer, call.cost, call.rate, false);
                        });
                    }
                    return Ok((true, remaining, 0.0));
                }
                if let Some(until) = lease.empty_until {
                    // Redis said the bucket cannot have the cost before `until`: tokens only
                    // come back with time, so asking again sooner would only cost a round trip.
                    if now < until {
                        return Ok((false, lease.remote, (until - now).as_secs_f64()));
                    }
                }
                if lease.refilling {
                    if now >= deadline {
                        return Err(());
                    }
                    Some(slot.refilled.notified())
                } else {
                    lease.refilling = true;
                    None
                }
            };
            match refill_under_way {
                Some(refilled) => {
                    let _ = tokio::time::timeout_at(deadline.into(), refilled).await;
                }
                None => break,
            }
        }
        let mut refill = RefillUnderWay {
            slot,
            key,
            done: false,
        };
        let answer = call.take(remote, true).await;
        refill.done = true;
        self.finish_refill(key, answer, cost, call.rate, true)
    }

    /// Records a refill's answer and wakes the requests waiting for it. With `spend`, one cost
    /// of the new lease is taken for the request that asked, and its decision returned.
    fn finish_refill(
        &self,
        key: BucketKey,
        answer: Result<(f64, f64), ()>,
        cost: f64,
        rate: f64,
        spend: bool,
    ) -> Result<Verdict, ()> {
        let slot = self.slot(&key);
        let taken = Instant::now();
        let mut held = slot.held.lock().expect("rate-limit lease shard lock");
        let lease = held.get_or_insert_mut(key, || Held::empty(taken));
        lease.refilling = false;
        slot.refilled.notify_waiters();
        let (granted, tokens) = answer?;
        lease.remote = tokens;
        if granted < cost {
            lease.empty_until =
                Some(taken + Duration::from_secs_f64((cost - tokens).max(0.0) / rate));
            return Ok(verdict(cost, rate, granted, tokens));
        }
        lease.empty_until = None;
        if taken.saturating_duration_since(lease.taken) > self.max_age {
            lease.tokens = 0.0;
        }
        lease.tokens += granted;
        lease.taken = taken;
        if spend {
            lease.tokens -= cost;
        }
        Ok((true, tokens + lease.tokens, 0.0))
    }

    /// Gives one cost back to the held lease it was spent from (the tokens stay leased to this
    /// node, so Redis is not asked).
    pub(super) fn refund(&self, key: &BucketKey, cost: f64) {
        if let Ok(mut held) = self.slot(key).held.lock() {
            if let Some(lease) = held.peek_mut(key) {
                if Instant::now().saturating_duration_since(lease.taken) <= self.max_age {
                    lease.tokens += cost;
                }
            }
        }
    }
}
