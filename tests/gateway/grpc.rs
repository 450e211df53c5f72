//! gRPC through the gateway, with real `grpcio` peers (tests/grpc/peer.py): calls pass, and
//! every answer the gateway makes itself reaches a gRPC client as a gRPC status (trailers-only),
//! never as an HTTP error page; the client's `grpc-timeout` bounds the upstream exchange; calls
//! are counted by status.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::grpc::{call, GrpcServer};
use crate::support::idp::IdentityProvider;
use crate::support::{free_port, Gateway};

/// The gateway with h2c on its listener (gRPC clients speak HTTP/2 without TLS here).
pub fn h2c_gateway(rest: &str) -> Gateway {
    Gateway::start_edited(rest, |text| {
        text.replacen("}]\n  threads", ", h2c: true }]\n  threads", 1)
    })
}

fn answers_gateway(server: SocketAddr, idp: &IdentityProvider) -> Gateway {
    let dead = free_port();
    h2c_gateway(&format!(
        r#"
upstreams:
  - {{ name: grpc, protocol: h2, targets: [{{ address: "{server}" }}] }}
  - {{ name: dead, protocol: h2, targets: [{{ address: "127.0.0.1:{dead}" }}] }}
routes:
  - name: items
    match: {{ paths: [{{ exact: /gatehouse.example.Echo/GetItem }}] }}
    upstream: grpc
    filters:
      - {{ kind: rate_limit, config: {{ policies: [{{ name: grpc-items, key: [route], capacity: 1, refill: {{ tokens: 1, every: 1h }} }}] }} }}
  - name: failing
    match: {{ paths: [{{ exact: /gatehouse.example.Echo/Fail }}] }}
    upstream: dead
  - name: echo
    match: {{ paths: [{{ prefix: /gatehouse.example.Echo/ }}] }}
    upstream: grpc
    timeout: 500ms
  - name: guarded
    match: {{ paths: [{{ prefix: /gatehouse.example.Extra/ }}] }}
    upstream: grpc
    auth: required
    filters:
      - kind: jwt
        config: {{ issuer: "{issuer}", jwks_url: "{jwks}", algorithms: [RS256], audiences: [api] }}
"#,
        issuer = idp.issuer(),
        jwks = idp.jwks_url(),
    ))
}

#[test]
fn grpc_clients_see_the_gateways_own_answers_as_their_status() {
    let server = GrpcServer::start();
    let idp = IdentityProvider::start();
    let gateway = answers_gateway(server.addr, &idp);
    let target = gateway.addr;

    // A call the upstream answers passes, its replies and status intact.
    let ok = call(
        target,
        "/gatehouse.example.Echo/Say",
        r#"{"text":"hi","count":"7"}"#,
        &[],
    );
    assert_eq!(ok.code, "OK", "{ok:?}");
    assert_eq!(ok.replies[0]["text"], "hi");
    assert_eq!(ok.replies[0]["count"], "7");
    let streamed = call(
        target,
        "/gatehouse.example.Echo/ListItems",
        r#"{"count":20}"#,
        &["--stream"],
    );
    assert_eq!(streamed.code, "OK", "{streamed:?}");
    assert_eq!(streamed.replies.len(), 20);
    // The upstream's own error status passes as it is.
    let failed = call(
        target,
        "/gatehouse.example.Echo/Fail",
        r#"{"code":7,"message":"no"}"#,
        &[],
    );
    assert_eq!(
        failed.code, "UNAVAILABLE",
        "the Fail route goes to a dead upstream: {failed:?}"
    );

    // No JWT on a route that requires one: UNAUTHENTICATED, with the problem's words.
    let missing = call(
        target,
        "/gatehouse.example.Extra/Shout",
        r#"{"text":"hi"}"#,
        &[],
    );
    assert_eq!(missing.code, "UNAUTHENTICATED", "{missing:?}");
    assert!(
        missing.details.contains("requires credentials"),
        "{missing:?}"
    );
    // A malformed one: UNAUTHENTICATED too; a valid one passes.
    let bad = call(
        target,
        "/gatehouse.example.Extra/Shout",
        r#"{"text":"hi"}"#,
        &["--metadata", "authorization=Bearer not.a.token"],
    );
    assert_eq!(bad.code, "UNAUTHENTICATED", "{bad:?}");
    let token = idp.sign(idp.claims("alice", "api"));
    let authorization = format!("authorization=Bearer {token}");
    let shouted = call(
        target,
        "/gatehouse.example.Extra/Shout",
        r#"{"text":"hi"}"#,
        &["--metadata", &authorization],
    );
    assert_eq!(shouted.code, "OK", "{shouted:?}");
    assert_eq!(shouted.replies[0]["text"], "HI");

    // Over the rate limit: RESOURCE_EXHAUSTED.
    let first = call(
        target,
        "/gatehouse.example.Echo/GetItem",
        r#"{"id":"3"}"#,
        &[],
    );
    assert_eq!(first.code, "OK", "{first:?}");
    let limited = call(
        target,
        "/gatehouse.example.Echo/GetItem",
        r#"{"id":"3"}"#,
        &[],
    );
    assert_eq!(limited.code, "RESOURCE_EXHAUSTED", "{limited:?}");

    // A method no route serves: UNIMPLEMENTED.
    let unknown = call(
        target,
        "/gatehouse.example.Echo/Say",
        "{}",
        &["--path", "/gatehouse.example.Nowhere/Nothing"],
    );
    assert_eq!(unknown.code, "UNIMPLEMENTED", "{unknown:?}");

    // A dead upstream: UNAVAILABLE (the Fail call above); its gateway answer is counted.
    let metrics = gateway.metrics();
    for row in [
        r#"gatehouse_grpc_requests_total{grpc_status="OK",route="echo"} 2"#,
        r#"gatehouse_grpc_requests_total{grpc_status="UNAVAILABLE",route="failing"} 1"#,
        r#"gatehouse_grpc_requests_total{grpc_status="UNAUTHENTICATED",route="guarded"} 2"#,
        r#"gatehouse_grpc_requests_total{grpc_status="OK",route="guarded"} 1"#,
        r#"gatehouse_grpc_requests_total{grpc_status="RESOURCE_EXHAUSTED",route="items"} 1"#,
        r#"gatehouse_grpc_requests_total{grpc_status="UNIMPLEMENTED",route="(none)"} 1"#,
    ] {
        assert!(metrics.contains(row), "{row} missing:\n{metrics}");
    }
}

