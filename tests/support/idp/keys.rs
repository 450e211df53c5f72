//! The identity provider's signing keys: the PEM fixtures in `tests/support/keys/`, signing
//! with them, which RSA key is current, and the JWKS that publishes them. The JWKs are derived
//! from the public key files at start-up, so a fixture can be replaced without touching this
//! file.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use super::lock;

/// One key pair from `tests/support/keys/`.
struct Fixture {
    kid: &'static str,
    private_pem: &'static str,
    public_pem: &'static str,
}

const RSA1: Fixture = Fixture {
    kid: "rsa1",
    private_pem: include_str!("../keys/rsa1.key"),
    public_pem: include_str!("../keys/rsa1.pub"),
};
const RSA2: Fixture = Fixture {
    kid: "rsa2",
    private_pem: include_str!("../keys/rsa2.key"),
    public_pem: include_str!("../keys/rsa2.pub"),
};
const EC256: Fixture = Fixture {
    kid: "ec256",
    private_pem: include_str!("../keys/ec256.key"),
    public_pem: include_str!("../keys/ec256.pub"),
};
const EC384: Fixture = Fixture {
    kid: "ec384",
    private_pem: include_str!("../keys/ec384.key"),
    public_pem: include_str!("../keys/ec384.pub"),
};
const ED25519: Fixture = Fixture {
    kid: "ed25519",
    private_pem: include_str!("../keys/ed25519.key"),
    public_pem: include_str!("../keys/ed25519.pub"),
};

/// The keys a provider signs with and publishes.
pub(super) struct Keys {
    /// JWKs of the RSA fixtures by kid; rotation changes which of them are published.
    rsa_jwks: HashMap<&'static str, Value>,
    /// JWKs of the other fixtures, always published.
    other_jwks: Vec<Value>,
    rotation: Mutex<Rotation>,
}

struct Rotation {
    /// The RSA key [`Keys::sign`] uses.
    signing: &'static Fixture,
    /// The RSA keys the JWKS publishes, in order.
    published: Vec<&'static Fixture>,
}

impl Keys {
    pub(super) fn from_fixtures() -> Keys {
        Keys {
            rsa_jwks: [&RSA1, &RSA2]
                .into_iter()
                .map(|fixture| (fixture.kid, rsa_jwk(fixture)))
                .collect(),
            other_jwks: vec![
                ec_jwk(&EC256, "P-256", "ES256", 32),
                ec_jwk(&EC384, "P-384", "ES384", 48),
                okp_jwk(&ED25519),
            ],
            rotation: Mutex::new(Rotation {
                signing: &RSA1,
                published: vec![&RSA1],
            }),
        }
    }

    /// Signs with RS256 and the current RSA key, whose kid goes into the header.
    pub(super) fn sign(&self, claims: &Value) -> String {
        let fixture = self.rotation().signing;
        let key = EncodingKey::from_rsa_pem(fixture.private_pem.as_bytes()).unwrap();
        encode(Algorithm::RS256, fixture.kid, &key, claims)
    }

    /// Signs with `rsa2` from now on and publishes it; `drop_old` also withdraws `rsa1`.
    pub(super) fn rotate(&self, drop_old: bool) {
        let mut rotation = self.rotation();
        rotation.signing = &RSA2;
        rotation.published = if drop_old {
            vec![&RSA2]
        } else {
            vec![&RSA1, &RSA2]
        };
    }

    /// The JWKS document: the published RSA keys, then the others.
    pub(super) fn jwks(&self) -> Value {
        let rotation = self.rotation();
        let mut keys: Vec<Value> = rotation
            .published
            .iter()
            .map(|fixture| self.rsa_jwks[fixture.kid].clone())
            .collect();
        keys.extend(self.other_jwks.iter().cloned());
        json!({ "keys": keys })
    }

    fn rotation(&self) -> MutexGuard<'_, Rotation> {
        lock(&self.rotation)
    }
}

