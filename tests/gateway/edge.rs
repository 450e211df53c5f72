//! Edge policies through the real gateway: CORS (`cors`), client address rules
//! (`ip_restriction`) and a route's methods, body size and content types (`request_limits`).
//! Each test checks what the upstream received (recording targets and the echo upstream) and
//! what the client got; config errors go through `gatehouse validate`, and the kinds through
//! the PostgreSQL store.

use std::net::SocketAddr;

use crate::support::pg::TestDatabase;
use crate::support::target::Target;
use crate::support::{request, request_bytes, run_cli, send_raw, spawn_echo, Gateway, Reply};

const APP: &str = "https://app.example.com";
const KEY: &str = "edge-policies-test-key";

fn key_hash() -> String {
    format!(
        "sha256:{}",
        hex::encode(gatehouse_filters::consumers::sha256(KEY.as_bytes()))
    )
}

fn cors_headers(reply: &Reply) -> Vec<&(String, String)> {
    reply
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with("access-control-"))
        .collect()
}

fn problem_type(reply: &Reply) -> String {
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json"),
        "{reply:?}"
    );
    reply.json()["type"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A preflight asking to send `method` with two headers.
fn preflight(address: SocketAddr, path: &str, origin: &str, method: &str) -> Reply {
    request(
        address,
        "OPTIONS",
        path,
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", method),
            ("Access-Control-Request-Headers", "content-type, x-api-key"),
        ],
        b"",
    )
}

#[test]
fn cors_preflights_are_answered_before_auth_and_only_allowed_origins_get_cors_headers() {
    let private = Target::start("private");
    let fallback = Target::start("fallback");
    let gateway = Gateway::start(&format!(
        r#"
consumers:
  - id: acme
    credentials: [{{ type: api_key, hash: "{hash}" }}]
upstreams:
  - {{ name: private, targets: [{{ address: "{private}" }}] }}
  - {{ name: fallback, targets: [{{ address: "{fallback}" }}] }}
filters:
  - kind: request_id
routes:
  - name: private
    match: {{ paths: [{{ prefix: /private }}], methods: [GET, PUT] }}
    upstream: private
    auth: required
    filters:
      - kind: api_key
      - kind: cors
        config:
          allow_origins: ["{APP}", "*.partner.example", {{ regex: "https://tenant-[0-9]+\\.example\\.io" }}]
          allow_methods: [GET, PUT]
          allow_headers: [content-type, x-api-key]
          expose_headers: [x-request-id]
          allow_credentials: true
          max_age: 10m
  - name: catch-all
    priority: -1
    match: {{ paths: [{{ prefix: / }}] }}
    upstream: fallback
"#,
        hash = key_hash(),
        private = private.address,
        fallback = fallback.address,
    ));

    // The route needs credentials, lists the auth filter first and matches only GET and PUT;
    // the preflight is still answered, by the gateway, and not by the catch-all route.
    for origin in [
        APP,
        "https://eu.partner.example",
        "https://tenant-7.example.io",
    ] {
        let reply = preflight(gateway.addr, "/private/items/7", origin, "PUT");
        assert_eq!(reply.status, 204, "{origin}: {reply:?}");
        assert_eq!(reply.header("access-control-allow-origin"), Some(origin));
        assert_eq!(
            reply.header("access-control-allow-methods"),
            Some("GET, PUT")
        );
        assert_eq!(
            reply.header("access-control-allow-headers"),
            Some("content-type, x-api-key")
        );
        assert_eq!(
            reply.header("access-control-allow-credentials"),
            Some("true")
        );
        assert_eq!(reply.header("access-control-max-age"), Some("600"));
        assert_eq!(reply.header("access-control-expose-headers"), None);
        assert_eq!(reply.header("vary"), Some("Origin"));
        assert_eq!(reply.header("content-length"), None);
        assert!(reply.body.is_empty());
        assert!(reply.header("x-request-id").is_some(), "{reply:?}");
    }

    // Disallowed origins, look-alikes included: 403, and no CORS header at all.
    for origin in [
        "https://evil.example",
        "https://app.example.com.evil.example",
        "http://app.example.com",
        "https://partner.example",
        "https://tenant-7.example.io.evil.example",
        "null",
    ] {
        let reply = preflight(gateway.addr, "/private/items/7", origin, "PUT");
        assert_eq!(reply.status, 403, "{origin}: {reply:?}");
        assert_eq!(
            problem_type(&reply),
            "urn:gatehouse:problem:origin-not-allowed"
        );
        assert!(cors_headers(&reply).is_empty(), "{origin}: {reply:?}");
        assert_eq!(reply.header("vary"), Some("Origin"));
    }
    assert_eq!(private.requests(), 0, "a preflight reached the upstream");
    assert_eq!(fallback.requests(), 0, "a preflight reached the catch-all");

    // Actual requests: a refusal by auth is readable by the allowed page...
    let reply = gateway.request("GET", "/private/items/7", &[("Origin", APP)], b"");
    assert_eq!(reply.status, 401);
    assert_eq!(reply.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        reply.header("access-control-allow-credentials"),
        Some("true")
    );
    // ...and so is an answer, with the exposed headers.
    let reply = gateway.request(
        "PUT",
        "/private/items/7",
        &[
            ("Origin", APP),
            ("x-api-key", KEY),
            ("content-type", "application/json"),
        ],
        b"{\"n\":1}",
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["target"], "private");
    assert_eq!(reply.header("access-control-allow-origin"), Some(APP));
    assert_eq!(
        reply.header("access-control-expose-headers"),
        Some("x-request-id")
    );
    assert_eq!(reply.header("vary"), Some("Origin"));
    let seen = private.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("PUT", "/private/items/7")
    );
    assert_eq!(seen[0].body_bytes, 7);

    // Another origin's request goes through (the browser enforces CORS), without CORS headers.
    let reply = gateway.request(
        "GET",
        "/private/items/7",
        &[("Origin", "https://evil.example"), ("x-api-key", KEY)],
        b"",
    );
    assert_eq!(reply.status, 200);
    assert!(cors_headers(&reply).is_empty(), "{reply:?}");
    assert_eq!(reply.header("vary"), Some("Origin"));
    // An OPTIONS that asks about no method is no preflight: it is routed by its own method.
    let reply = gateway.request("OPTIONS", "/private/items/7", &[("Origin", APP)], b"");
    assert_eq!(reply.json()["target"], "fallback");
    assert_eq!(private.requests(), 2);
}

