//! The `json_body` filter through the real gateway: the bytes an upstream that records them
//! received, the bytes the client got, the bodies refused (invalid JSON, one byte over the
//! limit, an unknown coding), the responses passed through unchanged (too large, a gzip bomb,
//! a truncated gzip body, not JSON) with their metric, and a large non-JSON upload streaming
//! through in constant memory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::support::recorder::Recorder;
use crate::support::Gateway;

const ROUTES: &str = r#"
upstreams: [{ name: up, targets: [{ address: "UPSTREAM" }] }]
routes:
  - name: orders
    match: { paths: [{ prefix: /orders }] }
    upstream: up
    filters:
      - kind: json_body
        config:
          max_body_bytes: 256
          request:
            - { op: set, path: /tenant, value: "${request.header.x-tenant}" }
            - { op: set, path: /meta/source, value: { via: gatehouse, page: "${query.page}", n: 1 } }
            - { op: add, path: /priority, value: normal }
            - { op: add, path: /tags/-, value: checked }
            - { op: remove, path: /debug }
            - { op: rename, from: /qty, path: /quantity }
            - { op: copy, from: /id, path: /meta/order }
          response:
            - { op: remove, path: /internal }
            - { op: set, path: /served_by, value: gatehouse }
            - { op: rename, from: /n, path: /count }
  - name: raw
    match: { paths: [{ prefix: /raw }] }
    upstream: up
    filters:
      - kind: json_body
        config:
          decode: false
          response: [{ op: set, path: /served_by, value: gatehouse }]
"#;

fn gateway(upstream: &Recorder) -> Gateway {
    Gateway::start(&ROUTES.replace("UPSTREAM", &upstream.address.to_string()))
}

const JSON: (&str, &str) = ("Content-Type", "application/json; charset=utf-8");

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body).unwrap();
    encoder.finish().unwrap()
}

fn gunzip(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(body)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn brotli(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
        encoder.write_all(body).unwrap();
    }
    out
}

