//! HTTP/2 from clients, spoken frame by frame over h2c (prior knowledge): the advertised
//! SETTINGS, the stream limit, the Rapid Reset and CONTINUATION-flood defences, and h2c being
//! opt-in per listener with its preface under the head deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::support::target::Target;
use crate::support::{send_raw, spawn_echo, Gateway};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// `GET /path` with `:authority a`, HPACK-encoded without the dynamic table.
fn request_block(path: &str) -> Vec<u8> {
    // :method GET (static 2), :scheme http (static 6), :path (name 4) and :authority (name 1)
    // as literals without indexing.
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 0x01, b'a']);
    block
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn read_frame(stream: &mut TcpStream) -> std::io::Result<Frame> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head)?;
    let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload)?;
    Ok(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// Opens an h2c connection: the preface and empty SETTINGS out, the server's SETTINGS (as
/// `(id, value)` pairs) in, and acknowledged.
fn open(address: SocketAddr) -> (TcpStream, Vec<(u16, u32)>) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(PREFACE).unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    let settings = loop {
        let frame = read_frame(&mut stream).unwrap();
        if frame.kind == SETTINGS && frame.flags & 0x1 == 0 {
            break frame
                .payload
                .chunks(6)
                .map(|pair| {
                    (
                        u16::from_be_bytes([pair[0], pair[1]]),
                        u32::from_be_bytes([pair[2], pair[3], pair[4], pair[5]]),
                    )
                })
                .collect();
        }
    };
    stream.write_all(&frame(SETTINGS, 0x1, 0, &[])).unwrap();
    (stream, settings)
}

/// The gateway with h2c on its listener, in front of `upstream`.
fn gateway(upstream: SocketAddr, http2: &str) -> Gateway {
    Gateway::start_edited(
        &format!(
            r#"upstreams: [{{ name: app, targets: [{{ address: "{upstream}" }}] }}]
routes: [{{ name: all, upstream: app, match: {{ paths: [{{ prefix: / }}] }} }}]
"#
        ),
        |text| {
            text.replacen("}]\n  threads", ", h2c: true }]\n  threads", 1)
                .replacen(
                    "  threads: 2\n",
                    &format!(
                        "  threads: 2\n  http2: {http2}\n  limits: {{ header_read_timeout: 1s }}\n"
                    ),
                    1,
                )
        },
    )
}

/// What came back until the connection closed or went quiet: GOAWAY's error code, the
/// streams refused, the streams answered.
#[derive(Debug, Default)]
struct Outcome {
    goaway: Option<u32>,
    refused: Vec<u32>,
    answered: Vec<u32>,
    closed: bool,
}

fn drain(stream: &mut TcpStream, quiet: Duration) -> Outcome {
    stream.set_read_timeout(Some(quiet)).unwrap();
    let mut outcome = Outcome::default();
    loop {
        match read_frame(stream) {
            Ok(frame) => match frame.kind {
                GOAWAY => {
                    outcome.goaway = Some(u32::from_be_bytes([
                        frame.payload[4],
                        frame.payload[5],
                        frame.payload[6],
                        frame.payload[7],
                    ]))
                }
                RST_STREAM
                    if u32::from_be_bytes([
                        frame.payload[0],
                        frame.payload[1],
                        frame.payload[2],
                        frame.payload[3],
                    ]) == REFUSED_STREAM =>
                {
                    outcome.refused.push(frame.stream)
                }
                HEADERS => outcome.answered.push(frame.stream),
                _ => {}
            },
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return outcome
            }
            Err(_) => {
                outcome.closed = true;
                return outcome;
            }
        }
    }
}

#[test]
fn the_advertised_settings_are_the_configured_ones_and_the_stream_limit_holds() {
    let echo = spawn_echo("echo");
    let gateway = gateway(
        echo,
        "{ max_concurrent_streams: 100, max_header_list_size: 16KiB }",
    );
    let (mut stream, settings) = open(gateway.addr);
    assert!(settings.contains(&(0x3, 100)), "{settings:?}");
    assert!(settings.contains(&(0x6, 16 * 1024)), "{settings:?}");
    // An ordinary request is answered.
    stream
        .write_all(&frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &request_block("/one"),
        ))
        .unwrap();
    let outcome = drain(&mut stream, Duration::from_millis(500));
    assert_eq!(outcome.answered, vec![1], "{outcome:?}");
    // 101 streams held open (their bodies never end): the 101st is refused.
    let mut burst = Vec::new();
    for n in 0..101u32 {
        burst.extend(frame(
            HEADERS,
            END_HEADERS,
            3 + 2 * n,
            &request_block("/open"),
        ));
    }
    stream.write_all(&burst).unwrap();
    let outcome = drain(&mut stream, Duration::from_millis(1000));
    assert_eq!(outcome.refused, vec![3 + 2 * 100], "{outcome:?}");
    assert_eq!(outcome.goaway, None);
    // The open streams still finish.
    stream.write_all(&frame(DATA, END_STREAM, 3, b"")).unwrap();
    let outcome = drain(&mut stream, Duration::from_millis(1000));
    assert!(outcome.answered.contains(&3), "{outcome:?}");
}

