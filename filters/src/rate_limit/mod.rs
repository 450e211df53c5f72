//! `rate_limit`: token buckets. A request passes when every policy of the filter has tokens
//! for its cost; otherwise it gets 429 with `Retry-After`, and the tokens earlier policies took
//! for it are given back, wherever they came from, so a refused request costs nothing. Each
//! policy has a capacity (the burst), a refill rate and a key built from the consumer, the
//! client address (the trusted-proxy-aware one, never a raw `X-Forwarded-For`), the route, a
//! header or a JWT claim. Buckets belong to their route and policy. Responses carry the IETF
//! `RateLimit-Policy` and `RateLimit` headers, and optionally the legacy `X-RateLimit-*` ones.
//!
//! Backend `local` keeps buckets in process ([`local`]); backend `redis` keeps one bucket per
//! key for the whole cluster ([`redis`]), optionally leased to nodes in batches ([`lease`]).
//! Buckets are named by hashes of their key material a client cannot steer ([`key`]).

mod config;
mod headers;
mod key;
mod lease;
mod local;
mod redis;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_http::{RequestHeader, ResponseHeader};
use prometheus::IntCounter;

pub use config::{Backend, Config, KeyPart, Lease, OnRedisError, Policy, Refill};
use headers::PolicyHeaders;
use key::{Namer, Names, Part};
use lease::Leasing;
use local::{Buckets, Verdict};
use redis::{verdict, RedisCall};

use crate::metrics::Row;
use crate::util::duration;
use crate::{
    BuildCtx, BuildError, Decision, Filter, FilterKind, Phases, Problem, ProblemType,
    RateLimitNote, RateLimitResult, RequestContext,
};

struct CompiledPolicy {
    name: Arc<str>,
    namer: Namer,
    capacity: f64,
    /// Tokens per second.
    rate: f64,
    cost: f64,
    headers: PolicyHeaders,
    /// The buckets of the `local` backend, and of `local_fallback` while Redis is away.
    local: Buckets,
    /// `gatehouse_ratelimit_decisions_total{route, policy, result}`.
    allowed: Row<IntCounter>,
    limited: Row<IntCounter>,
    redis: Option<RedisBucket>,
}

struct RedisBucket {
    call: Arc<RedisCall>,
    on_error: OnRedisError,
    /// `gatehouse_ratelimit_fallback_total{route, policy, mode}`.
    fallbacks: Row<IntCounter>,
    leasing: Option<Arc<Leasing>>,
    /// `capacity / expected_nodes` and `rate / expected_nodes`, for `local_fallback`.
    fallback_capacity: f64,
    fallback_rate: f64,
}

/// Where an admitted request's tokens came from, so a refusal by a later policy can give them
/// back there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Taken {
    Local,
    Redis,
    Leased,
    Fallback,
    /// `fail_open` admitted without taking anything.
    Nothing,
}

