//! A small identity provider for the integration tests: an HTTP/1.1 server on `127.0.0.1:0`
//! that publishes a JWKS, answers OAuth2 token introspection (RFC 7662), and runs the
//! authorization-code flow with PKCE (RFC 7636) and refresh tokens (RFC 6749), so the gateway's
//! JWT, introspection and login filters can be tested against a real peer.
//!
//! Endpoints (all answer `503` while [`IdentityProvider::set_down`] is on, after the delay set
//! by [`IdentityProvider::set_delay`]):
//!
//! - `GET /.well-known/jwks.json`: the published signing keys (`Cache-Control: max-age=300`);
//! - `GET /.well-known/openid-configuration`: OpenID Connect discovery pointing at the others;
//! - `POST /introspect`: RFC 7662, HTTP Basic client authentication required;
//! - `GET /authorize`: redirects at once to `redirect_uri?code=..&state=..` (the test plays the
//!   browser; there is no login page). The user is [`IdentityProvider::SUBJECT`], or the
//!   `login_hint` parameter when one is given;
//! - `POST /token`: `authorization_code` (PKCE `S256` only) and `refresh_token` grants.
//!
//! Signing keys are the PEM fixtures in `tests/support/keys/`. Their JWKs are derived from the
//! public key files at start-up by a small DER reader, so a fixture can be replaced without
//! touching this file.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

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

/// Lifetime of JWTs from [`IdentityProvider::claims`] and of ID tokens.
const JWT_LIFETIME_SECS: u64 = 300;

/// Default lifetime of access tokens issued by `/token`.
const DEFAULT_ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// A running identity provider. Dropping it stops the server and closes its connections.
pub struct IdentityProvider {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    /// Dropped with the provider, which ends the accept loop and the server's runtime.
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// What the test thread and the server's connections share.
struct Shared {
    issuer: String,
    jwks_rsa: HashMap<&'static str, Value>,
    jwks_other: Vec<Value>,
    state: Mutex<State>,
    down: AtomicBool,
    delay_ms: AtomicU64,
    jwks_fetches: AtomicUsize,
    introspections: AtomicUsize,
    refreshes: AtomicUsize,
}

struct State {
    /// The RSA key `sign` uses.
    signing_kid: &'static str,
    /// The RSA keys the JWKS publishes, in order.
    published_rsa: Vec<&'static str>,
    access_token_lifetime: Duration,
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

impl IdentityProvider {
    pub const CLIENT_ID: &'static str = "gatehouse";
    pub const CLIENT_SECRET: &'static str = "gatehouse-secret";
    /// The user `/authorize` logs in when the request has no `login_hint`.
    pub const SUBJECT: &'static str = "alice";

    /// Binds `127.0.0.1:0` and serves on a thread of its own with its own Tokio runtime. The
    /// socket is listening when this returns.
    pub fn start() -> IdentityProvider {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind identity provider");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let jwks_rsa = [&RSA1, &RSA2]
            .into_iter()
            .map(|fixture| (fixture.kid, rsa_jwk(fixture)))
            .collect();
        let jwks_other = vec![
            ec_jwk(&EC256, "P-256", "ES256", 32),
            ec_jwk(&EC384, "P-384", "ES384", 48),
            okp_jwk(&ED25519),
        ];
        let shared = Arc::new(Shared {
            issuer: format!("http://{addr}"),
            jwks_rsa,
            jwks_other,
            state: Mutex::new(State {
                signing_kid: RSA1.kid,
                published_rsa: vec![RSA1.kid],
                access_token_lifetime: DEFAULT_ACCESS_TOKEN_LIFETIME,
                access_tokens: HashMap::new(),
                codes: HashMap::new(),
                refresh_tokens: HashMap::new(),
            }),
            down: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            jwks_fetches: AtomicUsize::new(0),
            introspections: AtomicUsize::new(0),
            refreshes: AtomicUsize::new(0),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let server = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("idp-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("identity provider runtime");
                runtime.block_on(serve(listener, server, stopped));
            })
            .expect("spawn identity provider thread");
        IdentityProvider {
            addr,
            shared,
            _stop: stop,
        }
    }

    /// `http://127.0.0.1:PORT`, the `iss` of every token.
    pub fn issuer(&self) -> String {
        self.shared.issuer.clone()
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.shared.issuer)
    }

    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.shared.issuer)
    }

