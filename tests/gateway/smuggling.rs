//! Request smuggling: every request head or body whose framing two HTTP implementations could
//! read differently is answered 400 and its connection closed, and nothing it carried (a
//! request hidden after it) reaches the upstream. Each case is sent as raw bytes, followed on
//! the same connection by a request for `/smuggled`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::support::target::Target;
use crate::support::{spawn_echo, Gateway};

const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";

fn gateway(upstream: SocketAddr) -> Gateway {
    Gateway::start(&format!(
        r#"upstreams: [{{ name: app, targets: [{{ address: "{upstream}" }}] }}]
routes: [{{ name: all, upstream: app, match: {{ paths: [{{ prefix: / }}] }}, filters: [{{ kind: request_id }}] }}]
"#
    ))
}

/// Sends `bytes` and then the smuggled request, and reads until the gateway closes.
fn exchange(gateway: &Gateway, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(gateway.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let _ = stream.write_all(SMUGGLED);
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    String::from_utf8_lossy(&received).into_owned()
}

fn post(headers: &str, body: &str) -> Vec<u8> {
    format!("POST /upload HTTP/1.1\r\nHost: a\r\n{headers}\r\n{body}").into_bytes()
}

#[test]
fn ambiguous_framing_is_refused_with_400_and_a_close() {
    let upstream = Target::start("app");
    let gateway = gateway(upstream.address);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "Content-Length with Transfer-Encoding",
            post(
                "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        (
            "Transfer-Encoding with Content-Length",
            post(
                "Transfer-Encoding: chunked\r\nContent-Length: 6\r\n",
                "0\r\n\r\n",
            ),
        ),
        (
            "duplicate Content-Length lines that differ",
            post("Content-Length: 3\r\nContent-Length: 5\r\n", "abcde"),
        ),
        (
            "a Content-Length list that differs",
            post("Content-Length: 3, 5\r\n", "abcde"),
        ),
        ("Content-Length +5", post("Content-Length: +5\r\n", "abcde")),
        (
            "Content-Length 0x10",
            post("Content-Length: 0x10\r\n", "abcdefghijklmnop"),
        ),
        ("Content-Length -1", post("Content-Length: -1\r\n", "")),
        (
            "Transfer-Encoding gzip, chunked",
            post("Transfer-Encoding: gzip, chunked\r\n", "0\r\n\r\n"),
        ),
        (
            "Transfer-Encoding identity",
            post("Transfer-Encoding: identity\r\n", "0\r\n\r\n"),
        ),
        (
            "Transfer-Encoding xchunked",
            post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
        ),
        (
            "two Transfer-Encoding lines",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST /upload HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
        ),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n".to_vec(),
        ),
        (
            "obs-fold with a tab",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n\tb\r\n\r\n".to_vec(),
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Nul: a\0b\r\n\r\n".to_vec(),
        ),
        (
            "bare CR in a header value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Cr: a\rb\r\n\r\n".to_vec(),
        ),
        (
            "a space before the colon",
            post("Content-Length : 5\r\n", "abcde"),
        ),
        (
            "a tab before the colon",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Tab\t: a\r\n\r\n".to_vec(),
        ),
        (
            "bare LF line ends",
            b"GET / HTTP/1.1\nHost: a\nX-A: b\n\n".to_vec(),
        ),
        (
            "one bare LF among CRLFs",
            b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n".to_vec(),
        ),
        (
            "Connection naming Content-Length",
            post(
                "Content-Length: 5\r\nConnection: content-length\r\n",
                "abcde",
            ),
        ),
        (
            "Connection naming Transfer-Encoding",
            post(
                "Transfer-Encoding: chunked\r\nConnection: keep-alive, Transfer-Encoding\r\n",
                "5\r\nabcde\r\n0\r\n\r\n",
            ),
        ),
        (
            "a chunk size in hex notation",
            post(
                "Transfer-Encoding: chunked\r\n",
                "0x5\r\nabcde\r\n0\r\n\r\n",
            ),
        ),
        (
            "a negative chunk size",
            post("Transfer-Encoding: chunked\r\n", "-5\r\nabcde\r\n0\r\n\r\n"),
        ),
        (
            "a chunk size with a sign",
            post("Transfer-Encoding: chunked\r\n", "+5\r\nabcde\r\n0\r\n\r\n"),
        ),
        (
            "a chunk size that overflows",
            post(
                "Transfer-Encoding: chunked\r\n",
                "10000000000000005\r\nabcde\r\n0\r\n\r\n",
            ),
        ),
        (
            "a chunk size with spaces inside",
            post(
                "Transfer-Encoding: chunked\r\n",
                "5 5\r\nabcde\r\n0\r\n\r\n",
            ),
        ),
        (
            "a chunk that is longer than its size",
            post("Transfer-Encoding: chunked\r\n", "3\r\nabcde\r\n0\r\n\r\n"),
        ),
        (
            "a chunk size ended by a bare LF",
            post("Transfer-Encoding: chunked\r\n", "5\nabcde\r\n0\r\n\r\n"),
        ),
    ];
    let mut failures = Vec::new();
    for (case, bytes) in &cases {
        let answer = exchange(&gateway, bytes);
        let first_line = answer.lines().next().unwrap_or("").to_string();
        let responses = answer.matches("HTTP/1.1 ").count();
        if !first_line.starts_with("HTTP/1.1 400") || responses != 1 {
            failures.push(format!("{case}: {first_line:?}, {responses} responses"));
        }
    }
    let smuggled: Vec<_> = upstream
        .seen()
        .into_iter()
        .filter(|seen| seen.path == "/smuggled")
        .collect();
    assert!(
        failures.is_empty() && smuggled.is_empty(),
        "refused wrongly:\n{}\nsmuggled: {smuggled:?}",
        failures.join("\n")
    );
    // The same bytes, well framed, pass.
    let good = exchange(
        &gateway,
        &post(
            "Transfer-Encoding: chunked\r\nConnection: close\r\n",
            "5\r\nabcde\r\n0\r\n\r\n",
        ),
    );
    assert!(good.starts_with("HTTP/1.1 200"), "{good}");
    let good = exchange(
        &gateway,
        &post(
            "Content-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n",
            "abcde",
        ),
    );
    assert!(
        good.starts_with("HTTP/1.1 200"),
        "identical duplicates: {good}"
    );
}

