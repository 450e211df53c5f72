//! The identity provider's OAuth2 side: the access tokens, authorization codes and refresh
//! grants it has issued, and the endpoints that issue and examine them (introspection,
//! authorization, token).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::form::{self, Form};
use super::server::{json_reply, HttpReply};
use super::{unix_now, unix_secs, IdentityProvider, Shared, JWT_LIFETIME_SECS};

/// Default lifetime of access tokens issued by `/token`.
const DEFAULT_ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// Everything the provider has issued and not yet forgotten.
pub(super) struct Tokens {
    /// Lifetime of the access tokens `/token` issues.
    pub(super) access_token_lifetime: Duration,
    access_tokens: HashMap<String, AccessToken>,
    codes: HashMap<String, PendingCode>,
    refresh_tokens: HashMap<String, RefreshGrant>,
}

struct AccessToken {
    subject: String,
    scope: String,
    client_id: String,
    issued_at: u64,
    expires_at: SystemTime,
    revoked: bool,
}

/// An authorization code waiting to be redeemed at `/token`.
struct PendingCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    subject: String,
    scope: String,
    nonce: Option<String>,
}

struct RefreshGrant {
    client_id: String,
    subject: String,
    scope: String,
}

impl Default for Tokens {
    fn default() -> Tokens {
        Tokens {
            access_token_lifetime: DEFAULT_ACCESS_TOKEN_LIFETIME,
            access_tokens: HashMap::new(),
            codes: HashMap::new(),
            refresh_tokens: HashMap::new(),
        }
    }
}

impl Tokens {
    pub(super) fn issue_access_token(
        &mut self,
        client_id: &str,
        subject: &str,
        scope: &str,
        lifetime: Duration,
    ) -> String {
        let token = random_token("at");
        self.access_tokens.insert(
            token.clone(),
            AccessToken {
                subject: subject.to_string(),
                scope: scope.to_string(),
                client_id: client_id.to_string(),
                issued_at: unix_now(),
                expires_at: SystemTime::now() + lifetime,
                revoked: false,
            },
        );
        token
    }

    pub(super) fn revoke(&mut self, token: &str) {
        if let Some(record) = self.access_tokens.get_mut(token) {
            record.revoked = true;
        }
    }

    /// A new access token and refresh token for a grant, as the `/token` JSON answer.
    fn token_response(&mut self, grant: RefreshGrant, id_token: Option<String>) -> Value {
        let lifetime = self.access_token_lifetime;
        let access_token =
            self.issue_access_token(&grant.client_id, &grant.subject, &grant.scope, lifetime);
        let refresh_token = random_token("rt");
        let scope = grant.scope.clone();
        self.refresh_tokens.insert(refresh_token.clone(), grant);
        // Rounded up, so a sub-second lifetime does not read as "already expired".
        let expires_in = lifetime.as_secs() + u64::from(lifetime.subsec_nanos() > 0);
        let mut answer = json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": expires_in,
            "refresh_token": refresh_token,
            "scope": scope,
        });
        if let Some(id_token) = id_token {
            answer["id_token"] = json!(id_token);
        }
        answer
    }
}

