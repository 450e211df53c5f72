//! Bucket names. A bucket is named by the SHA-256 of its key material: the route and policy the
//! bucket belongs to, then each key part of the request, length-prefixed. A client controls
//! some parts (a header, a claim); with a cryptographic hash it cannot choose a value whose
//! bucket is another client's, locally or in Redis, where the same name is the key.

use http::{HeaderName, HeaderValue};
use pingora_http::RequestHeader;
use sha2::{Digest, Sha256};

use super::config::KeyPart;
use crate::{BuildError, RequestContext};

/// One part of a policy's key, compiled.
#[derive(Clone, Debug)]
pub(super) enum Part {
    Consumer,
    ClientIp,
    Route,
    Header(HeaderName),
    Claim(String),
}

impl Part {
    pub(super) fn compile(
        part: &KeyPart,
        path: &str,
        errors: &mut Vec<BuildError>,
    ) -> Option<Part> {
        match part {
            KeyPart::Named(name) => match name.as_str() {
                "consumer" => Some(Part::Consumer),
                "client_ip" => Some(Part::ClientIp),
                "route" => Some(Part::Route),
                other => {
                    errors.push(BuildError::new(
                        path,
                        format!("unknown key part \"{other}\" (consumer, client_ip, route, {{header: NAME}}, {{claim: NAME}})"),
                    ));
                    None
                }
            },
            KeyPart::Header { header } => match HeaderName::from_bytes(header.as_bytes()) {
                Ok(name) => Some(Part::Header(name)),
                Err(_) => {
                    errors.push(BuildError::new(
                        path,
                        format!("\"{header}\" is not a valid header name"),
                    ));
                    None
                }
            },
            KeyPart::Claim { claim } => Some(Part::Claim(claim.clone())),
        }
    }
}

/// The name of one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct BucketKey(pub(super) [u8; 32]);

impl BucketKey {
    /// Which of `shards` holds the bucket (the digest is uniform, so any byte spreads evenly).
    pub(super) fn shard(&self, shards: usize) -> usize {
        usize::from(u16::from_le_bytes([self.0[0], self.0[1]])) % shards
    }

    /// The bucket's Redis key. The hash tag (in braces) keeps each bucket on one Redis Cluster
    /// slot; the names after it are for people reading Redis, not part of the identity.
    pub(super) fn redis_key(&self, scope: &str) -> String {
        let mut key = String::with_capacity(24 + 64 + scope.len());
        key.push_str("gatehouse:ratelimit:{");
        for byte in self.0 {
            key.push(char::from(HEX[usize::from(byte >> 4)]));
            key.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        key.push_str("}:");
        key.push_str(scope);
        key
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Builds the bucket names of one policy.
pub(super) struct Namer {
    /// The hash state after the policy's own scope (route and policy name), cloned per request.
    scope: Sha256,
    parts: Vec<Part>,
}

fn absorb(hasher: &mut Sha256, value: &[u8]) {
    hasher.update((value.len() as u64).to_le_bytes());
    hasher.update(value);
}

impl Namer {
    pub(super) fn new(route: &str, policy: &str, parts: Vec<Part>) -> Namer {
        let mut scope = Sha256::new();
        absorb(&mut scope, b"gatehouse rate limit v2");
        absorb(&mut scope, route.as_bytes());
        absorb(&mut scope, policy.as_bytes());
        Namer { scope, parts }
    }

    /// The bucket of this request. A part the request lacks counts as empty.
    pub(super) fn key(&self, request: &RequestHeader, ctx: &RequestContext) -> BucketKey {
        let mut hasher = self.scope.clone();
        for part in &self.parts {
            match part {
                Part::Consumer => absorb(
                    &mut hasher,
                    ctx.consumer
                        .as_ref()
                        .map_or(&b""[..], |consumer| consumer.id.as_bytes()),
                ),
                Part::ClientIp => match ctx.client_addr {
                    Some(std::net::IpAddr::V4(address)) => absorb(&mut hasher, &address.octets()),
                    Some(std::net::IpAddr::V6(address)) => absorb(&mut hasher, &address.octets()),
                    None => absorb(&mut hasher, b""),
                },
                Part::Route => absorb(&mut hasher, ctx.route.as_deref().unwrap_or("").as_bytes()),
                Part::Header(name) => absorb(
                    &mut hasher,
                    request
                        .headers
                        .get(name)
                        .map_or(&b""[..], HeaderValue::as_bytes),
                ),
                Part::Claim(claim) => {
                    match ctx.claims.as_ref().and_then(|claims| claims.get(claim)) {
                        // A string claim by its text, anything else by its JSON; a tag byte
                        // keeps the string "1" apart from the number 1.
                        Some(serde_json::Value::String(text)) => {
                            hasher.update([1]);
                            absorb(&mut hasher, text.as_bytes());
                        }
                        Some(other) => {
                            hasher.update([2]);
                            absorb(&mut hasher, other.to_string().as_bytes());
                        }
                        None => {
                            hasher.update([0]);
                            absorb(&mut hasher, b"");
                        }
                    }
                }
            }
        }
        BucketKey(hasher.finalize().into())
    }
}
