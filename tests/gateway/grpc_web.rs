//! Browsers' gRPC-Web (binary and base64 text) through the `grpc_web` filter to the `grpcio`
//! example service, with the `cors` filter in front as a browser needs it.

use base64::Engine;

use crate::support::grpc::GrpcServer;
use crate::support::{Gateway, Reply};

fn gateway(server: std::net::SocketAddr) -> Gateway {
    Gateway::start(&format!(
        r#"
upstreams:
  - {{ name: grpc, protocol: h2, targets: [{{ address: "{server}" }}] }}
routes:
  - name: web
    match: {{ paths: [{{ prefix: /gatehouse.example.Echo/ }}] }}
    upstream: grpc
    filters:
      - kind: cors
        config:
          allow_origins: ["https://app.example"]
          allow_methods: [POST]
          allow_headers: [content-type, x-grpc-web, x-user-agent, grpc-timeout]
          expose_headers: [grpc-status, grpc-message]
      - {{ kind: grpc_web }}
"#
    ))
}

/// One gRPC message frame.
fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// The frames of a gRPC-Web body: (flags, data).
fn frames(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 5, "a cut frame: {body:?}");
        let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        out.push((body[0], body[5..5 + length].to_vec()));
        body = &body[5 + length..];
    }
    out
}

/// A grpc-web-text body: base64 chunks, each padded, one after another.
fn decode_text(body: &[u8]) -> Vec<u8> {
    let text: Vec<u8> = body
        .iter()
        .copied()
        .filter(|byte| !byte.is_ascii_whitespace())
        .collect();
    assert_eq!(text.len() % 4, 0, "{}", String::from_utf8_lossy(&text));
    text.chunks(4)
        .flat_map(|quantum| {
            base64::engine::general_purpose::STANDARD
                .decode(quantum)
                .unwrap()
        })
        .collect()
}

fn call(gateway: &Gateway, method: &str, content_type: &str, body: &[u8]) -> Reply {
    gateway.request(
        "POST",
        &format!("/gatehouse.example.Echo/{method}"),
        &[
            ("content-type", content_type),
            ("x-grpc-web", "1"),
            ("origin", "https://app.example"),
        ],
        body,
    )
}

/// `SayRequest { text }` and `ListItemsRequest { count }`, encoded by hand.
fn say(text: &str) -> Vec<u8> {
    let mut out = vec![0x0a, text.len() as u8];
    out.extend_from_slice(text.as_bytes());
    out
}

fn list(count: u8) -> Vec<u8> {
    vec![0x08, count]
}

fn check_trailer(frame: &(u8, Vec<u8>), status: &str) {
    assert_eq!(frame.0, 0x80, "{frame:?}");
    let text = String::from_utf8(frame.1.clone()).unwrap();
    assert!(
        text.starts_with(&format!("grpc-status:{status}\r\n")),
        "{text:?}"
    );
}

#[test]
fn grpc_web_binary_and_text_calls_get_their_replies_and_the_trailer_frame() {
    let server = GrpcServer::start();
    let gateway = gateway(server.addr);

    // Binary, unary.
    let reply = call(
        &gateway,
        "Say",
        "application/grpc-web+proto",
        &frame(&say("hello")),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("application/grpc-web+proto")
    );
    let got = frames(&reply.body);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].0, 0);
    assert!(got[0].1.starts_with(&say("hello")), "{got:?}");
    check_trailer(&got[1], "0");
    // The browser may read the status: CORS exposes it.
    let exposed = reply
        .header("access-control-expose-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(exposed.contains("grpc-status"), "{reply:?}");

    // Binary, server streaming: every message, then the trailer frame.
    let reply = call(
        &gateway,
        "ListItems",
        "application/grpc-web+proto",
        &frame(&list(30)),
    );
    let got = frames(&reply.body);
    assert_eq!(got.len(), 31, "{got:?}");
    for (index, item) in got[..30].iter().enumerate() {
        let name = format!("item {index}");
        assert!(
            item.1
                .windows(name.len())
                .any(|window| window == name.as_bytes()),
            "{item:?}"
        );
    }
    check_trailer(&got[30], "0");

    // Text: the request in base64, the answer in base64 (each piece padded).
    let body = base64::engine::general_purpose::STANDARD.encode(frame(&say("text")));
    let reply = call(
        &gateway,
        "Say",
        "application/grpc-web-text",
        body.as_bytes(),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("application/grpc-web-text+proto")
    );
    let got = frames(&decode_text(&reply.body));
    assert!(!got.is_empty(), "{reply:?} {}", gateway.stderr());
    assert!(got[0].1.starts_with(&say("text")), "{got:?}");
    check_trailer(&got[1], "0");
    // A request body sent as two padded base64 chunks, as some clients do.
    let whole = frame(&list(12));
    let body = format!(
        "{}{}",
        base64::engine::general_purpose::STANDARD.encode(&whole[..4]),
        base64::engine::general_purpose::STANDARD.encode(&whole[4..])
    );
    let reply = call(
        &gateway,
        "ListItems",
        "application/grpc-web-text",
        body.as_bytes(),
    );
    let got = frames(&decode_text(&reply.body));
    assert_eq!(got.len(), 13, "{got:?}");
    check_trailer(&got[12], "0");

    // The service's error: its status reaches the browser (trailers-only: in the head).
    let mut fail = vec![0x08, 7, 0x12, 2];
    fail.extend_from_slice(b"no");
    let reply = call(
        &gateway,
        "Fail",
        "application/grpc-web+proto",
        &frame(&fail),
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("grpc-status"), Some("7"), "{reply:?}");
    assert_eq!(reply.header("grpc-message"), Some("no"));

    // Base64 that is not: 400 from the gateway, as a gRPC-Web status, before the service
    // sees anything.
    let reply = call(&gateway, "Say", "application/grpc-web-text", b"!!!!");
    assert_eq!(reply.header("grpc-status"), Some("3"), "{reply:?}");
    // The same, streamed (chunked, so decoded while the service has the call): answered at
    // once, not when the service gives up waiting for the rest of the call.
    let started = std::time::Instant::now();
    let reply = crate::support::send_raw(
        gateway.addr,
        b"POST /gatehouse.example.Echo/Say HTTP/1.1\r\nHost: a\r\nContent-Type: application/grpc-web-text\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n8\r\nAAAAAAY!\r\n0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(reply.header("grpc-status"), Some("3"), "{reply:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_browsers_cors_preflight_for_grpc_web_passes() {
    let server = GrpcServer::start();
    let gateway = gateway(server.addr);
    let reply = gateway.request(
        "OPTIONS",
        "/gatehouse.example.Echo/Say",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "content-type,x-grpc-web,x-user-agent",
            ),
        ],
        b"",
    );
    assert!(reply.status == 204 || reply.status == 200, "{reply:?}");
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let allowed = reply
        .header("access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    for name in ["content-type", "x-grpc-web", "x-user-agent"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    // Another origin's preflight is refused.
    let reply = gateway.request(
        "OPTIONS",
        "/gatehouse.example.Echo/Say",
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        b"",
    );
    assert!(
        reply.header("access-control-allow-origin").is_none(),
        "{reply:?}"
    );
}
