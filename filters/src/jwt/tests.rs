use super::*;
use base64::Engine;
use jsonwebtoken::{encode, EncodingKey, Header};
use std::time::Instant;

const RSA_PRIVATE: &str = include_str!("../../../tests/support/keys/rsa1.pk8.pem");
const RSA_PUBLIC: &str = include_str!("../../../tests/support/keys/rsa1.pub");

fn now() -> i64 {
    now_seconds() as i64
}

fn filter(extra: serde_json::Value) -> Jwt {
    let mut config = serde_json::json!({
        "issuer": "https://id.test",
        "algorithms": ["RS256"],
        "audiences": ["api"],
        "keys": [{ "kid": "k1", "algorithm": "RS256", "public_key": RSA_PUBLIC }],
    });
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    Jwt::build(
        serde_json::from_value(config).unwrap(),
        &BuildCtx::default(),
    )
    .unwrap_or_else(|errors| panic!("{errors:?}"))
}

fn claims() -> serde_json::Value {
    serde_json::json!({ "iss": "https://id.test", "aud": "api", "sub": "alice", "exp": now() + 300, "scope": "read write" })
}

fn sign(claims: &serde_json::Value, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap()
}

async fn check(filter: &Jwt, headers: &[(&str, &str)]) -> (Option<u16>, RequestContext) {
    let mut request = RequestHeader::build("GET", b"/", None).unwrap();
    for (name, value) in headers {
        request.append_header(name.to_string(), *value).unwrap();
    }
    let mut ctx = RequestContext::new(Instant::now());
    let status = match filter.request(&mut request, &mut ctx).await {
        Decision::Continue => None,
        Decision::Reject(problem) => Some(problem.status),
        Decision::Respond(response) => Some(response.status),
    };
    (status, ctx)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn b64(value: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test]
async fn a_valid_token_identifies_the_subject() {
    let filter = filter(serde_json::json!({}));
    let (status, ctx) = check(
        &filter,
        &[("authorization", &bearer(&sign(&claims(), Some("k1"))))],
    )
    .await;
    assert_eq!(status, None);
    assert_eq!(&*ctx.consumer.unwrap().id, "alice");
    assert_eq!(ctx.subject.as_deref(), Some("alice"));
    // No token: the route's auth setting decides.
    let (status, ctx) = check(&filter, &[]).await;
    assert_eq!(status, None);
    assert!(ctx.consumer.is_none());
}

#[tokio::test]
async fn token_attacks_are_401() {
    let filter = filter(serde_json::json!({}));
    let good = sign(&claims(), Some("k1"));
    let parts: Vec<&str> = good.split('.').collect();
    let mut cases: Vec<(&str, String)> = Vec::new();
    // alg:none
    cases.push((
        "alg none",
        format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
            parts[1]
        ),
    ));
    // RS256 -> HS256 with the public key as the HMAC secret.
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("k1".into());
    cases.push((
        "key confusion",
        encode(
            &hs,
            &claims(),
            &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()).unwrap(),
        )
        .unwrap(),
    ));
    for kid in ["../../dev/null", "1' OR '1'='1", &"k".repeat(10_000)] {
        cases.push(("hostile kid", sign(&claims(), Some(kid))));
    }
    let mut expired = claims();
    expired["exp"] = serde_json::json!(now() - 120);
    cases.push(("expired", sign(&expired, Some("k1"))));
    let mut early = claims();
    early["nbf"] = serde_json::json!(now() + 600);
    cases.push(("nbf", sign(&early, Some("k1"))));
    let mut text_exp = claims();
    text_exp["exp"] = serde_json::json!((now() + 300).to_string());
    cases.push(("exp string", sign(&text_exp, Some("k1"))));
    let mut no_exp = claims();
    no_exp.as_object_mut().unwrap().remove("exp");
    cases.push(("no exp", sign(&no_exp, Some("k1"))));
    let mut wrong_iss = claims();
    wrong_iss["iss"] = serde_json::json!("https://evil.test");
    cases.push(("iss", sign(&wrong_iss, Some("k1"))));
    let mut wrong_aud = claims();
    wrong_aud["aud"] = serde_json::json!("other");
    cases.push(("aud", sign(&wrong_aud, Some("k1"))));
    let mut admin = claims();
    admin["sub"] = serde_json::json!("admin");
    cases.push((
        "tampered",
        format!("{}.{}.{}", parts[0], b64(&admin), parts[2]),
    ));
    cases.push(("truncated", good[..good.len() - 10].to_string()));
    cases.push(("two parts", format!("{}.{}", parts[0], parts[1])));
    cases.push(("unknown kid", sign(&claims(), Some("k2"))));
    for (name, token) in cases {
        let (status, _) = check(&filter, &[("authorization", &bearer(&token))]).await;
        assert_eq!(status, Some(401), "{name} was not refused");
    }
    let (status, _) = check(&filter, &[("authorization", "Bearer ")]).await;
    assert_eq!(status, Some(401), "empty bearer");
    let (status, _) = check(
        &filter,
        &[
            ("authorization", &bearer(&good)),
            ("authorization", &bearer(&good)),
        ],
    )
    .await;
    assert_eq!(status, Some(401), "two Authorization headers");
}

#[tokio::test]
async fn required_claims_are_403_and_sources_are_configurable() {
    let filter = filter(serde_json::json!({
        "require": [{ "claim": "scope", "contains": "admin" }],
        "token_from": [{ "cookie": "session" }, { "query": "access_token" }],
    }));
    let token = sign(&claims(), Some("k1"));
    let (status, ctx) = check(&filter, &[("cookie", &format!("a=b; session={token}"))]).await;
    assert_eq!(status, Some(403));
    assert_eq!(ctx.auth_failure, Some(("jwt", "claims_not_allowed")));
    let mut admin = claims();
    admin["scope"] = serde_json::json!("read admin");
    let token = sign(&admin, Some("k1"));
    let (status, _) = check(&filter, &[("cookie", &format!("session={token}"))]).await;
    assert_eq!(status, None);
    // Header is not a source of this filter: a bearer token is ignored, not refused.
    let (status, ctx) = check(&filter, &[("authorization", &bearer(&token))]).await;
    assert_eq!(status, None);
    assert!(ctx.consumer.is_none());
}

#[test]
fn config_errors_are_reported() {
    let errors = Jwt::build(
        serde_json::from_value(serde_json::json!({
            "algorithms": ["RS999"],
            "keys": [{ "algorithm": "HS256" }],
            "leeway": "soon",
        }))
        .unwrap(),
        &BuildCtx::default(),
    )
    .err()
    .unwrap();
    let paths: Vec<_> = errors.iter().map(|error| error.path.as_str()).collect();
    assert!(paths.contains(&"algorithms[0]"), "{paths:?}");
    assert!(paths.contains(&"leeway"), "{paths:?}");
    assert!(paths.contains(&"keys[0]"), "{paths:?}");
}
