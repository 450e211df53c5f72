//! Bucket names. A bucket's key material is the route and policy it belongs to, then each key
//! part of the request, length-prefixed. A client controls some parts (a header, a claim), so a
//! name must be a hash it cannot steer: in this process a keyed hash (cheap, on every request),
//! and in Redis, where every node must agree, SHA-256.

use std::collections::hash_map::{DefaultHasher, RandomState};
use std::hash::{BuildHasher, Hasher};

use http::{HeaderName, HeaderValue};
use once_cell::sync::Lazy;
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

/// A bucket's name in this process: the SipHash of its key material under a key drawn at random
/// when the process starts. Nothing outside the process can compute one, so no client can
/// choose a value that names another client's bucket (finding one blindly takes about 2^64
/// tries), and the odds of two of a policy's buckets meeting by chance are about n²/2^65.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct BucketKey(u64);

impl BucketKey {
    /// Which of `shards` holds the bucket.
    pub(super) fn shard(&self, shards: usize) -> usize {
        (self.0 as usize) % shards
    }
}

/// A bucket's names: here, and (for a `redis` policy) in Redis.
pub(super) struct Names {
    pub(super) local: BucketKey,
    /// `gatehouse:ratelimit:{<SHA-256 of the key material>}:<route>:<policy>`. Every node must
    /// compute the same name, so it cannot be keyed: it is a cryptographic hash. The hash tag
    /// (in braces) keeps each bucket on one Redis Cluster slot; the names after it are for people
    /// reading Redis, not part of the identity.
    pub(super) remote: Option<String>,
}

/// The process's SipHash key.
static KEY: Lazy<RandomState> = Lazy::new(RandomState::new);

/// Builds the bucket names of one policy.
pub(super) struct Namer {
    /// The hash states after the policy's own scope (route and policy name), cloned per request.
    local: DefaultHasher,
    remote: Option<Sha256>,
    /// `route:policy`, the readable end of Redis keys.
    readable: String,
    parts: Vec<Part>,
}

/// Feeds one length-prefixed value to every hash of a name.
struct Hashes {
    local: DefaultHasher,
    remote: Option<Sha256>,
}

impl Hashes {
    fn absorb(&mut self, value: &[u8]) {
        let length = (value.len() as u64).to_le_bytes();
        self.local.write(&length);
        self.local.write(value);
        if let Some(remote) = &mut self.remote {
            remote.update(length);
            remote.update(value);
        }
    }

    fn tag(&mut self, tag: u8) {
        self.local.write_u8(tag);
        if let Some(remote) = &mut self.remote {
            remote.update([tag]);
        }
    }
}

impl Namer {
    /// `remote`: the policy keeps its buckets in Redis too.
    pub(super) fn new(route: &str, policy: &str, parts: Vec<Part>, remote: bool) -> Namer {
        let mut scope = Hashes {
            local: KEY.build_hasher(),
            remote: remote.then(Sha256::new),
        };
        scope.absorb(b"gatehouse rate limit v2");
        scope.absorb(route.as_bytes());
        scope.absorb(policy.as_bytes());
        Namer {
            local: scope.local,
            remote: scope.remote,
            readable: format!("{route}:{policy}"),
            parts,
        }
    }

    /// The names of this request's bucket. A part the request lacks counts as empty.
    pub(super) fn names(&self, request: &RequestHeader, ctx: &RequestContext) -> Names {
        let mut hashes = Hashes {
            local: self.local.clone(),
            remote: self.remote.clone(),
        };
        for part in &self.parts {
            match part {
                Part::Consumer => hashes.absorb(
                    ctx.consumer
                        .as_ref()
                        .map_or(&b""[..], |consumer| consumer.id.as_bytes()),
                ),
                Part::ClientIp => match ctx.client_addr {
                    Some(std::net::IpAddr::V4(address)) => hashes.absorb(&address.octets()),
                    Some(std::net::IpAddr::V6(address)) => hashes.absorb(&address.octets()),
                    None => hashes.absorb(b""),
                },
                Part::Route => hashes.absorb(ctx.route.as_deref().unwrap_or("").as_bytes()),
                Part::Header(name) => hashes.absorb(
                    request
                        .headers
                        .get(name)
                        .map_or(&b""[..], HeaderValue::as_bytes),
                ),
                // A string claim by its text, anything else by its JSON; a tag keeps the string
                // "1" apart from the number 1, and both apart from no claim.
                Part::Claim(claim) => {
                    match ctx.claims.as_ref().and_then(|claims| claims.get(claim)) {
                        Some(serde_json::Value::String(text)) => {
                            hashes.tag(1);
                            hashes.absorb(text.as_bytes());
                        }
                        Some(other) => {
                            hashes.tag(2);
                            hashes.absorb(other.to_string().as_bytes());
                        }
                        None => {
                            hashes.tag(0);
                            hashes.absorb(b"");
                        }
                    }
                }
            }
        }
        Names {
            local: BucketKey(hashes.local.finish()),
            remote: hashes
                .remote
                .map(|remote| self.redis_key(remote.finalize().into())),
        }
    }

    fn redis_key(&self, digest: [u8; 32]) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut key = String::with_capacity(24 + 64 + self.readable.len());
        key.push_str("gatehouse:ratelimit:{");
        for byte in digest {
            key.push(char::from(HEX[usize::from(byte >> 4)]));
            key.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        key.push_str("}:");
        key.push_str(&self.readable);
        key
    }
}
