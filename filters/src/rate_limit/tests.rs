//! Unit tests of the rate-limit filter: bursts and refusals, policies applied together, the
//! memory bound, config errors, bucket names that cannot be forged, and several rate-limit
//! filters in one chain.

use std::hash::{Hash, Hasher};
use std::time::Instant;

use http::HeaderValue;
use pingora_http::{RequestHeader, ResponseHeader};

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
    let kept = filter.policies[0].local.len();
    assert!(kept <= 1600, "{kept} buckets kept");
}

#[test]
fn config_errors_are_reported() {
    let errors = RateLimit::build(
        serde_json::from_value(serde_json::json!({
            "policies": [
                { "name": "p", "key": ["nobody"], "capacity": 0, "refill": { "tokens": 0, "every": "soon" } },
                { "name": "has \"quotes\"", "key": ["consumer"], "capacity": 1, "refill": { "tokens": 1, "every": "1s" } },
            ]
        }))
        .unwrap(),
        &BuildCtx::default(),
    )
    .err()
    .unwrap();
    let paths: Vec<_> = errors.iter().map(|error| error.path.as_str()).collect();
    for expected in [
        "policies[1].name",
        "policies[0].key[0]",
        "policies[0].capacity",
        "policies[0].refill.every",
        "policies[0].refill",
    ] {
        assert!(paths.contains(&expected), "{expected} missing in {paths:?}");
    }
}

/// The bucket key of the earlier scheme: an unkeyed 64-bit FxHash of the policy name and the key
/// parts, which also named the Redis key. Kept here to show the collision it allowed.
fn fxhash_key(policy: &str, header: &[u8]) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    policy.hash(&mut hasher);
    header.hash(&mut hasher);
    0xffu8.hash(&mut hasher);
    hasher.finish()
}

/// A 16-byte header value whose FxHash equals the victim's: FxHash mixes the two 8-byte halves
/// of a 16-byte string as a product of (half XOR seed) terms, and a product does not change when
/// its factors swap, so swapping the halves across the two seeds gives the same hash.
fn forged_twin(victim: &[u8; 16]) -> Vec<u8> {
    const SEEDS: u64 = 0x243f_6a88_85a3_08d3 ^ 0x1319_8a2e_0370_7344;
    let seeds = SEEDS.to_le_bytes();
    let (low, high) = victim.split_at(8);
    high.iter()
        .chain(low)
        .enumerate()
        .map(|(index, byte)| byte ^ seeds[index % 8])
        .collect()
}

async fn run_with_header(filter: &RateLimit, value: &[u8]) -> Option<Problem> {
    let mut request = RequestHeader::build("GET", b"/", None).unwrap();
    request
        .insert_header("x-tenant", HeaderValue::from_bytes(value).unwrap())
        .unwrap();
    let mut ctx = RequestContext::new(Instant::now());
    match filter.request(&mut request, &mut ctx).await {
        Decision::Continue => None,
        Decision::Reject(problem) => Some(problem),
        Decision::Respond(_) => panic!("unexpected response"),
    }
}

#[tokio::test]
async fn a_client_cannot_forge_a_header_that_lands_in_another_tenants_bucket() {
    let victim = b"ACME-CORPORATION";
    let forged = forged_twin(victim);
    assert_ne!(&forged[..], &victim[..]);
    // The forged value is a header value a client can send (obs-text bytes, no controls).
    assert!(HeaderValue::from_bytes(&forged).is_ok());
    // Under the earlier scheme both named the same bucket, on every node and in Redis.
    assert_eq!(
        fxhash_key("per-tenant", victim),
        fxhash_key("per-tenant", &forged)
    );

    let filter = filter(serde_json::json!({
        "policies": [{ "name": "per-tenant", "key": [{ "header": "x-tenant" }], "capacity": 2, "refill": { "tokens": 1, "every": "1h" } }]
    }));
    // The attacker spends what it can from the bucket its forged value names...
    assert!(run_with_header(&filter, &forged).await.is_none());
    assert!(run_with_header(&filter, &forged).await.is_none());
    assert_eq!(
        run_with_header(&filter, &forged)
            .await
            .map(|problem| problem.status),
        Some(429)
    );
    // ...and the victim's own bucket is untouched.
    assert!(run_with_header(&filter, victim).await.is_none());
    assert!(run_with_header(&filter, victim).await.is_none());
    assert_eq!(
        run_with_header(&filter, victim)
            .await
            .map(|problem| problem.status),
        Some(429)
    );
}

