//! The filter chain's price per request: the full chain of the load test (a `jwt` filter
//! answering from its verified-token cache, a local `rate_limit` policy and three response-header
//! operations), run by `Chain` as the proxy runs it, against the same filters with every request
//! phase awaited as a boxed future, which is what each filter cost before filters could decide
//! at once (`Filter::try_request`).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gatehouse_filters::{
    AuthGate, BuildCtx, Chain, Decision, Filter, Phases, Registry, RequestContext,
};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pingora_http::{RequestHeader, ResponseHeader};
use serde_json::json;

const RSA_PRIVATE: &str = include_str!("../tests/support/keys/rsa1.pk8.pem");
const RSA_PUBLIC: &str = include_str!("../tests/support/keys/rsa1.pub");

/// A filter seen only through its async request phase: the chain cannot ask it to decide at
/// once, so every request pays the boxed future.
struct Awaited(Arc<dyn Filter>);

#[async_trait]
impl Filter for Awaited {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn phases(&self) -> Phases {
        self.0.phases()
    }

    fn is_auth(&self) -> bool {
        self.0.is_auth()
    }

    async fn request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        self.0.request(request, ctx).await
    }

    fn response(&self, response: &mut ResponseHeader, ctx: &mut RequestContext) {
        self.0.response(response, ctx);
    }
}

fn full_chain_filters() -> Vec<Arc<dyn Filter>> {
    let registry = Registry::builtin();
    let ctx = BuildCtx {
        route: Some("all".into()),
        ..BuildCtx::default()
    };
    [
        (
            "jwt",
            json!({ "algorithms": ["RS256"], "keys": [{ "kid": "k1", "algorithm": "RS256", "public_key": RSA_PUBLIC }] }),
        ),
        (
            "rate_limit",
            json!({ "policies": [{ "name": "per-consumer", "key": ["consumer"], "capacity": 1_000_000_000u64, "refill": { "tokens": 1_000_000_000u64, "every": "1s" } }] }),
        ),
        (
            "response_headers",
            json!({ "set": { "x-gateway": "gatehouse" }, "add": { "x-served-by": "bench" }, "remove": ["server"] }),
        ),
    ]
    .into_iter()
    .map(|(kind, config)| {
        registry
            .build(kind, &config, &ctx)
            .unwrap_or_else(|errors| panic!("{kind}: {errors:?}"))
    })
    .collect()
}

fn token() -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("k1".into());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs();
    let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("the bench key reads");
    encode(&header, &json!({ "sub": "bench", "exp": now + 3600 }), &key)
        .expect("the bench token signs")
}

fn bench(criterion: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let direct = Chain::new(full_chain_filters(), Some(AuthGate::Required));
    let awaited = Chain::new(
        full_chain_filters()
            .into_iter()
            .map(|filter| Arc::new(Awaited(filter)) as Arc<dyn Filter>)
            .collect(),
        Some(AuthGate::Required),
    );
    let authorization = format!("Bearer {}", token());
    let mut group = criterion.benchmark_group("full_chain");
    for (name, chain) in [("as_run", &direct), ("every_phase_awaited", &awaited)] {
        group.bench_function(name, |bencher| {
            bencher.iter(|| {
                let mut request = RequestHeader::build("GET", b"/orders/42", None).unwrap();
                request
                    .insert_header("authorization", authorization.as_str())
                    .unwrap();
                let mut ctx = RequestContext::new(Instant::now());
                let mut reached = 0;
                let decision =
                    runtime.block_on(chain.request(&mut request, &mut ctx, &mut reached));
                assert!(matches!(decision, Decision::Continue));
                let mut response = ResponseHeader::build(200, None).unwrap();
                chain.response(&mut response, &mut ctx, reached);
                black_box(response);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