#[test]
fn cors_in_the_global_chain_answers_preflights_before_global_auth_filters() {
    let api = Target::start("api");
    let gateway = Gateway::start(&format!(
        r#"
consumers:
  - id: acme
    credentials: [{{ type: api_key, hash: "{hash}" }}]
upstreams: [{{ name: api, targets: [{{ address: "{api}" }}] }}]
filters:
  - kind: api_key
  - kind: cors
    config: {{ allow_origins: ["*"], allow_methods: [GET, PUT, DELETE] }}
routes:
  - name: api
    match: {{ paths: [{{ prefix: /api }}], methods: [DELETE] }}
    upstream: api
    auth: required
"#,
        hash = key_hash(),
        api = api.address,
    ));
    let reply = preflight(
        gateway.addr,
        "/api/orders/1",
        "https://anyone.example",
        "DELETE",
    );
    assert_eq!(reply.status, 204, "{reply:?}");
    // Any origin without credentials: `*`, and the answer does not depend on the origin.
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        reply.header("access-control-allow-methods"),
        Some("GET, PUT, DELETE")
    );
    assert_eq!(reply.header("access-control-allow-credentials"), None);
    assert_eq!(reply.header("access-control-allow-headers"), None);
    assert_eq!(reply.header("vary"), None);
    assert_eq!(api.requests(), 0);

    let reply = gateway.request(
        "DELETE",
        "/api/orders/1",
        &[("Origin", "https://anyone.example")],
        b"",
    );
    assert_eq!(reply.status, 401);
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
    let reply = gateway.request(
        "DELETE",
        "/api/orders/1",
        &[("Origin", "https://anyone.example"), ("x-api-key", KEY)],
        b"",
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
    assert_eq!(api.seen()[0].method, "DELETE");
}