pub struct RateLimit {
    policies: Vec<CompiledPolicy>,
    /// No policy keeps its buckets in Redis: a decision never waits.
    local_only: bool,
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
        let route = ctx.route_label();
        let decisions = ctx.metrics.counters(
            "gatehouse_ratelimit_decisions_total",
            "Rate-limit decisions, by route, policy and result",
            &["route", "policy", "result"],
        );
        let fallbacks = ctx.metrics.counters(
            "gatehouse_ratelimit_fallback_total",
            "Rate-limit decisions made without Redis (it did not answer in time), by route, policy and failure mode",
            &["route", "policy", "mode"],
        );
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
            if !headers::valid_name(&policy.name) {
                errors.push(BuildError::new(
                    format!("{path}.name"),
                    "a policy name goes into the RateLimit headers: use 1 to 64 visible ASCII characters, without `\"` or `\\`",
                ));
                continue;
            }
            let parts: Vec<Part> = policy
                .key
                .iter()
                .enumerate()
                .filter_map(|(part_index, part)| {
                    Part::compile(part, &format!("{path}.key[{part_index}]"), &mut errors)
                })
                .collect();
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
                (Backend::Redis, Some(client)) => {
                    let mode = match policy.on_redis_error {
                        OnRedisError::FailOpen => "fail_open",
                        OnRedisError::FailClosed => "fail_closed",
                        OnRedisError::LocalFallback => "local_fallback",
                    };
                    let leasing = policy.lease.as_ref().map(|lease| {
                        let max_age = duration(
                            &format!("{path}.lease.max_age"),
                            &lease.max_age,
                            &mut errors,
                        );
                        Arc::new(Leasing::new(
                            lease.tokens,
                            policy.cost,
                            max_age,
                            config.max_keys,
                        ))
                    });
                    let nodes = policy.expected_nodes.max(1) as f64;
                    Some(RedisBucket {
                        call: Arc::new(RedisCall::new(
                            client.clone(),
                            policy.capacity,
                            rate,
                            policy.cost,
                            window,
                            policy.lease.as_ref().map(|lease| lease.tokens),
                        )),
                        on_error: policy.on_redis_error,
                        fallbacks: fallbacks.row(&[route, &policy.name, mode]),
                        leasing,
                        fallback_capacity: (policy.capacity as f64 / nodes).max(1.0),
                        fallback_rate: rate / nodes,
                    })
                }
            };
            policies.push(CompiledPolicy {
                name: policy.name.as_str().into(),
                namer: Namer::new(route, &policy.name, parts, redis.is_some()),
                capacity: policy.capacity as f64,
                rate,
                cost: policy.cost as f64,
                headers: PolicyHeaders::new(
                    &policy.name,
                    policy.capacity,
                    window,
                    policy.legacy_headers,
                ),
                local: Buckets::new(config.max_keys),
                allowed: decisions.row(&[route, &policy.name, "allowed"]),
                limited: decisions.row(&[route, &policy.name, "limited"]),
                redis,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let local_only = policies.iter().all(|policy| policy.redis.is_none());
        Ok(RateLimit {
            policies,
            local_only,
        })
    }
}

impl CompiledPolicy {
    /// This policy's decision for the request's bucket. `Err` means the request is refused
    /// without a decision: Redis did not answer and the policy fails closed.
    async fn decide(&self, names: &Names, now: Instant) -> Result<(Verdict, Taken), ()> {
        let key = &names.local;
        let (Some(redis), Some(remote)) = (&self.redis, &names.remote) else {
            let verdict = self
                .local
                .take(key, now, self.capacity, self.rate, self.cost);
            return Ok((verdict, Taken::Local));
        };
        let answer = match &redis.leasing {
            Some(leasing) => leasing
                .take(&redis.call, *key, remote, now)
                .await
                .map(|verdict| (verdict, Taken::Leased)),
            None => redis
                .call
                .take(remote, false)
                .await
                .map(|(granted, tokens)| {
                    (verdict(self.cost, self.rate, granted, tokens), Taken::Redis)
                }),
        };
        if answer.is_ok() {
            return answer;
        }
        redis.fallbacks.inc();
        match redis.on_error {
            OnRedisError::FailOpen => Ok(((true, self.capacity, 0.0), Taken::Nothing)),
            OnRedisError::FailClosed => Err(()),
            OnRedisError::LocalFallback => Ok((
                self.local.take(
                    key,
                    now,
                    redis.fallback_capacity,
                    redis.fallback_rate,
                    self.cost,
                ),
                Taken::Fallback,
            )),
        }
    }

    /// Gives back the tokens this policy took for a request that was refused after all.
    async fn refund(&self, names: &Names, taken: Taken) {
        let key = &names.local;
        match (taken, &self.redis) {
            (Taken::Local, _) => self.local.refund(key, self.cost, self.capacity),
            (Taken::Fallback, Some(redis)) => {
                self.local.refund(key, self.cost, redis.fallback_capacity)
            }
            (Taken::Leased, Some(redis)) => {
                if let Some(leasing) = &redis.leasing {
                    leasing.refund(key, self.cost);
                }
            }
            // Bounded by the command deadline like the take; a refund Redis did not take only
            // leaves the bucket lower than it should be (admitting less, never more).
            (Taken::Redis, Some(redis)) => {
                if let Some(remote) = &names.remote {
                    let _ = redis.call.refund(remote).await;
                }
            }
            _ => {}
        }
    }

    fn seconds_to_full(&self, tokens: f64) -> u64 {
        ((self.capacity - tokens) / self.rate).ceil() as u64
    }
}

impl RateLimit {
    /// Gives back what the policies that admitted the request took; Redis refunds run side by
    /// side, so a refusal waits at most one command deadline for them.
    async fn refund(&self, taken: &[(usize, Names, Taken)]) {
        futures_util::future::join_all(
            taken
                .iter()
                .map(|(policy, names, how)| self.policies[*policy].refund(names, *how)),
        )
        .await;
    }

