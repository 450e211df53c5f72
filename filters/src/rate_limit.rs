//! `rate_limit`: token buckets. A request passes when every policy of the filter has tokens
//! for its cost; otherwise it gets 429 with `Retry-After`. Each policy has a capacity (the
//! burst), a refill rate and a key built from the consumer, the client address (the
//! trusted-proxy-aware one, never a raw `X-Forwarded-For`), the route, a header or a JWT claim.
//! Responses carry the IETF `RateLimit-Policy` and `RateLimit` headers, and optionally the
//! legacy `X-RateLimit-*` ones.
//!
//! Backend `local` keeps buckets in process, in sharded LRU maps with a fixed number of keys, so
//! a flood of random keys evicts idle buckets instead of growing memory.
//!
//! Backend `redis` keeps one bucket per key for the whole cluster, updated atomically by a Lua
//! script on Redis's clock. With `lease`, a node takes up to `lease.tokens` at once and spends
//! them locally, so most requests cost no round trip; when fewer than half a lease is left it
//! fetches the next one in the background. Tokens are always taken from Redis before they are
//! spent, so the cluster never admits more than the bucket gave out; a lease only moves
//! admissions later in time. A node holds less than `1.5 * lease.tokens` per key, so in any
//! interval of length T the cluster admits at most `capacity + rate * T + 1.5 * nodes *
//! lease.tokens` per key; leased tokens a node does not spend within `lease.max_age` are dropped
//! (admitting less, never more).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};
use once_cell::sync::Lazy;
use pingora_http::{RequestHeader, ResponseHeader};
use serde::Deserialize;

use crate::registry::FilterKind;
use crate::util::duration;
use crate::{BuildCtx, BuildError, Decision, Filter, Problem, RequestContext};

#[derive(Debug, Deserialize, schemars::JsonSchema, Clone, PartialEq, Eq)]
#[serde(untagged)]
pub enum KeyPart {
    /// `consumer`, `client_ip` or `route`.
    Named(String),
    Header {
        header: String,
    },
    Claim {
        claim: String,
    },
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Refill {
    pub tokens: u64,
    pub every: String,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    #[default]
    Local,
    /// One bucket per key shared by every node, updated atomically by a Lua script in Redis.
    Redis,
}

/// What a `redis` policy does when Redis does not answer within its command deadline.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Admit the request.
    FailOpen,
    /// Answer 503.
    FailClosed,
    /// Limit in process to `capacity / expected_nodes` (and the same share of the refill).
    #[default]
    LocalFallback,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    /// Parts of the bucket key, combined: `consumer`, `client_ip`, `route`, `{header: NAME}`,
    /// `{claim: NAME}`. A request missing a part (no consumer, no such header) is keyed by the
    /// empty value of that part.
    pub key: Vec<KeyPart>,
    /// Bucket size: the burst allowed.
    pub capacity: u64,
    pub refill: Refill,
    /// Tokens one request takes.
    #[serde(default = "default_cost")]
    pub cost: u64,
    #[serde(default)]
    pub backend: Backend,
    #[serde(default)]
    pub on_redis_error: OnRedisError,
    /// Nodes sharing the limit, for `local_fallback`.
    #[serde(default = "default_expected_nodes")]
    pub expected_nodes: u64,
    /// Also send `X-RateLimit-Limit/-Remaining/-Reset`.
    #[serde(default)]
    pub legacy_headers: bool,
    /// `redis` only: take tokens from Redis in batches and spend them locally.
    #[serde(default)]
    pub lease: Option<Lease>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// Tokens a node takes from Redis at once (at least the cost, at most the capacity).
    pub tokens: u64,
    /// Leased tokens not spent within this time are dropped (default 1s).
    #[serde(default = "default_lease_max_age")]
    pub max_age: String,
}

fn default_lease_max_age() -> String {
    "1s".into()
}

fn default_cost() -> u64 {
    1
}

fn default_expected_nodes() -> u64 {
    1
}

/// The token bucket, atomically in Redis, on Redis's own clock. Takes `cost` tokens, or up to
/// `want` (a lease) when at least `cost` are there; returns {tokens granted, tokens left}.
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

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub policies: Vec<Policy>,
    /// Buckets kept in memory per policy (least recently used ones are dropped beyond it).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_max_keys() -> usize {
    100_000
}