    pub fn introspection_url(&self) -> String {
        format!("{}/introspect", self.shared.issuer)
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.shared.issuer)
    }

    pub fn authorize_url(&self) -> String {
        format!("{}/authorize", self.shared.issuer)
    }

    /// Signs `claims` with RS256 and the current RSA key; the header `kid` is that key's
    /// (`rsa1` until [`IdentityProvider::rotate`]).
    pub fn sign(&self, claims: Value) -> String {
        let kid = self.shared.state().signing_kid;
        self.sign_with("RS256", kid, claims)
    }

    /// Signs `claims` with `alg` and the fixture key named `kid`, which goes into the header:
    /// `RS*`/`PS*` with `rsa1` or `rsa2`, `ES256` with `ec256`, `ES384` with `ec384`, `EdDSA`
    /// with `ed25519`. For `HS256`/`HS384`/`HS512`, `kid` is the shared secret itself and the
    /// header `kid` is `hmac`. Panics on any other combination.
    pub fn sign_with(&self, alg: &str, kid: &str, claims: Value) -> String {
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
        let mut header = Header::new(algorithm);
        header.kid = Some(header_kid.to_string());
        jsonwebtoken::encode(&header, &claims, &key).expect("sign JWT")
    }

    /// Valid claims for a JWT from this issuer: `iss`, `aud`, `sub`, `iat` = now and
    /// `exp` = now + 300 s.
    pub fn claims(&self, subject: &str, audience: &str) -> Value {
        let now = unix_now();
        json!({
            "iss": self.shared.issuer,
            "aud": audience,
            "sub": subject,
            "iat": now,
            "exp": now + JWT_LIFETIME_SECS,
        })
    }

    /// Signs with `rsa2` from now on and publishes it; `drop_old` also withdraws `rsa1` from
    /// the JWKS.
    pub fn rotate(&self, drop_old: bool) {
        let mut state = self.shared.state();
        state.signing_kid = RSA2.kid;
        state.published_rsa = if drop_old {
            vec![RSA2.kid]
        } else {
            vec![RSA1.kid, RSA2.kid]
        };
    }

    /// While down, every endpoint answers `503`.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Waits this long before answering any request (the request is counted on arrival).
    pub fn set_delay(&self, delay: Duration) {
        let millis = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.delay_ms.store(millis, Ordering::SeqCst);
    }

    /// Requests to the JWKS endpoint so far, however they were answered.
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Requests to the introspection endpoint so far, however they were answered.
    pub fn introspections(&self) -> usize {
        self.shared.introspections.load(Ordering::SeqCst)
    }

    /// `refresh_token` grant requests to `/token` so far, however they were answered.
    pub fn refreshes(&self) -> usize {
        self.shared.refreshes.load(Ordering::SeqCst)
    }

    /// Lifetime of access tokens issued by `/token` from now on (default 300 s).
    pub fn set_access_token_lifetime(&self, lifetime: Duration) {
        self.shared.state().access_token_lifetime = lifetime;
    }

    /// An opaque access token for [`IdentityProvider::CLIENT_ID`] that introspection reports
    /// active until `expires_in` has passed or it is revoked.
    pub fn issue_opaque(&self, subject: &str, scopes: &[&str], expires_in: Duration) -> String {
        let mut state = self.shared.state();
        state.issue_access_token(Self::CLIENT_ID, subject, &scopes.join(" "), expires_in)
    }

    /// Makes an opaque access token inactive. Unknown tokens are ignored.
    pub fn revoke(&self, token: &str) {
        if let Some(record) = self.shared.state().access_tokens.get_mut(token) {
            record.revoked = true;
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take the server down with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn jwks(&self) -> Value {
        let state = self.state();
        let mut keys: Vec<Value> = state
            .published_rsa
            .iter()
            .map(|kid| self.jwks_rsa[kid].clone())
            .collect();
        keys.extend(self.jwks_other.iter().cloned());
        json!({ "keys": keys })
    }

    fn id_token(&self, subject: &str, nonce: Option<&str>) -> String {
        let kid = self.state().signing_kid;
        let fixture = if kid == RSA2.kid { &RSA2 } else { &RSA1 };
        let now = unix_now();
        let mut claims = json!({
            "iss": self.issuer,
            "aud": IdentityProvider::CLIENT_ID,
            "sub": subject,
            "iat": now,
            "auth_time": now,
            "exp": now + JWT_LIFETIME_SECS,
        });
        if let Some(nonce) = nonce {
            claims["nonce"] = json!(nonce);
        }
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_string());
        let key = EncodingKey::from_rsa_pem(fixture.private_pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &key).expect("sign ID token")
    }
}

