//! Token buckets kept in this process: sharded LRU maps with a fixed number of keys, so a flood of
//! random keys evicts idle buckets instead of growing memory.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Instant;

use super::key::BucketKey;

pub(super) const SHARDS: usize = 16;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

type Shard = Mutex<lru::LruCache<BucketKey, Bucket, rustc_hash::FxBuildHasher>>;

/// What a bucket said: admitted or not, the tokens left, and the seconds until the cost is
/// there again (0 when admitted).
pub(super) type Verdict = (bool, f64, f64);

pub(super) struct Buckets {
    shards: Vec<Shard>,
}

impl Buckets {
    /// Room for about `max_keys` buckets.
    pub(super) fn new(max_keys: usize) -> Buckets {
        let per_shard = NonZeroUsize::new((max_keys / SHARDS).max(1)).expect("at least one");
        Buckets {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(lru::LruCache::with_hasher(per_shard, Default::default())))
                .collect(),
        }
    }

    /// Takes `cost` tokens from a bucket of `capacity` refilled at `rate` per second, if it has
    /// them.
    pub(super) fn take(
        &self,
        key: &BucketKey,
        now: Instant,
        capacity: f64,
        rate: f64,
        cost: f64,
    ) -> Verdict {
        let mut buckets = self.shards[key.shard(SHARDS)]
            .lock()
            .expect("rate-limit shard lock");
        let bucket = buckets.get_or_insert_mut(*key, || Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            (true, bucket.tokens, 0.0)
        } else {
            (false, bucket.tokens, (cost - bucket.tokens) / rate)
        }
    }

    /// Gives `cost` tokens back to a bucket, never beyond `capacity`.
    pub(super) fn refund(&self, key: &BucketKey, cost: f64, capacity: f64) {
        if let Ok(mut buckets) = self.shards[key.shard(SHARDS)].lock() {
            if let Some(bucket) = buckets.peek_mut(key) {
                bucket.tokens = (bucket.tokens + cost).min(capacity);
            }
        }
    }

    /// Buckets held, for tests of the memory bound.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().expect("rate-limit shard lock").len())
            .sum()
    }
}
