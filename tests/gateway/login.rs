//! The browser login flow (authorization code + PKCE) through the real gateway, with the test
//! identity provider and the real Redis; the test plays the browser.

use std::io::{Read, Write};
use std::time::Duration;

use sha2::Digest;

use crate::support::idp::IdentityProvider;
use crate::support::{request, spawn_echo, Gateway, Reply};

fn redis_address() -> String {
    let url = std::env::var("GATEHOUSE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    url.trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string()
}

/// `EXISTS key` over a raw RESP connection.
fn redis_exists(key: &str) -> bool {
    let mut stream = std::net::TcpStream::connect(redis_address()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    write!(stream, "*2\r\n$6\r\nEXISTS\r\n${}\r\n{key}\r\n", key.len()).unwrap();
    let mut answer = [0u8; 16];
    let read = stream.read(&mut answer).unwrap();
    std::str::from_utf8(&answer[..read])
        .unwrap()
        .starts_with(":1")
}

fn set_cookies(reply: &Reply) -> Vec<String> {
    reply
        .headers
        .iter()
        .filter(|(name, _)| name == "set-cookie")
        .map(|(_, value)| value.clone())
        .collect()
}

fn cookie_value(reply: &Reply, name: &str) -> Option<String> {
    set_cookies(reply).iter().find_map(|cookie| {
        let first = cookie.split(';').next()?;
        let (key, value) = first.split_once('=')?;
        (key == name).then(|| value.to_string())
    })
}

fn location_path(location: &str) -> String {
    let without_scheme = location
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(location);
    without_scheme
        .find('/')
        .map(|index| without_scheme[index..].to_string())
        .unwrap_or_else(|| "/".into())
}

struct Browser<'a> {
    gateway: &'a Gateway,
    idp: &'a IdentityProvider,
}

impl Browser<'_> {
    /// Follow a login from a protected page to the session cookie.
    fn log_in(&self, page: &str) -> String {
        let reply = self.gateway.get(page);
        assert_eq!(reply.status, 302, "{}", reply.text());
        let location = reply.header("location").unwrap().to_string();
        assert!(
            location.starts_with(&self.idp.authorize_url()),
            "{location}"
        );
        assert!(
            location.contains("code_challenge_method=S256") && location.contains("code_challenge=")
        );
        let state = cookie_value(&reply, "gatehouse_session_state").expect("a state cookie");
        let state_cookie = set_cookies(&reply)
            .into_iter()
            .find(|cookie| cookie.starts_with("gatehouse_session_state="))
            .unwrap();
        assert!(
            state_cookie.contains("HttpOnly")
                && state_cookie.contains("Secure")
                && state_cookie.contains("SameSite=Lax")
        );

        let authorized = request(self.idp.addr, "GET", &location_path(&location), &[], b"");
        assert_eq!(authorized.status, 302, "{}", authorized.text());
        let callback = location_path(authorized.header("location").unwrap());
        assert!(callback.starts_with("/oauth2/callback?"), "{callback}");

        let reply = self.gateway.request(
            "GET",
            &callback,
            &[("Cookie", &format!("gatehouse_session_state={state}"))],
            b"",
        );
        assert_eq!(reply.status, 302, "{}", reply.text());
        assert_eq!(reply.header("location"), Some(page));
        let session = cookie_value(&reply, "gatehouse_session").expect("a session cookie");
        let session_cookie = set_cookies(&reply)
            .into_iter()
            .find(|cookie| cookie.starts_with("gatehouse_session="))
            .unwrap();
        assert!(
            session_cookie.contains("HttpOnly")
                && session_cookie.contains("Secure")
                && session_cookie.contains("SameSite=Lax")
        );
        session
    }
}

fn session_key(id: &str) -> String {
    format!(
        "gatehouse:session:{{{}}}",
        hex::encode(sha2::Sha256::digest(id.as_bytes()))
    )
}

/// A gateway whose only route logs browsers in at `idp`, keeping sessions in `redis`.
fn login_gateway(
    idp: &IdentityProvider,
    redis: &str,
    route_extra: &str,
    filter_extra: &str,
) -> Gateway {
    let echo = spawn_echo("echo");
    Gateway::start(&format!(
        r#"
redis: {{ url: "{redis}", command_timeout: 100ms }}
upstreams: [{{ name: echo, targets: [{{ address: "{echo}" }}] }}]
routes:
  - name: app
    match: {{ paths: [{{ prefix: / }}] }}
    upstream: echo
    {route_extra}
    filters:
      - kind: oauth2
        config:
          mode: login
          authorization_url: "{authorize}"
          token_url: "{token}"
          redirect_uri: "http://gateway.test/oauth2/callback"
          client_id: {client_id}
          client_secret: {client_secret}
          {filter_extra}
"#,
        authorize = idp.authorize_url(),
        token = idp.token_url(),
        client_id = IdentityProvider::CLIENT_ID,
        client_secret = IdentityProvider::CLIENT_SECRET,
    ))
}