impl State {
    fn issue_access_token(
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

type HttpReply = Response<Full<Bytes>>;

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("register listener");
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(&shared, request).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(shared: &Shared, request: Request<Incoming>) -> HttpReply {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    match path.as_str() {
        "/.well-known/jwks.json" => {
            shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
        }
        "/introspect" => {
            shared.introspections.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    }
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let form = parse_form(&String::from_utf8_lossy(&body));
    if path == "/token" && form_value(&form, "grant_type") == Some("refresh_token") {
        shared.refreshes.fetch_add(1, Ordering::SeqCst);
    }
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if shared.down.load(Ordering::SeqCst) {
        return json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "error": "temporarily_unavailable" }),
        );
    }
    let query = parse_form(parts.uri.query().unwrap_or_default());
    match (&parts.method, path.as_str()) {
        (&Method::GET, "/.well-known/jwks.json") => {
            let mut reply = json_reply(StatusCode::OK, &shared.jwks());
            reply.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("max-age=300"),
            );
            reply
        }
        (&Method::GET, "/.well-known/openid-configuration") => {
            json_reply(StatusCode::OK, &discovery(&shared.issuer))
        }
        (&Method::POST, "/introspect") => introspect(shared, &parts.headers, &form),
        (&Method::GET, "/authorize") => authorize(shared, &query),
        (&Method::POST, "/token") => token(shared, &parts.headers, &form),
        _ => json_reply(StatusCode::NOT_FOUND, &json!({ "error": "not_found" })),
    }
}

fn discovery(issuer: &str) -> Value {
    json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "introspection_endpoint": format!("{issuer}/introspect"),
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    })
}

