//! OAuth2 token introspection through the real gateway, with the test identity provider and the
//! real Redis (`GATEHOUSE_TEST_REDIS_URL`, default redis://127.0.0.1:6379).

use std::time::{Duration, Instant};

use crate::support::idp::IdentityProvider;
use crate::support::{spawn_echo, Gateway};

fn redis_url() -> String {
    std::env::var("GATEHOUSE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn config(idp: &IdentityProvider, echo: std::net::SocketAddr, cache: &str) -> String {
    format!(
        r#"
redis: {{ url: "{redis}", command_timeout: 50ms }}
upstreams: [{{ name: echo, targets: [{{ address: "{echo}" }}] }}]
routes:
  - name: api
    match: {{ paths: [{{ prefix: /api }}] }}
    upstream: echo
    auth: required
    filters:
      - kind: oauth2
        config:
          introspection_url: "{url}"
          client_id: {client_id}
          client_secret: {client_secret}
          required_scopes: [read]
          timeout: 300ms
          {cache}
"#,
        redis = redis_url(),
        url = idp.introspection_url(),
        client_id = IdentityProvider::CLIENT_ID,
        client_secret = IdentityProvider::CLIENT_SECRET,
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn active_inactive_and_scopes() {
    let idp = IdentityProvider::start();
    let echo = spawn_echo("echo");
    let gateway = Gateway::start(&config(&idp, echo, ""));
    let token = idp.issue_opaque("alice", &["read", "write"], Duration::from_secs(300));
    let reply = gateway.request("GET", "/api/x", &[("Authorization", &bearer(&token))], b"");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["x-consumer-id"], "alice");

    let narrow = idp.issue_opaque("bob", &["write"], Duration::from_secs(300));
    let reply = gateway.request("GET", "/api/x", &[("Authorization", &bearer(&narrow))], b"");
    assert_eq!(reply.status, 403);

    let reply = gateway.request(
        "GET",
        "/api/x",
        &[("Authorization", "Bearer not-a-known-token")],
        b"",
    );
    assert_eq!(reply.status, 401);
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer realm=\"gatehouse\", error=\"invalid_token\"")
    );

    // Answers are cached: the same token again does not reach the endpoint.
    let before = idp.introspections();
    for _ in 0..5 {
        assert_eq!(
            gateway
                .request("GET", "/api/x", &[("Authorization", &bearer(&token))], b"")
                .status,
            200
        );
    }
    assert_eq!(idp.introspections(), before);
}

#[test]
fn a_down_or_slow_endpoint_is_503_within_the_deadline() {
    let idp = IdentityProvider::start();
    let echo = spawn_echo("echo");
    let gateway = Gateway::start(&config(&idp, echo, "cache_size: 0"));
    idp.set_delay(Duration::from_secs(3));
    let token = idp.issue_opaque("alice", &["read"], Duration::from_secs(300));
    let started = Instant::now();
    let reply = gateway.request("GET", "/api/x", &[("Authorization", &bearer(&token))], b"");
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(
        reply.json()["type"],
        "urn:gatehouse:problem:auth-unavailable"
    );
    assert!(
        elapsed < Duration::from_millis(1500),
        "answered after {elapsed:?}"
    );

    idp.set_delay(Duration::ZERO);
    idp.set_down(true);
    let another = idp.issue_opaque("carol", &["read"], Duration::from_secs(300));
    let reply = gateway.request(
        "GET",
        "/api/x",
        &[("Authorization", &bearer(&another))],
        b"",
    );
    assert_eq!(reply.status, 503);
}

#[test]
fn revocation_takes_effect_and_negative_answers_are_cached() {
    let idp = IdentityProvider::start();
    let echo = spawn_echo("echo");
    let gateway = Gateway::start(&config(
        &idp,
        echo,
        "cache_ttl: 1s\n          negative_cache_ttl: 30s",
    ));
    let token = idp.issue_opaque("alice", &["read"], Duration::from_secs(300));
    assert_eq!(
        gateway
            .request("GET", "/api/x", &[("Authorization", &bearer(&token))], b"")
            .status,
        200
    );
    idp.revoke(&token);
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(
        gateway
            .request("GET", "/api/x", &[("Authorization", &bearer(&token))], b"")
            .status,
        401
    );
    let before = idp.introspections();
    for _ in 0..5 {
        assert_eq!(
            gateway
                .request("GET", "/api/x", &[("Authorization", &bearer(&token))], b"")
                .status,
            401
        );
    }
    assert_eq!(
        idp.introspections(),
        before,
        "inactive answers were not cached"
    );
}

/// Two nodes on `redis`: the second finds the first one's answer there.
fn nodes_share_answers(redis: &str) {
    let idp = IdentityProvider::start();
    let echo = spawn_echo("echo");
    let yaml = config(&idp, echo, "").replace(&redis_url(), redis);
    let first = Gateway::start(&yaml);
    let second = Gateway::start(&yaml);
    let token = idp.issue_opaque("alice", &["read"], Duration::from_secs(300));
    assert_eq!(
        first
            .request("GET", "/api/x", &[("Authorization", &bearer(&token))], b"")
            .status,
        200
    );
    let after_first = idp.introspections();
    // The write to Redis happens off the request path; give it a moment.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        second
            .request("GET", "/api/x", &[("Authorization", &bearer(&token))], b"")
            .status,
        200
    );
    assert_eq!(
        idp.introspections(),
        after_first,
        "the second node asked the endpoint again"
    );
}

#[test]
fn nodes_share_answers_through_redis() {
    nodes_share_answers(&redis_url());
}

#[test]
fn nodes_share_answers_through_a_redis_cluster() {
    let cluster = crate::support::redis_cluster::RedisCluster::start(3, 0);
    nodes_share_answers(&cluster.url());
    assert!(
        !cluster.keys("gatehouse:introspect:*").is_empty(),
        "no cached answer in the cluster"
    );
}

#[test]
fn a_dead_redis_only_costs_the_shared_cache() {
    let idp = IdentityProvider::start();
    let echo = spawn_echo("echo");
    let dead = format!("redis://127.0.0.1:{}", crate::support::free_port());
    let yaml = config(&idp, echo, "").replace(&redis_url(), &dead);
    let gateway = Gateway::start(&yaml);
    let token = idp.issue_opaque("alice", &["read"], Duration::from_secs(300));
    let started = Instant::now();
    let reply = gateway.request("GET", "/api/x", &[("Authorization", &bearer(&token))], b"");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}