    /// Counts policy `index`'s verdict. An admission may be the tightest so far (its numbers go
    /// into the response headers); a refusal is the 429 to answer with.
    fn judge(
        &self,
        index: usize,
        (admitted, tokens, wait): Verdict,
        tightest: &mut Option<Outcome>,
        ctx: &mut RequestContext,
    ) -> Result<(), Decision> {
        let policy = &self.policies[index];
        if !admitted {
            policy.limited.inc();
            ctx.rate_limit = Some(RateLimitNote {
                policy: policy.name.clone(),
                result: RateLimitResult::Limited,
                remaining: 0,
            });
            let retry_after = wait.ceil().max(1.0) as u64;
            let mut problem = Problem::new(ProblemType::RateLimited).header(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(retry_after),
            );
            policy.headers.emit(0, retry_after, |name, value| {
                problem
                    .headers
                    .push((http::HeaderName::from_static(name), value));
            });
            return Err(Decision::Reject(problem));
        }
        policy.allowed.inc();
        let remaining = tokens.floor() as u64;
        if tightest
            .as_ref()
            .is_none_or(|current| remaining < current.remaining)
        {
            *tightest = Some(Outcome {
                policy: index,
                remaining,
                reset_seconds: policy.seconds_to_full(tokens),
            });
        }
        Ok(())
    }

    /// Every policy admitted the request: keep the tightest one's numbers for the response.
    fn settle(&self, ctx: &mut RequestContext, tightest: Option<Outcome>) -> Decision {
        if let Some(outcome) = tightest {
            // Of several rate-limit filters on the request, the one with the fewest tokens left.
            if ctx
                .rate_limit
                .as_ref()
                .is_none_or(|note| outcome.remaining < note.remaining)
            {
                ctx.rate_limit = Some(RateLimitNote {
                    policy: self.policies[outcome.policy].name.clone(),
                    result: RateLimitResult::Allowed,
                    remaining: outcome.remaining,
                });
            }
            ctx.set_instance_state(self, outcome);
        }
        Decision::Continue
    }
}

#[async_trait]
impl Filter for RateLimit {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST | Phases::RESPONSE
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        if !self.local_only {
            return None;
        }
        let now = Instant::now();
        let mut taken: smallvec::SmallVec<[(usize, Names); 2]> = smallvec::SmallVec::new();
        let mut tightest = None;
        for (index, policy) in self.policies.iter().enumerate() {
            let names = policy.namer.names(request, ctx);
            let verdict =
                policy
                    .local
                    .take(&names.local, now, policy.capacity, policy.rate, policy.cost);
            if let Err(refusal) = self.judge(index, verdict, &mut tightest, ctx) {
                for (earlier, names) in &taken {
                    let earlier = &self.policies[*earlier];
                    earlier
                        .local
                        .refund(&names.local, earlier.cost, earlier.capacity);
                }
                return Some(refusal);
            }
            taken.push((index, names));
        }
        Some(self.settle(ctx, tightest))
    }

    async fn request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        if let Some(decision) = self.try_request(request, ctx) {
            return decision;
        }
        let now = Instant::now();
        let mut taken: Vec<(usize, Names, Taken)> = Vec::with_capacity(self.policies.len());
        let mut tightest = None;
        for (index, policy) in self.policies.iter().enumerate() {
            let names = policy.namer.names(request, ctx);
            let Ok((verdict, how)) = policy.decide(&names, now).await else {
                self.refund(&taken).await;
                ctx.rate_limit = Some(RateLimitNote {
                    policy: policy.name.clone(),
                    result: RateLimitResult::Unavailable,
                    remaining: 0,
                });
                return Decision::Reject(Problem::new(ProblemType::RateLimitUnavailable));
            };
            if let Err(refusal) = self.judge(index, verdict, &mut tightest, ctx) {
                self.refund(&taken).await;
                return refusal;
            }
            taken.push((index, names, how));
        }
        self.settle(ctx, tightest)
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        let outcome = ctx.instance_state::<_, Outcome>(self);
        if let Some(outcome) = outcome {
            self.policies[outcome.policy].headers.emit(
                outcome.remaining,
                outcome.reset_seconds,
                |name, value| {
                    response.insert_header(name, value).ok();
                },
            );
        }
    }
}
