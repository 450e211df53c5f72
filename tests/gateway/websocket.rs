//! WebSocket as a property of a route: accepted only where `websocket` allows it, carried by
//! the gateway with an idle timeout and a maximum lifetime, counted in metrics, and closed with
//! a close frame when the process drains. Real peers: the `websockets` library
//! (tests/websocket/peer.py), and raw sockets where the test needs to see every byte.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::websocket::{client, outcome, EchoServer};
use crate::support::{send_raw, Gateway};

fn gateway(echo: SocketAddr, raw: SocketAddr, websocket: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
upstreams:
  - {{ name: echo, targets: [{{ address: "{echo}" }}] }}
  - {{ name: raw, targets: [{{ address: "{raw}" }}] }}
routes:
  - name: ws
    match: {{ paths: [{{ prefix: /ws }}] }}
    upstream: echo
    websocket: {websocket}
  - name: raw-ws
    match: {{ paths: [{{ prefix: /raw-ws }}] }}
    upstream: raw
    websocket: true
  - name: plain
    match: {{ paths: [{{ prefix: /plain }}] }}
    upstream: raw
"#
    ))
}

/// What one connection sent: after its request head before the answer, and after the answer.
type Seen = (Vec<u8>, Vec<u8>);

/// A raw upstream: counts connections, and keeps what each sent before and after it answered.
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl RawUpstream {
    /// Answers every request with `answer` after holding it for 300 ms.
    fn start(answer: &'static [u8]) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count, record) = (connections.clone(), seen.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let record = record.clone();
                std::thread::spawn(move || {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    stream
                        .set_read_timeout(Some(Duration::from_millis(300)))
                        .unwrap();
                    let started = Instant::now();
                    while started.elapsed() < Duration::from_millis(300) {
                        match stream.read(&mut chunk) {
                            Ok(0) => return,
                            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                            Err(_) => {}
                        }
                    }
                    let head_end = buffer
                        .windows(4)
                        .position(|window| window == b"\r\n\r\n")
                        .map_or(buffer.len(), |at| at + 4);
                    let before = buffer[head_end..].to_vec();
                    let _ = stream.write_all(answer);
                    let mut after = Vec::new();
                    let started = Instant::now();
                    while started.elapsed() < Duration::from_millis(500) {
                        match stream.read(&mut chunk) {
                            Ok(0) => break,
                            Ok(read) => after.extend_from_slice(&chunk[..read]),
                            Err(_) => {}
                        }
                    }
                    record.lock().unwrap().push((before, after));
                });
            }
        });
        RawUpstream {
            addr,
            connections,
            seen,
        }
    }
}

/// Waits (5 s at most) until `open` WebSocket connections are counted open.
fn wait_for_open(gateway: &Gateway, open: usize) {
    let row = format!("gatehouse_websocket_connections {open}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gateway.metrics().contains(&row) {
        assert!(Instant::now() < deadline, "{row}:\n{}", gateway.metrics());
        std::thread::sleep(Duration::from_millis(50));
    }
}

const UPGRADE: &str = "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

fn upgrade(path: &str, protocol: &str) -> String {
    UPGRADE
        .replace("{path}", path)
        .replace("{protocol}", protocol)
}

