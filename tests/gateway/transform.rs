//! Transformations through the real gateway: the `headers` and `rewrite` filters against an
//! upstream that records the bytes it received, the answers the client got, and the configs
//! `gatehouse validate` refuses, each with its path.

use crate::support::idp::IdentityProvider;
use crate::support::recorder::Recorder;
use crate::support::{run_cli, Gateway};

/// The configs below name their upstream `UPSTREAM` and their issuer `ISSUER`.
fn config(yaml: &str, upstream: &Recorder) -> String {
    yaml.replace("UPSTREAM", &upstream.address.to_string())
}

/// What an upstream answers in these tests: headers a response section can work on.
fn recorder() -> Recorder {
    Recorder::start(
        &[
            ("Content-Type", "text/plain"),
            ("X-Internal", "secret"),
            ("X-Old-Name", "value"),
            ("Vary", "Accept"),
            ("X-Powered-By", "upstream"),
        ],
        "upstream body",
    )
}

const HEADERS_ROUTE: &str = r#"
upstreams: [{ name: up, targets: [{ address: "UPSTREAM" }] }]
routes:
  - name: headers
    match: { paths: [{ prefix: /h }] }
    upstream: up
    filters:
      - kind: headers
        config:
          request:
            set:
              x-route: "${route}"
              x-user: "${query.user}"
              x-host: "${host}"
              x-method: "${method}"
              x-scheme: "${scheme}"
              x-tenant: "tenant=${request.header.x-tenant}"
            add: { x-tag: gateway }
            append: { x-list: gatehouse }
            remove: [x-debug]
            rename: { x-old: x-new }
          response:
            set: { x-served-by: gatehouse, x-asked: "${method} ${query.user} ${status}" }
            add: { vary: Origin }
            append: { x-powered-by: gatehouse }
            remove: [x-internal]
            rename: { x-old-name: x-new-name }
  - name: plain
    match: { paths: [{ prefix: /plain }] }
    upstream: up
"#;