#[test]
fn ip_restriction_ignores_forwarding_headers_from_an_untrusted_peer() {
    let echo = spawn_echo("echo");
    let guarded = Target::start("guarded");
    let gateway = Gateway::start(&format!(
        r#"
upstreams:
  - {{ name: echo, targets: [{{ address: "{echo}" }}] }}
  - {{ name: guarded, targets: [{{ address: "{guarded}" }}] }}
routes:
  - name: local
    match: {{ paths: [{{ prefix: /local }}] }}
    upstream: echo
    filters: [{{ kind: ip_restriction, config: {{ allow: [127.0.0.0/8] }} }}]
  - name: partners
    match: {{ paths: [{{ prefix: /partners }}] }}
    upstream: guarded
    filters: [{{ kind: ip_restriction, config: {{ allow: [10.0.0.0/8, "2001:db8::/32"] }} }}]
  - name: deny-wins
    match: {{ paths: [{{ prefix: /deny-wins }}] }}
    upstream: guarded
    filters: [{{ kind: ip_restriction, config: {{ allow: [127.0.0.0/8], deny: [127.0.0.1] }} }}]
"#,
        guarded = guarded.address,
    ));
    let spoofed = [
        ("X-Forwarded-For", "10.1.2.3"),
        ("X-Real-IP", "10.1.2.3"),
        ("Forwarded", "for=10.1.2.3"),
    ];
    // The peer, 127.0.0.1, is no trusted proxy: its claim to be 10.1.2.3 counts for nothing.
    let reply = gateway.request("GET", "/partners/report", &spoofed, b"");
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(
        problem_type(&reply),
        "urn:gatehouse:problem:address-not-allowed"
    );
    assert!(reply.json()["request_id"].is_string());
    let reply = gateway.request("GET", "/deny-wins", &spoofed, b"");
    assert_eq!(reply.status, 403);
    assert_eq!(
        guarded.requests(),
        0,
        "a refused request reached the upstream"
    );

    // The peer itself is allowed here, and the upstream hears the truth about it.
    let reply = gateway.request("GET", "/local", &spoofed, b"");
    assert_eq!(reply.status, 200);
    let received = &reply.json()["headers"];
    assert_eq!(received["x-forwarded-for"], "127.0.0.1");
    assert_eq!(received["x-real-ip"], "127.0.0.1");
}

