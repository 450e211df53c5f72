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
//! The parts: `server` serves HTTP and holds the outage switches and request counts, `oauth`
//! the tokens, codes and grants, `keys` the signing keys and their JWKS, `form` the URL and
//! form encodings OAuth speaks. This module is the face the tests use.

mod form;
mod keys;
mod oauth;
mod server;

#[cfg(test)]
mod client;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Lifetime of JWTs from [`IdentityProvider::claims`] and of ID tokens.
const JWT_LIFETIME_SECS: u64 = 300;

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
    keys: keys::Keys,
    tokens: Mutex<oauth::Tokens>,
    traffic: server::Traffic,
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
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            issuer: format!("http://{addr}"),
            keys: keys::Keys::from_fixtures(),
            tokens: Mutex::new(oauth::Tokens::default()),
            traffic: server::Traffic::default(),
        });
        let stop = server::spawn(listener, Arc::clone(&shared));
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
        self.shared.url(server::JWKS_PATH)
    }

    pub fn discovery_url(&self) -> String {
        self.shared.url(server::DISCOVERY_PATH)
    }

    pub fn introspection_url(&self) -> String {
        self.shared.url(server::INTROSPECTION_PATH)
    }

    pub fn token_url(&self) -> String {
        self.shared.url(server::TOKEN_PATH)
    }

    pub fn authorize_url(&self) -> String {
        self.shared.url(server::AUTHORIZATION_PATH)
    }

    /// Signs `claims` with RS256 and the current RSA key; the header `kid` is that key's
    /// (`rsa1` until [`IdentityProvider::rotate`]).
    pub fn sign(&self, claims: Value) -> String {
        self.shared.keys.sign(&claims)
    }

    /// Signs `claims` with `alg` and the fixture key named `kid`, which goes into the header:
    /// `RS*`/`PS*` with `rsa1` or `rsa2`, `ES256` with `ec256`, `ES384` with `ec384`, `EdDSA`
    /// with `ed25519`. For `HS256`/`HS384`/`HS512`, `kid` is the shared secret itself and the
    /// header `kid` is `hmac`. Panics on any other combination.
    pub fn sign_with(&self, alg: &str, kid: &str, claims: Value) -> String {
        keys::sign_with(alg, kid, &claims)
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
        self.shared.keys.rotate(drop_old);
    }

    /// While down, every endpoint answers `503`.
    pub fn set_down(&self, down: bool) {
        self.shared.traffic.set_down(down);
    }

    /// Waits this long before answering any request (the request is counted on arrival).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.traffic.set_delay(delay);
    }

    /// Requests to the JWKS endpoint so far, however they were answered.
    pub fn jwks_fetches(&self) -> usize {
        self.shared.traffic.jwks_fetches()
    }

    /// Requests to the introspection endpoint so far, however they were answered.
    pub fn introspections(&self) -> usize {
        self.shared.traffic.introspections()
    }

    /// `refresh_token` grant requests to `/token` so far, however they were answered.
    pub fn refreshes(&self) -> usize {
        self.shared.traffic.refreshes()
    }

    /// Lifetime of access tokens issued by `/token` from now on (default 300 s).
    pub fn set_access_token_lifetime(&self, lifetime: Duration) {
        self.shared.tokens().access_token_lifetime = lifetime;
    }

    /// An opaque access token for [`IdentityProvider::CLIENT_ID`] that introspection reports
    /// active until `expires_in` has passed or it is revoked.
    pub fn issue_opaque(&self, subject: &str, scopes: &[&str], expires_in: Duration) -> String {
        self.shared.tokens().issue_access_token(
            Self::CLIENT_ID,
            subject,
            &scopes.join(" "),
            expires_in,
        )
    }

    /// Makes an opaque access token inactive. Unknown tokens are ignored.
    pub fn revoke(&self, token: &str) {
        self.shared.tokens().revoke(token);
    }
}

impl Shared {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.issuer)
    }

    fn tokens(&self) -> MutexGuard<'_, oauth::Tokens> {
        lock(&self.tokens)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take the server down with it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}
