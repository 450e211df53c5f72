//! PROXY protocol on the listeners, as the L4 load balancer in front sends it: the header's
//! client is the client everywhere (forwarding headers, rate-limit keys, the access log), its
//! TLVs reach the request, and a connection that breaks the rules is closed without an answer.
//! Raw sockets send the headers byte by byte where a rule is tested; a real HAProxy in
//! `mode tcp` is the balancer where the deployment is.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use gatehouse::edge::proxy_protocol::encode_v2;

use crate::support::haproxy::Haproxy;
use crate::support::{free_port, parse_response, spawn_echo, Gateway, Reply};

const TLV_AUTHORITY: u8 = 0x02;
const TLV_UNIQUE_ID: u8 = 0x05;
const TLV_SSL: u8 = 0x20;

/// The generated config with `proxy_protocol` on the `public` listener.
fn with_proxy_protocol(settings: &str) -> impl Fn(String) -> String + '_ {
    move |text: String| {
        text.replacen(
            "}]\n  threads",
            &format!(", proxy_protocol: {settings} }}]\n  threads"),
            1,
        )
    }
}

fn routes(echo: SocketAddr) -> String {
    format!(
        r#"upstreams: [{{ name: echo, targets: [{{ address: "{echo}" }}] }}]
routes:
  - name: echo
    upstream: echo
    match: {{ paths: [{{ prefix: / }}] }}
    filters:
      - kind: request_id
      - kind: headers
        config:
          request:
            set:
              x-balancer-authority: "${{connection.authority}}"
              x-client-cn: "${{connection.client_cn}}"
      - kind: rate_limit
        config:
          policies:
            - {{ name: per-client, key: [client_ip], capacity: 100, refill: {{ tokens: 1, every: 1h }} }}
"#
    )
}

/// Reads one response from a kept-alive connection (a `Content-Length` or chunked body).
fn read_response(stream: &mut TcpStream) -> std::io::Result<Reply> {
    let mut buffer = Vec::new();
    let mut byte = [0u8; 1];
    while !buffer.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buffer).to_ascii_lowercase();
    if let Some(length) = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
    {
        let mut body = vec![0u8; length.trim().parse().unwrap()];
        stream.read_exact(&mut body)?;
        buffer.extend_from_slice(&body);
    } else if head.contains("transfer-encoding: chunked") {
        while !buffer.ends_with(b"\r\n0\r\n\r\n") {
            if stream.read(&mut byte)? == 0 {
                break;
            }
            buffer.push(byte[0]);
        }
    }
    parse_response(&buffer)
}

fn get_on(stream: &mut TcpStream, path: &str) -> Reply {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: api.test\r\n\r\n").as_bytes())
        .unwrap();
    read_response(stream).unwrap()
}

fn connect_with(gateway: &Gateway, header: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(gateway.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(header).unwrap();
    stream
}

/// What the peer sent before closing, and how long the close took; `None` when it stayed open
/// for `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<(Vec<u8>, Duration)> {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Some((received, started.elapsed())),
            Ok(read) => received.extend_from_slice(&chunk[..read]),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            // A reset is a close too.
            Err(_) => return Some((received, started.elapsed())),
        }
    }
}

fn access_log(gateway: &Gateway, count: usize) -> Vec<serde_json::Value> {
    access_log_until(gateway, |lines| lines.len() >= count)
}