/// A port free on `[::1]`.
fn free_ipv6_port() -> u16 {
    std::net::TcpListener::bind("[::1]:0")
        .expect("IPv6 loopback ([::1]) is available")
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn ip_restriction_meets_ipv6_clients_and_ipv4_mapped_addresses() {
    let echo = spawn_echo("echo");
    let v6: SocketAddr = format!("[::1]:{}", free_ipv6_port()).parse().unwrap();
    let gateway = Gateway::start_full(
        &format!(", {{ name: public-v6, address: \"{v6}\" }}"),
        "  trusted_proxies: [127.0.0.1/32]",
        &format!(
            r#"
upstreams: [{{ name: echo, targets: [{{ address: "{echo}" }}] }}]
routes:
  - name: v4-only
    match: {{ paths: [{{ prefix: /v4-only }}] }}
    upstream: echo
    filters: [{{ kind: ip_restriction, config: {{ allow: [127.0.0.0/8, 198.51.100.0/24], deny: [198.51.100.66/32] }} }}]
  - name: deny-list
    match: {{ paths: [{{ prefix: /deny-list }}] }}
    upstream: echo
    filters: [{{ kind: ip_restriction, config: {{ deny: [127.0.0.0/8, 203.0.113.0/24] }} }}]
"#
        ),
    );
    let via_proxy = |path: &str, client: &str| {
        gateway.request("GET", path, &[("X-Forwarded-For", client)], b"")
    };
    // Behind the trusted proxy at 127.0.0.1, the forwarded address is the client.
    let reply = via_proxy("/v4-only", "198.51.100.7");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.json()["headers"]["x-forwarded-for"],
        "198.51.100.7, 127.0.0.1"
    );
    assert_eq!(via_proxy("/v4-only", "198.51.100.66").status, 403);
    assert_eq!(via_proxy("/deny-list", "203.0.113.9").status, 403);
    // IPv4-mapped IPv6 addresses meet the IPv4 rules, deny included.
    assert_eq!(via_proxy("/v4-only", "::ffff:198.51.100.7").status, 200);
    assert_eq!(via_proxy("/v4-only", "::ffff:198.51.100.66").status, 403);
    assert_eq!(via_proxy("/deny-list", "::ffff:203.0.113.9").status, 403);
    // An IPv6 client is not let in by IPv4-only rules, nor kept out by an IPv4 deny list.
    assert_eq!(via_proxy("/v4-only", "2001:db8::7").status, 403);
    let reply = via_proxy("/deny-list", "2001:db8::9");
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.json()["headers"]["x-forwarded-for"],
        "2001:db8::9, 127.0.0.1"
    );

    // A real IPv6 client on the [::1] listener: ::1 is not 127.0.0.1.
    let reply = request(v6, "GET", "/v4-only", &[], b"");
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(
        problem_type(&reply),
        "urn:gatehouse:problem:address-not-allowed"
    );
    let reply = request(v6, "GET", "/deny-list", &[], b"");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["headers"]["x-forwarded-for"], "::1");
    // ...and the IPv4 peer itself, without forwarding headers.
    assert_eq!(gateway.get("/v4-only").status, 200);
    assert_eq!(gateway.get("/deny-list").status, 403);
}