#[test]
fn a_grpc_timeout_bounds_the_upstream_exchange() {
    let server = GrpcServer::start();
    let idp = IdentityProvider::start();
    let gateway = answers_gateway(server.addr, &idp);

    // 100 ms against a call that takes 2 s: DEADLINE_EXCEEDED within 100 ms + 50 ms.
    let slow = r#"{"text":"zz","wait":"2s"}"#;
    let late = call(
        gateway.addr,
        "/gatehouse.example.Echo/Slow",
        slow,
        &["--timeout", "0.1"],
    );
    assert_eq!(late.code, "DEADLINE_EXCEEDED", "{late:?}");
    assert!(late.ms < 150.0, "{late:?}");

    // The client enforces its own deadline too, so the gateway's part is shown on its own: a
    // raw request with `grpc-timeout: 100m` gets the gateway's DEADLINE_EXCEEDED, in time.
    // `SayRequest { wait: 2s }`, framed.
    let frame = [0u8, 0, 0, 0, 4, 0x22, 2, 0x08, 2];
    let started = Instant::now();
    let reply = gateway.request(
        "POST",
        "/gatehouse.example.Echo/Slow",
        &[
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", "100m"),
        ],
        &frame,
    );
    let took = started.elapsed();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("grpc-status"),
        Some("4"),
        "{reply:?} {}",
        gateway.stderr()
    );
    assert_eq!(reply.header("content-type"), Some("application/grpc"));
    assert!(reply.body.is_empty(), "{reply:?}");
    assert!(took >= Duration::from_millis(95), "{took:?}");
    assert!(took < Duration::from_millis(150), "{took:?}");

    // Without a client deadline the route's (500 ms) bounds it, and the upstream is told the
    // time left in `grpc-timeout`.
    let started = Instant::now();
    let bounded = call(gateway.addr, "/gatehouse.example.Echo/Slow", slow, &[]);
    assert_eq!(bounded.code, "DEADLINE_EXCEEDED", "{bounded:?}");
    assert!(started.elapsed() < Duration::from_millis(1500));
    let told = call(
        gateway.addr,
        "/gatehouse.example.Echo/Say",
        r#"{"text":"t"}"#,
        &["--timeout", "5"],
    );
    let left: f64 = told.replies[0]["timeout"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        left > 0.3 && left <= 0.5,
        "the service was told {left} s: {told:?}"
    );
}

#[test]
fn the_gateways_answers_to_grpc_web_and_http1_grpc_clients_are_statuses_too() {
    let server = GrpcServer::start();
    let idp = IdentityProvider::start();
    let gateway = answers_gateway(server.addr, &idp);
    for (content_type, answered) in [
        ("application/grpc", "application/grpc"),
        ("application/grpc+proto", "application/grpc"),
        ("application/grpc-web+proto", "application/grpc-web+proto"),
        (
            "application/grpc-web-text",
            "application/grpc-web-text+proto",
        ),
    ] {
        let reply = gateway.request(
            "POST",
            "/gatehouse.example.Nowhere/Nothing",
            &[("content-type", content_type)],
            &[0, 0, 0, 0, 0],
        );
        assert_eq!(reply.status, 200, "{content_type}: {reply:?}");
        assert_eq!(reply.header("grpc-status"), Some("12"), "{reply:?}");
        assert_eq!(reply.header("content-type"), Some(answered));
        assert_eq!(
            reply.header("grpc-message"),
            Some("No route matches this request")
        );
        assert!(reply.header("x-request-id").is_some(), "{reply:?}");
        assert!(reply.body.is_empty());
    }
    // Anything else still gets a problem document.
    let reply = gateway.request(
        "POST",
        "/gatehouse.example.Nowhere/Nothing",
        &[("content-type", "application/json")],
        b"{}",
    );
    assert_eq!(reply.status, 404);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
}