/// The access log once `done` says it holds what is awaited (or after 10 s).
fn access_log_until(
    gateway: &Gateway,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let path = gateway.dir.path().join("access.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect();
        if done(&lines) || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn forwarded_for(reply: &Reply) -> String {
    reply.json()["headers"]["x-forwarded-for"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_header_names_the_client_for_every_request_of_the_connection() {
    let echo = spawn_echo("echo");
    let gateway = Gateway::start_edited(
        &routes(echo),
        with_proxy_protocol("{ trusted: [127.0.0.1/32], timeout: 2s }"),
    );

    // v1, as `send-proxy` and `curl --haproxy-protocol` send it, then 100 kept-alive requests:
    // all of them from the header's client, whose own rate-limit bucket (100) they empty.
    let mut first = connect_with(&gateway, b"PROXY TCP4 203.0.113.7 127.0.0.1 56324 8080\r\n");
    for n in 0..100 {
        let reply = get_on(&mut first, &format!("/v1/{n}"));
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(forwarded_for(&reply), "203.0.113.7");
        assert_eq!(reply.json()["headers"]["x-forwarded-proto"], "http");
    }
    assert_eq!(get_on(&mut first, "/v1/over").status, 429);

    // v2 from another client, with a unique id, the SNI the balancer saw, TLS to the balancer
    // with a client certificate, and a CRC: its own bucket, its own id, https.
    let ssl = [
        &[0x01 | 0x02, 0, 0, 0, 0][..],
        &[0x21, 0, 7],
        b"TLSv1.3",
        &[0x22, 0, 11],
        b"client-7.eu",
    ]
    .concat();
    let header = encode_v2(
        Some("198.51.100.9:40000".parse().unwrap()),
        Some("10.0.0.1:443".parse().unwrap()),
        &[
            (TLV_UNIQUE_ID, &b"lb-4711"[..]),
            (TLV_AUTHORITY, &b"api.example.com"[..]),
            (TLV_SSL, &ssl[..]),
        ],
        true,
    );
    let mut second = connect_with(&gateway, &header);
    let reply = get_on(&mut second, "/v2/first");
    assert_eq!(reply.status, 200, "{reply:?}");
    let headers = &reply.json()["headers"];
    assert_eq!(forwarded_for(&reply), "198.51.100.9");
    assert_eq!(headers["x-real-ip"], "198.51.100.9");
    assert_eq!(headers["x-forwarded-proto"], "https", "the SSL TLV");
    assert_eq!(headers["x-request-id"], "lb-4711", "the UNIQUE_ID TLV");
    assert_eq!(headers["x-balancer-authority"], "api.example.com");
    assert_eq!(headers["x-client-cn"], "client-7.eu");
    assert_eq!(reply.header("x-request-id"), Some("lb-4711"));
    // The next request of the connection gets its own id made from the unique id, which beats
    // one the client sends.
    second
        .write_all(b"GET /v2/second HTTP/1.1\r\nHost: api.test\r\nX-Request-Id: mine\r\n\r\n")
        .unwrap();
    let reply = read_response(&mut second).unwrap();
    assert_eq!(reply.json()["headers"]["x-request-id"], "lb-4711-1");

    // A second header on a kept-alive connection is only a bad request.
    second
        .write_all(b"PROXY TCP4 192.0.2.66 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut second).unwrap().status, 400);

    // v2 LOCAL (the balancer's health check) keeps the socket's address.
    let mut local = connect_with(&gateway, &encode_v2(None, None, &[], false));
    let reply = get_on(&mut local, "/local");
    assert_eq!(forwarded_for(&reply), "127.0.0.1");

    // A client the header names is trusted for X-Forwarded-For only if it is itself in
    // trusted_proxies (it is not here): the header's address stands.
    let mut spoofing = connect_with(&gateway, b"PROXY TCP4 203.0.113.8 127.0.0.1 1 2\r\n");
    spoofing
        .write_all(b"GET /spoof HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        .unwrap();
    let reply = read_response(&mut spoofing).unwrap();
    assert_eq!(forwarded_for(&reply), "203.0.113.8");

    let lines = access_log(&gateway, 105);
    let clients: Vec<&str> = lines
        .iter()
        .filter_map(|line| line["client"].as_str())
        .collect();
    assert_eq!(
        clients
            .iter()
            .filter(|client| **client == "203.0.113.7")
            .count(),
        101,
        "{clients:?}"
    );
    assert!(lines
        .iter()
        .any(|line| line["client"] == "198.51.100.9" && line["request_id"] == "lb-4711"));
    assert!(lines
        .iter()
        .any(|line| line["client"] == "127.0.0.1" && line["path"] == "/local"));
    let metrics = gateway.metrics();
    assert!(
        metrics.contains(
            "gatehouse_proxy_protocol_connections_total{listener=\"public\",result=\"proxied\"} 3"
        ),
        "{metrics}"
    );
    assert!(metrics.contains(
        "gatehouse_proxy_protocol_connections_total{listener=\"public\",result=\"local\"} 1"
    ));
}

#[test]
fn connections_that_break_the_rules_are_closed_without_an_answer() {
    let echo = spawn_echo("echo");
    let gateway = Gateway::start_edited(
        &routes(echo),
        with_proxy_protocol("{ trusted: [127.0.0.1/32], timeout: 1s }"),
    );
    let v2 = encode_v2(
        Some("192.0.2.1:1".parse().unwrap()),
        Some("192.0.2.2:2".parse().unwrap()),
        &[],
        false,
    );
    let mut bad_family = v2.clone();
    bad_family[13] = 0x41;
    let mut too_long = v2.clone();
    too_long[14..16].copy_from_slice(&5000u16.to_be_bytes());
    too_long.resize(16 + 5000, 0);
    let mut bad_crc = encode_v2(
        Some("192.0.2.1:1".parse().unwrap()),
        Some("192.0.2.2:2".parse().unwrap()),
        &[],
        true,
    );
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 1;
    let mut no_crlf = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 ".to_vec();
    no_crlf.resize(108, b'x');
    let cases: [(&str, Vec<u8>); 6] = [
        ("no header", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        ("a v1 header of 108 bytes without CRLF", no_crlf),
        ("a v2 header over 4 KiB", too_long),
        ("a bad address family", bad_family),
        ("a bad CRC", bad_crc),
        (
            "TLS without a header",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00".to_vec(),
        ),
    ];
    for (case, bytes) in cases {
        let mut stream = connect_with(&gateway, &bytes);
        let (received, took) = closed_within(&mut stream, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{case}: still open"));
        assert!(received.is_empty(), "{case}: answered {received:?}");
        assert!(took < Duration::from_millis(900), "{case}: took {took:?}");
    }

    // A header that stalls halfway is cut at the timeout (1 s).
    let mut stalled = connect_with(&gateway, b"PROXY TCP4 192.0.2.1 ");
    let (received, took) = closed_within(&mut stalled, Duration::from_secs(5)).expect("closed");
    assert!(received.is_empty());
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");

    // With the balancer's address no longer trusted, a valid header is refused at once.
    let version = gateway.config_version();
    gateway.write_config_edited(
        &routes(echo),
        with_proxy_protocol("{ trusted: [10.0.0.0/8], timeout: 5s }"),
    );
    gateway.wait_for_version_above(version);
    let mut untrusted = connect_with(&gateway, b"PROXY TCP4 203.0.113.7 127.0.0.1 1 2\r\n");
    let (received, took) = closed_within(&mut untrusted, Duration::from_secs(5)).expect("closed");
    assert!(received.is_empty(), "{received:?}");
    assert!(took < Duration::from_secs(1), "closed after {took:?}");
    assert_eq!(echo_requests(&gateway), 0, "nothing reached the upstream");
    let metrics = gateway.metrics();
    for (result, count) in [("invalid", 6), ("timeout", 1), ("untrusted", 1)] {
        assert!(
            metrics.contains(&format!(
                "gatehouse_proxy_protocol_connections_total{{listener=\"public\",result=\"{result}\"}} {count}"
            )),
            "{result}: {metrics}"
        );
    }
}

fn echo_requests(gateway: &Gateway) -> usize {
    access_log(gateway, 0).len()
}

#[test]
fn stalled_headers_do_not_hold_up_other_clients() {
    let echo = spawn_echo("echo");
    let gateway = Gateway::start_edited(
        &routes(echo),
        with_proxy_protocol("{ trusted: [127.0.0.1/32], timeout: 3s }"),
    );
    let mut stalled: Vec<TcpStream> = (0..1000)
        .map(|_| connect_with(&gateway, b"PROXY TCP4 192.0.2."))
        .collect();
    let mut client = connect_with(&gateway, b"PROXY TCP4 203.0.113.9 127.0.0.1 1 2\r\n");
    let mut latencies = Vec::new();
    for n in 0..100 {
        let started = Instant::now();
        assert_eq!(get_on(&mut client, &format!("/busy/{n}")).status, 200);
        latencies.push(started.elapsed());
    }
    latencies.sort();
    eprintln!(
        "with 1000 stalled PROXY headers: p50 {:?}, p99 {:?}",
        latencies[50], latencies[98]
    );
    // Every stalled connection is closed at the timeout, without an answer.
    for stream in &mut stalled {
        let (received, _) =
            closed_within(stream, Duration::from_secs(10)).expect("closed at the timeout");
        assert!(received.is_empty());
    }
    assert!(gateway.metrics().contains(
        "gatehouse_proxy_protocol_connections_total{listener=\"public\",result=\"timeout\"} 1000"
    ));
}

fn wait_for_port(address: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(address).is_err() {
        assert!(Instant::now() < deadline, "{address} never listened");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// curl from `source` (127.0.0.2-.9) through the balancer: 100 requests on one connection.
fn curl_hundred(source: &str, url: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let output = Command::new("curl")
        .args(["-sS", "--interface", source, "-k", "--max-time", "30"])
        .args(extra)
        .args(["-w", "\\n"])
        .arg(url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let replies: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(replies.len(), 100);
    replies
}

#[test]
fn behind_haproxy_the_client_is_the_client_over_v1_and_over_v2_with_tls() {
    let echo = spawn_echo("echo");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let files = tempfile::tempdir().unwrap();
    let cert = files.path().join("tls.crt");
    let key = files.path().join("tls.key");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let tls_port = free_port();
    let gateway = Gateway::start_edited(&routes(echo), |text| {
        with_proxy_protocol("{ trusted: [127.0.0.1/32] }")(text).replacen(
            " }]\n  threads",
            &format!(
                " }}, {{ name: public-tls, address: \"127.0.0.1:{tls_port}\", tls: {{ cert: {}, key: {} }}, proxy_protocol: {{ trusted: [127.0.0.1/32] }} }}]\n  threads",
                cert.display(),
                key.display()
            ),
            1,
        )
    });
    let (v1_port, v2_port) = (free_port(), free_port());
    let _haproxy = Haproxy::start(&format!(
        "global
    maxconn 200
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend v1
    bind 127.0.0.1:{v1_port}
    default_backend gatehouse_v1
backend gatehouse_v1
    option httpchk GET /healthcheck
    server gh {gateway} send-proxy check check-send-proxy inter 200ms
frontend v2
    bind 127.0.0.1:{v2_port}
    unique-id-format lb-%ci-%cp
    default_backend gatehouse_v2
backend gatehouse_v2
    server gh 127.0.0.1:{tls_port} send-proxy-v2 proxy-v2-options crc32c,unique-id check inter 200ms
",
        gateway = gateway.addr
    ));
    wait_for_port(format!("127.0.0.1:{v1_port}").parse().unwrap());
    wait_for_port(format!("127.0.0.1:{v2_port}").parse().unwrap());
    // Health checks have run (and passed: a server marked down would refuse the traffic).
    std::thread::sleep(Duration::from_millis(800));

    for reply in curl_hundred(
        "127.0.0.5",
        &format!("http://127.0.0.1:{v1_port}/plain/[1-100]"),
        &[],
    ) {
        assert_eq!(reply["headers"]["x-forwarded-for"], "127.0.0.5", "{reply}");
    }
    let replies = curl_hundred(
        "127.0.0.6",
        &format!("https://localhost:{v2_port}/tls/[1-100]"),
        &["--resolve", &format!("localhost:{v2_port}:127.0.0.1")],
    );
    // Every request has its own id, made from the balancer's unique id for the connection.
    let request_id = replies[0]["headers"]["x-request-id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(request_id.starts_with("lb-127.0.0.6-"), "{request_id}");
    let mut ids = std::collections::HashSet::new();
    for reply in &replies {
        assert_eq!(reply["headers"]["x-forwarded-for"], "127.0.0.6", "{reply}");
        assert_eq!(reply["headers"]["x-forwarded-proto"], "https");
        let id = reply["headers"]["x-request-id"].as_str().unwrap();
        assert!(id.starts_with(&request_id), "{id}");
        ids.insert(id.to_string());
    }
    assert_eq!(ids.len(), 100, "{ids:?}");

    let lines = access_log_until(&gateway, |lines| {
        let under = |prefix: &str| {
            lines
                .iter()
                .filter(|line| line["path"].as_str().unwrap_or("").starts_with(prefix))
                .count()
        };
        under("/plain/") >= 100 && under("/tls/") >= 100
    });
    let client_of = |prefix: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|line| line["path"].as_str().unwrap_or("").starts_with(prefix))
            .map(|line| line["client"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(client_of("/plain/"), vec!["127.0.0.5".to_string(); 100]);
    assert_eq!(client_of("/tls/"), vec!["127.0.0.6".to_string(); 100]);
    // The health checks: HTTP ones on v1 (logged with the balancer's address), TCP ones with a
    // v2 LOCAL header.
    assert!(client_of("/healthcheck")
        .iter()
        .all(|client| client == "127.0.0.1"));
    assert!(!client_of("/healthcheck").is_empty());
    let metrics = gateway.metrics();
    assert!(
        metrics.contains(
            "gatehouse_proxy_protocol_connections_total{listener=\"public-tls\",result=\"local\"}"
        ),
        "{metrics}"
    );
    assert!(!metrics.contains(
        "gatehouse_proxy_protocol_connections_total{listener=\"public-tls\",result=\"local\"} 0"
    ));
}