fn chunked(pieces: &[usize]) -> Vec<u8> {
    let mut body = Vec::new();
    for &size in pieces {
        body.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        body.extend(std::iter::repeat_n(b'c', size));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    body
}

#[test]
fn request_limits_refuse_methods_sizes_and_types_before_the_upstream() {
    let uploads = Target::start("uploads");
    let gateway = Gateway::start_with(
        "  limits: { max_body_bytes: 1KiB }",
        &format!(
            r#"
consumers:
  - id: acme
    credentials: [{{ type: api_key, hash: "{hash}" }}]
upstreams: [{{ name: uploads, targets: [{{ address: "{uploads}" }}] }}]
routes:
  - name: uploads
    match: {{ paths: [{{ prefix: /uploads }}] }}
    upstream: uploads
    auth: required
    filters:
      - kind: api_key
      - kind: request_limits
        config:
          max_body_bytes: 100
          methods: [GET, POST]
          content_types: [application/json, "application/*+json"]
"#,
            hash = key_hash(),
            uploads = uploads.address,
        ),
    );
    let json = ("content-type", "application/json");
    let key = ("x-api-key", KEY);
    let post =
        |body: &[u8], headers: &[(&str, &str)]| gateway.request("POST", "/uploads", headers, body);

    // At the limit: the upstream gets every byte.
    let reply = post(&[b'a'; 100], &[json, key]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["body_bytes"], 100);
    assert_eq!(uploads.seen()[0].body_bytes, 100);

    // One byte over, declared up front: 413 before the upstream or the auth filter sees it.
    for headers in [&[json, key][..], &[json][..]] {
        let reply = post(&[b'a'; 101], headers);
        assert_eq!(reply.status, 413, "{reply:?}");
        assert_eq!(
            problem_type(&reply),
            "urn:gatehouse:problem:content-too-large"
        );
        assert_eq!(
            reply.json()["detail"],
            "This route accepts bodies up to 100 bytes"
        );
    }
    assert_eq!(uploads.requests(), 1);

    // Chunked bodies declare no length: they are counted as they stream.
    let send_chunked = |pieces: &[usize]| {
        let raw = request_bytes(
            "POST",
            "/uploads",
            &[json, key, ("Transfer-Encoding", "chunked")],
            &chunked(pieces),
        );
        send_raw(gateway.addr, &raw).unwrap()
    };
    let reply = send_chunked(&[60, 40]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["body_bytes"], 100);
    let reply = send_chunked(&[60, 41]);
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(
        problem_type(&reply),
        "urn:gatehouse:problem:content-too-large"
    );
    assert!(
        uploads.seen().iter().all(|seen| seen.body_bytes <= 100),
        "the upstream received a body over the limit: {:?}",
        uploads.seen()
    );

    // Methods outside the list: 405 with Allow.
    let reply = gateway.request("DELETE", "/uploads/1", &[key], b"");
    assert_eq!(reply.status, 405, "{reply:?}");
    assert_eq!(reply.header("allow"), Some("GET, POST"));
    assert_eq!(
        problem_type(&reply),
        "urn:gatehouse:problem:method-not-allowed"
    );

    // Content types outside the list: 415; a body without a type too.
    for headers in [
        &[("content-type", "text/plain"), key][..],
        &[("content-type", "application/jsonp"), key][..],
        &[key][..],
    ] {
        let reply = gateway.request("POST", "/uploads/refused-type", headers, b"{}");
        assert_eq!(reply.status, 415, "{headers:?}: {reply:?}");
        assert_eq!(
            problem_type(&reply),
            "urn:gatehouse:problem:unsupported-media-type"
        );
    }
    // (Checked by path: the upstream records the request cut off at 413 above whenever its
    // connection ends, which may be after this point.)
    let seen = uploads.seen();
    assert!(
        seen.iter()
            .all(|seen| seen.method != "DELETE" && seen.path != "/uploads/refused-type"),
        "a refused request reached the upstream: {seen:?}"
    );
    let reply = post(
        b"{}",
        &[
            ("content-type", "application/vnd.api+json; charset=utf-8"),
            key,
        ],
    );
    assert_eq!(reply.status, 200);
    // A request without a body is not asked for a type.
    let reply = gateway.request("GET", "/uploads", &[key], b"");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["method"], "GET");
}

#[test]
fn validate_reports_edge_policy_errors_with_their_paths() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.yaml");
    std::fs::write(
        &file,
        r#"
version: 1
server:
  listeners: [{ name: public, address: "127.0.0.1:8080" }]
  limits: { max_body_bytes: 1MiB }
upstreams: [{ name: app, targets: [{ address: "127.0.0.1:9001" }] }]
filters:
  - { kind: ip_restriction, config: { allow: [10.0.0.0/8, 10.0.0.0/33] } }
routes:
  - name: app
    match: { paths: [{ prefix: / }] }
    upstream: app
    filters:
      - kind: cors
        config:
          allow_origins: ["*", { regex: "https://(unclosed" }]
          allow_credentials: true
      - kind: request_limits
        config: { max_body_bytes: 2MiB }
      - kind: ip_restriction
        config: { deny: ["192.168.1.300", "2001:db8::/129"] }
"#,
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["validate", file.to_str().unwrap()], dir.path());
    assert_eq!(code, 1, "{stderr}");
    for expected in [
        "filters[0].config.allow[1]: \"10.0.0.0/33\" is not a CIDR block",
        "routes[0].filters[0].config.allow_origins[0]: \"*\" cannot be combined with `allow_credentials: true`",
        "routes[0].filters[0].config.allow_origins[1].regex: invalid regular expression",
        "routes[0].filters[1].config.max_body_bytes: 2MiB is above the server's limits.max_body_bytes (1MiB)",
        "routes[0].filters[2].config.deny[0]: \"192.168.1.300\" is not a CIDR block",
        "routes[0].filters[2].config.deny[1]: \"2001:db8::/129\" is not a CIDR block",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("6 errors"), "{stderr}");
}

