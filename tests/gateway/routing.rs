//! Routing rules, priorities, rewrites, and normalisation attacks.

use crate::support::{spawn_echo, Gateway};

fn routing_gateway() -> Gateway {
    let users = spawn_echo("users");
    let admin = spawn_echo("admin");
    let public = spawn_echo("public");
    let other = spawn_echo("other");
    Gateway::start(&format!(
        r#"
upstreams:
  - {{ name: users, targets: [{{ address: "{users}" }}] }}
  - {{ name: admin, targets: [{{ address: "{admin}" }}] }}
  - {{ name: public, targets: [{{ address: "{public}" }}] }}
  - {{ name: other, targets: [{{ address: "{other}" }}] }}
filters:
  - kind: request_id
routes:
  - name: users-prefix
    match: {{ paths: [{{ prefix: /users }}] }}
    upstream: users
    strip_prefix: /users
  - name: users-me
    match: {{ paths: [{{ exact: /users/me }}] }}
    upstream: other
  - name: versioned
    priority: 5
    match: {{ paths: [{{ regex: "/v(?P<version>[0-9]+)/users/(?P<id>[^/]+)" }}] }}
    upstream: users
    rewrite: "/internal/users/${{id}}?v=${{version}}"
  - name: admin
    match:
      paths: [{{ prefix: /admin }}]
      headers: [{{ name: x-admin-token, equals: letmein }}]
    upstream: admin
  - name: public
    match: {{ paths: [{{ prefix: /public }}] }}
    upstream: public
  - name: api-host
    match: {{ hosts: [api.example.com], paths: [{{ prefix: /h }}] }}
    upstream: users
  - name: wildcard-host
    match: {{ hosts: ["*.example.com"], paths: [{{ prefix: /h }}] }}
    upstream: other
  - name: loopback-v6
    match: {{ hosts: ["[::1]"], paths: [{{ prefix: /h }}] }}
    upstream: admin
  - name: writes
    match: {{ paths: [{{ prefix: /w }}], methods: [POST, PUT] }}
    upstream: users
  - name: header-present
    match: {{ paths: [{{ prefix: /hp }}], headers: [{{ name: x-beta, present: true }}] }}
    upstream: users
  - name: header-regex
    match: {{ paths: [{{ prefix: /hr }}], headers: [{{ name: x-client, regex: "^mobile-[0-9]+$" }}] }}
    upstream: users
  - name: query
    match: {{ paths: [{{ prefix: /q }}], query: [{{ name: preview, equals: "yes" }}] }}
    upstream: users
  - name: low-priority-catch-all
    priority: -1
    match: {{ paths: [{{ prefix: / }}] }}
    upstream: other
  - name: high-priority-override
    priority: 100
    match: {{ paths: [{{ exact: /public/override }}] }}
    upstream: admin
"#
    ))
}

