//! Consumers and their credentials, as authentication filters look them up: API keys by hash
//! (SHA-256, or HMAC-SHA-256 with a server secret), JWT identities by issuer and subject.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::Consumer;

/// How an API key is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyHashKind {
    Sha256,
    HmacSha256,
}

/// A stored API key credential.
#[derive(Clone, Debug)]
pub struct ApiKeyCredential {
    pub consumer: Consumer,
    pub hash: [u8; 32],
    pub disabled: bool,
    pub expires_at: Option<SystemTime>,
}

/// Why a presented API key was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRefusal {
    Unknown,
    Disabled,
    Expired,
}

#[derive(Debug, Default)]
pub struct ConsumerRegistry {
    sha256_keys: HashMap<[u8; 32], ApiKeyCredential>,
    hmac_keys: HashMap<[u8; 32], ApiKeyCredential>,
    hmac_secret: Option<Vec<u8>>,
    jwt_subjects: HashMap<(String, String), Consumer>,
    /// Client certificates (`mtls` credentials), by subject common name and by subject
    /// alternative name.
    mtls_subjects: HashMap<String, Consumer>,
    mtls_sans: HashMap<String, Consumer>,
    /// The consumer of requests that no filter identified, on routes with `auth: optional`.
    pub anonymous: Option<Consumer>,
}

/// Parse a stored hash: `sha256:<64 hex>` or `hmac-sha256:<64 hex>`.
pub fn parse_key_hash(text: &str) -> Result<(KeyHashKind, [u8; 32]), String> {
    let (kind, hex_digest) = match text.split_once(':') {
        Some(("sha256", digest)) => (KeyHashKind::Sha256, digest),
        Some(("hmac-sha256", digest)) => (KeyHashKind::HmacSha256, digest),
        _ => {
            return Err(
                "an API key hash looks like \"sha256:<64 hex digits>\" or \"hmac-sha256:<64 hex digits>\" (see `gatehouse keygen`)".into(),
            )
        }
    };
    let bytes = hex::decode(hex_digest).map_err(|_| "the digest is not hexadecimal".to_string())?;
    let digest: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "the digest must be 32 bytes (64 hex digits)".to_string())?;
    Ok((kind, digest))
}

