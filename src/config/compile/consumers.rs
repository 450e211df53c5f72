//! Consumers and identity: the consumer registry with every credential checked, and the headers
//! that tell the upstream who called.

use std::collections::HashMap;

use gatehouse_filters::consumers::{parse_key_hash, ApiKeyCredential, ConsumerRegistry};
use gatehouse_filters::Consumer;

use super::super::error::ConfigError;
use super::super::model::{Config, CredentialConfig};
use super::super::snapshot::IdentityHeaders;

/// The consumer registry, with every credential checked.
pub(super) fn build(config: &Config, errors: &mut Vec<ConfigError>) -> ConsumerRegistry {
    let secret = config
        .auth
        .api_key_secret
        .as_ref()
        .map(|secret| secret.as_bytes().to_vec());
    if secret.as_ref().is_some_and(|secret| secret.len() < 16) {
        errors.push(ConfigError::new(
            "auth.api_key_secret",
            "use at least 16 bytes",
        ));
    }
    let mut registry = ConsumerRegistry::new(secret);
    let mut ids = HashMap::new();
    let mut consumers = HashMap::new();
    for (index, consumer) in config.consumers.iter().enumerate() {
        let path = format!("consumers[{index}]");
        if consumer.id.is_empty() {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                "a consumer needs an id",
            ));
        }
        if let Some(previous) = ids.insert(consumer.id.as_str(), index) {
            errors.push(ConfigError::new(
                format!("{path}.id"),
                format!(
                    "duplicate consumer id \"{}\" (also consumers[{previous}])",
                    consumer.id
                ),
            ));
        }
        let built = Consumer {
            id: consumer.id.as_str().into(),
            username: consumer.username.as_deref().map(Into::into),
            tags: consumer.tags.clone().into(),
        };
        consumers.insert(consumer.id.as_str(), built.clone());
        for (credential_index, credential) in consumer.credentials.iter().enumerate() {
            let path = format!("{path}.credentials[{credential_index}]");
            match credential {
                CredentialConfig::ApiKey {
                    hash,
                    disabled,
                    expires_at,
                } => {
                    let expires_at = match expires_at {
                        Some(text) => match humantime::parse_rfc3339_weak(text) {
                            Ok(time) => Some(time),
                            Err(_) => {
                                errors.push(ConfigError::new(format!("{path}.expires_at"), format!("\"{text}\" is not an RFC 3339 time like 2027-01-31T00:00:00Z")));
                                None
                            }
                        },
                        None => None,
                    };
                    match parse_key_hash(hash) {
                        Ok((kind, digest)) => {
                            if kind == gatehouse_filters::consumers::KeyHashKind::HmacSha256
                                && !registry.has_hmac_secret()
                            {
                                errors.push(ConfigError::new(
                                    format!("{path}.hash"),
                                    "an hmac-sha256 hash needs `auth.api_key_secret`",
                                ));
                            }
                            let added = registry.add_api_key(
                                kind,
                                ApiKeyCredential {
                                    consumer: built.clone(),
                                    hash: digest,
                                    disabled: *disabled,
                                    expires_at,
                                },
                            );
                            if !added {
                                errors.push(ConfigError::new(
                                    format!("{path}.hash"),
                                    "this key is already registered",
                                ));
                            }
                        }
                        Err(message) => {
                            errors.push(ConfigError::new(format!("{path}.hash"), message))
                        }
                    }
                }
                CredentialConfig::Mtls { subject, san } => {
                    if subject.is_some() == san.is_some() {
                        errors.push(ConfigError::new(
                            path,
                            "an mtls credential names the certificate's `subject` (common name) or one `san`, not both",
                        ));
                    } else if !registry.add_mtls(subject.as_deref(), san.as_deref(), built.clone())
                    {
                        errors.push(ConfigError::new(
                            path,
                            "this certificate name already belongs to another consumer",
                        ));
                    }
                }
                CredentialConfig::Jwt { issuer, subject } => {
                    if !registry.add_jwt_subject(issuer, subject, built.clone()) {
                        errors.push(ConfigError::new(
                            path,
                            "issuer and subject already belong to another consumer",
                        ));
                    }
                }
            }
        }
    }
    if let Some(anonymous) = &config.auth.anonymous {
        match consumers.get(anonymous.as_str()) {
            Some(consumer) => registry.anonymous = Some(consumer.clone()),
            None => errors.push(ConfigError::new(
                "auth.anonymous",
                format!("no consumer with id \"{anonymous}\""),
            )),
        }
    }
    registry
}

/// The identity headers of `auth.upstream_headers`.
pub(super) fn identity_headers(config: &Config, errors: &mut Vec<ConfigError>) -> IdentityHeaders {
    let headers = &config.auth.upstream_headers;
    IdentityHeaders {
        consumer_id: identity_header(
            "auth.upstream_headers.consumer_id",
            &headers.consumer_id,
            errors,
        ),
        consumer_username: identity_header(
            "auth.upstream_headers.consumer_username",
            &headers.consumer_username,
            errors,
        ),
        subject: identity_header("auth.upstream_headers.subject", &headers.subject, errors),
    }
}

fn identity_header(
    path: &str,
    name: &Option<String>,
    errors: &mut Vec<ConfigError>,
) -> Option<http::HeaderName> {
    let name = name.as_ref().filter(|name| !name.is_empty())?;
    match http::HeaderName::from_bytes(name.as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            errors.push(ConfigError::new(
                path,
                format!("\"{name}\" is not a valid header name"),
            ));
            None
        }
    }
}