#[test]
fn headers_change_what_the_upstream_receives_and_what_the_client_gets() {
    let upstream = recorder();
    let gateway = Gateway::start(&config(HEADERS_ROUTE, &upstream));
    let reply = gateway.request(
        "GET",
        "/h/orders?user=jo%20e&page=2",
        &[
            ("Host", "API.example.com:8080"),
            ("X-Tenant", "acme"),
            ("X-Tag", "client"),
            ("X-List", "a"),
            ("X-List", "b"),
            ("X-Debug", "1"),
            ("X-Old", "moved"),
        ],
        b"",
    );
    assert_eq!(reply.status, 200, "{}", reply.text());

    let received = upstream.last();
    assert_eq!(received.target, "/h/orders?user=jo%20e&page=2");
    assert_eq!(received.header("x-route"), Some("headers"));
    assert_eq!(received.header("x-user"), Some("jo e"));
    assert_eq!(received.header("x-host"), Some("api.example.com"));
    assert_eq!(received.header("x-method"), Some("GET"));
    assert_eq!(received.header("x-scheme"), Some("http"));
    assert_eq!(received.header("x-tenant"), Some("tenant=acme"));
    assert_eq!(received.header_all("x-tag"), ["client", "gateway"]);
    assert_eq!(received.header("x-list"), Some("a, b, gatehouse"));
    assert_eq!(received.header("x-debug"), None);
    assert_eq!(received.header("x-old"), None);
    assert_eq!(received.header("x-new"), Some("moved"));
    // The gateway's own headers are still there, and the client's Host is untouched.
    assert_eq!(received.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(received.header("host"), Some("API.example.com:8080"));
    let raw = String::from_utf8_lossy(&received.raw);
    assert!(
        raw.starts_with("GET /h/orders?user=jo%20e&page=2 HTTP/1.1\r\n"),
        "{raw}"
    );

    assert_eq!(reply.header("x-served-by"), Some("gatehouse"));
    assert_eq!(reply.header("x-asked"), Some("GET jo e 200"));
    let vary: Vec<_> = reply
        .headers
        .iter()
        .filter(|(name, _)| name == "vary")
        .map(|(_, value)| value.as_str())
        .collect();
    assert_eq!(vary, ["Accept", "Origin"]);
    assert_eq!(reply.header("x-powered-by"), Some("upstream, gatehouse"));
    assert_eq!(reply.header("x-internal"), None);
    assert_eq!(reply.header("x-old-name"), None);
    assert_eq!(reply.header("x-new-name"), Some("value"));
    assert_eq!(reply.text(), "upstream body");

    // A route without the filter forwards and answers untouched.
    let reply = gateway.request("GET", "/plain", &[("X-Debug", "1")], b"");
    assert_eq!(reply.header("x-internal"), Some("secret"));
    assert_eq!(reply.header("x-served-by"), None);
    assert_eq!(upstream.last().header("x-debug"), Some("1"));
}

#[test]
fn a_template_naming_a_missing_header_renders_empty() {
    let upstream = recorder();
    let gateway = Gateway::start(&config(HEADERS_ROUTE, &upstream));
    let reply = gateway.get("/h");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let received = upstream.last();
    assert_eq!(received.header("x-tenant"), Some("tenant="));
    assert_eq!(received.header("x-user"), Some(""));
    assert_eq!(received.header("x-list"), Some("gatehouse"));
    assert_eq!(received.header_all("x-tag"), ["gateway"]);
    assert_eq!(reply.header("x-asked"), Some("GET  200"));
    // An absent header is not renamed into existence.
    assert_eq!(received.header("x-new"), None);
}

#[test]
fn templates_read_the_jwt_consumer_and_the_route_captures() {
    let idp = IdentityProvider::start();
    let upstream = recorder();
    let yaml = r#"
consumers:
  - id: acme
    username: acme-corp
    credentials:
      - { type: jwt, issuer: "ISSUER", subject: alice }
upstreams: [{ name: up, targets: [{ address: "UPSTREAM" }] }]
routes:
  - name: tenants
    match: { paths: [{ regex: "^/tenants/(?P<tenant>[a-z0-9]+)/orders$" }] }
    upstream: up
    auth: required
    filters:
      # Before the jwt filter in the chain: request operations run once every filter has
      # decided, so the token is still there to verify and the consumer is known.
      - kind: headers
        config:
          request:
            set:
              x-user: "${consumer.username}"
              x-consumer: "${consumer.id}"
              x-subject: "${jwt.claim.sub}"
              x-audience: "${jwt.claim.aud}"
              x-plan: "[${jwt.claim.plan}]"
              x-level: "${jwt.claim.level}"
              x-tenant: "${path.tenant}"
            remove: [authorization]
          response:
            set: { x-consumer: "${consumer.id}" }
      - kind: jwt
        config:
          issuer: "ISSUER"
          jwks_url: "JWKS"
          algorithms: [RS256]
          audiences: [api]
"#
    .replace("ISSUER", &idp.issuer())
    .replace("JWKS", &idp.jwks_url());
    let gateway = Gateway::start(&config(&yaml, &upstream));
    let mut claims = idp.claims("alice", "api");
    claims["level"] = serde_json::json!(3);
    let token = idp.sign(claims);
    let reply = gateway.request(
        "GET",
        "/tenants/north7/orders",
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let received = upstream.last();
    assert_eq!(received.header("authorization"), None);
    assert_eq!(received.header("x-user"), Some("acme-corp"));
    assert_eq!(received.header("x-consumer"), Some("acme"));
    assert_eq!(received.header("x-subject"), Some("alice"));
    assert_eq!(received.header("x-audience"), Some("api"));
    assert_eq!(received.header("x-plan"), Some("[]"));
    assert_eq!(received.header("x-level"), Some("3"));
    assert_eq!(received.header("x-tenant"), Some("north7"));
    assert_eq!(reply.header("x-consumer"), Some("acme"));

    // Without a token the route answers 401 and the upstream sees nothing.
    upstream.clear();
    let reply = gateway.get("/tenants/north7/orders");
    assert_eq!(reply.status, 401);
    assert!(upstream.requests().is_empty());
}

const REWRITE_ROUTES: &str = r#"
upstreams: [{ name: up, targets: [{ address: "UPSTREAM" }] }]
routes:
  - name: api
    match: { paths: [{ prefix: /api }] }
    upstream: up
    strip_prefix: /api
    filters:
      - kind: rewrite
        config:
          path: { regex: "^/v(?P<version>[0-9]+)/(?P<rest>.*)$", replacement: "/${rest}/v${version}" }
          query:
            remove: [debug]
            set: { tenant: "${request.header.x-tenant}", v: "${version}" }
            add: { via: gate house }
          host: target
  - name: literal-host
    match: { paths: [{ prefix: /literal }] }
    upstream: up
    filters:
      - kind: rewrite
        config: { host: { set: "${consumer.id}internal.example" } }
  - name: client-host
    match: { paths: [{ prefix: /client }] }
    upstream: up
    filters:
      - kind: rewrite
        config: { query: { set: { page: "1" } } }
  - name: tenant-path
    match: { paths: [{ prefix: /t }] }
    upstream: up
    filters:
      - kind: rewrite
        config: { path: { regex: "^/t$", replacement: "/tenants/${request.header.x-tenant}" } }
  - name: broken
    match: { paths: [{ prefix: /broken }] }
    upstream: up
    filters:
      - kind: rewrite
        config: { path: { regex: "^/broken", replacement: "no-slash" } }
"#;

#[test]
fn rewrite_changes_the_path_the_query_and_the_host() {
    let upstream = recorder();
    let gateway = Gateway::start(&config(REWRITE_ROUTES, &upstream));

    // After the route's strip_prefix: the regex, its captures, the query operations, and the
    // target's Host; the client's host still reaches the upstream as X-Forwarded-Host.
    let reply = gateway.request(
        "GET",
        "/api/v2/users/7?debug=1&keep=a%2Fb&tenant=spoofed&debug",
        &[("Host", "client.example"), ("X-Tenant", "acme")],
        b"",
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "upstream body");
    let received = upstream.last();
    assert_eq!(
        received.target,
        "/users/7/v2?keep=a%2Fb&tenant=acme&v=2&via=gate+house"
    );
    assert_eq!(
        received.header("host"),
        Some(upstream.address.to_string().as_str())
    );
    assert_eq!(received.header("x-forwarded-host"), Some("client.example"));
    assert!(
        received
            .header("forwarded")
            .unwrap()
            .contains("host=\"client.example\""),
        "{:?}",
        received.header("forwarded")
    );
    // A path the regex does not match is forwarded as it is; the query still changes, and the
    // regex's captures render empty.
    gateway.request("GET", "/api/other?debug=1", &[], b"");
    assert_eq!(upstream.last().target, "/other?tenant=&v=&via=gate+house");

    // A host of its own (a template: no consumer here, so the literal part alone).
    gateway.request("GET", "/literal", &[("Host", "client.example")], b"");
    let received = upstream.last();
    assert_eq!(received.header("host"), Some("internal.example"));
    assert_eq!(received.target, "/literal");

    // `host: client` (the default) keeps the client's.
    gateway.request(
        "GET",
        "/client?page=9&q=x",
        &[("Host", "client.example")],
        b"",
    );
    let received = upstream.last();
    assert_eq!(received.header("host"), Some("client.example"));
    assert_eq!(received.target, "/client?q=x&page=1");

    // A header value cannot leave its path segment.
    gateway.request("GET", "/t", &[("X-Tenant", "../admin?x=1")], b"");
    assert_eq!(upstream.last().target, "/tenants/..%2Fadmin%3Fx%3D1");
    gateway.request("GET", "/t", &[("X-Tenant", "..")], b"");
    assert_eq!(upstream.last().target, "/tenants/%2E%2E");

    // A rewrite that makes no path is answered here, and nothing is forwarded.
    upstream.clear();
    let reply = gateway.get("/broken");
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["type"], "urn:gatehouse:problem:invalid-path");
    assert!(upstream.requests().is_empty());
}

/// `gatehouse validate` of a route with a regex path (capture `id`) and `filters`: (exit code,
/// stderr).
fn validate(filters: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gatehouse.yaml");
    let route = r#"version: 1
upstreams: [{ name: up, targets: [{ address: "127.0.0.1:9" }] }]
routes:
  - name: r
    match: { paths: [{ regex: "^/r/(?P<id>[0-9]+)$" }] }
    upstream: up
    filters:
"#;
    std::fs::write(&file, format!("{route}{filters}")).unwrap();
    let (code, stdout, stderr) = run_cli(&["validate", file.to_str().unwrap()], dir.path());
    (code, format!("{stdout}{stderr}"))
}

#[test]
fn validate_refuses_bad_transform_configs_with_their_paths() {
    let (code, output) = validate(
        r#"      - kind: rewrite
        config: { path: { regex: "^/(unclosed", replacement: "/" }, host: { set: "${nope}" } }
      - kind: headers
        config:
          request:
            set: { x-forwarded-for: 1.2.3.4, x-a: "${consumer.nickname}", x-b: "${path.version}" }
            add: { connection: close }
            remove: [transfer-encoding, x-consumer-id]
          response:
            rename: { x-a: keep-alive }
      - kind: json_body
        config:
          request:
            - { op: set, path: user/id, value: 1 }
            - { op: rename, from: "/a~2b", path: /b }
            - { op: set, path: /who, value: { name: "${consumer.nick}" } }
          response: [{ op: remove, path: "" }]
"#,
    );
    assert_eq!(code, 1, "{output}");
    for expected in [
        "routes[0].filters[0].config.path.regex: regex parse error",
        "routes[0].filters[0].config.host.set: unknown variable \"${nope}\"",
        "routes[0].filters[1].config.request.set.x-forwarded-for: \"x-forwarded-for\" is a forwarding header",
        "routes[0].filters[1].config.request.set.x-a: unknown variable \"${consumer.nickname}\"",
        "routes[0].filters[1].config.request.set.x-b: \"${path.version}\": \"version\" is not a named capture of this route's regex paths (known: id)",
        "routes[0].filters[1].config.request.add.connection: \"connection\" is a hop-by-hop header",
        "routes[0].filters[1].config.request.remove[0]: \"transfer-encoding\" is a hop-by-hop header",
        "routes[0].filters[1].config.request.remove[1]: \"x-consumer-id\" is an identity or request id header",
        "routes[0].filters[1].config.response.rename.x-a: \"keep-alive\" is a hop-by-hop header",
        "routes[0].filters[2].config.request[0].path: \"user/id\" is not a JSON Pointer",
        "routes[0].filters[2].config.request[1].from: \"/a~2b\" is not a JSON Pointer",
        "routes[0].filters[2].config.request[2].value: unknown variable \"${consumer.nick}\"",
        "routes[0].filters[2].config.response[0].path: the empty pointer names the whole body",
    ] {
        assert!(output.contains(expected), "missing {expected:?} in:\n{output}");
    }

    // The same filters, corrected, validate.
    let (code, output) = validate(
        r#"      - kind: rewrite
        config: { path: { regex: "^/r/", replacement: "/records/" }, host: { set: "${path.id}.internal" } }
      - kind: headers
        config:
          request: { set: { x-a: "${consumer.username}", x-b: "${path.id}" }, remove: [x-debug] }
          response: { rename: { x-a: x-b } }
      - kind: json_body
        config:
          request: [{ op: set, path: /user/id, value: "${path.id}" }, { op: rename, from: "/a~1b", path: /b }]
          response: [{ op: remove, path: /internal }]
"#,
    );
    assert_eq!(code, 0, "{output}");
}
