//! The identity provider's signing keys: the PEM fixtures in `tests/support/keys/`, signing
//! with them, which RSA key is current, and the JWKS that publishes them. The JWKs are derived
//! from the public key files at start-up, so a fixture can be replaced without touching this
//! file.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pkcs1::der::Decode;
use pkcs1::RsaPublicKeyRef;
use serde_json::{json, Value};
use spki::der::DecodePem;
use spki::{AsAlgorithmIdentifierRef, ObjectIdentifier, SubjectPublicKeyInfoOwned};

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
                .map(|fixture| (fixture.kid, public_jwk(fixture)))
                .collect(),
            other_jwks: [&EC256, &EC384, &ED25519].map(public_jwk).to_vec(),
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

/// `id-ecPublicKey` (RFC 5480); its parameter names the curve.
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
/// `id-Ed25519` (RFC 8410).
const ED25519_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

/// The JWK of a fixture's public key, its type and curve read from the key file itself.
fn public_jwk(fixture: &Fixture) -> Value {
    let kid = fixture.kid;
    let info = SubjectPublicKeyInfoOwned::from_pem(fixture.public_pem)
        .unwrap_or_else(|error| panic!("{kid}: not a PEM public key: {error}"));
    let key = info
        .subject_public_key
        .as_bytes()
        .unwrap_or_else(|| panic!("{kid}: the public key is not whole bytes"));
    let algorithm = info
        .algorithm
        .as_algo_ref()
        .oids()
        .unwrap_or_else(|error| panic!("{kid}: key algorithm: {error}"));
    let mut jwk = match algorithm {
        (pkcs1::ALGORITHM_OID, None) => {
            let rsa = RsaPublicKeyRef::from_der(key)
                .unwrap_or_else(|error| panic!("{kid}: RSA public key: {error}"));
            json!({
                "kty": "RSA",
                "alg": "RS256",
                "n": URL_SAFE_NO_PAD.encode(rsa.modulus.as_bytes()),
                "e": URL_SAFE_NO_PAD.encode(rsa.public_exponent.as_bytes()),
            })
        }
        (EC_PUBLIC_KEY, Some(curve_oid)) => {
            let (curve, alg, coordinate_len) = match curve_oid {
                P256 => ("P-256", "ES256", 32),
                P384 => ("P-384", "ES384", 48),
                other => panic!("{kid}: unknown curve {other}"),
            };
            // An uncompressed point: 0x04 || x || y.
            let coordinates = key
                .strip_prefix(&[0x04])
                .filter(|coordinates| coordinates.len() == 2 * coordinate_len)
                .unwrap_or_else(|| panic!("{kid}: not an uncompressed {curve} point"));
            let (x, y) = coordinates.split_at(coordinate_len);
            json!({
                "kty": "EC",
                "alg": alg,
                "crv": curve,
                "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y),
            })
        }
        (ED25519_KEY, None) => json!({
            "kty": "OKP",
            "alg": "EdDSA",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(key),
        }),
        (oid, _) => panic!("{kid}: unknown key algorithm {oid}"),
    };
    jwk["kid"] = json!(kid);
    jwk["use"] = json!("sig");
    jwk
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
