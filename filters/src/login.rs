//! The login mode of `oauth2`: the authorization-code flow with PKCE for browser clients. The
//! session lives in Redis behind an HttpOnly, Secure, SameSite cookie that holds only a random
//! session id; `state` is bound to the browser by a short-lived cookie (login CSRF); expired
//! access tokens are renewed with the refresh token; logout deletes the session.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use fred::prelude::*;
use http::{HeaderName, HeaderValue};
use pingora_http::RequestHeader;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::shared::IO;
use crate::util::{cookie, decode_query_component, now_seconds};
use crate::{Consumer, Decision, Problem, ProblemType, RequestContext, Response};

/// Settings of login mode, checked by the `oauth2` filter's build.
pub struct Login {
    pub authorization_url: String,
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uri: String,
    /// The path of `redirect_uri`, where the authorization server sends the browser back.
    pub callback_path: String,
    pub logout_path: String,
    pub after_logout: String,
    pub scopes: Vec<String>,
    pub cookie_name: String,
    pub cookie_secure: bool,
    pub session_ttl: Duration,
    pub forward_access_token: bool,
    pub timeout: Duration,
    pub client: reqwest::Client,
    pub redis: Arc<crate::shared::Redis>,
}

#[derive(Serialize, Deserialize)]
struct Pending {
    verifier: String,
    return_to: String,
}

#[derive(Serialize, Deserialize, Clone)]
struct Session {
    subject: String,
    access_token: String,
    refresh_token: Option<String>,
    /// Unix seconds.
    expires_at: u64,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system provides randomness");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn query_param(request: &RequestHeader, name: &str) -> Option<String> {
    request.uri.query()?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| decode_query_component(value))
    })
}

fn encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn redirect(location: &str) -> Response {
    let mut response = Response::new(302);
    if let Ok(value) = HeaderValue::from_str(location) {
        response = response.header(http::header::LOCATION, value);
    }
    response.header(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    )
}

fn session_key(id: &str) -> String {
    format!(
        "gatehouse:session:{{{}}}",
        hex::encode(Sha256::digest(id.as_bytes()))
    )
}

fn pending_key(state: &str) -> String {
    format!(
        "gatehouse:login:{{{}}}",
        hex::encode(Sha256::digest(state.as_bytes()))
    )
}

fn unavailable() -> Decision {
    Decision::Reject(
        Problem::new(ProblemType::AuthUnavailable).detail("The login service could not be reached"),
    )
}

impl Login {
    fn cookie(&self, name: &str, value: &str, path: &str, max_age: Option<u64>) -> HeaderValue {
        let mut text = format!("{name}={value}; Path={path}; HttpOnly; SameSite=Lax");
        if self.cookie_secure {
            text.push_str("; Secure");
        }
        if let Some(max_age) = max_age {
            text.push_str(&format!("; Max-Age={max_age}"));
        }
        HeaderValue::from_str(&text).expect("cookie values are URL-safe")
    }

    fn state_cookie_name(&self) -> String {
        format!("{}_state", self.cookie_name)
    }

    // Session commands go through this thread's own client (see `Redis::local`); each has the
    // client's command deadline.
    async fn redis_get(&self, key: String) -> Result<Option<String>, ()> {
        self.redis
            .local()
            .get::<Option<String>, _>(key)
            .await
            .map_err(|_| ())
    }

    async fn redis_set(&self, key: String, value: String, ttl: u64) -> Result<(), ()> {
        self.redis
            .local()
            .set::<(), _, _>(
                key,
                value,
                Some(Expiration::EX(ttl.max(1) as i64)),
                None,
                false,
            )
            .await
            .map_err(|_| ())
    }

    async fn redis_delete(&self, key: String) -> Result<(), ()> {
        self.redis
            .local()
            .del::<i64, _>(key)
            .await
            .map(|_| ())
            .map_err(|_| ())
    }

    async fn token_request(
        &self,
        form: Vec<(&'static str, String)>,
    ) -> Result<serde_json::Value, ()> {
        let request = self
            .client
            .post(&self.token_url)
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .form(&form);
        let call = IO.spawn(async move {
            let response = request.send().await.map_err(|_| ())?;
            if !response.status().is_success() {
                return Err(());
            }
            response.json::<serde_json::Value>().await.map_err(|_| ())
        });
        match tokio::time::timeout(self.timeout + Duration::from_millis(50), call).await {
            Ok(Ok(result)) => result,
            _ => Err(()),
        }
    }

    fn session_from_tokens(
        &self,
        tokens: &serde_json::Value,
        previous_refresh: Option<String>,
        subject: Option<String>,
    ) -> Option<Session> {
        let access_token = tokens.get("access_token")?.as_str()?.to_string();
        let expires_in = tokens
            .get("expires_in")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(300);
        let subject = subject.or_else(|| {
            let id_token = tokens.get("id_token")?.as_str()?;
            let payload = id_token.split('.').nth(1)?;
            let claims: serde_json::Value = serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(payload)
                    .ok()?,
            )
            .ok()?;
            claims.get("sub")?.as_str().map(str::to_owned)
        })?;
        Some(Session {
            subject,
            access_token,
            refresh_token: tokens
                .get("refresh_token")
                .and_then(|token| token.as_str())
                .map(str::to_owned)
                .or(previous_refresh),
            expires_at: now_seconds() + expires_in,
        })
    }

