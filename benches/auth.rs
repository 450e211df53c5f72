//! Authentication micro-benchmarks: JWT verification through the `jwt` filter (HS256, RS256 and
//! ES256, with the verified-token cache on and off) and API-key lookup among 10,000 stored keys
//! (SHA-256 and HMAC-SHA-256), directly in the consumer registry and through the `api_key` filter.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gatehouse_filters::consumers::{
    hmac_sha256, sha256, ApiKeyCredential, ConsumerRegistry, KeyHashKind,
};
use gatehouse_filters::{BuildCtx, Consumer, Decision, Filter, Registry, RequestContext};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use pingora_http::RequestHeader;
use serde_json::json;
use tokio::runtime::Runtime;

const RSA_PRIVATE: &str = include_str!("../tests/support/keys/rsa1.pk8.pem");
const RSA_PUBLIC: &str = include_str!("../tests/support/keys/rsa1.pub");
const EC_PRIVATE: &str = include_str!("../tests/support/keys/ec256.pk8.pem");
const EC_PUBLIC: &str = include_str!("../tests/support/keys/ec256.pub");
const HMAC_SECRET: &str = "gatehouse-bench-hs256-secret-of-32+bytes";
const ISSUER: &str = "https://id.bench.test";
const STORED_KEYS: usize = 10_000;

/// The filters' request phase is async; a current-thread runtime is what one Gatehouse worker
/// runs them on.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

/// A token of the shape identity providers issue: issuer, subject, audience-free, one hour left.
fn sign(algorithm: Algorithm, key: &EncodingKey) -> String {
    let mut header = Header::new(algorithm);
    header.kid = Some("k1".into());
    let now = unix_now();
    let claims = json!({
        "iss": ISSUER,
        "sub": "bench-client",
        "iat": now,
        "exp": now + 3600,
        "scope": "orders:read orders:write",
    });
    encode(&header, &claims, key).expect("the bench token signs")
}

/// The `jwt` filter for one algorithm, with the verified-token cache of `cache_size` entries.
fn jwt_filter(algorithm: &str, cache_size: usize) -> Arc<dyn Filter> {
    let key = match algorithm {
        "HS256" => json!({ "kid": "k1", "algorithm": algorithm, "secret": HMAC_SECRET }),
        "RS256" => json!({ "kid": "k1", "algorithm": algorithm, "public_key": RSA_PUBLIC }),
        "ES256" => json!({ "kid": "k1", "algorithm": algorithm, "public_key": EC_PUBLIC }),
        other => panic!("no bench key for {other}"),
    };
    let config = json!({
        "issuer": ISSUER,
        "algorithms": [algorithm],
        "keys": [key],
        "cache_size": cache_size,
    });
    Registry::builtin()
        .build("jwt", &config, &BuildCtx::default())
        .unwrap_or_else(|errors| panic!("the jwt bench config is refused: {errors:?}"))
}

fn request_with(header: &str, value: &str) -> RequestHeader {
    let mut request = RequestHeader::build("GET", b"/orders/42", None).expect("a request head");
    request
        .insert_header(header.to_string(), value)
        .expect("a valid header");
    request
}

/// Runs one request through `filter` and fails the bench when it is not accepted, so that a
/// figure never measures a rejection path by mistake.
fn expect_accepted(
    runtime: &Runtime,
    filter: &dyn Filter,
    request: &mut RequestHeader,
    what: &str,
) {
    let mut ctx = RequestContext::new(Instant::now());
    let decision = runtime.block_on(filter.request(request, &mut ctx));
    assert!(
        matches!(decision, Decision::Continue) && ctx.consumer.is_some(),
        "{what}: the request was not accepted ({decision:?}, failure {:?})",
        ctx.auth_failure
    );
}