#[test]
fn routes_by_path_host_method_header_and_query() {
    let gateway = routing_gateway();

    let reply = gateway.get("/users/7");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.upstream(), "users");
    assert_eq!(reply.json()["path"], "/7", "strip_prefix removes /users");

    // Exact beats prefix.
    assert_eq!(gateway.get("/users/me").upstream(), "other");

    // Regex with captures, and a templated rewrite; priority 5 beats the /users prefix.
    let reply = gateway.get("/v2/users/42");
    assert_eq!(reply.upstream(), "users");
    assert_eq!(reply.json()["path"], "/internal/users/42?v=2");

    // Host: exact beats wildcard; wildcard matches subdomains, not the apex.
    let host = |host: &str| {
        gateway
            .request("GET", "/h", &[("Host", host)], b"")
            .upstream()
    };
    assert_eq!(host("api.example.com"), "users");
    assert_eq!(host("API.example.com:8080"), "users");
    assert_eq!(host("eu.example.com"), "other");
    assert_eq!(host("example.com"), "other"); // only the catch-all
                                              // Methods.
    assert_eq!(
        gateway.request("POST", "/w", &[], b"{}").upstream(),
        "users"
    );
    assert_eq!(gateway.get("/w").upstream(), "other");
    // Headers: present, equals, regex.
    assert_eq!(
        gateway
            .request("GET", "/hp", &[("x-beta", "1")], b"")
            .upstream(),
        "users"
    );
    assert_eq!(gateway.get("/hp").upstream(), "other");
    assert_eq!(
        gateway
            .request("GET", "/hr", &[("x-client", "mobile-12")], b"")
            .upstream(),
        "users"
    );
    assert_eq!(
        gateway
            .request("GET", "/hr", &[("x-client", "mobile-x")], b"")
            .upstream(),
        "other"
    );
    // Query.
    assert_eq!(gateway.get("/q?preview=yes").upstream(), "users");
    assert_eq!(gateway.get("/q?preview=no").upstream(), "other");
    // Priority beats specificity in both directions.
    assert_eq!(gateway.get("/public/override").upstream(), "admin");
    assert_eq!(gateway.get("/public/x").upstream(), "public");
}

#[test]
fn no_route_is_a_problem_json_404_with_request_id() {
    let users = spawn_echo("users");
    let gateway = Gateway::start(&format!(
        "upstreams: [{{ name: users, targets: [{{ address: \"{users}\" }}] }}]\nfilters: [{{ kind: request_id }}]\nroutes: [{{ name: users, upstream: users, match: {{ paths: [{{ prefix: /users }}] }} }}]\n"
    ));
    let reply = gateway.get("/nowhere");
    assert_eq!(reply.status, 404);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    let body = reply.json();
    assert_eq!(body["type"], "urn:gatehouse:problem:route-not-found");
    assert_eq!(body["status"], 404);
    let request_id = reply.header("x-request-id").unwrap();
    assert_eq!(body["request_id"], request_id);
}

#[test]
fn normalisation_attacks_do_not_reach_the_protected_route() {
    let gateway = routing_gateway();
    // The protected route needs the header; without it these must never reach `admin`.
    for path in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin/x",
        "/public/%252e%252e/admin",
        "//admin",
        "/./admin",
        "/admin",
    ] {
        let reply = gateway.get(path);
        if reply.status == 200 {
            assert_ne!(
                reply.upstream(),
                "admin",
                "{path} reached the protected upstream"
            );
        }
    }
    // Dot segments resolve before routing: what is forwarded is what was routed.
    let reply = gateway.get("/public/../users/7");
    assert_eq!(reply.upstream(), "users");
    assert_eq!(reply.json()["path"], "/7");
    let reply = gateway.get("/public/%2e%2e/public/a");
    assert_eq!(reply.upstream(), "public");
    assert_eq!(reply.json()["path"], "/public/a");
    // Double encoding is decoded once only and forwarded literally to the route it matched.
    let reply = gateway.get("/public/%252e%252e/admin");
    assert_eq!(reply.upstream(), "public");
    assert_eq!(reply.json()["path"], "/public/%252e%252e/admin");
    // `//` collapses before matching.
    let reply = gateway.get("//users//7");
    assert_eq!(reply.json()["path"], "/7");
    // Encoded slash, backslash and NUL are refused outright.
    for path in [
        "/public%2F..%2Fadmin",
        "/public/%2fadmin",
        "/public/%5c..%5cadmin",
        "/public/a%00b",
    ] {
        let reply = gateway.get(path);
        assert_eq!(reply.status, 400, "{path}");
        assert_eq!(reply.json()["type"], "urn:gatehouse:problem:invalid-path");
    }
    // With the header the protected route is reachable, so the tests above could have failed.
    let reply = gateway.request(
        "GET",
        "/public/../admin",
        &[("x-admin-token", "letmein")],
        b"",
    );
    assert_eq!(reply.upstream(), "admin");
}

