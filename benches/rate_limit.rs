//! Rate-limit micro-benchmarks: the local token bucket through the real `rate_limit` filter, for
//! a hot key and for a stream of distinct keys (with key building and LRU churn), and with two
//! policies applied together.

use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gatehouse_filters::{build_filter, BuildCtx, Consumer, Decision, RequestContext};
use pingora_http::RequestHeader;
use serde_json::json;

fn bench(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let one_policy = build_filter(
        "rate_limit",
        &json!({ "policies": [{ "name": "p", "key": ["consumer"], "capacity": 1_000_000_000u64, "refill": { "tokens": 1_000_000_000u64, "every": "1s" } }] }),
        &BuildCtx::default(),
    )
    .unwrap();
    let two_policies = build_filter(
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
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