#[test]
fn buckets_belong_to_their_route_and_policy() {
    let request = RequestHeader::build("GET", b"/", None).unwrap();
    let ctx = RequestContext::new(Instant::now());
    let names = |route: &str, policy: &str| {
        key::Namer::new(route, policy, vec![key::Part::Consumer], true).names(&request, &ctx)
    };
    assert_eq!(names("users", "p").local, names("users", "p").local);
    assert_eq!(names("users", "p").remote, names("users", "p").remote);
    assert_ne!(names("users", "p").local, names("orders", "p").local);
    assert_ne!(names("users", "p").local, names("users", "q").local);
    assert_ne!(names("users", "p").remote, names("orders", "p").remote);
    // Length prefixes keep ("ab", "c") apart from ("a", "bc").
    assert_ne!(names("ab", "c").local, names("a", "bc").local);
    assert_ne!(names("ab", "c").remote, names("a", "bc").remote);
    let redis_key = names("users", "p").remote.unwrap();
    assert!(
        redis_key.starts_with("gatehouse:ratelimit:{"),
        "{redis_key}"
    );
    assert!(redis_key.ends_with("}:users:p"), "{redis_key}");
    assert_eq!(redis_key.len(), "gatehouse:ratelimit:{}:users:p".len() + 64);
    // A local policy has no Redis name.
    let local = key::Namer::new("users", "p", vec![key::Part::Consumer], false);
    assert!(local.names(&request, &ctx).remote.is_none());
}

#[tokio::test]
async fn two_rate_limit_filters_in_one_chain_each_answer_for_their_own_policies() {
    let global = filter(serde_json::json!({
        "policies": [{ "name": "global", "key": ["consumer"], "capacity": 100, "refill": { "tokens": 1, "every": "1h" } }]
    }));
    let route = filter(serde_json::json!({
        "policies": [
            { "name": "a", "key": ["consumer"], "capacity": 50, "refill": { "tokens": 1, "every": "1h" } },
            { "name": "b", "key": ["consumer"], "capacity": 10, "refill": { "tokens": 1, "every": "1h" } },
        ]
    }));
    let mut request = RequestHeader::build("GET", b"/", None).unwrap();
    let mut ctx = RequestContext::new(Instant::now());
    ctx.consumer = Some(Consumer::new("acme"));
    assert!(matches!(
        global.request(&mut request, &mut ctx).await,
        Decision::Continue
    ));
    assert!(matches!(
        route.request(&mut request, &mut ctx).await,
        Decision::Continue
    ));
    // Response phases in reverse order: the route's filter reports its tightest policy (b, the
    // second one), the global filter its own (a single policy) without looking at the route's.
    let mut response = ResponseHeader::build(200, None).unwrap();
    route.response(&mut response, &mut ctx);
    assert_eq!(response.headers["ratelimit"], "\"b\";r=9;t=3600");
    global.response(&mut response, &mut ctx);
    assert_eq!(response.headers["ratelimit"], "\"global\";r=99;t=3600");
}

#[test]
fn local_policies_decide_without_waiting_and_redis_ones_wait() {
    let local = filter(serde_json::json!({
        "policies": [{ "name": "p", "key": ["consumer"], "capacity": 2, "refill": { "tokens": 1, "every": "1h" } }]
    }));
    let decide = |filter: &RateLimit| {
        let mut request = RequestHeader::build("GET", b"/", None).unwrap();
        let mut ctx = RequestContext::new(Instant::now());
        ctx.consumer = Some(Consumer::new("acme"));
        filter
            .try_request(&mut request, &mut ctx)
            .map(|decision| match decision {
                Decision::Continue => 200,
                Decision::Reject(problem) => problem.status,
                Decision::Respond(response) => response.status,
            })
    };
    assert_eq!(decide(&local), Some(200));
    assert_eq!(decide(&local), Some(200));
    assert_eq!(decide(&local), Some(429));

    let redis = crate::shared::redis_client(
        &crate::shared::RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            command_timeout: std::time::Duration::from_millis(5),
            connect_timeout: std::time::Duration::from_millis(50),
            max_queue: 10,
        },
        &crate::Metrics::new(),
    )
    .unwrap();
    let shared = RateLimit::build(
        serde_json::from_value(serde_json::json!({
            "policies": [{ "name": "p", "key": ["consumer"], "capacity": 2, "refill": { "tokens": 1, "every": "1h" }, "backend": "redis" }]
        }))
        .unwrap(),
        &BuildCtx {
            redis: Some(redis),
            ..BuildCtx::default()
        },
    )
    .unwrap();
    assert_eq!(
        decide(&shared),
        None,
        "a Redis policy is decided in the async phase"
    );
}
