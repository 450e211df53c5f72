//! How the identity provider's own tests talk to it: as a client would, over HTTP, with the
//! harness's raw client, and checking tokens against the published JWKS.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::Value;

pub(super) use super::super::{request, Reply};
use super::IdentityProvider;

pub(super) fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}

pub(super) fn client_basic() -> String {
    basic(IdentityProvider::CLIENT_ID, IdentityProvider::CLIENT_SECRET)
}

pub(super) fn form_post(
    idp: &IdentityProvider,
    path: &str,
    authorization: &str,
    body: &str,
) -> Reply {
    let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
    if !authorization.is_empty() {
        headers.push(("Authorization", authorization));
    }
    request(idp.addr, "POST", path, &headers, body.as_bytes())
}

pub(super) fn fetch_jwks(idp: &IdentityProvider) -> JwkSet {
    let reply = request(idp.addr, "GET", "/.well-known/jwks.json", &[], b"");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("cache-control"), Some("max-age=300"));
    serde_json::from_slice(&reply.body).expect("JWKS parses as a JwkSet")
}

/// Verifies `token` with the JWK its header names and returns its claims.
pub(super) fn verify(jwks: &JwkSet, token: &str, issuer: &str, audience: &str) -> Value {
    let header = jsonwebtoken::decode_header(token).unwrap();
    let kid = header.kid.expect("token has a kid");
    let jwk = jwks
        .find(&kid)
        .unwrap_or_else(|| panic!("kid {kid} not in the JWKS"));
    let key = DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[issuer]);
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .unwrap_or_else(|error| panic!("{kid}: {error}"))
        .claims
}
