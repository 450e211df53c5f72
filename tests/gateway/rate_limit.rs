//! Rate limiting through the real gateway (local backend): exact admission under concurrency,
//! 429 answers with their headers, and buckets keyed on the real client address.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::support::{spawn_echo, Gateway};

fn gateway(policy: &str) -> Gateway {
    limited_gateway("", policy)
}

/// One route limited by `policy`; `preamble` goes before the upstreams (e.g. a `redis` section).
fn limited_gateway(preamble: &str, policy: &str) -> Gateway {
    let echo = spawn_echo("echo");
    Gateway::start(&format!(
        r#"
{preamble}
upstreams: [{{ name: echo, targets: [{{ address: "{echo}" }}] }}]
routes:
  - name: limited
    match: {{ paths: [{{ prefix: / }}] }}
    upstream: echo
    filters:
      - kind: rate_limit
        config:
          policies:
            - {policy}
"#
    ))
}

#[test]
fn concurrent_requests_admit_exactly_the_capacity() {
    let gateway = gateway(
        "{ name: per-ip, key: [client_ip], capacity: 50, refill: { tokens: 1, every: 1h } }",
    );
    let admitted = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let address = gateway.addr;
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let admitted = admitted.clone();
            let limited = limited.clone();
            std::thread::spawn(move || {
                for _ in 0..10 {
                    match crate::support::request(address, "GET", "/x", &[], b"").status {
                        200 => admitted.fetch_add(1, Ordering::Relaxed),
                        429 => limited.fetch_add(1, Ordering::Relaxed),
                        other => panic!("unexpected status {other}"),
                    };
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 50);
    assert_eq!(limited.load(Ordering::Relaxed), 150);
    let metrics = gateway.metrics();
    assert!(
        metrics.contains(
            "gatehouse_ratelimit_decisions_total{policy=\"per-ip\",result=\"allowed\"} 50"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "gatehouse_ratelimit_decisions_total{policy=\"per-ip\",result=\"limited\"} 150"
        ),
        "{metrics}"
    );
}

#[test]
fn limited_answers_carry_retry_after_and_ratelimit_headers() {
    let gateway = gateway("{ name: per-ip, key: [client_ip], capacity: 3, refill: { tokens: 1, every: 20s }, legacy_headers: true }");
    for expected_remaining in [2, 1, 0] {
        let reply = gateway.get("/x");
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("ratelimit-policy"),
            Some("\"per-ip\";q=3;w=60")
        );
        assert!(reply
            .header("ratelimit")
            .unwrap()
            .starts_with(&format!("\"per-ip\";r={expected_remaining};t=")));
        assert_eq!(reply.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(
            reply.header("x-ratelimit-remaining"),
            Some(expected_remaining.to_string().as_str())
        );
    }
    let reply = gateway.get("/x");
    assert_eq!(reply.status, 429);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(reply.json()["type"], "urn:gatehouse:problem:rate-limited");
    let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    assert!(reply
        .header("ratelimit")
        .unwrap()
        .starts_with("\"per-ip\";r=0;t="));
}

#[test]
fn spoofed_forwarding_headers_do_not_change_the_bucket() {
    let gateway = gateway(
        "{ name: per-ip, key: [client_ip], capacity: 3, refill: { tokens: 1, every: 1h } }",
    );
    let mut statuses = Vec::new();
    for index in 0..6 {
        let spoofed = format!("203.0.113.{index}");
        let reply = gateway.request(
            "GET",
            "/x",
            &[
                ("X-Forwarded-For", &spoofed),
                ("X-Real-IP", &spoofed),
                ("Forwarded", &format!("for={spoofed}")),
            ],
            b"",
        );
        statuses.push(reply.status);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
}

#[test]
fn a_connection_header_cannot_remove_the_gateways_forwarding_headers() {
    let gateway = gateway(
        "{ name: per-ip, key: [client_ip], capacity: 100, refill: { tokens: 1, every: 1h } }",
    );
    // Naming X-Forwarded-For as hop-by-hop would strip the gateway's own header; it is refused.
    let raw = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close, X-Forwarded-For\r\n\r\n";
    let reply = crate::support::send_raw(gateway.addr, raw).unwrap();
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    // Without the trick the upstream sees the gateway's value, not the client's.
    let reply = gateway.request("GET", "/x", &[("X-Forwarded-For", "6.6.6.6")], b"");
    assert_eq!(reply.json()["headers"]["x-forwarded-for"], "127.0.0.1");
}

fn redis_url() -> String {
    std::env::var("GATEHOUSE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn redis_gateway(redis: &str, policy: &str) -> Gateway {
    limited_gateway(
        &format!("redis: {{ url: \"{redis}\", command_timeout: 50ms }}"),
        policy,
    )
}

fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), fastrand::u64(..))
}

#[test]
fn the_redis_backend_admits_exactly_the_capacity() {
    let name = unique_name("redis-exact");
    let gateway = redis_gateway(
        &redis_url(),
        &format!("{{ name: {name}, key: [client_ip], capacity: 50, refill: {{ tokens: 1, every: 1h }}, backend: redis }}"),
    );
    let admitted = Arc::new(AtomicUsize::new(0));
    let address = gateway.addr;
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let admitted = admitted.clone();
            std::thread::spawn(move || {
                for _ in 0..10 {
                    if crate::support::request(address, "GET", "/x", &[], b"").status == 200 {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 50);
    // A second gateway on the same Redis shares the (now empty) bucket.
    let second = redis_gateway(
        &redis_url(),
        &format!("{{ name: {name}, key: [client_ip], capacity: 50, refill: {{ tokens: 1, every: 1h }}, backend: redis }}"),
    );
    assert_eq!(second.get("/x").status, 429);
}

#[test]
fn a_dead_redis_gets_each_policys_documented_answer_within_the_deadline() {
    let dead = format!("redis://127.0.0.1:{}", crate::support::free_port());
    let cases = [
        ("fail_closed", vec![503, 503]),
        ("fail_open", vec![200, 200, 200, 200]),
        ("local_fallback", vec![200, 200, 429, 429]),
    ];
    for (mode, expected) in cases {
        let gateway = redis_gateway(
            &dead,
            &format!(
                "{{ name: {}, key: [client_ip], capacity: 4, refill: {{ tokens: 1, every: 1h }}, backend: redis, on_redis_error: {mode}, expected_nodes: 2 }}",
                unique_name(mode)
            ),
        );
        let mut statuses = Vec::new();
        for _ in 0..expected.len() {
            let started = std::time::Instant::now();
            let reply = gateway.get("/x");
            assert!(
                started.elapsed() < std::time::Duration::from_millis(500),
                "{mode}: took {:?}",
                started.elapsed()
            );
            statuses.push(reply.status);
        }
        assert_eq!(statuses, expected, "{mode}");
        assert!(
            gateway
                .metrics()
                .contains("gatehouse_ratelimit_fallback_total"),
            "{mode}"
        );
    }
}

/// A Redis server of the test's own, so it can be stopped and paused without touching others.
struct PrivateRedis {
    child: std::process::Child,
}

impl PrivateRedis {
    fn start(port: u16) -> PrivateRedis {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (make test installs or reports it)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private redis did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        PrivateRedis { child }
    }

    fn signal(&self, signal: &str) {
        crate::support::signal_pid(self.child.id(), signal);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn redis_paused_stopped_and_restarted_mid_run() {
    let port = crate::support::free_port();
    let mut redis = PrivateRedis::start(port);
    let name = unique_name("faults");
    let gateway = redis_gateway(
        &format!("redis://127.0.0.1:{port}"),
        &format!("{{ name: {name}, key: [client_ip], capacity: 1000, refill: {{ tokens: 1, every: 1h }}, backend: redis, on_redis_error: fail_closed }}"),
    );
    let timed = |label: &str| {
        let started = std::time::Instant::now();
        let status = gateway.get("/x").status;
        let elapsed = started.elapsed();
        // The command deadline is 50 ms; no request may wait longer than that plus 50 ms, plus
        // the request's own time on a loaded test machine.
        assert!(
            elapsed < std::time::Duration::from_millis(300),
            "{label}: took {elapsed:?}"
        );
        status
    };
    assert_eq!(timed("healthy"), 200);
    redis.signal("STOP");
    for _ in 0..3 {
        assert_eq!(timed("paused"), 503);
    }
    redis.signal("CONT");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(timed("resumed"), 200);
    redis.signal("TERM");
    let _ = redis.child.wait();
    std::thread::sleep(std::time::Duration::from_millis(100));
    for _ in 0..3 {
        assert_eq!(timed("stopped"), 503);
    }
    // Redis comes back (empty): it is used again without a restart of the gateway.
    redis = PrivateRedis::start(port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while gateway.get("/x").status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "Redis was not used again after it came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(redis);
}