    /// Send the browser to the authorization server, remembering where it wanted to go.
    async fn start_login(&self, request: &RequestHeader) -> Decision {
        let state = random_token();
        let verifier = random_token();
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(Sha256::digest(verifier.as_bytes()));
        let return_to = request
            .uri
            .path_and_query()
            .map(|target| target.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let pending = serde_json::to_string(&Pending {
            verifier,
            return_to,
        })
        .expect("serialises");
        if self
            .redis_set(pending_key(&state), pending, 600)
            .await
            .is_err()
        {
            return unavailable();
        }
        let separator = if self.authorization_url.contains('?') {
            '&'
        } else {
            '?'
        };
        let location = format!(
            "{}{separator}response_type=code&client_id={}&redirect_uri={}&scope={}&state={state}&code_challenge={challenge}&code_challenge_method=S256",
            self.authorization_url,
            encode(&self.client_id),
            encode(&self.redirect_uri),
            encode(&self.scopes.join(" ")),
        );
        let cookie = self.cookie(
            &self.state_cookie_name(),
            &state,
            &self.callback_path,
            Some(600),
        );
        Decision::Respond(redirect(&location).header(http::header::SET_COOKIE, cookie))
    }

    /// The authorization server sent the browser back with a code.
    async fn callback(&self, request: &RequestHeader, ctx: &mut RequestContext) -> Decision {
        let refuse = |ctx: &mut RequestContext, reason: &'static str| {
            ctx.auth_failure = Some(("oauth2", reason));
            Decision::Reject(Problem::new(ProblemType::LoginFailed))
        };
        let (Some(code), Some(state)) =
            (query_param(request, "code"), query_param(request, "state"))
        else {
            return refuse(ctx, "callback_without_code");
        };
        // The state must be the one this browser was given (login CSRF).
        if cookie(request, &self.state_cookie_name()) != Some(state.as_str()) {
            return refuse(ctx, "state_mismatch");
        }
        let pending = match self.redis_get(pending_key(&state)).await {
            Ok(Some(pending)) => pending,
            Ok(None) => return refuse(ctx, "unknown_state"),
            Err(()) => return unavailable(),
        };
        let _ = self.redis_delete(pending_key(&state)).await;
        let Ok(pending) = serde_json::from_str::<Pending>(&pending) else {
            return refuse(ctx, "unknown_state");
        };
        let tokens = match self
            .token_request(vec![
                ("grant_type", "authorization_code".into()),
                ("code", code),
                ("redirect_uri", self.redirect_uri.clone()),
                ("code_verifier", pending.verifier),
            ])
            .await
        {
            Ok(tokens) => tokens,
            Err(()) => return refuse(ctx, "code_exchange_failed"),
        };
        let Some(session) = self.session_from_tokens(&tokens, None, None) else {
            return refuse(ctx, "token_response");
        };
        let id = random_token();
        let stored = serde_json::to_string(&session).expect("serialises");
        if self
            .redis_set(session_key(&id), stored, self.session_ttl.as_secs())
            .await
            .is_err()
        {
            return unavailable();
        }
        let return_to =
            if pending.return_to.starts_with('/') && !pending.return_to.starts_with("//") {
                pending.return_to
            } else {
                "/".into()
            };
        Decision::Respond(
            redirect(&return_to)
                .header(
                    http::header::SET_COOKIE,
                    self.cookie(
                        &self.cookie_name,
                        &id,
                        "/",
                        Some(self.session_ttl.as_secs()),
                    ),
                )
                .header(
                    http::header::SET_COOKIE,
                    self.cookie(&self.state_cookie_name(), "", &self.callback_path, Some(0)),
                ),
        )
    }

    async fn logout(&self, request: &RequestHeader) -> Decision {
        if let Some(id) = cookie(request, &self.cookie_name) {
            if self.redis_delete(session_key(id)).await.is_err() {
                return unavailable();
            }
        }
        Decision::Respond(redirect(&self.after_logout).header(
            http::header::SET_COOKIE,
            self.cookie(&self.cookie_name, "", "/", Some(0)),
        ))
    }

    pub async fn request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        let path = request.uri.path();
        if path == self.callback_path {
            return self.callback(request, ctx).await;
        }
        if path == self.logout_path {
            return self.logout(request).await;
        }
        let Some(id) = cookie(request, &self.cookie_name)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
        else {
            return self.start_login(request).await;
        };
        let stored = match self.redis_get(session_key(&id)).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return self.start_login(request).await,
            Err(()) => return unavailable(),
        };
        let Ok(mut session) = serde_json::from_str::<Session>(&stored) else {
            return self.start_login(request).await;
        };
        if session.expires_at <= now_seconds() {
            let Some(refresh_token) = session.refresh_token.clone() else {
                return self.start_login(request).await;
            };
            let tokens = self
                .token_request(vec![
                    ("grant_type", "refresh_token".into()),
                    ("refresh_token", refresh_token),
                ])
                .await;
            let renewed = tokens.ok().and_then(|tokens| {
                self.session_from_tokens(
                    &tokens,
                    session.refresh_token.clone(),
                    Some(session.subject.clone()),
                )
            });
            match renewed {
                Some(renewed) => {
                    let stored = serde_json::to_string(&renewed).expect("serialises");
                    if self
                        .redis_set(session_key(&id), stored, self.session_ttl.as_secs())
                        .await
                        .is_err()
                    {
                        return unavailable();
                    }
                    session = renewed;
                }
                None => {
                    let _ = self.redis_delete(session_key(&id)).await;
                    return self.start_login(request).await;
                }
            }
        }
        // The session cookie is ours; the upstream gets the access token if asked, not the cookie.
        if self.forward_access_token {
            if let Ok(value) = HeaderValue::from_str(&format!("Bearer {}", session.access_token)) {
                request
                    .insert_header(HeaderName::from_static("authorization"), value)
                    .ok();
            }
        }
        ctx.consumer = Some(Consumer::new(&session.subject));
        // A login session of the oauth2 filter's `login` mode.
        ctx.auth_method = Some("oauth2");
        ctx.subject = Some(session.subject.into());
        Decision::Continue
    }
}
