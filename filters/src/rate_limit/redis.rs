//! The `redis` backend's call: one bucket per key for the whole cluster, updated atomically by a
//! Lua script on Redis's own clock, called with `EVALSHA` (and loaded again on `NOSCRIPT`), and
//! the refund that gives tokens back when a later policy refuses the request.

use std::sync::Arc;
use std::time::Duration;

/// The token bucket. Takes `cost` tokens, or up to `want` (a lease) when at least `cost` are
/// there; returns {tokens granted, tokens left}.
const BUCKET_SCRIPT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local want = tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local updated = tonumber(state[2])
if tokens == nil or updated == nil then
  tokens = capacity
  updated = now
end
tokens = math.min(capacity, tokens + math.max(0, now - updated) * rate)
local granted = 0
if tokens >= cost then
  granted = math.max(cost, math.min(want, math.floor(tokens)))
  tokens = tokens - granted
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {granted, tostring(tokens)}
"#;

/// Gives ARGV[5] tokens back to a bucket (after its refill), never beyond its capacity. A bucket
/// that expired meanwhile is full already and stays as it is. Returns {0, tokens left}.
const REFUND_SCRIPT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local amount = tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local updated = tonumber(state[2])
if tokens == nil or updated == nil then
  return {0, tostring(capacity)}
end
tokens = math.min(capacity, tokens + math.max(0, now - updated) * rate + amount)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {0, tostring(tokens)}
"#;

/// Everything one call of the scripts needs, shareable with a background refill.
pub(super) struct RedisCall {
    pub(super) redis: Arc<crate::shared::Redis>,
    bucket_sha: fred::bytes_utils::Str,
    refund_sha: fred::bytes_utils::Str,
    pub(super) cost: f64,
    pub(super) rate: f64,
    /// The scripts' arguments, built once per config: capacity, rate, cost, the seconds an idle
    /// bucket is kept (the time to refill completely, at least a second), and the tokens wanted
    /// (or given back): the cost, or with leasing a lease. Cloning them per call only bumps
    /// reference counts.
    args: Vec<fred::types::Value>,
    lease_args: Option<Vec<fred::types::Value>>,
}

/// The scripts' arguments for a policy, asking for `want` tokens.
fn script_args(
    capacity: u64,
    rate: f64,
    cost: u64,
    window: Duration,
    want: u64,
) -> Vec<fred::types::Value> {
    [
        (capacity as f64).to_string(),
        rate.to_string(),
        (cost as f64).to_string(),
        (window.as_secs().max(1) + 1).to_string(),
        (want as f64).to_string(),
    ]
    .into_iter()
    .map(fred::types::Value::from)
    .collect()
}

impl RedisCall {
    /// `window` is the time an empty bucket takes to fill; `lease` the tokens of a lease.
    pub(super) fn new(
        redis: Arc<crate::shared::Redis>,
        capacity: u64,
        rate: f64,
        cost: u64,
        window: Duration,
        lease: Option<u64>,
    ) -> RedisCall {
        redis.preload(BUCKET_SCRIPT);
        redis.preload(REFUND_SCRIPT);
        RedisCall {
            redis,
            bucket_sha: fred::util::sha1_hash(BUCKET_SCRIPT).into(),
            refund_sha: fred::util::sha1_hash(REFUND_SCRIPT).into(),
            cost: cost as f64,
            rate,
            args: script_args(capacity, rate, cost, window, cost),
            lease_args: lease.map(|tokens| script_args(capacity, rate, cost, window, tokens)),
        }
    }

    /// Asks Redis for `cost` tokens, or with `lease` up to a lease of them. Returns (tokens
    /// granted, tokens left). `Err` when Redis did not answer within its command deadline, or
    /// failed so recently that it is in its back-off (then no time is spent waiting on it).
    pub(super) async fn take(&self, key: &str, lease: bool) -> Result<(f64, f64), ()> {
        let args = match (&self.lease_args, lease) {
            (Some(lease_args), true) => lease_args.clone(),
            _ => self.args.clone(),
        };
        self.run(key, &self.bucket_sha, BUCKET_SCRIPT, args).await
    }

    /// Gives one cost back to the bucket.
    pub(super) async fn refund(&self, key: &str) -> Result<(), ()> {
        self.run(key, &self.refund_sha, REFUND_SCRIPT, self.args.clone())
            .await
            .map(|_| ())
    }

    async fn run(
        &self,
        key: &str,
        sha: &fred::bytes_utils::Str,
        script: &'static str,
        args: Vec<fred::types::Value>,
    ) -> Result<(f64, f64), ()> {
        use fred::prelude::LuaInterface;
        let redis = &self.redis;
        if !redis.available() {
            return Err(());
        }
        // Awaited here, on this thread's own client: the command, its answer and this task are
        // all handled by the worker's runtime.
        let client = redis.local();
        let call = async {
            match client
                .evalsha::<(i64, String), _, _, _>(sha.clone(), key, args.clone())
                .await
            {
                Err(error) if error.details().starts_with("NOSCRIPT") => {
                    client
                        .eval::<(i64, String), _, _, _>(script, key, args)
                        .await
                }
                result => result,
            }
        };
        // The client's own timeout covers each command; this bounds the whole exchange (both
        // commands after a NOSCRIPT) to the same deadline.
        let deadline = redis.command_timeout + crate::shared::SCHEDULING_GRACE;
        let (granted, tokens) = match tokio::time::timeout(deadline, call).await {
            Ok(Ok(answer)) => {
                redis.record_success();
                answer
            }
            Ok(Err(error)) => {
                redis.record_failure(&error.to_string());
                return Err(());
            }
            Err(_) => {
                redis.record_failure("no answer within the command deadline");
                return Err(());
            }
        };
        let tokens: f64 = tokens.parse().map_err(|_| ())?;
        Ok((granted as f64, tokens))
    }
}

/// (admitted, tokens left, seconds until the cost is available) from Redis's answer.
pub(super) fn verdict(cost: f64, rate: f64, granted: f64, tokens: f64) -> (bool, f64, f64) {
    if granted >= cost {
        (true, tokens, 0.0)
    } else {
        (false, tokens, (cost - tokens) / rate)
    }
}
