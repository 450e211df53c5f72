//! Authentication through the real gateway: JWT with a live JWKS (rotation, outage, readiness),
//! token attacks, API keys made by `gatehouse keygen`, route `auth` modes, identity headers.

use std::time::Duration;

use crate::support::idp::IdentityProvider;
use crate::support::{get, run_cli, spawn_echo, Gateway};

fn jwt_config(idp: &IdentityProvider, echo: std::net::SocketAddr, extra_jwt: &str) -> String {
    format!(
        r#"
consumers:
  - id: acme
    username: acme-corp
    credentials:
      - {{ type: jwt, issuer: "{issuer}", subject: alice }}
upstreams: [{{ name: echo, targets: [{{ address: "{echo}" }}] }}]
filters: [{{ kind: request_id }}]
routes:
  - name: api
    match: {{ paths: [{{ prefix: /api }}] }}
    upstream: echo
    auth: required
    filters:
      - kind: jwt
        config:
          issuer: "{issuer}"
          jwks_url: "{jwks}"
          algorithms: [RS256, ES256, EdDSA]
          audiences: [api]
          jwks_min_refresh_interval: 1s
          {extra_jwt}
  - name: admin
    match: {{ paths: [{{ prefix: /admin }}] }}
    upstream: echo
    auth: required
    filters:
      - kind: jwt
        config:
          issuer: "{issuer}"
          jwks_url: "{jwks}"
          algorithms: [RS256]
          audiences: [api]
          require: [{{ claim: scope, contains: admin }}]
  - name: open
    match: {{ paths: [{{ prefix: /open }}] }}
    upstream: echo
"#,
        issuer = idp.issuer(),
        jwks = idp.jwks_url(),
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn jwt_identifies_the_consumer_and_tells_the_upstream() {
    let idp = IdentityProvider::start();
    let echo = spawn_echo("echo");
    let gateway = Gateway::start(&jwt_config(&idp, echo, ""));

    let token = idp.sign(idp.claims("alice", "api"));
    let reply = gateway.request(
        "GET",
        "/api/x",
        &[
            ("Authorization", &bearer(&token)),
            ("X-Consumer-Id", "spoofed"),
        ],
        b"",
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let headers = &reply.json()["headers"];
    assert_eq!(headers["x-consumer-id"], "acme");
    assert_eq!(headers["x-consumer-username"], "acme-corp");
    assert_eq!(headers["x-authenticated-subject"], "alice");

    // Every algorithm the route pins, from the same key set.
    for (alg, kid) in [("ES256", "ec256"), ("EdDSA", "ed25519")] {
        let token = idp.sign_with(alg, kid, idp.claims("bob", "api"));
        let reply = gateway.request("GET", "/api/x", &[("Authorization", &bearer(&token))], b"");
        assert_eq!(reply.status, 200, "{alg}: {}", reply.text());
        assert_eq!(reply.json()["headers"]["x-consumer-id"], "bob");
    }

    // No token on a required route.
    let reply = gateway.get("/api/x");
    assert_eq!(reply.status, 401);
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer realm=\"gatehouse\"")
    );
    assert_eq!(
        reply.json()["request_id"],
        reply.header("x-request-id").unwrap()
    );

    // Client-sent identity headers never reach the upstream, even on open routes.
    let reply = gateway.request(
        "GET",
        "/open",
        &[
            ("X-Consumer-Id", "spoofed"),
            ("X-Authenticated-Subject", "root"),
        ],
        b"",
    );
    assert_eq!(reply.status, 200);
    assert!(reply.json()["headers"].get("x-consumer-id").is_none());
    assert!(reply.json()["headers"]
        .get("x-authenticated-subject")
        .is_none());

    // Authenticated but without the required scope: 403.
    let reply = gateway.request("GET", "/admin", &[("Authorization", &bearer(&token))], b"");
    assert_eq!(reply.status, 403);
    let mut claims = idp.claims("alice", "api");
    claims["scope"] = serde_json::json!("read admin");
    let reply = gateway.request(
        "GET",
        "/admin",
        &[("Authorization", &bearer(&idp.sign(claims)))],
        b"",
    );
    assert_eq!(reply.status, 200);
}

#[test]
fn token_attacks_are_refused_without_saying_why() {
    let idp = IdentityProvider::start();
    let echo = spawn_echo("echo");
    let gateway = Gateway::start(&jwt_config(&idp, echo, ""));
    let good = idp.sign(idp.claims("alice", "api"));
    let parts: Vec<&str> = good.split('.').collect();
    use base64::Engine;
    let b64 = |value: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    };
    let public_key = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/keys/rsa1.pub"
    ))
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let with = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut claims = idp.claims("alice", "api");
        change(&mut claims);
        idp.sign(claims)
    };
    let mut attacks = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(serde_json::json!({"alg": "none", "typ": "JWT"})),
                parts[1]
            ),
        ),
        (
            "key confusion",
            idp.sign_with("HS256", &public_key, idp.claims("alice", "api")),
        ),
        (
            "expired",
            with(&|claims| claims["exp"] = serde_json::json!(now - 120)),
        ),
        (
            "nbf in the future",
            with(&|claims| claims["nbf"] = serde_json::json!(now + 600)),
        ),
        (
            "exp as a string",
            with(&|claims| claims["exp"] = serde_json::json!((now + 300).to_string())),
        ),
        (
            "wrong iss",
            with(&|claims| claims["iss"] = serde_json::json!("https://evil.example")),
        ),
        (
            "wrong aud",
            with(&|claims| claims["aud"] = serde_json::json!("other")),
        ),
        (
            "tampered",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(serde_json::json!({"sub": "admin", "aud": "api", "exp": now + 300})),
                parts[2]
            ),
        ),
        ("truncated", good[..good.len() - 8].to_string()),
    ];
    for kid in ["../../dev/null", "x' OR '1'='1", &"k".repeat(10_000)] {
        let header = b64(serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": kid}));
        attacks.push(("hostile kid", format!("{header}.{}.{}", parts[1], parts[2])));
    }
    let fetches_before = idp.jwks_fetches();
    for (name, token) in &attacks {
        let reply = gateway.request("GET", "/api/x", &[("Authorization", &bearer(token))], b"");
        assert_eq!(reply.status, 401, "{name}: {}", reply.text());
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer realm=\"gatehouse\", error=\"invalid_token\""),
            "{name}"
        );
        let body = reply.text();
        assert!(
            !body.contains(&token[..token.len().min(40)]),
            "{name}: the token is echoed"
        );
        assert_eq!(reply.json()["title"], "Authentication failed", "{name}");
    }
    // Hostile kids are refused before any lookup: they cause no JWKS fetch.
    assert!(
        idp.jwks_fetches() - fetches_before <= 1,
        "hostile kids triggered key fetches"
    );
    for (name, headers) in [
        (
            "empty bearer",
            vec![("Authorization", "Bearer ".to_string())],
        ),
        (
            "two authorization headers",
            vec![
                ("Authorization", bearer(&good)),
                ("Authorization", bearer(&good)),
            ],
        ),
    ] {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        let reply = gateway.request("GET", "/api/x", &headers, b"");
        assert_eq!(reply.status, 401, "{name}");
    }
    let metrics = gateway.metrics();
    for reason in [
        "algorithm",
        "expired",
        "not_yet_valid",
        "claims",
        "issuer",
        "audience",
        "signature",
        "kid",
        "malformed",
        "ambiguous",
    ] {
        assert!(
            metrics.contains(&format!(
                "gatehouse_auth_failures_total{{method=\"jwt\",reason=\"{reason}\"}}"
            )),
            "no failure counted for {reason}:\n{metrics}"
        );
    }
}