/// RFC 7662. Only opaque tokens are known; anything else is inactive.
fn introspect(shared: &Shared, headers: &HeaderMap, form: &[(String, String)]) -> HttpReply {
    if basic_client(headers).as_ref() != Some(&client_credentials()) {
        return unauthorized_client();
    }
    let Some(token) = form_value(form, "token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let state = shared.state();
    let answer = match state.access_tokens.get(token) {
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
fn authorize(shared: &Shared, query: &[(String, String)]) -> HttpReply {
    let get = |name| form_value(query, name);
    if get("response_type") != Some("code") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_response_type");
    }
    if get("client_id") != Some(IdentityProvider::CLIENT_ID) {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_client");
    }
    let Some(redirect_uri) = get("redirect_uri").filter(|uri| !uri.is_empty()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let Some(challenge) = get("code_challenge").filter(|challenge| !challenge.is_empty()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    if get("code_challenge_method") != Some("S256") {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let code = random_token("code");
    shared.state().codes.insert(
        code.clone(),
        PendingCode {
            client_id: IdentityProvider::CLIENT_ID.to_string(),
            redirect_uri: redirect_uri.to_string(),
            challenge: challenge.to_string(),
            subject: get("login_hint")
                .unwrap_or(IdentityProvider::SUBJECT)
                .to_string(),
            scope: get("scope").unwrap_or_default().to_string(),
            nonce: get("nonce").map(str::to_string),
        },
    );
    let separator = if redirect_uri.contains('?') { '&' } else { '?' };
    let mut location = format!("{redirect_uri}{separator}code={code}");
    if let Some(state) = get("state") {
        location.push_str("&state=");
        location.push_str(&percent_encode(state));
    }
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, location)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn token(shared: &Shared, headers: &HeaderMap, form: &[(String, String)]) -> HttpReply {
    let client = basic_client(headers).or_else(|| {
        Some((
            form_value(form, "client_id")?.to_string(),
            form_value(form, "client_secret")?.to_string(),
        ))
    });
    if client != Some(client_credentials()) {
        return unauthorized_client();
    }
    let client_id = IdentityProvider::CLIENT_ID;
    match form_value(form, "grant_type") {
        Some("authorization_code") => {
            let (Some(code), Some(redirect_uri), Some(verifier)) = (
                form_value(form, "code"),
                form_value(form, "redirect_uri"),
                form_value(form, "code_verifier"),
            ) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            // A code is consumed by its first redemption, successful or not.
            let Some(pending) = shared.state().codes.remove(code) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            };
            let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
            if pending.client_id != client_id
                || pending.redirect_uri != redirect_uri
                || pending.challenge != computed
            {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            }
            let id_token = shared.id_token(&pending.subject, pending.nonce.as_deref());
            let grant = RefreshGrant {
                client_id: pending.client_id,
                subject: pending.subject,
                scope: pending.scope,
            };
            let answer = shared.state().token_response(grant, Some(id_token));
            token_reply(&answer)
        }
        Some("refresh_token") => {
            let Some(refresh_token) = form_value(form, "refresh_token") else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            let mut state = shared.state();
            // Refresh tokens rotate: the one presented stops working here.
            match state.refresh_tokens.remove(refresh_token) {
                Some(grant) if grant.client_id == client_id => {
                    let answer = state.token_response(grant, None);
                    token_reply(&answer)
                }
                _ => oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"),
            }
        }
        Some(_) => oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
        None => oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
    }
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
    Some((form_decode(id), form_decode(secret)))
}

fn json_reply(status: StatusCode, value: &Value) -> HttpReply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap()
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

/// `application/x-www-form-urlencoded` pairs, in order.
fn parse_form(input: &str) -> Vec<(String, String)> {
    input
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(name), form_decode(value))
        })
        .collect()
}

fn form_value<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Decodes `+` and `%XX`; malformed escapes are kept as they are.
fn form_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len()
                && bytes[index + 1].is_ascii_hexdigit()
                && bytes[index + 2].is_ascii_hexdigit() =>
            {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                index += 2;
            }
            byte => out.push(byte),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    for byte in input.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn random_token(prefix: &str) -> String {
    let body: String = std::iter::repeat_with(fastrand::alphanumeric)
        .take(32)
        .collect();
    format!("{prefix}_{body}")
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
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
    use std::time::Instant;

    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{DecodingKey, Validation};

    use super::super::{request, Reply};
    use super::*;

    fn basic(id: &str, secret: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
    }

    fn client_basic() -> String {
        basic(IdentityProvider::CLIENT_ID, IdentityProvider::CLIENT_SECRET)
    }

    fn form_post(idp: &IdentityProvider, path: &str, authorization: &str, body: &str) -> Reply {
        let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded")];
        if !authorization.is_empty() {
            headers.push(("Authorization", authorization));
        }
        request(idp.addr, "POST", path, &headers, body.as_bytes())
    }

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

    fn fetch_jwks(idp: &IdentityProvider) -> JwkSet {
        let reply = request(idp.addr, "GET", "/.well-known/jwks.json", &[], b"");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("cache-control"), Some("max-age=300"));
        serde_json::from_slice(&reply.body).expect("JWKS parses as a JwkSet")
    }

    /// Verifies `token` with the JWK its header names and returns its claims.
    fn verify(jwks: &JwkSet, token: &str, issuer: &str, audience: &str) -> Value {
        let header = jsonwebtoken::decode_header(token).unwrap();
        let kid = header.kid.expect("token has a kid");
        let jwk = jwks
            .find(&kid)
            .unwrap_or_else(|| panic!("kid {kid} not in the JWKS"));
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[issuer]);
        jsonwebtoken::decode::<Value>(token, &key, &validation)
            .unwrap_or_else(|error| panic!("{kid}: {error}"))
            .claims
    }

    fn kids(jwks: &JwkSet) -> Vec<String> {
        jwks.keys
            .iter()
            .filter_map(|jwk| jwk.common.key_id.clone())
            .collect()
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
            percent_encode(REDIRECT)
        );
        let reply = request(idp.addr, "GET", &path, &[], b"");
        assert_eq!(reply.status, 302, "{}", reply.text());
        let location = reply.header("location").unwrap();
        let query = location
            .strip_prefix(&format!("{REDIRECT}?"))
            .unwrap_or_else(|| panic!("redirect to {location}"));
        let query = parse_form(query);
        assert_eq!(form_value(&query, "state"), Some("s 1"));
        form_value(&query, "code").unwrap().to_string()
    }

    fn redeem(idp: &IdentityProvider, code: &str, verifier: &str) -> Reply {
        let body = format!(
            "grant_type=authorization_code&code={code}&redirect_uri={}&code_verifier={verifier}",
            percent_encode(REDIRECT)
        );
        form_post(idp, "/token", &client_basic(), &body)
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

    #[test]
    fn idp_down_delay_and_unknown_paths() {
        let idp = IdentityProvider::start();
        assert_eq!(request(idp.addr, "GET", "/nope", &[], b"").status, 404);
        let discovery = request(
            idp.addr,
            "GET",
            "/.well-known/openid-configuration",
            &[],
            b"",
        );
        assert_eq!(discovery.json()["jwks_uri"], idp.jwks_url());
        assert_eq!(discovery.json()["token_endpoint"], idp.token_url());

        idp.set_down(true);
        let jwks = request(idp.addr, "GET", "/.well-known/jwks.json", &[], b"");
        assert_eq!(jwks.status, 503);
        let token = idp.issue_opaque("alice", &[], Duration::from_secs(60));
        let reply = form_post(
            &idp,
            "/introspect",
            &client_basic(),
            &format!("token={token}"),
        );
        assert_eq!(reply.status, 503);
        assert_eq!((idp.jwks_fetches(), idp.introspections()), (1, 1));
        idp.set_down(false);
        fetch_jwks(&idp);

        idp.set_delay(Duration::from_millis(300));
        let started = Instant::now();
        fetch_jwks(&idp);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(idp.jwks_fetches(), 3);
    }
}