fn unbrotli(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    brotli::Decompressor::new(body, 4096)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn skipped(gateway: &Gateway, route: &str, reason: &str) -> u64 {
    let wanted =
        format!("gatehouse_transform_skipped_total{{reason=\"{reason}\",route=\"{route}\"}} ");
    gateway
        .metrics()
        .lines()
        .find_map(|line| line.strip_prefix(&wanted).map(str::to_string))
        .map(|value| value.trim().parse().unwrap())
        .unwrap_or(0)
}

#[test]
fn request_and_response_bodies_are_rewritten_with_their_lengths() {
    let upstream = Recorder::start(
        &[("Content-Type", "application/json"), ("ETag", "\"v1\"")],
        r#"{"id":7,"internal":{"secret":1},"n":3,"status":"ok"}"#,
    );
    let gateway = gateway(&upstream);
    let sent = br#"{"id":42,"qty":2,"debug":true,"tags":["a"],"note":"keep"}"#;
    let reply = gateway.request(
        "POST",
        "/orders?page=3",
        &[JSON, ("X-Tenant", "acme")],
        sent,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());

    // The upstream got the rewritten body, members in their order, with its own length.
    let received = upstream.last();
    let expected = r#"{"id":42,"tags":["a","checked"],"note":"keep","tenant":"acme","meta":{"source":{"via":"gatehouse","page":"3","n":1},"order":42},"priority":"normal","quantity":2}"#;
    assert_eq!(String::from_utf8_lossy(&received.body), expected);
    assert_eq!(
        received.header("content-length"),
        Some(expected.len().to_string().as_str())
    );
    assert_eq!(received.header("transfer-encoding"), None);

    // The client got the rewritten response, chunked, with a weak validator.
    assert_eq!(
        reply.text(),
        r#"{"id":7,"status":"ok","served_by":"gatehouse","count":3}"#
    );
    assert_eq!(reply.header("content-length"), None);
    assert_eq!(reply.header("transfer-encoding"), Some("chunked"));
    assert_eq!(reply.header("etag"), Some("W/\"v1\""));

    // A chunked request body streams: the upstream gets it rewritten, chunked, no stale length.
    let chunked = b"10\r\n{\"id\":1,\"qty\":5,\r\na\r\n\"debug\":1}\r\n0\r\n\r\n";
    let reply = gateway.request(
        "POST",
        "/orders",
        &[JSON, ("Transfer-Encoding", "chunked")],
        chunked,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let received = upstream.last();
    assert_eq!(
        String::from_utf8_lossy(&received.body),
        r#"{"id":1,"tenant":"","meta":{"source":{"via":"gatehouse","page":"","n":1},"order":1},"priority":"normal","tags":["checked"],"quantity":5}"#
    );
    assert_eq!(received.header("content-length"), None);
    assert_eq!(received.header("transfer-encoding"), Some("chunked"));

    // A gzip request body is decoded and forwarded rewritten, without its coding.
    let reply = gateway.request(
        "POST",
        "/orders",
        &[JSON, ("Content-Encoding", "gzip")],
        &gzip(br#"{"id":9}"#),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let received = upstream.last();
    assert_eq!(received.header("content-encoding"), None);
    let body: serde_json::Value = serde_json::from_slice(&received.body).unwrap();
    assert_eq!(body["meta"]["order"], 9);
    assert_eq!(
        received.header("content-length"),
        Some(received.body.len().to_string().as_str())
    );

    // A body that is not JSON streams through untouched, with its own framing.
    let reply = gateway.request(
        "POST",
        "/orders",
        &[("Content-Type", "text/plain")],
        b"{\"debug\":true}",
    );
    assert_eq!(reply.status, 200);
    let received = upstream.last();
    assert_eq!(received.body, b"{\"debug\":true}");
    assert_eq!(received.header("content-length"), Some("14"));
}

#[test]
fn bad_request_bodies_are_refused_before_the_upstream_sees_them() {
    let upstream = Recorder::start(&[("Content-Type", "text/plain")], "ok");
    let gateway = gateway(&upstream);

    let reply = gateway.request("POST", "/orders", &[JSON], b"{\"id\":1,");
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    assert!(
        reply.json()["detail"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{}",
        reply.text()
    );

    // The limit is 256 bytes: exactly that is rewritten, one byte more is refused.
    let at_limit = |extra: usize| {
        let mut body = String::from("{\"pad\":\"");
        body.push_str(&"x".repeat(256 - 10 + extra));
        body.push_str("\"}");
        body
    };
    assert_eq!(at_limit(0).len(), 256);
    let reply = gateway.request("POST", "/orders", &[JSON], at_limit(1).as_bytes());
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(
        reply.json()["type"],
        "urn:gatehouse:problem:content-too-large"
    );
    // A chunked body over the limit is cut off as it arrives.
    let big = at_limit(100);
    let chunked = format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len());
    let reply = gateway.request(
        "POST",
        "/orders",
        &[JSON, ("Transfer-Encoding", "chunked")],
        chunked.as_bytes(),
    );
    assert_eq!(reply.status, 413, "{}", reply.text());
    // A coding the gateway cannot decode.
    let reply = gateway.request(
        "POST",
        "/orders",
        &[JSON, ("Content-Encoding", "zstd")],
        b"\x28\xb5\x2f\xfd",
    );
    assert_eq!(reply.status, 415, "{}", reply.text());
    // A gzip body that decodes to more than the limit.
    let reply = gateway.request(
        "POST",
        "/orders",
        &[JSON, ("Content-Encoding", "gzip")],
        &gzip(at_limit(1).as_bytes()),
    );
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert!(
        upstream.requests().is_empty(),
        "the upstream saw a refused body: {:?}",
        upstream.requests()
    );

    let reply = gateway.request("POST", "/orders", &[JSON], at_limit(0).as_bytes());
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.requests().len(), 1);
}

#[test]
fn compressed_responses_are_decoded_rewritten_and_encoded_again() {
    let document = br#"{"id":1,"internal":true,"n":2}"#;
    let rewritten = r#"{"id":1,"served_by":"gatehouse","count":2}"#;
    for (coding, encoded, decode) in [
        ("gzip", gzip(document), gunzip as fn(&[u8]) -> Vec<u8>),
        ("br", brotli(document), unbrotli),
    ] {
        let upstream = Recorder::start_bytes(
            &[
                ("Content-Type", "application/vnd.api+json"),
                ("Content-Encoding", coding),
            ],
            &encoded,
        );
        let gateway = gateway(&upstream);
        let reply = gateway.get("/orders/1");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-encoding"), Some(coding));
        assert_eq!(String::from_utf8(decode(&reply.body)).unwrap(), rewritten);

        // With `decode: false` the compressed body passes through byte for byte.
        let reply = gateway.get("/raw");
        assert_eq!(reply.body, encoded, "{coding}");
        assert_eq!(skipped(&gateway, "raw", "encoded"), 1);
    }
}

#[test]
fn responses_that_cannot_be_rewritten_pass_through_byte_for_byte() {
    let large = format!("{{\"pad\":\"{}\"}}", "x".repeat(300));
    // A gzip bomb: 10 MiB of JSON decoded from about 10 KiB.
    let mut bomb_json = b"{\"pad\":\"".to_vec();
    bomb_json.extend(std::iter::repeat_n(b'0', 10 << 20));
    bomb_json.extend_from_slice(b"\"}");
    let bomb = gzip(&bomb_json);
    assert!(bomb.len() < 20 << 10, "the bomb is {} bytes", bomb.len());
    let whole = gzip(br#"{"id":1,"internal":true}"#);
    let truncated = whole[..whole.len() - 8].to_vec();

    for (body, coding, reason) in [
        (large.as_bytes().to_vec(), None, "too_large"),
        (bomb, Some("gzip"), "too_large"),
        (truncated, Some("gzip"), "decode_error"),
        (b"{\"id\":1,".to_vec(), None, "invalid_json"),
        (
            b"\x00\x01\x02".to_vec(),
            Some("zstd"),
            "unsupported_encoding",
        ),
    ] {
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(coding) = coding {
            headers.push(("Content-Encoding", coding));
        }
        let upstream = Recorder::start_bytes(&headers, &body);
        let gateway = gateway(&upstream);
        let reply = gateway.get("/orders");
        assert_eq!(reply.status, 200, "{reason}");
        assert!(reply.body == body, "{reason}: the body changed");
        assert_eq!(skipped(&gateway, "orders", reason), 1, "{reason}");
    }
}

/// An upstream that reads each request's body and answers with its length, holding nothing.
fn counting_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || count_one(stream));
        }
    });
    address
}

