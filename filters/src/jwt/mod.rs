//! `jwt`: verify a JSON Web Token from a header, cookie or query parameter, with keys given
//! inline (secret or PEM) or fetched from a JWKS URL. The algorithms are pinned in config: the
//! token's header never chooses one. `exp` is required, `nbf`, `iss` and `aud` are checked, and
//! per-route claim requirements answer 403. Verified tokens are cached (by the token itself) until
//! they expire.

pub mod jwks;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pingora_http::RequestHeader;
use serde::Deserialize;

use crate::consumers::ConsumerRegistry;
use crate::util::{cookie, duration, now_seconds};
use crate::{
    BuildCtx, BuildError, Consumer, Decision, Filter, FilterKind, Phases, Problem, RequestContext,
};
use jwks::{Jwks, JwksSettings, KeyEntry};

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StaticKey {
    /// Matched against the token's `kid`; a key without one matches tokens without one.
    #[serde(default)]
    pub kid: Option<String>,
    pub algorithm: String,
    /// HMAC secret (HS256/384/512). Use `${env:NAME}` or `${file:/path}`.
    #[serde(default)]
    pub secret: Option<String>,
    /// PEM public key (RS*, PS*, ES*, EdDSA), inline or as `${file:/path}`.
    #[serde(default)]
    pub public_key: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum TokenSource {
    Header {
        header: String,
        #[serde(default)]
        scheme: Option<String>,
    },
    Cookie {
        cookie: String,
    },
    Query {
        query: String,
    },
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequirement {
    pub claim: String,
    /// The claim equals this value.
    #[serde(default)]
    pub equals: Option<serde_json::Value>,
    /// The claim (a space-separated string such as `scope`, or an array) contains this item.
    #[serde(default)]
    pub contains: Option<String>,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSubjects {
    /// A subject with no configured consumer becomes a consumer named after it.
    #[default]
    Allow,
    /// Only subjects of configured consumers are accepted.
    Reject,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Expected `iss`; also the issuer consumers' `jwt` credentials are matched with.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Where to fetch the key set.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Keys given in config.
    #[serde(default)]
    pub keys: Vec<StaticKey>,
    /// The algorithms accepted: HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA.
    pub algorithms: Vec<String>,
    /// Accepted `aud` values (any one must be present) when given.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Clock skew allowed for `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway: String,
    /// Where the token comes from, in order. Default: `Authorization: Bearer`.
    #[serde(default)]
    pub token_from: Vec<TokenSource>,
    /// Claims the route requires (403 when not met).
    #[serde(default)]
    pub require: Vec<ClaimRequirement>,
    /// The claim that names the caller.
    #[serde(default = "default_consumer_claim")]
    pub consumer_claim: String,
    #[serde(default)]
    pub unknown_subjects: UnknownSubjects,
    /// Verified tokens kept in memory.
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
    /// How often the key set is fetched again.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh: String,
    /// Deadline of one key-set fetch.
    #[serde(default = "default_jwks_timeout")]
    pub jwks_timeout: String,
    /// Least time between two fetches caused by unknown `kid`s.
    #[serde(default = "default_jwks_min_refresh")]
    pub jwks_min_refresh_interval: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            issuer: None,
            jwks_url: None,
            keys: Vec::new(),
            algorithms: Vec::new(),
            audiences: Vec::new(),
            leeway: default_leeway(),
            token_from: Vec::new(),
            require: Vec::new(),
            consumer_claim: default_consumer_claim(),
            unknown_subjects: UnknownSubjects::Allow,
            cache_size: default_cache_size(),
            jwks_refresh: default_jwks_refresh(),
            jwks_timeout: default_jwks_timeout(),
            jwks_min_refresh_interval: default_jwks_min_refresh(),
        }
    }
}

fn default_leeway() -> String {
    "30s".into()
}
fn default_consumer_claim() -> String {
    "sub".into()
}
fn default_cache_size() -> usize {
    10_000
}
fn default_jwks_refresh() -> String {
    "5m".into()
}
fn default_jwks_timeout() -> String {
    "2s".into()
}
fn default_jwks_min_refresh() -> String {
    "10s".into()
}

enum Source {
    Header {
        name: http::HeaderName,
        scheme: Option<String>,
    },
    Cookie(String),
    Query(String),
}

#[derive(Clone)]
struct Verified {
    consumer: Consumer,
    subject: Option<Arc<str>>,
    claims: Arc<serde_json::Value>,
    expires: u64,
}

const CACHE_SHARDS: usize = 8;

/// Verified tokens by the SHA-256 of the token, in shards so requests rarely wait on a lock.
/// Verified tokens by the token itself (compared whole on a hit, so no two tokens can share an
/// entry), in shards chosen by the token's last character: its signature's, as good as random.
type TokenCache = Vec<Mutex<lru::LruCache<Box<str>, Verified>>>;

fn shard_of(token: &str) -> usize {
    token.as_bytes().last().copied().unwrap_or(0) as usize % CACHE_SHARDS
}

pub struct Jwt {
    issuer: Option<String>,
    algorithms: Vec<Algorithm>,
    validations: HashMap<Algorithm, Validation>,
    static_keys: HashMap<String, Arc<KeyEntry>>,
    jwks: Option<Arc<Jwks>>,
    sources: Vec<Source>,
    require: Vec<ClaimRequirement>,
    consumer_claim: String,
    unknown_subjects: UnknownSubjects,
    consumers: Arc<ConsumerRegistry>,
    cache: Option<TokenCache>,
}

/// Whether a `kid` is a plain identifier; anything else (paths, quotes, huge values) is refused
/// before any lookup.
fn sane_kid(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= 128
        && kid.bytes().all(|byte| {
            byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b':' | b'=' | b'+')
        })
        && !kid.contains("..")
}