/// RFC 7662. Only opaque tokens are known; anything else is inactive.
pub(super) fn introspect(shared: &Shared, headers: &HeaderMap, form: &Form) -> HttpReply {
    if basic_client(headers).as_ref() != Some(&client_credentials()) {
        return unauthorized_client();
    }
    let Some(token) = form.get("token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let tokens = shared.tokens();
    let answer = match tokens.access_tokens.get(token) {
        Some(record) if !record.revoked && SystemTime::now() < record.expires_at => json!({
            "active": true,
            "sub": record.subject,
            "scope": record.scope,
            "client_id": record.client_id,
            "iss": shared.issuer,
            "token_type": "Bearer",
            "iat": record.issued_at,
            "exp": unix_secs(record.expires_at),
        }),
        _ => json!({ "active": false }),
    };
    json_reply(StatusCode::OK, &answer)
}

/// Issues a code at once and redirects back to the client.
pub(super) fn authorize(shared: &Shared, query: &Form) -> HttpReply {
    if query.get("response_type") != Some("code") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_response_type");
    }
    if query.get("client_id") != Some(IdentityProvider::CLIENT_ID) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_client");
    }
    let Some(redirect_uri) = query.get("redirect_uri").filter(|uri| !uri.is_empty()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let Some(challenge) = query
        .get("code_challenge")
        .filter(|challenge| !challenge.is_empty())
    else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    if query.get("code_challenge_method") != Some("S256") {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let code = random_token("code");
    shared.tokens().codes.insert(
        code.clone(),
        PendingCode {
            client_id: IdentityProvider::CLIENT_ID.to_string(),
            redirect_uri: redirect_uri.to_string(),
            challenge: challenge.to_string(),
            subject: query
                .get("login_hint")
                .unwrap_or(IdentityProvider::SUBJECT)
                .to_string(),
            scope: query.get("scope").unwrap_or_default().to_string(),
            nonce: query.get("nonce").map(str::to_string),
        },
    );
    let separator = if redirect_uri.contains('?') { '&' } else { '?' };
    let mut location = format!("{redirect_uri}{separator}code={code}");
    if let Some(state) = query.get("state") {
        location.push_str("&state=");
        location.push_str(&form::percent_encode(state));
    }
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, location)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

pub(super) fn token(shared: &Shared, headers: &HeaderMap, form: &Form) -> HttpReply {
    let client = basic_client(headers).or_else(|| {
        Some((
            form.get("client_id")?.to_string(),
            form.get("client_secret")?.to_string(),
        ))
    });
    if client != Some(client_credentials()) {
        return unauthorized_client();
    }
    let client_id = IdentityProvider::CLIENT_ID;
    match form.get("grant_type") {
        Some("authorization_code") => {
            let (Some(code), Some(redirect_uri), Some(verifier)) = (
                form.get("code"),
                form.get("redirect_uri"),
                form.get("code_verifier"),
            ) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            // A code is consumed by its first redemption, successful or not.
            let Some(pending) = shared.tokens().codes.remove(code) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            };
            if pending.client_id != client_id
                || pending.redirect_uri != redirect_uri
                || pending.challenge != pkce_challenge(verifier)
            {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            }
            let id_token = id_token(shared, &pending.subject, pending.nonce.as_deref());
            let grant = RefreshGrant {
                client_id: pending.client_id,
                subject: pending.subject,
                scope: pending.scope,
            };
            let answer = shared.tokens().token_response(grant, Some(id_token));
            token_reply(&answer)
        }
        Some("refresh_token") => {
            let Some(refresh_token) = form.get("refresh_token") else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            let mut tokens = shared.tokens();
            // Refresh tokens rotate: the one presented stops working here.
            match tokens.refresh_tokens.remove(refresh_token) {
                Some(grant) if grant.client_id == client_id => {
                    let answer = tokens.token_response(grant, None);
                    token_reply(&answer)
                }
                _ => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"),
            }
        }
        Some(_) => oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
        None => oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
    }
}

/// The `S256` code challenge of a PKCE verifier (RFC 7636 section 4.2).
fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn id_token(shared: &Shared, subject: &str, nonce: Option<&str>) -> String {
    let now = unix_now();
    let mut claims = json!({
        "iss": shared.issuer,
        "aud": IdentityProvider::CLIENT_ID,
        "sub": subject,
        "iat": now,
        "auth_time": now,
        "exp": now + JWT_LIFETIME_SECS,
    });
    if let Some(nonce) = nonce {
        claims["nonce"] = json!(nonce);
    }
    shared.keys.sign(&claims)
}

fn client_credentials() -> (String, String) {
    (
        IdentityProvider::CLIENT_ID.to_string(),
        IdentityProvider::CLIENT_SECRET.to_string(),
    )
}

/// The client id and secret of an `Authorization: Basic` header (RFC 6749 section 2.3.1:
/// both form-encoded before base64).
fn basic_client(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form::decode(id), form::decode(secret)))
}