#[test]
fn forwarding_headers_trust_only_configured_proxies() {
    let echo = spawn_echo("echo");
    let routes = format!(
        "upstreams: [{{ name: echo, targets: [{{ address: \"{echo}\" }}] }}]\nroutes: [{{ name: all, upstream: echo, match: {{ paths: [{{ prefix: / }}] }} }}]\n"
    );
    // Untrusted peer: spoofed headers are replaced.
    let gateway = Gateway::start(&routes);
    let reply = gateway.request(
        "GET",
        "/x",
        &[
            ("Host", "shop.example.com"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("Forwarded", "for=6.6.6.6"),
            ("X-Real-IP", "6.6.6.6"),
        ],
        b"",
    );
    let headers = &reply.json()["headers"];
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-host"], "shop.example.com");
    assert_eq!(headers["x-real-ip"], "127.0.0.1");
    assert_eq!(
        headers["forwarded"],
        "for=127.0.0.1;proto=http;host=\"shop.example.com\""
    );
    drop(gateway);

    // Trusted peer (loopback): the chain is extended and the client is the nearest untrusted hop.
    let gateway = Gateway::start_with("  trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]", &routes);
    let reply = gateway.request(
        "GET",
        "/x",
        &[
            ("X-Forwarded-For", "203.0.113.9, 10.1.2.3"),
            ("X-Forwarded-Proto", "https"),
        ],
        b"",
    );
    let headers = &reply.json()["headers"];
    assert_eq!(
        headers["x-forwarded-for"],
        "203.0.113.9, 10.1.2.3, 127.0.0.1"
    );
    assert_eq!(headers["x-forwarded-proto"], "https");
    assert_eq!(headers["x-real-ip"], "203.0.113.9");
}

#[test]
fn server_forwarded_headers_chooses_what_the_upstream_is_told() {
    let echo = spawn_echo("echo");
    let routes = format!(
        "upstreams: [{{ name: echo, targets: [{{ address: \"{echo}\" }}] }}]\nroutes: [{{ name: r, match: {{ paths: [{{ prefix: / }}] }}, upstream: echo }}]"
    );
    let spoofed = [
        ("Host", "shop.example.com"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
    ];
    // Only X-Forwarded-For: the others are neither written nor passed on from a client.
    let gateway = Gateway::start_with("  forwarded_headers: [X-Forwarded-For]", &routes);
    let reply = gateway.request("GET", "/x", &spoofed, b"");
    let headers = &reply.json()["headers"];
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    for absent in [
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "x-real-ip",
    ] {
        assert!(headers.get(absent).is_none(), "{absent}: {headers}");
    }
    drop(gateway);

    // None at all, behind a trusted proxy: what the proxy sent passes as it came.
    let gateway = Gateway::start_with(
        "  forwarded_headers: []\n  trusted_proxies: [127.0.0.0/8]",
        &routes,
    );
    let reply = gateway.request("GET", "/x", &spoofed, b"");
    let headers = &reply.json()["headers"];
    assert_eq!(headers["x-forwarded-for"], "6.6.6.6");
    assert_eq!(headers["x-real-ip"], "6.6.6.6");
    drop(gateway);

    // A name that is not a forwarding header is a config error naming the key.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "version: 1\nserver: { listeners: [{ name: p, address: \"127.0.0.1:0\" }], forwarded_headers: [x-client-ip] }\n",
    )
    .unwrap();
    let output = std::process::Command::new(crate::support::binary())
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("forwarded_headers"), "{text}");
    assert!(text.contains("x-client-ip"), "{text}");
}