impl FilterKind for Jwt {
    const KIND: &'static str = "jwt";
    type Config = Config;

    fn build(config: Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        let mut algorithms = Vec::new();
        if config.algorithms.is_empty() {
            errors.push(BuildError::new(
                "algorithms",
                "list the accepted algorithms, e.g. [RS256]",
            ));
        }
        for (index, name) in config.algorithms.iter().enumerate() {
            match Algorithm::from_str(name) {
                Ok(algorithm) => algorithms.push(algorithm),
                Err(_) => errors.push(BuildError::new(
                    format!("algorithms[{index}]"),
                    format!("unknown algorithm \"{name}\" (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA)"),
                )),
            }
        }
        let leeway = duration("leeway", &config.leeway, &mut errors);
        let mut static_keys = HashMap::new();
        for (index, key) in config.keys.iter().enumerate() {
            let path = format!("keys[{index}]");
            let Ok(algorithm) = Algorithm::from_str(&key.algorithm) else {
                errors.push(BuildError::new(
                    format!("{path}.algorithm"),
                    format!("unknown algorithm \"{}\"", key.algorithm),
                ));
                continue;
            };
            if !algorithms.contains(&algorithm) {
                errors.push(BuildError::new(
                    format!("{path}.algorithm"),
                    format!("{} is not in `algorithms`", key.algorithm),
                ));
            }
            use jsonwebtoken::AlgorithmFamily as Family;
            let decoded = match (algorithm.family(), &key.secret, &key.public_key) {
                (Family::Hmac, Some(secret), None) if !secret.is_empty() => {
                    DecodingKey::from_secret(secret.as_bytes()).map_err(|error| error.to_string())
                }
                (Family::Hmac, _, _) => {
                    Err("an HMAC key needs a non-empty `secret` and no `public_key`".to_string())
                }
                (Family::Rsa, None, Some(pem)) => DecodingKey::from_rsa_pem(pem.as_bytes())
                    .map_err(|error| format!("not an RSA public key: {error}")),
                (Family::Ec, None, Some(pem)) => DecodingKey::from_ec_pem(pem.as_bytes())
                    .map_err(|error| format!("not an EC public key: {error}")),
                (Family::Ed, None, Some(pem)) => DecodingKey::from_ed_pem(pem.as_bytes())
                    .map_err(|error| format!("not an Ed25519 public key: {error}")),
                _ => Err(
                    "a public-key algorithm needs `public_key` (PEM) and no `secret`".to_string(),
                ),
            };
            match decoded {
                Ok(decoded) => {
                    let kid = key.kid.clone().unwrap_or_default();
                    if static_keys
                        .insert(
                            kid.clone(),
                            Arc::new(KeyEntry {
                                algorithm: Some(algorithm),
                                key: decoded,
                            }),
                        )
                        .is_some()
                    {
                        errors.push(BuildError::new(
                            format!("{path}.kid"),
                            format!("duplicate kid \"{kid}\""),
                        ));
                    }
                }
                Err(message) => errors.push(BuildError::new(path, message)),
            }
        }
        let settings = JwksSettings {
            timeout: duration("jwks_timeout", &config.jwks_timeout, &mut errors),
            refresh_every: duration("jwks_refresh", &config.jwks_refresh, &mut errors),
            min_interval: duration(
                "jwks_min_refresh_interval",
                &config.jwks_min_refresh_interval,
                &mut errors,
            ),
        };
        if config.jwks_url.is_none() && config.keys.is_empty() {
            errors.push(BuildError::new("", "give `jwks_url` or `keys`"));
        }
        if let Some(url) = &config.jwks_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                errors.push(BuildError::new(
                    "jwks_url",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        let mut sources = Vec::new();
        for (index, source) in config.token_from.iter().enumerate() {
            match source {
                TokenSource::Header { header, scheme } => {
                    match http::HeaderName::from_bytes(header.as_bytes()) {
                        Ok(name) => sources.push(Source::Header {
                            name,
                            scheme: scheme.clone(),
                        }),
                        Err(_) => errors.push(BuildError::new(
                            format!("token_from[{index}].header"),
                            "not a valid header name",
                        )),
                    }
                }
                TokenSource::Cookie { cookie } => sources.push(Source::Cookie(cookie.clone())),
                TokenSource::Query { query } => sources.push(Source::Query(query.clone())),
            }
        }
        if sources.is_empty() {
            sources.push(Source::Header {
                name: http::header::AUTHORIZATION,
                scheme: Some("Bearer".into()),
            });
        }
        for (index, requirement) in config.require.iter().enumerate() {
            if requirement.equals.is_some() == requirement.contains.is_some() {
                errors.push(BuildError::new(
                    format!("require[{index}]"),
                    "give exactly one of `equals` or `contains`",
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let validations = algorithms
            .iter()
            .map(|algorithm| {
                let mut validation = Validation::new(*algorithm);
                validation.leeway = leeway.as_secs();
                validation.validate_exp = true;
                validation.validate_nbf = true;
                validation.set_required_spec_claims(&["exp"]);
                if let Some(issuer) = &config.issuer {
                    validation.set_issuer(&[issuer]);
                }
                if config.audiences.is_empty() {
                    validation.validate_aud = false;
                } else {
                    validation.set_audience(&config.audiences);
                }
                (*algorithm, validation)
            })
            .collect();
        let cache = NonZeroUsize::new(config.cache_size / CACHE_SHARDS + 1)
            .filter(|_| config.cache_size > 0)
            .map(|per_shard| {
                (0..CACHE_SHARDS)
                    .map(|_| Mutex::new(lru::LruCache::new(per_shard)))
                    .collect()
            });
        Ok(Jwt {
            issuer: config.issuer,
            algorithms,
            validations,
            static_keys,
            jwks: config
                .jwks_url
                .as_deref()
                .map(|url| Jwks::shared(url, settings, &ctx.metrics)),
            sources,
            require: config.require,
            consumer_claim: config.consumer_claim,
            unknown_subjects: config.unknown_subjects,
            consumers: ctx.consumers.clone(),
            cache,
        })
    }
}

/// Why a token was refused (the `reason` label of the failure metric).
enum Failure {
    Invalid(&'static str),
}

impl Jwt {
    /// The token, `Ok(None)` when none was sent, or an error for a malformed presentation.
    fn token<'a>(&self, request: &'a RequestHeader) -> Result<Option<&'a str>, &'static str> {
        for source in &self.sources {
            match source {
                Source::Header { name, scheme } => {
                    let mut values = request.headers.get_all(name).iter();
                    let Some(value) = values.next() else { continue };
                    if values.next().is_some() {
                        return Err("ambiguous");
                    }
                    let text = value.to_str().map_err(|_| "malformed")?;
                    let token = match scheme {
                        Some(scheme) => {
                            let (given, rest) = text.split_once(' ').unwrap_or((text, ""));
                            if !given.eq_ignore_ascii_case(scheme) {
                                // Another scheme (e.g. Basic) is not ours to judge.
                                continue;
                            }
                            rest.trim()
                        }
                        None => text.trim(),
                    };
                    if token.is_empty() {
                        return Err("malformed");
                    }
                    return Ok(Some(token));
                }
                Source::Cookie(name) => {
                    if let Some(token) = cookie(request, name) {
                        return Ok(Some(token));
                    }
                }
                Source::Query(name) => {
                    if let Some(query) = request.uri.query() {
                        for pair in query.split('&') {
                            if let Some((key, value)) = pair.split_once('=') {
                                if key == name && !value.is_empty() {
                                    return Ok(Some(value));
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// The key a token names, if it is known now; `Ok(None)` when the key set must be fetched
    /// again first (a `kid` it does not hold yet).
    fn key_now(&self, kid: Option<&str>) -> Result<Option<Arc<KeyEntry>>, &'static str> {
        let kid_key = kid.unwrap_or("");
        if kid.is_some_and(|kid| !sane_kid(kid)) {
            return Err("kid");
        }
        if let Some(entry) = self.static_keys.get(kid_key) {
            return Ok(Some(entry.clone()));
        }
        let Some(jwks) = &self.jwks else {
            return Err("unknown_kid");
        };
        if let Some(entry) = jwks.get(kid_key) {
            return Ok(Some(entry));
        }
        if kid.is_none() {
            return jwks.only_key().map(Some).ok_or("unknown_kid");
        }
        Ok(None)
    }

    /// The token's header, when it is a token this filter could accept at all.
    fn header(&self, token: &str) -> Result<jsonwebtoken::Header, Failure> {
        if token.len() > 16 * 1024 || token.split('.').count() != 3 {
            return Err(Failure::Invalid("malformed"));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| Failure::Invalid("malformed"))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(Failure::Invalid("algorithm"));
        }
        Ok(header)
    }

    /// Verifies a token whose key is known now; `Ok(None)` when its key set must be fetched.
    fn verify_now(&self, token: &str) -> Result<Option<Verified>, Failure> {
        let header = self.header(token)?;
        match self
            .key_now(header.kid.as_deref())
            .map_err(Failure::Invalid)?
        {
            Some(entry) => self.verify_with(token, &header, &entry).map(Some),
            None => Ok(None),
        }
    }

    /// Verifies a token, fetching its key set again (once, shared, rate-limited) when it names a
    /// `kid` the set does not hold yet.
    async fn verify(&self, token: &str) -> Result<Verified, Failure> {
        let header = self.header(token)?;
        let entry = match self
            .key_now(header.kid.as_deref())
            .map_err(Failure::Invalid)?
        {
            Some(entry) => entry,
            None => {
                let jwks = self.jwks.as_ref().ok_or(Failure::Invalid("unknown_kid"))?;
                jwks.refresh_for(header.kid.as_deref().unwrap_or(""))
                    .await
                    .ok_or(Failure::Invalid("unknown_kid"))?
            }
        };
        self.verify_with(token, &header, &entry)
    }

    fn verify_with(
        &self,
        token: &str,
        header: &jsonwebtoken::Header,
        entry: &KeyEntry,
    ) -> Result<Verified, Failure> {
        // The key decides the algorithm family, never the token: an RSA key is never used as an
        // HMAC secret, whatever `alg` says.
        match entry.algorithm {
            Some(algorithm) if algorithm != header.alg => {
                return Err(Failure::Invalid("algorithm"))
            }
            None if entry.key.family() != header.alg.family() => {
                return Err(Failure::Invalid("algorithm"))
            }
            _ => {}
        }
        let validation = &self.validations[&header.alg];
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &entry.key, validation)
            .map_err(|error| {
                Failure::Invalid(match error.kind() {
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::ImmatureSignature => "not_yet_valid",
                    ErrorKind::InvalidIssuer => "issuer",
                    ErrorKind::InvalidAudience => "audience",
                    ErrorKind::InvalidSignature => "signature",
                    ErrorKind::InvalidAlgorithm => "algorithm",
                    ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
                        "claims"
                    }
                    _ => "malformed",
                })
            })?;
        let claims = data.claims;
        let expires = claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .ok_or(Failure::Invalid("claims"))?;
        let subject = claims
            .get(&self.consumer_claim)
            .and_then(|value| value.as_str())
            .map(Arc::from);
        let issuer = claims
            .get("iss")
            .and_then(serde_json::Value::as_str)
            .or(self.issuer.as_deref())
            .unwrap_or("");
        let consumer = match &subject {
            Some(subject) => match self.consumers.jwt_consumer(issuer, subject) {
                Some(consumer) => consumer.clone(),
                None if self.unknown_subjects == UnknownSubjects::Allow => Consumer::new(subject),
                None => return Err(Failure::Invalid("unknown_subject")),
            },
            None => return Err(Failure::Invalid("claims")),
        };
        Ok(Verified {
            consumer,
            subject,
            claims: Arc::new(claims),
            expires,
        })
    }

    fn requirements_met(&self, claims: &serde_json::Value) -> bool {
        self.require.iter().all(|requirement| {
            let Some(value) = claims.get(&requirement.claim) else {
                return false;
            };
            if let Some(expected) = &requirement.equals {
                return value == expected;
            }
            let Some(item) = &requirement.contains else {
                return false;
            };
            match value {
                serde_json::Value::String(text) => text.split_whitespace().any(|part| part == item),
                serde_json::Value::Array(items) => {
                    items.iter().any(|entry| entry.as_str() == Some(item))
                }
                _ => false,
            }
        })
    }
}

#[async_trait]
impl Filter for Jwt {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn is_auth(&self) -> bool {
        true
    }

    fn ready(&self) -> bool {
        self.jwks.as_ref().is_none_or(|jwks| jwks.is_ready())
    }

    fn try_request(
        &self,
        request: &mut RequestHeader,
        ctx: &mut RequestContext,
    ) -> Option<Decision> {
        let token = match self.token(request) {
            Ok(Some(token)) => token,
            Ok(None) => return Some(Decision::Continue),
            Err(reason) => return Some(self.refuse(ctx, reason)),
        };
        let verified = match self.cached(token) {
            Some(verified) => verified,
            None => match self.verify_now(token) {
                Ok(Some(verified)) => self.remember(token, verified),
                // The key set must be fetched: the async phase does it.
                Ok(None) => return None,
                Err(Failure::Invalid(reason)) => return Some(self.refuse(ctx, reason)),
            },
        };
        Some(self.admit(verified, ctx))
    }

    async fn request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        if let Some(decision) = self.try_request(request, ctx) {
            return decision;
        }
        // Only a token whose key must be fetched first gets here.
        let token = match self.token(request) {
            Ok(Some(token)) => token.to_owned(),
            Ok(None) => return Decision::Continue,
            Err(reason) => return self.refuse(ctx, reason),
        };
        match self.verify(&token).await {
            Ok(verified) => {
                let verified = self.remember(&token, verified);
                self.admit(verified, ctx)
            }
            Err(Failure::Invalid(reason)) => self.refuse(ctx, reason),
        }
    }
}

impl Jwt {
    /// A verified token seen before and not expired.
    fn cached(&self, token: &str) -> Option<Verified> {
        let cache = self.cache.as_ref()?;
        let now = now_seconds();
        let mut shard = cache[shard_of(token)].lock().ok()?;
        match shard.get(token) {
            Some(verified) if verified.expires > now => Some(verified.clone()),
            Some(_) => {
                shard.pop(token);
                None
            }
            None => None,
        }
    }

    fn remember(&self, token: &str, verified: Verified) -> Verified {
        if let Some(cache) = &self.cache {
            if let Ok(mut shard) = cache[shard_of(token)].lock() {
                shard.put(token.into(), verified.clone());
            }
        }
        verified
    }

    fn refuse(&self, ctx: &mut RequestContext, reason: &'static str) -> Decision {
        ctx.auth_failure = Some((Self::KIND, reason));
        Decision::Reject(Problem::invalid_token())
    }

    /// The caller is identified; the route's claim requirements decide the rest.
    fn admit(&self, verified: Verified, ctx: &mut RequestContext) -> Decision {
        if !self.requirements_met(&verified.claims) {
            ctx.consumer = Some(verified.consumer);
            ctx.auth_failure = Some((Self::KIND, "claims_not_allowed"));
            return Decision::Reject(Problem::forbidden());
        }
        ctx.consumer = Some(verified.consumer);
        ctx.auth_method = Some(Self::KIND);
        ctx.subject = verified.subject;
        ctx.claims = Some(verified.claims);
        Decision::Continue
    }
}

#[cfg(test)]
mod tests;