fn token_reply(value: &Value) -> HttpReply {
    let mut reply = json_reply(StatusCode::OK, value);
    reply.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    reply
}

fn oauth_error(status: StatusCode, error: &str) -> HttpReply {
    json_reply(status, &json!({ "error": error }))
}

fn unauthorized_client() -> HttpReply {
    let mut reply = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    reply.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Basic realm=\"idp\""),
    );
    reply
}

fn random_token(prefix: &str) -> String {
    let body: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(32)
        .collect();
    format!("{prefix}_{body}")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use serde_json::{json, Value};
    use sha2::{Digest, Sha256};

    use super::super::client::{
        basic, client_basic, fetch_jwks, form_post, request, verify, Reply,
    };
    use super::super::form::{self, Form};
    use super::super::{unix_now, IdentityProvider};
    use super::random_token;

    fn introspect(idp: &IdentityProvider, token: &str) -> Value {
        let reply = form_post(
            idp,
            "/introspect",
            &client_basic(),
            &format!("token={token}&token_type_hint=access_token"),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()
    }

    fn pkce_pair() -> (String, String) {
        let verifier = random_token("verifier-0123456789");
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        (verifier, challenge)
    }

    const REDIRECT: &str = "http://127.0.0.1:9/callback";

    /// Runs `/authorize` and returns the code from the redirect.
    fn authorize_code(idp: &IdentityProvider, challenge: &str) -> String {
        let path = format!(
            "/authorize?response_type=code&client_id=gatehouse&redirect_uri={}&state=s%201&\
             code_challenge={challenge}&code_challenge_method=S256&scope=openid%20orders",
            form::percent_encode(REDIRECT)
        );
        let reply = request(idp.addr, "GET", &path, &[], b"");
        assert_eq!(reply.status, 302, "{}", reply.text());
        let location = reply.header("location").unwrap();
        let query = location
            .strip_prefix(&format!("{REDIRECT}?"))
            .unwrap_or_else(|| panic!("redirect to {location}"));
        let query = Form::parse(query.as_bytes());
        assert_eq!(query.get("state"), Some("s 1"));
        query.get("code").unwrap().to_string()
    }

    fn redeem(idp: &IdentityProvider, code: &str, verifier: &str) -> Reply {
        let body = format!(
            "grant_type=authorization_code&code={code}&redirect_uri={}&code_verifier={verifier}",
            form::percent_encode(REDIRECT)
        );
        form_post(idp, "/token", &client_basic(), &body)
    }

    #[test]
    fn idp_introspection() {
        let idp = IdentityProvider::start();
        let token = idp.issue_opaque("alice", &["read", "write"], Duration::from_secs(60));

        let reply = form_post(&idp, "/introspect", "", &format!("token={token}"));
        assert_eq!(reply.status, 401);
        assert!(reply.header("www-authenticate").is_some());
        let wrong = basic(IdentityProvider::CLIENT_ID, "nope");
        let reply = form_post(&idp, "/introspect", &wrong, &format!("token={token}"));
        assert_eq!(reply.status, 401);

        let answer = introspect(&idp, &token);
        assert_eq!(answer["active"], true);
        assert_eq!(answer["sub"], "alice");
        assert_eq!(answer["scope"], "read write");
        assert_eq!(answer["client_id"], IdentityProvider::CLIENT_ID);
        assert_eq!(answer["iss"], idp.issuer());
        assert_eq!(answer["token_type"], "Bearer");
        assert!(answer["exp"].as_u64().unwrap() >= unix_now() + 59);

        assert_eq!(introspect(&idp, "unknown"), json!({ "active": false }));
        let expired = idp.issue_opaque("alice", &["read"], Duration::ZERO);
        assert_eq!(introspect(&idp, &expired)["active"], false);
        idp.revoke(&token);
        assert_eq!(introspect(&idp, &token), json!({ "active": false }));
        assert_eq!(idp.introspections(), 6);
    }

    #[test]
    fn idp_authorization_code_with_pkce_and_refresh() {
        let idp = IdentityProvider::start();
        let (verifier, challenge) = pkce_pair();

        // Bad authorization requests are refused outright: no client, an unknown client, no
        // challenge, a `plain` challenge, no challenge method.
        let good = [
            ("response_type", "code"),
            ("client_id", "gatehouse"),
            ("redirect_uri", "x"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        let cases: [(&str, Option<&str>); 5] = [
            ("client_id", None),
            ("client_id", Some("other")),
            ("code_challenge", None),
            ("code_challenge_method", Some("plain")),
            ("code_challenge_method", None),
        ];
        for (name, replacement) in cases {
            let query: Vec<String> = good
                .iter()
                .filter_map(|(key, value)| match (*key == name, replacement) {
                    (false, _) => Some(format!("{key}={value}")),
                    (true, Some(other)) => Some(format!("{key}={other}")),
                    (true, None) => None,
                })
                .collect();
            let path = format!("/authorize?{}", query.join("&"));
            let reply = request(idp.addr, "GET", &path, &[], b"");
            assert_eq!(reply.status, 400, "{path}");
        }

        // A wrong verifier is refused, and the code is spent.
        let code = authorize_code(&idp, &challenge);
        let reply = redeem(
            &idp,
            &code,
            "not-the-verifier-not-the-verifier-not-the-verifier",
        );
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["error"], "invalid_grant");
        assert_eq!(redeem(&idp, &code, &verifier).status, 400);

        let code = authorize_code(&idp, &challenge);
        let reply = redeem(&idp, &code, &verifier);
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        let tokens = reply.json();
        assert_eq!(tokens["token_type"], "Bearer");
        assert_eq!(tokens["expires_in"], 300);
        let access = tokens["access_token"].as_str().unwrap();
        let answer = introspect(&idp, access);
        assert_eq!(answer["active"], true);
        assert_eq!(answer["sub"], IdentityProvider::SUBJECT);
        assert_eq!(answer["scope"], "openid orders");
        let id_token = tokens["id_token"].as_str().unwrap();
        let claims = verify(
            &fetch_jwks(&idp),
            id_token,
            &idp.issuer(),
            IdentityProvider::CLIENT_ID,
        );
        assert_eq!(claims["sub"], IdentityProvider::SUBJECT);
        assert_eq!(
            redeem(&idp, &code, &verifier).json()["error"],
            "invalid_grant"
        );

        // Refresh, with client credentials in the form this time; short-lived access token.
        idp.set_access_token_lifetime(Duration::ZERO);
        let refresh = tokens["refresh_token"].as_str().unwrap();
        let credentials = format!(
            "client_id={}&client_secret={}",
            IdentityProvider::CLIENT_ID,
            IdentityProvider::CLIENT_SECRET
        );
        let body = format!("grant_type=refresh_token&refresh_token={refresh}&{credentials}");
        let reply = form_post(&idp, "/token", "", &body);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let renewed = reply.json();
        assert_ne!(renewed["access_token"], tokens["access_token"]);
        assert_ne!(renewed["refresh_token"], tokens["refresh_token"]);
        assert_eq!(renewed["expires_in"], 0);
        let renewed_access = renewed["access_token"].as_str().unwrap();
        assert_eq!(introspect(&idp, renewed_access)["active"], false);
        // The old refresh token is spent.
        let reply = form_post(&idp, "/token", "", &body);
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["error"], "invalid_grant");
        assert_eq!(idp.refreshes(), 2);

        // Client authentication is required.
        let wrong = basic(IdentityProvider::CLIENT_ID, "nope");
        let body = format!("grant_type=refresh_token&refresh_token={refresh}");
        assert_eq!(form_post(&idp, "/token", &wrong, &body).status, 401);
        let reply = form_post(&idp, "/token", &client_basic(), "grant_type=password");
        assert_eq!(reply.json()["error"], "unsupported_grant_type");
    }
}