#[test]
fn upstream_failures_are_problem_documents() {
    let echo = spawn_echo("echo");
    let dead = format!("127.0.0.1:{}", crate::support::free_port());
    let gateway = Gateway::start(&format!(
        r#"
upstreams:
  - {{ name: echo, targets: [{{ address: "{echo}" }}] }}
  - {{ name: dead, targets: [{{ address: "{dead}" }}], timeouts: {{ connect: 500ms }} }}
routes:
  - {{ name: slow, upstream: echo, timeout: 300ms, match: {{ paths: [{{ prefix: /slow }}] }} }}
  - {{ name: dead, upstream: dead, match: {{ paths: [{{ prefix: /dead }}] }} }}
"#
    ));
    let reply = gateway.request("GET", "/slow", &[("x-echo-delay-ms", "2000")], b"");
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(
        reply.json()["type"],
        "urn:gatehouse:problem:upstream-timeout"
    );
    let reply = gateway.get("/dead");
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(
        reply.json()["type"],
        "urn:gatehouse:problem:upstream-unavailable"
    );
    assert!(
        !reply.text().contains(&dead),
        "the problem leaks the upstream address"
    );
    // The same route without the delay answers normally.
    assert_eq!(gateway.get("/slow").status, 200);
}

/// `/explain` runs the proxy's own resolve step: for every request of one table, the route,
/// upstream and forwarded target it names are what live traffic gets.
#[test]
fn explain_names_the_route_live_traffic_takes() {
    let gateway = routing_gateway();
    // (method, Host, path, other headers)
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)]);
    let table: &[Case] = &[
        ("GET", "test.local", "/users/7", &[]),
        ("GET", "test.local", "/users/me", &[]),
        ("GET", "test.local", "/users/./a/../7?x=1", &[]),
        ("GET", "test.local", "/v2/users/42?debug=1", &[]),
        ("GET", "api.example.com", "/h/1", &[]),
        ("GET", "API.Example.COM:8080", "/h/1", &[]),
        ("GET", "api.example.com.", "/h/1", &[]),
        ("GET", "deep.api.example.com", "/h/1", &[]),
        ("GET", "[::1]:8080", "/h/1", &[]),
        ("GET", "[::1]", "/h/1", &[]),
        ("GET", "example.com", "/h/1", &[]),
        ("POST", "test.local", "/w/1", &[]),
        ("GET", "test.local", "/w/1", &[]),
        (
            "GET",
            "test.local",
            "/admin/x",
            &[("x-admin-token", "letmein")],
        ),
        (
            "GET",
            "test.local",
            "/admin/x",
            &[("x-admin-token", "nope")],
        ),
        ("GET", "test.local", "/q?preview=yes", &[]),
        ("GET", "test.local", "/q?preview=no", &[]),
        ("GET", "test.local", "/public/override", &[]),
        ("GET", "test.local", "/users%2f7", &[]),
    ];
    for (method, host, path, headers) in table {
        let label = format!("{method} {host} {path} {headers:?}");
        let mut request_headers = vec![("Host", *host)];
        request_headers.extend_from_slice(headers);
        let live = gateway.request(method, path, &request_headers, b"");

        let mut query = format!(
            "/explain?method={method}&host={}&path={}",
            encode(host),
            encode(path)
        );
        for (name, value) in *headers {
            query.push_str(&format!("&header={}", encode(&format!("{name}:{value}"))));
        }
        let explained = crate::support::get(gateway.ops, &query).json();
        match live.status {
            200 => {
                let route = explained["route"].as_str();
                assert!(
                    route.is_some(),
                    "{label}: explain found no route: {explained}"
                );
                assert_eq!(
                    Some(live.upstream().as_str()),
                    explained["upstream"].as_str(),
                    "{label}: {explained}"
                );
                assert_eq!(
                    live.json()["path"].as_str(),
                    explained["forwarded_path"].as_str(),
                    "{label}: {explained}"
                );
            }
            404 => assert!(explained["route"].is_null(), "{label}: {explained}"),
            status => assert_eq!(
                explained["result"].as_str(),
                Some(format!("rejected with {status}").as_str()),
                "{label}: {explained}"
            ),
        }
    }
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}