fn redis_url() -> String {
    std::env::var("GATEHOUSE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[test]
fn login_refresh_and_logout() {
    let idp = IdentityProvider::start();
    let gateway = login_gateway(
        &idp,
        &redis_url(),
        "auth: required",
        "scopes: [openid, read]\n          forward_access_token: true",
    );
    idp.set_access_token_lifetime(Duration::from_secs(1));
    let browser = Browser {
        gateway: &gateway,
        idp: &idp,
    };
    let session = browser.log_in("/app/page?x=1");
    assert!(redis_exists(&session_key(&session)), "no session in Redis");

    let with_session = [("Cookie", format!("gatehouse_session={session}"))];
    let headers: Vec<(&str, &str)> = with_session
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let reply = gateway.request("GET", "/app/page?x=1", &headers, b"");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["headers"]["x-consumer-id"],
        IdentityProvider::SUBJECT
    );
    assert!(reply.json()["headers"]["authorization"]
        .as_str()
        .unwrap()
        .starts_with("Bearer "));

    // The access token expires; the refresh token renews it without a new login.
    std::thread::sleep(Duration::from_millis(2100));
    let refreshes = idp.refreshes();
    let reply = gateway.request("GET", "/app/page", &headers, b"");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(idp.refreshes(), refreshes + 1);

    // Logout deletes the session; the old cookie then leads to a new login.
    let reply = gateway.request("GET", "/oauth2/logout", &headers, b"");
    assert_eq!(reply.status, 302);
    assert!(set_cookies(&reply)
        .iter()
        .any(|cookie| cookie.starts_with("gatehouse_session=;") && cookie.contains("Max-Age=0")));
    assert!(
        !redis_exists(&session_key(&session)),
        "the session survived logout"
    );
    let reply = gateway.request("GET", "/app/page", &headers, b"");
    assert_eq!(reply.status, 302);
}

#[test]
fn a_login_session_lives_in_a_redis_cluster() {
    let cluster = crate::support::redis_cluster::RedisCluster::start(3, 0);
    let idp = IdentityProvider::start();
    let gateway = login_gateway(&idp, &cluster.url(), "auth: required", "scopes: [openid]");
    let browser = Browser {
        gateway: &gateway,
        idp: &idp,
    };
    let session = browser.log_in("/app/page");
    let key = session_key(&session);
    assert_eq!(cluster.keys(&key).len(), 1, "no session in the cluster");
    let cookie = format!("gatehouse_session={session}");
    let reply = gateway.request("GET", "/app/page", &[("Cookie", &cookie)], b"");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = gateway.request("GET", "/oauth2/logout", &[("Cookie", &cookie)], b"");
    assert_eq!(reply.status, 302);
    assert!(cluster.keys(&key).is_empty(), "the session survived logout");
}

#[test]
fn a_callback_with_a_foreign_state_is_refused() {
    let idp = IdentityProvider::start();
    let gateway = login_gateway(&idp, &redis_url(), "", "");
    let reply = gateway.get("/app");
    let location = reply.header("location").unwrap().to_string();
    let authorized = request(idp.addr, "GET", &location_path(&location), &[], b"");
    let callback = location_path(authorized.header("location").unwrap());
    // An attacker's callback replayed into a victim's browser: the victim has no matching state.
    let reply = gateway.request(
        "GET",
        &callback,
        &[("Cookie", "gatehouse_session_state=someone-else")],
        b"",
    );
    assert_eq!(reply.status, 401, "{}", reply.text());
    let reply = gateway.get(&callback);
    assert_eq!(reply.status, 401);
    assert!(cookie_value(&reply, "gatehouse_session").is_none());
}

#[test]
fn a_dead_session_store_is_503_not_a_hang_or_a_pass() {
    let idp = IdentityProvider::start();
    let dead = format!("redis://127.0.0.1:{}", crate::support::free_port());
    let gateway = login_gateway(&idp, &dead, "auth: required", "");
    let started = std::time::Instant::now();
    let reply = gateway.request("GET", "/app", &[("Cookie", "gatehouse_session=abc")], b"");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(
        reply.json()["type"],
        "urn:gatehouse:problem:auth-unavailable"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let reply = gateway.get("/app");
    assert_eq!(
        reply.status, 503,
        "a login must not start without a place to keep its state"
    );
}
