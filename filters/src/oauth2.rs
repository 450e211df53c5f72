//! `oauth2` in introspection mode: opaque bearer tokens are checked with the authorization
//! server's RFC 7662 endpoint (authenticating with client credentials). `active: false` is 401
//! whatever else the answer holds; missing scopes are 403; an endpoint that is down or slower
//! than the deadline is 503, never a pass and never a hang. Answers are cached in process and in
//! Redis (shared by every node): positive ones until `min(exp, cache_ttl)`, negative ones for
//! `negative_cache_ttl`.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use pingora_http::RequestHeader;
use serde::{Deserialize, Serialize};

use crate::consumers::sha256;
use crate::shared::IO;
use crate::util::{duration, now_seconds};
use crate::{
    BuildCtx, BuildError, Consumer, Decision, Filter, FilterKind, Phases, Problem, ProblemType,
    RequestContext,
};

#[derive(Debug, Default, Deserialize, schemars::JsonSchema, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Check opaque bearer tokens with the introspection endpoint.
    #[default]
    Introspection,
    /// Log browsers in with the authorization-code flow and PKCE; keep the session in Redis.
    Login,
}

#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub mode: Mode,
    /// The RFC 7662 endpoint (introspection mode).
    #[serde(default)]
    pub introspection_url: String,
    /// Login mode: the authorization server's authorize endpoint.
    #[serde(default)]
    pub authorization_url: String,
    /// Login mode: the token endpoint (code exchange and refresh).
    #[serde(default)]
    pub token_url: String,
    /// Login mode: this gateway's callback URL, registered with the authorization server. Its
    /// path must be routed to a route carrying this filter.
    #[serde(default)]
    pub redirect_uri: String,
    /// Login mode: the path that ends the session.
    #[serde(default = "default_logout_path")]
    pub logout_path: String,
    /// Login mode: where the browser goes after logout.
    #[serde(default = "default_after_logout")]
    pub after_logout: String,
    /// Login mode: scopes asked for.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Login mode: the session cookie's name.
    #[serde(default = "default_cookie_name")]
    pub cookie_name: String,
    /// Login mode: mark cookies `Secure` (on unless set to false for plain-HTTP development).
    #[serde(default = "default_true")]
    pub cookie_secure: bool,
    /// Login mode: how long a session lives in Redis.
    #[serde(default = "default_session_ttl")]
    pub session_ttl: String,
    /// Login mode: send the session's access token upstream as `Authorization: Bearer`.
    #[serde(default)]
    pub forward_access_token: bool,
    pub client_id: String,
    /// Give it as `${env:NAME}` or `${file:/path}`.
    pub client_secret: String,
    /// Scopes the route requires; a token without all of them is 403.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Deadline of one introspection call; past it the answer is 503.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Longest time a positive answer is reused (never past the token's `exp`).
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: String,
    /// How long an inactive token's answer is reused.
    #[serde(default = "default_negative_ttl")]
    pub negative_cache_ttl: String,
    /// Answers kept in process, in front of Redis.
    #[serde(default = "default_cache_size")]
    pub cache_size: usize,
}

fn default_logout_path() -> String {
    "/oauth2/logout".into()
}
fn default_after_logout() -> String {
    "/".into()
}
fn default_cookie_name() -> String {
    "gatehouse_session".into()
}
fn default_true() -> bool {
    true
}
fn default_session_ttl() -> String {
    "8h".into()
}
fn default_timeout() -> String {
    "1s".into()
}
fn default_cache_ttl() -> String {
    "5m".into()
}
fn default_negative_ttl() -> String {
    "10s".into()
}
fn default_cache_size() -> usize {
    10_000
}

/// What is cached about a token.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Answer {
    active: bool,
    subject: Option<String>,
    scopes: Vec<String>,
    /// Unix seconds until which this answer may be used.
    valid_until: u64,
}

pub struct OAuth2 {
    url: String,
    client_id: String,
    client_secret: String,
    required_scopes: Vec<String>,
    timeout: Duration,
    cache_ttl: Duration,
    negative_ttl: Duration,
    client: reqwest::Client,
    local: Option<Mutex<lru::LruCache<[u8; 32], Answer>>>,
    redis: Option<Arc<crate::shared::Redis>>,
    login: Option<crate::login::Login>,
}

impl FilterKind for OAuth2 {
    const KIND: &'static str = "oauth2";
    type Config = Config;