#[test]
fn key_rotation_and_jwks_outage() {
    let idp = IdentityProvider::start();
    let echo = spawn_echo("echo");
    let gateway = Gateway::start(&jwt_config(&idp, echo, "jwks_refresh: 1s"));
    let old_token = idp.sign(idp.claims("alice", "api"));
    assert_eq!(
        gateway
            .request(
                "GET",
                "/api/x",
                &[("Authorization", &bearer(&old_token))],
                b""
            )
            .status,
        200
    );

    // The provider rotates; tokens with the new kid work at once, fetched by one shared refresh.
    idp.rotate(true);
    let new_token = idp.sign(idp.claims("carol", "api"));
    let before = idp.jwks_fetches();
    let address = gateway.addr;
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let token = new_token.clone();
            std::thread::spawn(move || {
                crate::support::request(
                    address,
                    "GET",
                    "/api/x",
                    &[("Authorization", &bearer(&token))],
                    b"",
                )
                .status
            })
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap(), 200);
    }
    assert!(
        idp.jwks_fetches() - before <= 3,
        "unknown kid caused {} fetches",
        idp.jwks_fetches() - before
    );

    // The provider goes down: known keys keep working and failures are counted.
    idp.set_down(true);
    std::thread::sleep(Duration::from_millis(2500));
    let another = idp.sign(idp.claims("dave", "api"));
    assert_eq!(
        gateway
            .request(
                "GET",
                "/api/x",
                &[("Authorization", &bearer(&another))],
                b""
            )
            .status,
        200
    );
    let metrics = gateway.metrics();
    let failures: u64 = metrics
        .lines()
        .find(|line| line.starts_with("gatehouse_jwks_refresh_failures_total "))
        .and_then(|line| line.split(' ').nth(1)?.parse().ok())
        .unwrap();
    assert!(failures >= 1, "{metrics}");
}