#[test]
fn a_rapid_reset_flood_ends_in_goaway_while_another_client_is_served() {
    let upstream = Target::start("app");
    let gateway = gateway(upstream.address, "{}");
    // Another client, served throughout.
    let address = gateway.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut latencies = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let reply = crate::support::get(address, "/other");
                assert_eq!(reply.status, 200);
                latencies.push(started.elapsed());
            }
            latencies
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let (mut stream, _) = open(gateway.addr);
    let started = Instant::now();
    let mut sent = 0u32;
    let mut burst = Vec::new();
    for n in 0..10_000u32 {
        let id = 1 + 2 * n;
        burst.extend(frame(HEADERS, END_HEADERS, id, &request_block("/reset")));
        burst.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        if burst.len() > 64 * 1024 {
            if stream.write_all(&burst).is_err() {
                break;
            }
            burst.clear();
        }
        sent = n + 1;
    }
    let _ = stream.write_all(&burst);
    let took = started.elapsed();
    let outcome = drain(&mut stream, Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut latencies = served.join().unwrap();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!(
        "rapid reset: {sent} pairs in {took:?}, {outcome:?}, upstream saw {} requests, other client p99 {p99:?} over {} requests",
        upstream.requests(),
        latencies.len()
    );
    assert!(
        outcome.goaway.is_some() || outcome.closed,
        "the flood was not stopped: {outcome:?}"
    );
    // (The other client's requests went to the same upstream.)
    let flood_requests = upstream
        .seen()
        .iter()
        .filter(|seen| seen.path == "/reset")
        .count();
    assert!(flood_requests < 200, "{flood_requests}");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_continuation_flood_closes_the_connection() {
    let echo = spawn_echo("echo");
    let gateway = gateway(echo, "{}");
    let before = rss_kib(gateway.pid());
    let (mut stream, _) = open(gateway.addr);
    stream
        .write_all(&frame(HEADERS, 0, 1, &request_block("/flood")))
        .unwrap();
    // 1 MiB of header fields in CONTINUATION frames, never ending the header block: each a
    // literal without indexing, a 120-byte name and a 255-byte value.
    let mut field = vec![0x00, 120];
    field.extend(std::iter::repeat_n(b'x', 120));
    field.extend_from_slice(&[0x7f, 0x80, 0x01]);
    field.extend(std::iter::repeat_n(b'v', 255));
    let mut sent = 0usize;
    let mut stopped_early = false;
    while sent < 1024 * 1024 {
        let mut payload = Vec::new();
        while payload.len() + field.len() <= 16 * 1024 {
            payload.extend_from_slice(&field);
        }
        if stream
            .write_all(&frame(CONTINUATION, 0, 1, &payload))
            .is_err()
        {
            stopped_early = true;
            break;
        }
        sent += payload.len();
    }
    let outcome = drain(&mut stream, Duration::from_secs(3));
    let after = rss_kib(gateway.pid());
    eprintln!(
        "CONTINUATION flood: {sent} bytes sent, stopped early {stopped_early}, {outcome:?}, RSS {before} -> {after} KiB"
    );
    assert!(
        stopped_early || outcome.closed || outcome.goaway.is_some(),
        "{outcome:?}"
    );
    assert!(
        after.saturating_sub(before) < 20 * 1024,
        "{before} -> {after}"
    );
}

#[test]
fn h2c_is_opt_in_and_its_preface_is_under_the_head_deadline() {
    let echo = spawn_echo("echo");
    // Off (the default): a prior-knowledge preface is not HTTP/2 here.
    let plain = Gateway::start(&format!(
        r#"upstreams: [{{ name: app, targets: [{{ address: "{echo}" }}] }}]
routes: [{{ name: all, upstream: app, match: {{ paths: [{{ prefix: / }}] }} }}]
"#
    ));
    let mut stream = TcpStream::connect(plain.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(PREFACE).unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    // `Upgrade: h2c` is never an upgrade, and never reaches the upstream.
    let reply = send_raw(
        plain.addr,
        b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let headers = &reply.json()["headers"];
    assert!(headers.get("upgrade").is_none(), "{headers}");
    assert!(headers.get("http2-settings").is_none(), "{headers}");

    // On: HTTP/2 and HTTP/1.1 on the same listener; a preface that stalls is cut off.
    let gateway = gateway(echo, "{}");
    let (mut stream, _) = open(gateway.addr);
    stream
        .write_all(&frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &request_block("/h2"),
        ))
        .unwrap();
    assert_eq!(
        drain(&mut stream, Duration::from_millis(500)).answered,
        vec![1]
    );
    assert_eq!(crate::support::get(gateway.addr, "/h1").status, 200);
    assert_eq!(
        send_raw(gateway.addr, b"GET / HTTP/1.0\r\n\r\n")
            .unwrap()
            .status,
        200,
        "a request shorter than the preface"
    );
    let mut stalled = TcpStream::connect(gateway.addr).unwrap();
    stalled.write_all(&PREFACE[..10]).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    let took = started.elapsed();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
}