#[test]
fn every_connection_header_counts_and_none_removes_what_the_gateway_adds() {
    let upstream = Target::start("app");
    let gateway = gateway(upstream.address);
    // `close` in the second of two Connection lines closes the connection after the answer.
    let answer = exchange(
        &gateway,
        b"GET /first HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(upstream.seen().iter().all(|seen| seen.path != "/smuggled"));

    // Headers the client names in Connection are its own hop-by-hop headers; the ones the
    // gateway adds for the upstream stay.
    let gateway = self::gateway(spawn_echo("echo"));
    let answer = exchange(
        &gateway,
        b"GET /named HTTP/1.1\r\nHost: a\r\nConnection: close, X-Forwarded-For, X-Real-IP, X-Request-Id, Forwarded, X-Hop\r\nX-Hop: 1\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let reply: serde_json::Value = serde_json::from_str(body).unwrap();
    let headers = &reply["headers"];
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{reply}");
    assert_eq!(headers["x-real-ip"], "127.0.0.1", "{reply}");
    assert!(headers["forwarded"].is_string(), "{reply}");
    assert!(headers["x-request-id"].is_string(), "{reply}");
    assert!(headers.get("x-hop").is_none(), "{reply}");
}

/// A client that sends its next request while the first is still at the upstream gets both
/// answers, in order, on the same connection (RFC 9112 §9.3.2), whenever the second arrives.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let upstream = Target::start("app");
    upstream.set_delay(Duration::from_millis(300));
    let gateway = gateway(upstream.address);
    let mut stream = TcpStream::connect(gateway.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    // The second request arrives while the first waits for the upstream.
    std::thread::sleep(Duration::from_millis(100));
    stream
        .write_all(b"GET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    let answer = String::from_utf8_lossy(&received);
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    let paths: Vec<String> = upstream.seen().into_iter().map(|seen| seen.path).collect();
    assert_eq!(paths, ["/one", "/two"], "{answer}");
}
