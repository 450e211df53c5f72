//! Rate-limit micro-benchmarks: the local token bucket through the real `rate_limit` filter, for
//! a hot key and for a stream of distinct keys (with key building and LRU churn), with two
//! policies applied together, and with a four-part key; and, when Redis answers on
//! 127.0.0.1:6379, one decision of the `redis` backend with and without leasing.

use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gatehouse_filters::{BuildCtx, Consumer, Decision, Registry, RequestContext};
use pingora_http::RequestHeader;
use serde_json::json;

fn bench(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let one_policy = Registry::builtin().build(
        "rate_limit",
        &json!({ "policies": [{ "name": "p", "key": ["consumer"], "capacity": 1_000_000_000u64, "refill": { "tokens": 1_000_000_000u64, "every": "1s" } }] }),
        &BuildCtx::default(),
    )
    .unwrap();
    let two_policies = Registry::builtin().build(
        "rate_limit",
        &json!({ "policies": [
            { "name": "a", "key": ["consumer"], "capacity": 1_000_000_000u64, "refill": { "tokens": 1_000_000_000u64, "every": "1s" } },
            { "name": "b", "key": ["consumer", "route", { "header": "x-tenant" }], "capacity": 1_000_000_000u64, "refill": { "tokens": 1_000_000_000u64, "every": "1s" } },
        ] }),
        &BuildCtx::default(),
    )
    .unwrap();
    let mut request = RequestHeader::build("GET", b"/", None).unwrap();
    request.insert_header("x-tenant", "acme").unwrap();
    let consumers: Vec<Consumer> = (0..100_000)
        .map(|index| Consumer::new(&format!("consumer-{index}")))
        .collect();

    let mut group = criterion.benchmark_group("rate_limit_local");
    group.bench_function("hot_key", |bencher| {
        let mut ctx = RequestContext::new(Instant::now());
        ctx.consumer = Some(consumers[0].clone());
        bencher.iter(|| {
            let decision = runtime.block_on(one_policy.request(&mut request, &mut ctx));
            black_box(matches!(decision, Decision::Continue))
        })
    });
    group.bench_function("distinct_keys", |bencher| {
        let mut ctx = RequestContext::new(Instant::now());
        let mut index = 0;
        bencher.iter(|| {
            index = (index + 1) % consumers.len();
            ctx.consumer = Some(consumers[index].clone());
            let decision = runtime.block_on(one_policy.request(&mut request, &mut ctx));
            black_box(matches!(decision, Decision::Continue))
        })
    });
    group.bench_function("two_policies_composite_key", |bencher| {
        let mut ctx = RequestContext::new(Instant::now());
        ctx.consumer = Some(consumers[1].clone());
        ctx.route = Some("users".into());
        bencher.iter(|| {
            let decision = runtime.block_on(two_policies.request(&mut request, &mut ctx));
            black_box(matches!(decision, Decision::Continue))
        })
    });
    let four_part_key = Registry::builtin().build(
        "rate_limit",
        &json!({ "policies": [
            { "name": "k", "key": ["consumer", "client_ip", "route", { "header": "x-tenant" }], "capacity": 1_000_000_000u64, "refill": { "tokens": 1_000_000_000u64, "every": "1s" } },
        ] }),
        &BuildCtx::default(),
    )
    .unwrap();
    group.bench_function("four_part_key", |bencher| {
        let mut ctx = RequestContext::new(Instant::now());
        ctx.consumer = Some(consumers[2].clone());
        ctx.route = Some("users".into());
        ctx.client_addr = Some("192.0.2.7".parse().unwrap());
        bencher.iter(|| {
            let decision = runtime.block_on(four_part_key.request(&mut request, &mut ctx));
            black_box(matches!(decision, Decision::Continue))
        })
    });
    group.finish();

    if std::net::TcpStream::connect("127.0.0.1:6379").is_err() {
        eprintln!("Redis is not running on 127.0.0.1:6379: skipping the redis benches");
        return;
    }
    let redis = gatehouse_filters::shared::redis_client(
        &gatehouse_filters::shared::RedisSettings {
            url: "redis://127.0.0.1:6379".into(),
            command_timeout: std::time::Duration::from_millis(50),
            connect_timeout: std::time::Duration::from_secs(1),
            max_queue: 10_000,
        },
        &gatehouse_filters::Metrics::new(),
    )
    .unwrap();
    let redis_ctx = BuildCtx {
        redis: Some(redis),
        ..BuildCtx::default()
    };
    let run = std::process::id();
    let redis_filter = |lease: serde_json::Value| {
        Registry::builtin().build(
            "rate_limit",
            &json!({ "policies": [{ "name": format!("bench-{run}"), "key": ["consumer"], "capacity": 1_000_000_000u64, "refill": { "tokens": 1_000_000_000u64, "every": "1s" }, "backend": "redis", "on_redis_error": "fail_closed", "lease": lease }] }),
            &redis_ctx,
        )
        .unwrap()
    };
    let plain = redis_filter(serde_json::Value::Null);
    let leased = redis_filter(json!({ "tokens": 100 }));
    let mut group = criterion.benchmark_group("rate_limit_redis");
    for (name, filter) in [("plain", &plain), ("lease_100", &leased)] {
        group.bench_function(name, |bencher| {
            let mut ctx = RequestContext::new(Instant::now());
            ctx.consumer = Some(consumers[3].clone());
            bencher.iter(|| {
                let decision = runtime.block_on(filter.request(&mut request, &mut ctx));
                assert!(matches!(decision, Decision::Continue), "Redis must answer");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