    fn build(config: Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>> {
        let mut errors = Vec::new();
        let url = |value: &str| value.starts_with("https://") || value.starts_with("http://");
        match config.mode {
            Mode::Introspection => {
                if !url(&config.introspection_url) {
                    errors.push(BuildError::new(
                        "introspection_url",
                        "must be an http:// or https:// URL",
                    ));
                }
            }
            Mode::Login => {
                for (key, value) in [
                    ("authorization_url", &config.authorization_url),
                    ("token_url", &config.token_url),
                    ("redirect_uri", &config.redirect_uri),
                ] {
                    if !url(value) {
                        errors.push(BuildError::new(key, "must be an http:// or https:// URL"));
                    }
                }
                if ctx.redis.is_none() {
                    errors.push(BuildError::new(
                        "mode",
                        "login sessions are kept in Redis: add a `redis` section",
                    ));
                }
                if !config.logout_path.starts_with('/') {
                    errors.push(BuildError::new("logout_path", "must start with \"/\""));
                }
            }
        }
        if config.client_id.is_empty() || config.client_secret.is_empty() {
            errors.push(BuildError::new(
                "client_secret",
                "give `client_id` and `client_secret`",
            ));
        }
        let session_ttl = duration("session_ttl", &config.session_ttl, &mut errors);
        let timeout = duration("timeout", &config.timeout, &mut errors);
        let cache_ttl = duration("cache_ttl", &config.cache_ttl, &mut errors);
        let negative_ttl = duration(
            "negative_cache_ttl",
            &config.negative_cache_ttl,
            &mut errors,
        );
        if timeout.is_zero() {
            errors.push(BuildError::new("timeout", "must be longer than zero"));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|error| {
                vec![BuildError::new(
                    "",
                    format!("cannot build the HTTP client: {error}"),
                )]
            })?;
        let login = match (config.mode, &ctx.redis) {
            (Mode::Login, Some(redis)) => {
                let callback_path = config
                    .redirect_uri
                    .parse::<http::Uri>()
                    .map(|uri| uri.path().to_string())
                    .unwrap_or_else(|_| "/oauth2/callback".into());
                Some(crate::login::Login {
                    authorization_url: config.authorization_url.clone(),
                    token_url: config.token_url.clone(),
                    client_id: config.client_id.clone(),
                    client_secret: config.client_secret.clone(),
                    redirect_uri: config.redirect_uri.clone(),
                    callback_path,
                    logout_path: config.logout_path.clone(),
                    after_logout: config.after_logout.clone(),
                    scopes: config.scopes.clone(),
                    cookie_name: config.cookie_name.clone(),
                    cookie_secure: config.cookie_secure,
                    session_ttl,
                    forward_access_token: config.forward_access_token,
                    timeout,
                    client: client.clone(),
                    redis: redis.clone(),
                })
            }
            _ => None,
        };
        Ok(OAuth2 {
            login,
            url: config.introspection_url,
            client_id: config.client_id,
            client_secret: config.client_secret,
            required_scopes: config.required_scopes,
            timeout,
            cache_ttl,
            negative_ttl,
            client,
            local: NonZeroUsize::new(config.cache_size)
                .map(|size| Mutex::new(lru::LruCache::new(size))),
            redis: ctx.redis.clone(),
        })
    }
}

fn redis_key(digest: &[u8; 32]) -> String {
    // One hash tag per key keeps it on one slot of a Redis Cluster.
    format!("gatehouse:introspect:{{{}}}", hex::encode(digest))
}

impl OAuth2 {
    fn local_get(&self, digest: &[u8; 32], now: u64) -> Option<Answer> {
        let mut cache = self.local.as_ref()?.lock().ok()?;
        match cache.get(digest) {
            Some(answer) if answer.valid_until > now => Some(answer.clone()),
            Some(_) => {
                cache.pop(digest);
                None
            }
            None => None,
        }
    }

    fn local_put(&self, digest: [u8; 32], answer: &Answer) {
        if let Some(cache) = &self.local {
            if let Ok(mut cache) = cache.lock() {
                cache.put(digest, answer.clone());
            }
        }
    }

    async fn redis_get(&self, digest: &[u8; 32], now: u64) -> Option<Answer> {
        let redis = self.redis.as_ref()?;
        let key = redis_key(digest);
        let text = redis.local().get::<Option<String>, _>(key).await.ok()??;
        let answer: Answer = serde_json::from_str(&text).ok()?;
        (answer.valid_until > now).then_some(answer)
    }

