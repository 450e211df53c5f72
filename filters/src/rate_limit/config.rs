//! The `rate_limit` config: policies, their keys, refill, backend, failure mode and lease.

use serde::Deserialize;

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
