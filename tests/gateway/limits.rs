//! Request limits: URI length (414), header count and bytes (431), body size (413), and the total
//! deadline for a request head.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{request_bytes, send_raw, spawn_echo, Gateway};

fn limited_gateway() -> Gateway {
    let echo = spawn_echo("echo");
    Gateway::start_with(
        "  limits: { max_uri_bytes: 1KiB, max_headers: 20, max_header_bytes: 2KiB, max_body_bytes: 1KiB, header_read_timeout: 1s }",
        &format!(
            "upstreams: [{{ name: echo, targets: [{{ address: \"{echo}\" }}] }}]\nroutes: [{{ name: all, upstream: echo, match: {{ paths: [{{ prefix: / }}] }} }}]\n"
        ),
    )
}

#[test]
fn uri_header_and_body_limits_answer_with_problem_json() {
    let gateway = limited_gateway();

    let long_path = format!("/{}", "a".repeat(1100));
    let reply = gateway.get(&long_path);
    assert_eq!(reply.status, 414);
    assert_eq!(reply.json()["type"], "urn:gatehouse:problem:uri-too-long");
    assert_eq!(gateway.get(&format!("/{}", "a".repeat(900))).status, 200);

    let many: Vec<(String, String)> = (0..25)
        .map(|index| (format!("x-h{index}"), "v".into()))
        .collect();
    let many: Vec<(&str, &str)> = many
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    let reply = gateway.request("GET", "/", &many, b"");
    assert_eq!(reply.status, 431);
    assert_eq!(
        reply.json()["type"],
        "urn:gatehouse:problem:header-fields-too-large"
    );
    assert_eq!(gateway.request("GET", "/", &many[..10], b"").status, 200);

    let big_value = "b".repeat(2100);
    let reply = gateway.request("GET", "/", &[("x-big", &big_value)], b"");
    assert_eq!(reply.status, 431);

    let reply = gateway.request("POST", "/", &[], &vec![b'x'; 2000]);
    assert_eq!(reply.status, 413);
    assert_eq!(
        reply.json()["type"],
        "urn:gatehouse:problem:content-too-large"
    );
    let reply = gateway.request("POST", "/", &[], &vec![b'x'; 1000]);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["body_bytes"], 1000);

    // A chunked body declares no length; it is counted as it streams.
    let mut chunked = Vec::new();
    for _ in 0..4 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'y'; 0x200]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let raw = request_bytes("POST", "/", &[("Transfer-Encoding", "chunked")], &chunked);
    let reply = send_raw(gateway.addr, &raw).unwrap();
    assert_eq!(reply.status, 413, "{}", reply.text());
}

#[test]
fn slow_request_head_is_cut_off_without_hurting_others() {
    let gateway = limited_gateway();
    let started = Instant::now();
    let mut slow = TcpStream::connect(gateway.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let address = gateway.addr;
    // Feed the head one byte every 150 ms: each read is quick, the whole head is not.
    let dripper = std::thread::spawn(move || {
        let head = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        for byte in head {
            if slow.write_all(&[*byte]).is_err() {
                return (true, started.elapsed(), Vec::new());
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        let mut buffer = Vec::new();
        let _ = slow.read_to_end(&mut buffer);
        (false, started.elapsed(), buffer)
    });
    // Meanwhile other clients are served normally.
    for _ in 0..5 {
        assert_eq!(crate::support::get(address, "/").status, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (cut_off, elapsed, answer) = dripper.join().unwrap();
    // The whole head takes about 10 s to drip in; the 1 s deadline must cut it off long before.
    assert!(
        cut_off,
        "the slow head was accepted after {elapsed:?}: {}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "cut off only after {elapsed:?}"
    );
}

/// Gatehouse's own answers carry the request id in the header the `request_id` filter names,
/// whether the chain ran (a 404) or not (a limit refused the request first).
#[test]
fn problems_carry_the_request_id_in_the_configured_header() {
    let echo = spawn_echo("echo");
    let gateway = Gateway::start_with(
        "  limits: { max_uri_bytes: 1KiB }",
        &format!(
            "upstreams: [{{ name: echo, targets: [{{ address: \"{echo}\" }}] }}]\nfilters: [{{ kind: request_id, config: {{ header: x-trace-id }} }}]\nroutes: [{{ name: api, upstream: echo, match: {{ paths: [{{ prefix: /api }}] }} }}]\n"
        ),
    );
    let not_found = gateway.get("/nowhere");
    assert_eq!(not_found.status, 404);
    let too_long = gateway.get(&format!("/api/{}", "a".repeat(1100)));
    assert_eq!(too_long.status, 414);
    for reply in [not_found, too_long] {
        let id = reply.json()["request_id"].as_str().unwrap().to_string();
        assert_eq!(reply.header("x-trace-id"), Some(id.as_str()), "{reply:?}");
        assert_eq!(reply.header("x-request-id"), None, "{reply:?}");
    }
    // A proxied answer carries it there too, and the upstream got the same id.
    let reply = gateway.request("GET", "/api/x", &[("x-trace-id", "trace-7")], b"");
    assert_eq!(reply.header("x-trace-id"), Some("trace-7"));
    assert_eq!(reply.json()["headers"]["x-trace-id"], "trace-7");
}