#[test]
fn echo_works_on_a_websocket_route_and_is_counted() {
    let echo = EchoServer::start();
    let raw = RawUpstream::start(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
    let gateway = gateway(echo.addr, raw.addr, "true");
    let url = format!("ws://{}/ws/chat", gateway.addr);
    let replies = outcome(client(&["echo", &url, "5"]));
    assert_eq!(
        replies,
        serde_json::json!([
            "message 0",
            "message 1",
            "message 2",
            "message 3",
            "message 4"
        ])
    );
    // Open connections are counted while they are open.
    let open = client(&["wait", &url]);
    wait_for_open(&gateway, 1);
    // One client closes with a close frame (above), the other by going away.
    let mut open = open;
    open.kill().unwrap();
    open.wait().unwrap();
    wait_for_open(&gateway, 0);
    let metrics = gateway.metrics();
    assert!(
        metrics.contains(r#"gatehouse_websocket_upgrades_total{route="ws"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"gatehouse_websocket_closed_total{reason="client_closed",route="ws"} 2"#),
        "{metrics}"
    );
}

#[test]
fn an_upgrade_is_refused_where_the_route_does_not_allow_it_and_the_upstream_sees_nothing() {
    let echo = EchoServer::start();
    let raw = RawUpstream::start(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
    let gateway = gateway(echo.addr, raw.addr, "true");
    let reply = send_raw(gateway.addr, upgrade("/plain", "websocket").as_bytes()).unwrap();
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(
        reply.json()["type"],
        "urn:gatehouse:problem:upgrade-not-allowed"
    );
    // Without `Connection: upgrade` too (an upstream could still take it for a handshake).
    let reply = send_raw(
        gateway.addr,
        b"GET /plain HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(reply.status, 400, "{reply:?}");
    // Another protocol, even on a WebSocket route.
    let reply = send_raw(gateway.addr, upgrade("/raw-ws", "spdy/3").as_bytes()).unwrap();
    assert_eq!(reply.status, 400, "{reply:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(raw.connections.load(Ordering::SeqCst), 0);
    // A plain request on the same route still passes.
    assert_eq!(gateway.get("/plain").status, 200);
}

#[test]
fn nothing_reaches_the_upstream_before_its_101() {
    let echo = EchoServer::start();
    let raw = RawUpstream::start(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    );
    let gateway = gateway(echo.addr, raw.addr, "true");
    // The request head and a (masked) frame in one write, before any answer.
    let mut stream = TcpStream::connect(gateway.addr).unwrap();
    let mut bytes = upgrade("/raw-ws", "websocket").into_bytes();
    let frame = [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
    bytes.extend_from_slice(&frame);
    stream.write_all(&bytes).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = [0u8; 1024];
    let read = stream.read(&mut answer).unwrap();
    assert!(
        answer[..read].starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&answer[..read])
    );
    std::thread::sleep(Duration::from_millis(800));
    let seen = raw.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].0.is_empty(),
        "bytes before the 101: {:?}",
        seen[0].0
    );
    assert_eq!(seen[0].1, frame, "the frame after the 101");
}

#[test]
fn an_idle_connection_and_one_past_its_lifetime_are_closed_with_a_close_frame() {
    let echo = EchoServer::start();
    let raw = RawUpstream::start(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
    let gateway = gateway(
        echo.addr,
        raw.addr,
        "{ idle_timeout: 1s, max_lifetime: 3s }",
    );
    let url = format!("ws://{}/ws/idle", gateway.addr);
    let idle = outcome(client(&["wait", &url]));
    assert_eq!(idle["code"], 1001, "{idle}");
    assert_eq!(idle["reason"], "idle timeout");
    let took = idle["s"].as_f64().unwrap();
    assert!((0.9..2.5).contains(&took), "{idle}");
    // Busy (a message every 0.3 s), it lives until its lifetime ends.
    let busy = outcome(client(&["wait", &url, "0.3"]));
    assert_eq!(busy["code"], 1001, "{busy}");
    assert_eq!(busy["reason"], "connection lifetime reached");
    let took = busy["s"].as_f64().unwrap();
    assert!((2.9..4.5).contains(&took), "{busy}");
    let metrics = gateway.metrics();
    for reason in ["idle_timeout", "max_lifetime"] {
        let row = format!(r#"gatehouse_websocket_closed_total{{reason="{reason}",route="ws"}} 1"#);
        assert!(metrics.contains(&row), "{row}\n{metrics}");
    }
}

#[test]
fn a_draining_gateway_closes_websockets_with_a_close_frame() {
    let echo = EchoServer::start();
    let raw = RawUpstream::start(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
    let mut gateway = gateway(echo.addr, raw.addr, "true");
    let url = format!("ws://{}/ws/long", gateway.addr);
    let waiting = client(&["wait", &url]);
    wait_for_open(&gateway, 1);
    let signalled = Instant::now();
    gateway.signal("TERM");
    let closed = outcome(waiting);
    assert_eq!(closed["code"], 1001, "{closed}");
    assert_eq!(closed["reason"], "server shutting down");
    // Within the grace period (2 s in the test config), with time left for the closing
    // handshake before the process stops.
    let after = signalled.elapsed();
    assert!(after < Duration::from_millis(1500), "{after:?}");
    assert!(after > Duration::from_millis(300), "{after:?}");
    assert!(gateway.wait_exit(Duration::from_secs(10)).is_some());
}

#[test]
fn a_101_that_does_not_answer_the_handshake_is_not_passed_on() {
    let echo = EchoServer::start();
    // No Sec-WebSocket-Accept: a server that says 101 to anything.
    let raw = RawUpstream::start(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    let gateway = gateway(echo.addr, raw.addr, "true");
    let reply = send_raw(gateway.addr, upgrade("/raw-ws", "websocket").as_bytes()).unwrap();
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_eq!(
        reply.json()["type"],
        "urn:gatehouse:problem:upstream-unavailable"
    );
}

#[test]
fn a_graceful_upgrade_closes_the_old_process_websockets_with_a_close_frame() {
    let echo = EchoServer::start();
    let raw = RawUpstream::start(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
    let mut gateway = gateway(echo.addr, raw.addr, "true");
    let url = format!("ws://{}/ws/long", gateway.addr);
    let waiting = client(&["wait", &url]);
    wait_for_open(&gateway, 1);
    // A new process takes the listeners over (SIGQUIT to the old one once the new one waits).
    let old_pid = gateway.pid();
    let mut old = gateway.child.take().unwrap();
    let socket = gateway.dir.path().join("upgrade.sock");
    gateway.spawn(true);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "{}", gateway.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    crate::support::signal_pid(old_pid, "QUIT");
    let closed = outcome(waiting);
    assert_eq!(closed["code"], 1001, "{closed}");
    assert_eq!(closed["reason"], "server shutting down");
    let deadline = Instant::now() + Duration::from_secs(15);
    while old.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the old process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The new process serves WebSockets.
    gateway.wait_ready();
    let replies = outcome(client(&["echo", &url, "2"]));
    assert_eq!(replies, serde_json::json!(["message 0", "message 1"]));
}