#[test]
fn not_ready_until_the_key_set_is_fetched() {
    let idp = IdentityProvider::start();
    idp.set_down(true);
    let echo = spawn_echo("echo");
    let gateway = Gateway::start_unready(&jwt_config(&idp, echo, ""));
    std::thread::sleep(Duration::from_millis(700));
    let ready = get(gateway.ops, "/readyz");
    assert_eq!(ready.status, 503, "{}", ready.text());
    idp.set_down(false);
    gateway.wait_ready();
}

#[test]
fn api_keys_from_keygen() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, _) = run_cli(&["keygen"], dir.path());
    assert_eq!(code, 0);
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap()
            .trim()
            .to_string()
    };
    let key = field("key:");
    let hash = field("hash:");
    assert!(hash.starts_with("sha256:") && !hash.contains(&key));
    let (_, stdout, _) = run_cli(&["keygen"], dir.path());
    let disabled_key = stdout
        .lines()
        .find_map(|line| line.strip_prefix("key:"))
        .unwrap()
        .trim()
        .to_string();
    let disabled_hash = stdout
        .lines()
        .find_map(|line| line.strip_prefix("hash:"))
        .unwrap()
        .trim()
        .to_string();
    let expired_key = "expired-key-material";
    let expired_hash = format!(
        "sha256:{}",
        hex::encode(gatehouse_filters::consumers::sha256(expired_key.as_bytes()))
    );

    let echo = spawn_echo("echo");
    let gateway = Gateway::start(&format!(
        r#"
consumers:
  - id: acme
    credentials:
      - {{ type: api_key, hash: "{hash}" }}
      - {{ type: api_key, hash: "{disabled_hash}", disabled: true }}
      - {{ type: api_key, hash: "{expired_hash}", expires_at: "2020-01-01T00:00:00Z" }}
  - id: guest
auth: {{ anonymous: guest }}
upstreams: [{{ name: echo, targets: [{{ address: "{echo}" }}] }}]
routes:
  - name: keyed
    match: {{ paths: [{{ prefix: /keyed }}] }}
    upstream: echo
    auth: required
    filters: [{{ kind: api_key, config: {{ header: x-api-key, query: apikey }} }}]
  - name: optional
    match: {{ paths: [{{ prefix: /optional }}] }}
    upstream: echo
    auth: optional
    filters: [{{ kind: api_key }}]
"#
    ));
    let reply = gateway.request("GET", "/keyed", &[("x-api-key", &key)], b"");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["x-consumer-id"], "acme");
    assert!(
        reply.json()["headers"].get("x-api-key").is_none(),
        "the key reached the upstream"
    );
    let reply = gateway.get(&format!("/keyed?apikey={key}&page=2"));
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["path"], "/keyed?page=2");
    for bad in ["wrong", disabled_key.as_str(), expired_key] {
        let reply = gateway.request("GET", "/keyed", &[("x-api-key", bad)], b"");
        assert_eq!(reply.status, 401, "{bad}");
    }
    assert_eq!(gateway.get("/keyed").status, 401);
    // Optional: unidentified callers go on as the anonymous consumer; a bad key is still 401.
    let reply = gateway.get("/optional");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["headers"]["x-consumer-id"], "guest");
    assert_eq!(
        gateway
            .request("GET", "/optional", &[("x-api-key", "wrong")], b"")
            .status,
        401
    );

    // The key in clear is nowhere: not in /config, not in the access log, not in the logs.
    let config = get(gateway.ops, "/config").text();
    assert!(
        !config.contains(&key) && !config.contains(&hash[7..]),
        "{config}"
    );
    std::thread::sleep(Duration::from_millis(400));
    let access_log =
        std::fs::read_to_string(gateway.dir.path().join("access.log")).unwrap_or_default();
    assert!(access_log.contains("/keyed"), "the access log is empty");
    assert!(!access_log.contains(&key), "the key is in the access log");
    assert!(!gateway.stderr().contains(&key));
}