fn jwt(criterion: &mut Criterion) {
    let runtime = runtime();
    let tokens = [
        (
            "HS256",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(HMAC_SECRET.as_bytes()).expect("the HMAC secret"),
            ),
        ),
        (
            "RS256",
            sign(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("the RSA fixture"),
            ),
        ),
        (
            "ES256",
            sign(
                Algorithm::ES256,
                &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).expect("the EC fixture"),
            ),
        ),
    ];
    let mut group = criterion.benchmark_group("jwt_filter");
    for (algorithm, token) in &tokens {
        for (cache, cache_size) in [("cached", 10_000), ("uncached", 0)] {
            let filter = jwt_filter(algorithm, cache_size);
            let mut request = request_with("authorization", &format!("Bearer {token}"));
            let name = format!("{algorithm}/{cache}");
            expect_accepted(&runtime, filter.as_ref(), &mut request, &name);
            let mut ctx = RequestContext::new(Instant::now());
            group.bench_function(name, |bencher| {
                bencher.iter(|| black_box(runtime.block_on(filter.request(&mut request, &mut ctx))))
            });
        }
    }
    group.finish();

    // What `block_on` itself costs per iteration, to subtract from the figures above.
    criterion.bench_function("runtime/block_on_ready", |bencher| {
        bencher.iter(|| runtime.block_on(async { black_box(1u8) }))
    });
}

/// The key handed to client `index`: the shape `gatehouse keygen` prints (prefix and 32 hex).
fn client_key(index: usize) -> String {
    let digest = sha256(format!("bench client {index}").as_bytes());
    format!("ghk_{}", hex::encode(&digest[..16]))
}

fn registry(kind: KeyHashKind, hmac_secret: Option<&[u8]>) -> ConsumerRegistry {
    let mut registry = ConsumerRegistry::new(hmac_secret.map(<[u8]>::to_vec));
    for index in 0..STORED_KEYS {
        let key = client_key(index);
        let hash = match hmac_secret {
            Some(secret) => hmac_sha256(secret, key.as_bytes()),
            None => sha256(key.as_bytes()),
        };
        let added = registry.add_api_key(
            kind,
            ApiKeyCredential {
                consumer: Consumer::new(&format!("client-{index}")),
                hash,
                disabled: false,
                expires_at: None,
            },
        );
        assert!(added, "client key {index} collides with another");
    }
    registry
}

fn api_key(criterion: &mut Criterion) {
    let hmac_secret = b"gatehouse-bench-api-key-pepper".as_slice();
    let sha256_registry = registry(KeyHashKind::Sha256, None);
    let hmac_registry = registry(KeyHashKind::HmacSha256, Some(hmac_secret));
    let known = client_key(STORED_KEYS / 2);
    let unknown = client_key(STORED_KEYS + 1);
    let now = SystemTime::now();
    assert!(sha256_registry
        .api_key_consumer(known.as_bytes(), now)
        .is_ok());
    assert!(hmac_registry
        .api_key_consumer(known.as_bytes(), now)
        .is_ok());
    assert!(sha256_registry
        .api_key_consumer(unknown.as_bytes(), now)
        .is_err());

    let mut group = criterion.benchmark_group("api_key_10000_keys");
    group.bench_function("sha256/known", |bencher| {
        bencher.iter(|| {
            black_box(sha256_registry.api_key_consumer(black_box(known.as_bytes()), now)).is_ok()
        })
    });
    group.bench_function("sha256/unknown", |bencher| {
        bencher.iter(|| {
            black_box(sha256_registry.api_key_consumer(black_box(unknown.as_bytes()), now)).is_ok()
        })
    });
    group.bench_function("hmac_sha256/known", |bencher| {
        bencher.iter(|| {
            black_box(hmac_registry.api_key_consumer(black_box(known.as_bytes()), now)).is_ok()
        })
    });

    // The whole request phase of the filter: header read, lookup, consumer on the context. The
    // key is left on the request (`hide_credential: false`) so every iteration sees the same head.
    let runtime = runtime();
    let ctx = BuildCtx {
        consumers: Arc::new(sha256_registry),
        ..BuildCtx::default()
    };
    let filter = Registry::builtin()
        .build("api_key", &json!({ "hide_credential": false }), &ctx)
        .unwrap_or_else(|errors| panic!("the api_key bench config is refused: {errors:?}"));
    let mut request = request_with("x-api-key", &known);
    expect_accepted(&runtime, filter.as_ref(), &mut request, "api_key filter");
    let mut request_ctx = RequestContext::new(Instant::now());
    group.bench_function("sha256/filter", |bencher| {
        bencher.iter(|| black_box(runtime.block_on(filter.request(&mut request, &mut request_ctx))))
    });
    group.finish();
}

criterion_group!(benches, jwt, api_key);
criterion_main!(benches);