    fn redis_put(&self, digest: &[u8; 32], answer: &Answer, ttl: u64) {
        let (Some(redis), Ok(text)) = (self.redis.clone(), serde_json::to_string(answer)) else {
            return;
        };
        let key = redis_key(digest);
        // Best effort, off the request path: a cache write never delays or fails a request.
        IO.spawn(async move {
            let _: Result<(), _> = redis
                .set(
                    key,
                    text,
                    Some(Expiration::EX(ttl.max(1) as i64)),
                    None,
                    false,
                )
                .await;
        });
    }

    /// Ask the authorization server. `Err` means it could not answer in time.
    async fn introspect(&self, token: &str, now: u64) -> Result<Answer, ()> {
        let request = self
            .client
            .post(&self.url)
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .form(&[("token", token), ("token_type_hint", "access_token")]);
        let timeout = self.timeout;
        let call = IO.spawn(async move {
            let response = request.send().await.map_err(|_| ())?;
            if !response.status().is_success() {
                return Err(());
            }
            response.json::<serde_json::Value>().await.map_err(|_| ())
        });
        let body = match tokio::time::timeout(timeout + Duration::from_millis(50), call).await {
            Ok(Ok(Ok(body))) => body,
            _ => return Err(()),
        };
        // Only a literal `true` is active.
        let active = body.get("active") == Some(&serde_json::Value::Bool(true));
        let exp = body.get("exp").and_then(serde_json::Value::as_u64);
        if !active || exp.is_some_and(|exp| exp <= now) {
            return Ok(Answer {
                active: false,
                subject: None,
                scopes: Vec::new(),
                valid_until: now + self.negative_ttl.as_secs().max(1),
            });
        }
        let mut valid_until = now + self.cache_ttl.as_secs();
        if let Some(exp) = exp {
            valid_until = valid_until.min(exp);
        }
        Ok(Answer {
            active: true,
            subject: body
                .get("sub")
                .and_then(|sub| sub.as_str())
                .map(str::to_owned),
            scopes: body
                .get("scope")
                .and_then(|scope| scope.as_str())
                .map(|scope| scope.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            valid_until,
        })
    }
}

fn bearer(request: &RequestHeader) -> Result<Option<&str>, &'static str> {
    let mut values = request.headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("ambiguous");
    }
    let text = value.to_str().map_err(|_| "malformed")?;
    let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = token.trim();
    if token.is_empty() || token.len() > 8192 {
        return Err("malformed");
    }
    Ok(Some(token))
}

#[async_trait]
impl Filter for OAuth2 {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn is_auth(&self) -> bool {
        true
    }

    async fn request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        if let Some(login) = &self.login {
            return login.request(request, ctx).await;
        }
        let token = match bearer(request) {
            Ok(Some(token)) => token.to_owned(),
            Ok(None) => return Decision::Continue,
            Err(reason) => {
                ctx.auth_failure = Some((Self::KIND, reason));
                return Decision::Reject(Problem::invalid_token());
            }
        };
        let digest = sha256(token.as_bytes());
        let now = now_seconds();
        let answer = match self.local_get(&digest, now) {
            Some(answer) => answer,
            None => {
                let cached = self.redis_get(&digest, now).await;
                match cached {
                    Some(answer) => {
                        self.local_put(digest, &answer);
                        answer
                    }
                    None => match self.introspect(&token, now).await {
                        Ok(answer) => {
                            self.local_put(digest, &answer);
                            self.redis_put(
                                &digest,
                                &answer,
                                answer.valid_until.saturating_sub(now),
                            );
                            answer
                        }
                        Err(()) => {
                            ctx.auth_failure = Some((Self::KIND, "introspection_unavailable"));
                            return Decision::Reject(
                                Problem::new(ProblemType::AuthUnavailable)
                                    .detail("The authorization server could not be reached"),
                            );
                        }
                    },
                }
            }
        };
        if !answer.active {
            ctx.auth_failure = Some((Self::KIND, "inactive"));
            return Decision::Reject(Problem::invalid_token());
        }
        let subject = answer.subject.clone().unwrap_or_default();
        ctx.consumer = Some(Consumer::new(&subject));
        ctx.auth_method = Some(Self::KIND);
        ctx.subject = answer.subject.as_deref().map(Arc::from);
        if !self
            .required_scopes
            .iter()
            .all(|scope| answer.scopes.contains(scope))
        {
            ctx.auth_failure = Some((Self::KIND, "insufficient_scope"));
            return Decision::Reject(Problem::forbidden());
        }
        Decision::Continue
    }
}