/// See [`super::IdentityProvider::sign_with`].
pub(super) fn sign_with(alg: &str, kid: &str, claims: &Value) -> String {
    let algorithm: Algorithm = alg
        .parse()
        .unwrap_or_else(|_| panic!("unknown JWT algorithm {alg:?}"));
    let (header_kid, key) = match algorithm {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            let key = EncodingKey::from_secret(kid.as_bytes())
                .unwrap_or_else(|error| panic!("HMAC secret {kid:?}: {error}"));
            ("hmac", key)
        }
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => {
            let fixture = match kid {
                "rsa1" => &RSA1,
                "rsa2" => &RSA2,
                _ => panic!("{alg} needs kid rsa1 or rsa2, not {kid:?}"),
            };
            (
                fixture.kid,
                EncodingKey::from_rsa_pem(fixture.private_pem.as_bytes()).unwrap(),
            )
        }
        Algorithm::ES256 | Algorithm::ES384 => {
            let fixture = match (algorithm, kid) {
                (Algorithm::ES256, "ec256") => &EC256,
                (Algorithm::ES384, "ec384") => &EC384,
                _ => panic!("{alg} does not go with kid {kid:?}"),
            };
            (
                fixture.kid,
                EncodingKey::from_ec_pem(fixture.private_pem.as_bytes()).unwrap(),
            )
        }
        Algorithm::EdDSA => {
            assert_eq!(kid, ED25519.kid, "EdDSA needs kid ed25519");
            (
                ED25519.kid,
                EncodingKey::from_ed_pem(ED25519.private_pem.as_bytes()).unwrap(),
            )
        }
        _ => panic!("unsupported JWT algorithm {alg}"),
    };
    encode(algorithm, header_kid, &key, claims)
}

fn encode(algorithm: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(algorithm);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, key).expect("sign JWT")
}

// JWKs from the public key fixtures.

fn rsa_jwk(fixture: &Fixture) -> Value {
    // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
    let key = spki_public_key(fixture.public_pem);
    let (tag, fields, _) = der_element(&key);
    assert_eq!(tag, 0x30, "{}: RSAPublicKey is not a SEQUENCE", fixture.kid);
    let (tag, modulus, rest) = der_element(fields);
    assert_eq!(tag, 0x02, "{}: modulus is not an INTEGER", fixture.kid);
    let (tag, exponent, _) = der_element(rest);
    assert_eq!(tag, 0x02, "{}: exponent is not an INTEGER", fixture.kid);
    json!({
        "kty": "RSA",
        "kid": fixture.kid,
        "use": "sig",
        "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(unsigned(modulus)),
        "e": URL_SAFE_NO_PAD.encode(unsigned(exponent)),
    })
}

fn ec_jwk(fixture: &Fixture, curve: &str, alg: &str, coordinate_len: usize) -> Value {
    // An uncompressed point: 0x04 || x || y.
    let point = spki_public_key(fixture.public_pem);
    assert!(
        point.len() == 1 + 2 * coordinate_len && point[0] == 0x04,
        "{}: not an uncompressed {curve} point",
        fixture.kid
    );
    let (x, y) = point[1..].split_at(coordinate_len);
    json!({
        "kty": "EC",
        "kid": fixture.kid,
        "use": "sig",
        "alg": alg,
        "crv": curve,
        "x": URL_SAFE_NO_PAD.encode(x),
        "y": URL_SAFE_NO_PAD.encode(y),
    })
}

fn okp_jwk(fixture: &Fixture) -> Value {
    let x = spki_public_key(fixture.public_pem);
    assert_eq!(x.len(), 32, "{}: not an Ed25519 public key", fixture.kid);
    json!({
        "kty": "OKP",
        "kid": fixture.kid,
        "use": "sig",
        "alg": "EdDSA",
        "crv": "Ed25519",
        "x": URL_SAFE_NO_PAD.encode(x),
    })
}