fn count_one(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    let mut left = length;
    let mut buffer = vec![0u8; 64 << 10];
    while left > 0 {
        let want = buffer.len().min(left as usize);
        match stream.read(&mut buffer[..want]) {
            Ok(0) | Err(_) => return,
            Ok(read) => left -= read as u64,
        }
    }
    let body = length.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_large_upload_that_is_not_json_streams_in_constant_memory() {
    let upstream = counting_upstream();
    let gateway = Gateway::start_full(
        "",
        "  limits: { max_body_bytes: 200MiB }",
        &format!(
            r#"
upstreams: [{{ name: up, targets: [{{ address: "{upstream}" }}] }}]
routes:
  - name: upload
    match: {{ paths: [{{ prefix: /upload }}] }}
    upstream: up
    filters:
      - kind: json_body
        config:
          request: [{{ op: set, path: /checked, value: true }}]
"#
        ),
    );
    // Warm up the connection pools and allocator with a small upload first.
    let reply = gateway.request(
        "POST",
        "/upload",
        &[("Content-Type", "application/octet-stream")],
        &[7u8; 1 << 20],
    );
    assert_eq!(reply.text(), (1u64 << 20).to_string());
    let before = rss_kib(gateway.pid());

    const SIZE: u64 = 100 << 20;
    let mut stream = TcpStream::connect(gateway.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    write!(
        stream,
        "POST /upload HTTP/1.1\r\nHost: test.local\r\nContent-Type: application/octet-stream\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let piece = vec![b'j'; 256 << 10];
    let mut peak = before;
    let mut sent = 0;
    while sent < SIZE {
        stream.write_all(&piece).unwrap();
        sent += piece.len() as u64;
        if sent % (8 << 20) == 0 {
            peak = peak.max(rss_kib(gateway.pid()));
        }
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.ends_with(&format!("\r\n\r\n{SIZE}")), "{answer}");
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 20 << 10,
        "RSS grew by {grown} KiB while 100 MiB streamed through"
    );
}

#[test]
fn a_retried_request_sends_the_rewritten_body_again() {
    let upstream = Recorder::start(&[("Content-Type", "text/plain")], "ok");
    // A port nobody listens on, first in the round robin half of the time.
    let refused = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gateway = Gateway::start(&format!(
        r#"
upstreams:
  - name: up
    balance: round_robin
    targets: [{{ address: "{refused}" }}, {{ address: "{good}" }}]
routes:
  - name: orders
    match: {{ paths: [{{ prefix: /orders }}] }}
    upstream: up
    retry: {{ attempts: 3, on: [connect_failure], methods: [POST] }}
    filters:
      - kind: json_body
        config:
          request: [{{ op: set, path: /checked, value: true }}]
"#,
        good = upstream.address
    ));
    for id in 0..4 {
        let body = format!("{{\"id\":{id}}}");
        let reply = gateway.request("POST", "/orders", &[JSON], body.as_bytes());
        assert_eq!(reply.status, 200, "{}", reply.text());
        let received = upstream.last();
        let expected = format!("{{\"id\":{id},\"checked\":true}}");
        assert_eq!(String::from_utf8_lossy(&received.body), expected);
        assert_eq!(
            received.header("content-length"),
            Some(expected.len().to_string().as_str())
        );
    }
    assert_eq!(upstream.requests().len(), 4);
    assert!(
        gateway
            .metrics()
            .contains("gatehouse_retries_total{reason=\"connect_failure\",route=\"orders\"}"),
        "no request met the refused port:\n{}",
        gateway.metrics()
    );
}