pub fn sha256(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

pub fn hmac_sha256(secret: &[u8], key: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(key);
    mac.finalize().into_bytes().into()
}

impl ConsumerRegistry {
    pub fn new(hmac_secret: Option<Vec<u8>>) -> ConsumerRegistry {
        ConsumerRegistry {
            hmac_secret,
            ..Default::default()
        }
    }

    pub fn has_hmac_secret(&self) -> bool {
        self.hmac_secret.is_some()
    }

    /// Register an API key; false when the same hash is already registered.
    pub fn add_api_key(&mut self, kind: KeyHashKind, credential: ApiKeyCredential) -> bool {
        let map = match kind {
            KeyHashKind::Sha256 => &mut self.sha256_keys,
            KeyHashKind::HmacSha256 => &mut self.hmac_keys,
        };
        if map.contains_key(&credential.hash) {
            return false;
        }
        map.insert(credential.hash, credential);
        true
    }

    /// Register a JWT identity; false when (issuer, subject) is taken.
    pub fn add_jwt_subject(&mut self, issuer: &str, subject: &str, consumer: Consumer) -> bool {
        self.jwt_subjects
            .insert((issuer.to_string(), subject.to_string()), consumer)
            .is_none()
    }

    /// Register a client certificate identity (its subject common name, or one of its subject
    /// alternative names); false when it is taken.
    pub fn add_mtls(
        &mut self,
        subject: Option<&str>,
        san: Option<&str>,
        consumer: Consumer,
    ) -> bool {
        let (map, name) = match (subject, san) {
            (Some(subject), _) => (&mut self.mtls_subjects, subject),
            (None, Some(san)) => (&mut self.mtls_sans, san),
            (None, None) => return false,
        };
        map.insert(name.to_string(), consumer).is_none()
    }

    pub fn mtls_subject_consumer(&self, common_name: &str) -> Option<&Consumer> {
        self.mtls_subjects.get(common_name)
    }

    pub fn mtls_san_consumer(&self, name: &str) -> Option<&Consumer> {
        self.mtls_sans.get(name)
    }

    pub fn jwt_consumer(&self, issuer: &str, subject: &str) -> Option<&Consumer> {
        self.jwt_subjects
            .get(&(issuer.to_string(), subject.to_string()))
    }

    /// The consumer owning a presented API key. The stored digest is compared in constant time.
    pub fn api_key_consumer(&self, key: &[u8], now: SystemTime) -> Result<&Consumer, KeyRefusal> {
        let mut found = None;
        if !self.sha256_keys.is_empty() {
            let digest = sha256(key);
            if let Some(credential) = self.sha256_keys.get(&digest) {
                if bool::from(credential.hash.ct_eq(&digest)) {
                    found = Some(credential);
                }
            }
        }
        if found.is_none() {
            if let Some(secret) = &self.hmac_secret {
                let digest = hmac_sha256(secret, key);
                if let Some(credential) = self.hmac_keys.get(&digest) {
                    if bool::from(credential.hash.ct_eq(&digest)) {
                        found = Some(credential);
                    }
                }
            }
        }
        let credential = found.ok_or(KeyRefusal::Unknown)?;
        if credential.disabled {
            return Err(KeyRefusal::Disabled);
        }
        if credential.expires_at.is_some_and(|expires| expires <= now) {
            return Err(KeyRefusal::Expired);
        }
        Ok(&credential.consumer)
    }
}

/// Shared, for building filters.
pub type SharedRegistry = Arc<ConsumerRegistry>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn credential(
        hash: [u8; 32],
        disabled: bool,
        expires_at: Option<SystemTime>,
    ) -> ApiKeyCredential {
        ApiKeyCredential {
            consumer: Consumer::new("acme"),
            hash,
            disabled,
            expires_at,
        }
    }

    #[test]
    fn keys_are_found_by_hash_and_refused_when_disabled_or_expired() {
        let mut registry = ConsumerRegistry::new(Some(b"server-secret".to_vec()));
        registry.add_api_key(
            KeyHashKind::Sha256,
            credential(sha256(b"good"), false, None),
        );
        registry.add_api_key(
            KeyHashKind::HmacSha256,
            credential(hmac_sha256(b"server-secret", b"mac"), false, None),
        );
        registry.add_api_key(KeyHashKind::Sha256, credential(sha256(b"off"), true, None));
        let past = SystemTime::now() - Duration::from_secs(1);
        registry.add_api_key(
            KeyHashKind::Sha256,
            credential(sha256(b"old"), false, Some(past)),
        );
        let now = SystemTime::now();
        assert_eq!(
            &*registry.api_key_consumer(b"good", now).unwrap().id,
            "acme"
        );
        assert_eq!(&*registry.api_key_consumer(b"mac", now).unwrap().id, "acme");
        assert_eq!(
            registry.api_key_consumer(b"nope", now).unwrap_err(),
            KeyRefusal::Unknown
        );
        assert_eq!(
            registry.api_key_consumer(b"off", now).unwrap_err(),
            KeyRefusal::Disabled
        );
        assert_eq!(
            registry.api_key_consumer(b"old", now).unwrap_err(),
            KeyRefusal::Expired
        );
    }

    #[test]
    fn hashes_parse_only_in_known_forms() {
        let digest = hex::encode(sha256(b"x"));
        assert_eq!(
            parse_key_hash(&format!("sha256:{digest}")).unwrap().0,
            KeyHashKind::Sha256
        );
        assert_eq!(
            parse_key_hash(&format!("hmac-sha256:{digest}")).unwrap().0,
            KeyHashKind::HmacSha256
        );
        assert!(parse_key_hash("md5:abcd").is_err());
        assert!(parse_key_hash("sha256:abcd").is_err());
        assert!(parse_key_hash("plaintext-key").is_err());
    }
}