#[test]
fn the_postgres_store_carries_edge_policies_unchanged() {
    let database = TestDatabase::create();
    let echo = spawn_echo("echo");
    let filters = serde_json::json!([
        {"kind": "cors", "config": {
            "allow_origins": [APP, "*.partner.example", {"regex": "https://tenant-[0-9]+\\.example\\.io"}],
            "allow_methods": ["GET", "PUT"],
            "allow_headers": ["content-type"],
            "expose_headers": ["x-request-id"],
            "allow_credentials": true,
            "max_age": "10m"
        }},
        {"kind": "ip_restriction", "config": {"allow": ["127.0.0.0/8", "2001:db8::/32"], "deny": ["127.0.0.2"]}},
        {"kind": "request_limits", "config": {
            "max_body_bytes": "64KiB",
            "methods": ["GET", "PUT"],
            "content_types": ["application/json"]
        }}
    ]);
    let blocked = serde_json::json!([
        {"kind": "ip_restriction", "config": {"deny": ["127.0.0.0/8", "::1/128"]}}
    ]);
    let yaml = format!(
        "version: 1\nupstreams: [{{ name: echo, targets: [{{ address: \"{echo}\" }}] }}]\nroutes:\n  - name: items\n    match: {{ paths: [{{ prefix: /items }}], methods: [GET, PUT] }}\n    upstream: echo\n    filters: {filters}\n  - name: blocked\n    match: {{ paths: [{{ prefix: /blocked }}] }}\n    upstream: echo\n    filters: {blocked}\n"
    );
    database.push(&yaml);

    // Pulled back, the filters are what was pushed, key for key.
    let dir = tempfile::tempdir().unwrap();
    let (code, pulled, stderr) = run_cli(
        &["config", "pull", "--database-url", &database.url],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    let pulled: serde_json::Value = serde_yaml::from_str(&pulled).unwrap();
    assert_eq!(pulled["routes"][0]["filters"], filters, "{pulled:#}");
    assert_eq!(pulled["routes"][1]["filters"], blocked, "{pulled:#}");
    // Pushed again, the pulled file is the same config.
    let pulled_file = dir.path().join("pulled.yaml");
    std::fs::write(&pulled_file, serde_yaml::to_string(&pulled).unwrap()).unwrap();
    let (code, _, stderr) = run_cli(
        &[
            "config",
            "push",
            pulled_file.to_str().unwrap(),
            "--database-url",
            &database.url,
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    let (_, pulled_again, _) = run_cli(
        &["config", "pull", "--database-url", &database.url],
        dir.path(),
    );
    let pulled_again: serde_json::Value = serde_yaml::from_str(&pulled_again).unwrap();
    assert_eq!(pulled_again["routes"][0]["filters"], filters);
    assert_eq!(pulled_again["routes"][1]["filters"], blocked);

    // A node reading the store enforces all three.
    let gateway = Gateway::start(&format!(
        "config: {{ source: postgres, postgres: {{ url: \"{}\", resync_interval: 1s }} }}",
        database.url
    ));
    let reply = preflight(
        gateway.addr,
        "/items/1",
        "https://eu.partner.example",
        "PUT",
    );
    assert_eq!(reply.status, 204, "{reply:?}");
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://eu.partner.example")
    );
    assert_eq!(reply.header("access-control-max-age"), Some("600"));
    let reply = gateway.request(
        "PUT",
        "/items/1",
        &[("content-type", "application/json")],
        b"{}",
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["body"], "{}");
    let reply = gateway.request("PUT", "/items/1", &[("content-type", "text/plain")], b"x");
    assert_eq!(reply.status, 415);
    let reply = gateway.request(
        "PUT",
        "/items/1",
        &[("content-type", "application/json")],
        &vec![b'a'; 64 * 1024 + 1],
    );
    assert_eq!(reply.status, 413);
    let reply = gateway.get("/blocked");
    assert_eq!(reply.status, 403);
    assert_eq!(
        problem_type(&reply),
        "urn:gatehouse:problem:address-not-allowed"
    );
}