#[derive(Clone, Debug)]
enum Part {
    Consumer,
    ClientIp,
    Route,
    Header(HeaderName),
    Claim(String),
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

const SHARDS: usize = 16;

type Shard = Mutex<lru::LruCache<u64, Bucket, rustc_hash::FxBuildHasher>>;

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
    held: Mutex<lru::LruCache<u64, Held, rustc_hash::FxBuildHasher>>,
    /// Woken whenever a refill of a key of this shard ends.
    refilled: tokio::sync::Notify,
}

struct Leasing {
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
    key: u64,
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

struct CompiledPolicy {
    name: Arc<str>,
    parts: Vec<Part>,
    capacity: f64,
    /// Tokens per second.
    rate: f64,
    cost: f64,
    legacy_headers: bool,
    /// `RateLimit-Policy` and `X-RateLimit-Limit`, the same on every response.
    policy_header: HeaderValue,
    limit_header: HeaderValue,
    shards: Vec<Shard>,
    allowed: Arc<AtomicU64>,
    limited: Arc<AtomicU64>,
    redis: Option<RedisBucket>,
}

struct RedisBucket {
    call: Arc<RedisCall>,
    on_error: OnRedisError,
    fallbacks: Arc<AtomicU64>,
    leasing: Option<Arc<Leasing>>,
    /// `capacity / expected_nodes` and `rate / expected_nodes`, for `local_fallback`.
    fallback_capacity: f64,
    fallback_rate: f64,
}

/// Everything one call of the bucket script needs, shareable with a background refill.
struct RedisCall {
    redis: Arc<crate::shared::Redis>,
    script_sha: fred::bytes_utils::Str,
    name: Arc<str>,
    cost: f64,
    rate: f64,
    /// The script's arguments, built once per config: capacity, rate, cost, the seconds an idle
    /// bucket is kept (the time to refill completely, at least a second), and the tokens wanted:
    /// the cost, or with leasing a lease. Cloning them per call only bumps reference counts.
    args: Vec<fred::types::Value>,
    lease_args: Option<Vec<fred::types::Value>>,
}

/// Counters by (policy, label).
pub type DecisionCounters = HashMap<(String, &'static str), Arc<AtomicU64>>;

/// Decisions per (policy, result), for the metrics endpoint.
pub static DECISIONS: Lazy<Mutex<DecisionCounters>> = Lazy::new(Default::default);

/// Decisions made without Redis per (policy, failure mode), for the metrics endpoint.
pub static FALLBACKS: Lazy<Mutex<DecisionCounters>> = Lazy::new(Default::default);

fn decision_counter(policy: &str, result: &'static str) -> Arc<AtomicU64> {
    counter(&DECISIONS, policy, result)
}

fn counter(
    registry: &Mutex<DecisionCounters>,
    policy: &str,
    label: &'static str,
) -> Arc<AtomicU64> {
    registry
        .lock()
        .expect("rate-limit decision registry lock")
        .entry((policy.to_string(), label))
        .or_default()
        .clone()
}

pub struct RateLimit {
    policies: Vec<CompiledPolicy>,
}

/// What the response phase needs: the tightest policy's numbers.
#[derive(Clone, Debug)]
struct Outcome {
    policy: usize,
    remaining: u64,
    reset_seconds: u64,
}

impl FilterKind for RateLimit {
    const KIND: &'static str = "rate_limit";
    type Config = Config;

    fn build(config: Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        if config.policies.is_empty() {
            errors.push(BuildError::new("policies", "give at least one policy"));
        }
        let per_shard = NonZeroUsize::new((config.max_keys / SHARDS).max(1)).expect("at least one");
        let mut names = std::collections::HashSet::new();
        let mut policies = Vec::new();
        for (index, policy) in config.policies.iter().enumerate() {
            let path = format!("policies[{index}]");
            if !names.insert(policy.name.clone()) {
                errors.push(BuildError::new(
                    format!("{path}.name"),
                    format!("duplicate policy name \"{}\"", policy.name),
                ));
            }
            let mut parts = Vec::new();
            for (part_index, part) in policy.key.iter().enumerate() {
                let part_path = format!("{path}.key[{part_index}]");
                match part {
                    KeyPart::Named(name) => match name.as_str() {
                        "consumer" => parts.push(Part::Consumer),
                        "client_ip" => parts.push(Part::ClientIp),
                        "route" => parts.push(Part::Route),
                        other => errors.push(BuildError::new(
                            part_path,
                            format!("unknown key part \"{other}\" (consumer, client_ip, route, {{header: NAME}}, {{claim: NAME}})"),
                        )),
                    },
                    KeyPart::Header { header } => match HeaderName::from_bytes(header.as_bytes()) {
                        Ok(name) => parts.push(Part::Header(name)),
                        Err(_) => errors.push(BuildError::new(part_path, format!("\"{header}\" is not a valid header name"))),
                    },
                    KeyPart::Claim { claim } => parts.push(Part::Claim(claim.clone())),
                }
            }
            if policy.key.is_empty() {
                errors.push(BuildError::new(
                    format!("{path}.key"),
                    "give at least one key part",
                ));
            }
            if policy.capacity == 0 {
                errors.push(BuildError::new(
                    format!("{path}.capacity"),
                    "must be at least 1",
                ));
            }
            if policy.cost == 0 || policy.cost > policy.capacity {
                errors.push(BuildError::new(
                    format!("{path}.cost"),
                    "must be between 1 and the capacity",
                ));
            }
            let every = duration(
                &format!("{path}.refill.every"),
                &policy.refill.every,
                &mut errors,
            );
            if policy.refill.tokens == 0 || every.is_zero() {
                errors.push(BuildError::new(
                    format!("{path}.refill"),
                    "refill needs tokens > 0 every > 0s",
                ));
                continue;
            }
            let rate = policy.refill.tokens as f64 / every.as_secs_f64();
            let window = Duration::from_secs_f64(policy.capacity as f64 / rate);
            if policy.expected_nodes == 0 {
                errors.push(BuildError::new(
                    format!("{path}.expected_nodes"),
                    "must be at least 1",
                ));
            }
            if let Some(lease) = &policy.lease {
                if policy.backend != Backend::Redis {
                    errors.push(BuildError::new(
                        format!("{path}.lease"),
                        "leasing takes tokens from Redis: it needs `backend: redis`",
                    ));
                }
                if lease.tokens < policy.cost || lease.tokens > policy.capacity {
                    errors.push(BuildError::new(
                        format!("{path}.lease.tokens"),
                        "must be between the cost and the capacity",
                    ));
                }
            }
            let redis = match (policy.backend, &ctx.redis) {
                (Backend::Local, _) => None,
                (Backend::Redis, None) => {
                    errors.push(BuildError::new(
                        format!("{path}.backend"),
                        "the redis backend needs a `redis` section",
                    ));
                    None
                }
                (Backend::Redis, Some(client)) => Some(RedisBucket {
                    call: Arc::new(RedisCall {
                        redis: client.clone(),
                        script_sha: fred::util::sha1_hash(BUCKET_SCRIPT).into(),
                        name: policy.name.as_str().into(),
                        cost: policy.cost as f64,
                        rate,
                        args: script_args(policy, rate, window, policy.cost),
                        lease_args: policy
                            .lease
                            .as_ref()
                            .map(|lease| script_args(policy, rate, window, lease.tokens)),
                    }),
                    on_error: policy.on_redis_error,
                    fallbacks: counter(
                        &FALLBACKS,
                        &policy.name,
                        match policy.on_redis_error {
                            OnRedisError::FailOpen => "fail_open",
                            OnRedisError::FailClosed => "fail_closed",
                            OnRedisError::LocalFallback => "local_fallback",
                        },
                    ),
                    leasing: policy.lease.as_ref().map(|lease| {
                        Arc::new(Leasing {
                            low_water: (lease.tokens as f64 / 2.0).max(policy.cost as f64),
                            max_age: duration(
                                &format!("{path}.lease.max_age"),
                                &lease.max_age,
                                &mut errors,
                            ),
                            shards: (0..SHARDS)
                                .map(|_| LeaseSlot {
                                    held: Mutex::new(lru::LruCache::with_hasher(
                                        per_shard,
                                        Default::default(),
                                    )),
                                    refilled: tokio::sync::Notify::new(),
                                })
                                .collect(),
                        })
                    }),
                    fallback_capacity: (policy.capacity as f64
                        / policy.expected_nodes.max(1) as f64)
                        .max(1.0),
                    fallback_rate: rate / policy.expected_nodes.max(1) as f64,
                }),
            };
            policies.push(CompiledPolicy {
                name: policy.name.as_str().into(),
                parts,
                capacity: policy.capacity as f64,
                rate,
                cost: policy.cost as f64,
                legacy_headers: policy.legacy_headers,
                policy_header: header_value(format!(
                    "\"{}\";q={};w={}",
                    policy.name,
                    policy.capacity,
                    window.as_secs().max(1)
                )),
                limit_header: HeaderValue::from(policy.capacity),
                shards: (0..SHARDS)
                    .map(|_| Mutex::new(lru::LruCache::with_hasher(per_shard, Default::default())))
                    .collect(),
                allowed: decision_counter(&policy.name, "allowed"),
                limited: decision_counter(&policy.name, "limited"),
                redis,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(RateLimit { policies })
    }
}

impl CompiledPolicy {
    fn key(&self, request: &RequestHeader, ctx: &RequestContext) -> u64 {
        let mut hasher = rustc_hash::FxHasher::default();
        self.name.hash(&mut hasher);
        for part in &self.parts {
            match part {
                Part::Consumer => ctx
                    .consumer
                    .as_ref()
                    .map(|consumer| &*consumer.id)
                    .unwrap_or("")
                    .hash(&mut hasher),
                Part::ClientIp => ctx.client_addr.hash(&mut hasher),
                Part::Route => ctx.route.as_deref().unwrap_or("").hash(&mut hasher),
                Part::Header(name) => request
                    .headers
                    .get(name)
                    .map(HeaderValue::as_bytes)
                    .unwrap_or(b"")
                    .hash(&mut hasher),
                Part::Claim(claim) => ctx
                    .claims
                    .as_ref()
                    .and_then(|claims| claims.get(claim))
                    .map(ToString::to_string)
                    .unwrap_or_default()
                    .hash(&mut hasher),
            }
            // Separate parts so ("ab","c") and ("a","bc") differ.
            0xffu8.hash(&mut hasher);
        }
        hasher.finish()
    }

    /// Take `cost` tokens if there are enough. Returns (admitted, tokens left, seconds until the
    /// cost is available again).
    fn take(&self, key: u64, now: Instant) -> (bool, f64, f64) {
        self.take_local(key, now, self.capacity, self.rate)
    }

    fn take_local(&self, key: u64, now: Instant, capacity: f64, rate: f64) -> (bool, f64, f64) {
        let shard = &self.shards[(key as usize) % SHARDS];
        let mut buckets = shard.lock().expect("rate-limit shard lock");
        let bucket = buckets.get_or_insert_mut(key, || Bucket {
            tokens: capacity,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= self.cost {
            bucket.tokens -= self.cost;
            (true, bucket.tokens, 0.0)
        } else {
            (false, bucket.tokens, (self.cost - bucket.tokens) / rate)
        }
    }

    /// (admitted, tokens left, seconds until the cost is available) from Redis's answer.
    fn verdict(&self, granted: f64, tokens: f64) -> (bool, f64, f64) {
        verdict(self.cost, self.rate, granted, tokens)
    }

    /// The decision of a `redis` policy; `Err` when Redis could not be asked.
    async fn take_redis(
        &self,
        bucket: &RedisBucket,
        key: u64,
        now: Instant,
    ) -> Result<(bool, f64, f64), ()> {
        let Some(leasing) = &bucket.leasing else {
            let (granted, tokens) = bucket.call.take(key, false).await?;
            return Ok(self.verdict(granted, tokens));
        };
        let slot = &leasing.shards[(key as usize) % SHARDS];
        // Requests that find the lease empty while it is being refilled wait for that refill
        // (one Redis call per lease, not one per request), at most one command deadline.
        let deadline = now + bucket.call.redis.command_timeout + Duration::from_millis(2);
        loop {
            let refill_under_way = {
                let mut held = slot.held.lock().expect("rate-limit lease shard lock");
                let now = Instant::now();
                let lease = held.get_or_insert_mut(key, || Held::empty(now));
                if now.saturating_duration_since(lease.taken) > leasing.max_age {
                    lease.tokens = 0.0;
                }
                if lease.tokens >= self.cost {
                    lease.tokens -= self.cost;
                    let remaining = lease.remote + lease.tokens;
                    let prefetch = lease.tokens < leasing.low_water
                        && !lease.refilling
                        && lease.empty_until.is_none_or(|until| now >= until)
                        && bucket.call.redis.available();
                    if prefetch {
                        lease.refilling = true;
                    }
                    drop(held);
                    if prefetch {
                        let call = bucket.call.clone();
                        let leasing = leasing.clone();
                        crate::shared::IO.spawn(async move {
                            let answer = call.take(key, true).await;
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
        let answer = bucket.call.take(key, true).await;
        refill.done = true;
        leasing.finish_refill(key, answer, self.cost, self.rate, true)
    }

    fn refund(&self, key: u64) {
        let shard = &self.shards[(key as usize) % SHARDS];
        if let Ok(mut buckets) = shard.lock() {
            if let Some(bucket) = buckets.peek_mut(&key) {
                bucket.tokens = (bucket.tokens + self.cost).min(self.capacity);
            }
        }
    }

    fn seconds_to_full(&self, tokens: f64) -> u64 {
        ((self.capacity - tokens) / self.rate).ceil() as u64
    }
}

/// The bucket script's arguments for a policy, asking for `want` tokens.
fn script_args(policy: &Policy, rate: f64, window: Duration, want: u64) -> Vec<fred::types::Value> {
    [
        (policy.capacity as f64).to_string(),
        rate.to_string(),
        (policy.cost as f64).to_string(),
        (window.as_secs().max(1) + 1).to_string(),
        (want as f64).to_string(),
    ]
    .into_iter()
    .map(fred::types::Value::from)
    .collect()
}

/// (admitted, tokens left, seconds until the cost is available) from Redis's answer.
fn verdict(cost: f64, rate: f64, granted: f64, tokens: f64) -> (bool, f64, f64) {
    if granted >= cost {
        (true, tokens, 0.0)
    } else {
        (false, tokens, (cost - tokens) / rate)
    }
}

impl RedisCall {
    /// Asks Redis for `cost` tokens, or with `lease` up to a lease of them. Returns (tokens
    /// granted, tokens left). `Err` when Redis did not answer within its command deadline, or
    /// failed so recently that it is in its back-off (then no time is spent waiting on it).
    async fn take(&self, key: u64, lease: bool) -> Result<(f64, f64), ()> {
        use fred::prelude::LuaInterface;
        let redis = &self.redis;
        if !redis.available() {
            return Err(());
        }
        // The hash tag keeps each bucket on one Redis Cluster slot.
        let redis_key = format!("gatehouse:ratelimit:{{{}:{key:016x}}}", self.name);
        let args = match (&self.lease_args, lease) {
            (Some(lease_args), true) => lease_args.clone(),
            _ => self.args.clone(),
        };
        let client = redis.clone();
        let sha = self.script_sha.clone();
        let call = crate::shared::IO.spawn(async move {
            let result = match client
                .evalsha::<(i64, String), _, _, _>(sha, vec![redis_key.clone()], args.clone())
                .await
            {
                Err(error) if error.details().starts_with("NOSCRIPT") => {
                    client
                        .eval::<(i64, String), _, _, _>(BUCKET_SCRIPT, vec![redis_key], args)
                        .await
                }
                result => result,
            };
            match &result {
                Ok(_) => client.record_success(),
                Err(error) => client.record_failure(&error.to_string()),
            }
            result.map_err(|_| ())
        });
        // The client's own timeout covers each command; this bounds the whole exchange (and a
        // busy I/O thread) to the same deadline.
        let deadline = redis.command_timeout + Duration::from_millis(2);
        let (granted, tokens) = match tokio::time::timeout(deadline, call).await {
            Ok(Ok(answer)) => answer?,
            Ok(Err(_)) => return Err(()),
            Err(_) => {
                redis.record_failure("no answer within the command deadline");
                return Err(());
            }
        };
        let tokens: f64 = tokens.parse().map_err(|_| ())?;
        Ok((granted as f64, tokens))
    }
}

impl Leasing {
    /// Records a refill's answer and wakes the requests waiting for it. With `spend`, one cost
    /// of the new lease is taken for the request that asked, and its decision returned.
    fn finish_refill(
        &self,
        key: u64,
        answer: Result<(f64, f64), ()>,
        cost: f64,
        rate: f64,
        spend: bool,
    ) -> Result<(bool, f64, f64), ()> {
        let slot = &self.shards[(key as usize) % SHARDS];
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
}

fn header_value(text: String) -> HeaderValue {
    HeaderValue::from_str(&text).expect("rate-limit header values are ASCII")
}

impl RateLimit {
    /// The rate-limit headers for `outcome`, given to `emit` one by one.
    fn headers(&self, outcome: &Outcome, mut emit: impl FnMut(HeaderName, HeaderValue)) {
        let policy = &self.policies[outcome.policy];
        emit(
            HeaderName::from_static("ratelimit-policy"),
            policy.policy_header.clone(),
        );
        emit(
            HeaderName::from_static("ratelimit"),
            header_value(format!(
                "\"{}\";r={};t={}",
                policy.name, outcome.remaining, outcome.reset_seconds
            )),
        );
        if policy.legacy_headers {
            emit(
                HeaderName::from_static("x-ratelimit-limit"),
                policy.limit_header.clone(),
            );
            emit(
                HeaderName::from_static("x-ratelimit-remaining"),
                HeaderValue::from(outcome.remaining),
            );
            emit(
                HeaderName::from_static("x-ratelimit-reset"),
                HeaderValue::from(outcome.reset_seconds),
            );
        }
    }
}

#[async_trait]
impl Filter for RateLimit {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    async fn request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        let now = Instant::now();
        let mut taken: Vec<(usize, u64)> = Vec::with_capacity(self.policies.len());
        let mut tightest: Option<Outcome> = None;
        for (index, policy) in self.policies.iter().enumerate() {
            let key = policy.key(request, ctx);
            let (admitted, tokens, wait) = match &policy.redis {
                None => policy.take(key, now),
                Some(redis) => match policy.take_redis(redis, key, now).await {
                    Ok(decision) => decision,
                    Err(()) => {
                        redis.fallbacks.fetch_add(1, Ordering::Relaxed);
                        match redis.on_error {
                            OnRedisError::FailOpen => (true, policy.capacity, 0.0),
                            OnRedisError::FailClosed => {
                                for (earlier, key) in taken {
                                    self.policies[earlier].refund(key);
                                }
                                return Decision::Reject(Problem::new(
                                    503,
                                    "rate-limit-unavailable",
                                    "The rate limit could not be checked",
                                ));
                            }
                            OnRedisError::LocalFallback => policy.take_local(
                                key,
                                now,
                                redis.fallback_capacity,
                                redis.fallback_rate,
                            ),
                        }
                    }
                },
            };
            if !admitted {
                policy.limited.fetch_add(1, Ordering::Relaxed);
                // Give back what earlier policies took: a refused request costs nothing.
                for (earlier, key) in taken {
                    self.policies[earlier].refund(key);
                }
                let retry_after = wait.ceil().max(1.0) as u64;
                let outcome = Outcome {
                    policy: index,
                    remaining: 0,
                    reset_seconds: retry_after,
                };
                let mut problem = Problem::new(429, "rate-limited", "Too many requests").header(
                    http::header::RETRY_AFTER,
                    header_value(retry_after.to_string()),
                );
                self.headers(&outcome, |name, value| {
                    problem.headers.push((name, value));
                });
                return Decision::Reject(problem);
            }
            policy.allowed.fetch_add(1, Ordering::Relaxed);
            taken.push((index, key));
            let remaining = tokens.floor() as u64;
            if tightest
                .as_ref()
                .is_none_or(|current| remaining < current.remaining)
            {
                tightest = Some(Outcome {
                    policy: index,
                    remaining,
                    reset_seconds: policy.seconds_to_full(tokens),
                });
            }
        }
        if let Some(outcome) = tightest {
            ctx.state.insert(RateLimitOutcome(outcome));
        }
        Decision::Continue
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        if let Some(RateLimitOutcome(outcome)) = ctx.state.get::<RateLimitOutcome>() {
            self.headers(outcome, |name, value| {
                response.insert_header(name, value).ok();
            });
        }
    }
}

#[derive(Clone, Debug)]
struct RateLimitOutcome(Outcome);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Consumer;

    fn filter(config: serde_json::Value) -> RateLimit {
        RateLimit::build(
            serde_json::from_value(config).unwrap(),
            &BuildCtx::default(),
        )
        .unwrap_or_else(|errors| panic!("{errors:?}"))
    }

    async fn run(filter: &RateLimit, consumer: &str) -> Option<Problem> {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        ctx.consumer = Some(Consumer::new(consumer));
        match filter.request(&mut request, &mut ctx).await {
            Decision::Continue => None,
            Decision::Reject(problem) => Some(problem),
            Decision::Respond(_) => panic!("unexpected response"),
        }
    }

    #[tokio::test]
    async fn admits_the_burst_then_refuses_with_retry_after() {
        let filter = filter(serde_json::json!({
            "policies": [{ "name": "per-consumer", "key": ["consumer"], "capacity": 5, "refill": { "tokens": 1, "every": "10s" } }]
        }));
        for _ in 0..5 {
            assert!(run(&filter, "acme").await.is_none());
        }
        let problem = run(&filter, "acme").await.expect("the sixth is refused");
        assert_eq!(problem.status, 429);
        let header = |name: &str| {
            problem
                .headers
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.to_str().unwrap().to_string())
        };
        assert_eq!(header("retry-after").as_deref(), Some("10"));
        assert_eq!(
            header("ratelimit-policy").as_deref(),
            Some("\"per-consumer\";q=5;w=50")
        );
        assert_eq!(
            header("ratelimit").as_deref(),
            Some("\"per-consumer\";r=0;t=10")
        );
        // Another consumer has its own bucket.
        assert!(run(&filter, "other").await.is_none());
    }

    #[tokio::test]
    async fn two_policies_apply_together_and_a_refusal_costs_nothing() {
        let filter = filter(serde_json::json!({
            "policies": [
                { "name": "burst", "key": ["consumer"], "capacity": 3, "refill": { "tokens": 3, "every": "1h" } },
                { "name": "tiny", "key": ["consumer"], "capacity": 2, "refill": { "tokens": 2, "every": "1h" } },
            ]
        }));
        let refused_by_tiny = |problem: Problem| {
            problem.headers.iter().any(|(name, value)| {
                name == "ratelimit" && value.to_str().unwrap().starts_with("\"tiny\"")
            })
        };
        assert!(run(&filter, "a").await.is_none());
        assert!(run(&filter, "a").await.is_none());
        assert!(refused_by_tiny(run(&filter, "a").await.unwrap()));
        // "burst" was refunded: it still has one token, so it is not the one refusing.
        assert!(refused_by_tiny(run(&filter, "a").await.unwrap()));
    }

    #[tokio::test]
    async fn memory_is_bounded_under_a_key_flood() {
        let filter = filter(serde_json::json!({
            "max_keys": 1600,
            "policies": [{ "name": "p", "key": ["consumer"], "capacity": 1, "refill": { "tokens": 1, "every": "1h" } }]
        }));
        for index in 0..1_000_000 {
            assert!(run(&filter, &format!("key-{index}")).await.is_none());
        }
        let kept: usize = filter.policies[0]
            .shards
            .iter()
            .map(|shard| shard.lock().unwrap().len())
            .sum();
        assert!(kept <= 1600, "{kept} buckets kept");
    }

    #[test]
    fn config_errors_are_reported() {
        let errors = RateLimit::build(
            serde_json::from_value(serde_json::json!({
                "policies": [{ "name": "p", "key": ["nobody"], "capacity": 0, "refill": { "tokens": 0, "every": "soon" } }]
            }))
            .unwrap(),
            &BuildCtx::default(),
        )
        .err()
        .unwrap();
        let paths: Vec<_> = errors.iter().map(|error| error.path.as_str()).collect();
        for expected in [
            "policies[0].key[0]",
            "policies[0].capacity",
            "policies[0].refill.every",
            "policies[0].refill",
        ] {
            assert!(paths.contains(&expected), "{expected} missing in {paths:?}");
        }
    }
}