/// The key bytes of a PEM `PUBLIC KEY`: `SubjectPublicKeyInfo ::= SEQUENCE { algorithm
/// AlgorithmIdentifier, subjectPublicKey BIT STRING }`.
fn spki_public_key(pem: &str) -> Vec<u8> {
    let base64: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .map(str::trim)
        .collect();
    let der = STANDARD.decode(base64).expect("PEM body is base64");
    let (tag, info, _) = der_element(&der);
    assert_eq!(tag, 0x30, "SubjectPublicKeyInfo is not a SEQUENCE");
    let (_, _, rest) = der_element(info);
    let (tag, bits, _) = der_element(rest);
    assert_eq!(tag, 0x03, "subjectPublicKey is not a BIT STRING");
    assert_eq!(bits.first(), Some(&0), "subjectPublicKey has unused bits");
    bits[1..].to_vec()
}

/// Splits one DER element off `input`: (tag, contents, what follows).
fn der_element(input: &[u8]) -> (u8, &[u8], &[u8]) {
    assert!(input.len() >= 2, "truncated DER");
    let tag = input[0];
    let (length, header_len) = match input[1] {
        short if short < 0x80 => (usize::from(short), 2),
        long => {
            let count = usize::from(long & 0x7f);
            assert!(
                (1..=4).contains(&count) && input.len() >= 2 + count,
                "bad DER length"
            );
            let length = input[2..2 + count]
                .iter()
                .fold(0usize, |length, byte| (length << 8) | usize::from(*byte));
            (length, 2 + count)
        }
    };
    assert!(input.len() >= header_len + length, "truncated DER");
    let (contents, rest) = input[header_len..].split_at(length);
    (tag, contents, rest)
}

/// A DER INTEGER's magnitude without its sign-padding zero bytes.
fn unsigned(integer: &[u8]) -> &[u8] {
    let start = integer
        .iter()
        .position(|byte| *byte != 0)
        .unwrap_or(integer.len().saturating_sub(1));
    &integer[start..]
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    use serde_json::Value;

    use super::super::client::{fetch_jwks, verify};
    use super::super::IdentityProvider;

    fn kids(jwks: &JwkSet) -> Vec<String> {
        jwks.keys
            .iter()
            .filter_map(|jwk| jwk.common.key_id.clone())
            .collect()
    }

    #[test]
    fn idp_jwks_verifies_signed_tokens() {
        let idp = IdentityProvider::start();
        let token = idp.sign(idp.claims("alice", "orders"));
        let jwks = fetch_jwks(&idp);
        assert_eq!(idp.jwks_fetches(), 1);
        assert_eq!(kids(&jwks), ["rsa1", "ec256", "ec384", "ed25519"]);
        let claims = verify(&jwks, &token, &idp.issuer(), "orders");
        assert_eq!(claims["sub"], "alice");
        for (alg, kid) in [
            ("RS384", "rsa1"),
            ("PS256", "rsa1"),
            ("PS512", "rsa1"),
            ("ES256", "ec256"),
            ("ES384", "ec384"),
            ("EdDSA", "ed25519"),
        ] {
            let token = idp.sign_with(alg, kid, idp.claims("bob", "orders"));
            let claims = verify(&jwks, &token, &idp.issuer(), "orders");
            assert_eq!(claims["sub"], "bob", "{alg}");
        }
        let token = idp.sign_with("HS256", "shared-secret", idp.claims("carol", "orders"));
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some("hmac"));
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&["orders"]);
        let key = DecodingKey::from_secret(b"shared-secret").unwrap();
        jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap();
    }

    #[test]
    fn idp_rotation_changes_kid_and_jwks() {
        let idp = IdentityProvider::start();
        let kid_of = |token: &str| jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
        assert_eq!(kid_of(&idp.sign(idp.claims("a", "b"))), "rsa1");
        idp.rotate(false);
        let token = idp.sign(idp.claims("a", "b"));
        assert_eq!(kid_of(&token), "rsa2");
        let jwks = fetch_jwks(&idp);
        assert!(kids(&jwks).starts_with(&["rsa1".to_string(), "rsa2".to_string()]));
        verify(&jwks, &token, &idp.issuer(), "b");
        idp.rotate(true);
        let jwks = fetch_jwks(&idp);
        assert!(jwks.find("rsa1").is_none());
        verify(&jwks, &token, &idp.issuer(), "b");
        assert_eq!(idp.jwks_fetches(), 2);
    }
}
