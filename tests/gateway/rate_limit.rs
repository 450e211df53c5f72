//! Rate limiting through the real gateway (local backend): exact admission under concurrency,
//! 429 answers with their headers, and buckets keyed on the real client address.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::support::{spawn_echo, Gateway};

fn gateway(policy: &str) -> Gateway {
    limited_gateway("", policy)
}

/// One route limited by `policy`; `preamble` goes before the upstreams (e.g. a `redis` section).
pub(crate) fn limited_gateway(preamble: &str, policy: &str) -> Gateway {
    limited_gateway_with(preamble, &[policy])
}

/// One route limited by a filter with `policies`, in order.
fn limited_gateway_with(preamble: &str, policies: &[&str]) -> Gateway {
    let echo = spawn_echo("echo");
    let policies: String = policies
        .iter()
        .map(|policy| format!("            - {policy}\n"))
        .collect();
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
{policies}"#
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
            "gatehouse_ratelimit_decisions_total{policy=\"per-ip\",result=\"allowed\",route=\"limited\"} 50"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "gatehouse_ratelimit_decisions_total{policy=\"per-ip\",result=\"limited\",route=\"limited\"} 150"
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
    // Naming X-Forwarded-For as hop-by-hop removes the client's copy only: the upstream gets
    // the gateway's own.
    let raw = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close, X-Forwarded-For\r\n\r\n";
    let reply = crate::support::send_raw(gateway.addr, raw).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["x-forwarded-for"], "127.0.0.1");
    // Without the trick the upstream sees the gateway's value, not the client's.
    let reply = gateway.request("GET", "/x", &[("X-Forwarded-For", "6.6.6.6")], b"");
    assert_eq!(reply.json()["headers"]["x-forwarded-for"], "127.0.0.1");
}

fn redis_url() -> String {
    std::env::var("GATEHOUSE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn redis_gateway(redis: &str, deadline: &str, policy: &str) -> Gateway {
    limited_gateway(
        &format!("redis: {{ url: \"{redis}\", command_timeout: {deadline} }}"),
        policy,
    )
}

/// The command deadline of tests that measure exactness. It is long, because a deadline a
/// loaded machine's scheduler can overrun (the I/O thread not run for tens of milliseconds)
/// turns into the policy's failure mode, which the fault tests cover on their own.
const EXACT: &str = "1s";

/// A gateway whose Redis connection is up, so the first requests do not race the connection.
fn connected_redis_gateway(redis: &str, policy: &str) -> Gateway {
    let gateway = redis_gateway(redis, EXACT, policy);
    wait_for_redis_state(&gateway, "up");
    gateway
}

pub(crate) fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), fastrand::u64(..))
}

#[test]
fn the_redis_backend_admits_exactly_the_capacity() {
    let name = unique_name("redis-exact");
    let gateway = connected_redis_gateway(
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
    let second = connected_redis_gateway(
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
            "50ms",
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

/// Statuses of `count` concurrent requests to `path` (20 threads).
fn concurrent_statuses(address: std::net::SocketAddr, path: &str, count: usize) -> Vec<u16> {
    let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..20)
        .map(|thread| {
            let statuses = statuses.clone();
            let path = path.to_string();
            std::thread::spawn(move || {
                let mut client = crate::support::KeepAlive::new(address);
                for _ in (thread..count).step_by(20) {
                    let status = client.get(&path).expect("request");
                    statuses.lock().unwrap().push(status);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    Arc::try_unwrap(statuses).unwrap().into_inner().unwrap()
}

fn assert_all(statuses: &[u16], expected: u16, label: &str) {
    assert!(
        statuses.iter().all(|&status| status == expected),
        "{label}: expected only {expected}, got {statuses:?}"
    );
}

pub(crate) fn redis_state(gateway: &Gateway) -> String {
    let reply = crate::support::get(gateway.ops, "/readyz");
    assert_eq!(
        reply.status, 200,
        "Redis trouble never makes the node unready"
    );
    reply.json()["redis"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

pub(crate) fn wait_for_redis_state(gateway: &Gateway, wanted: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while redis_state(gateway) != wanted {
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never showed Redis {wanted}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A gateway on `redis_url` with a command deadline of `deadline_ms`, and one route per failure
/// policy (`/closed`, `/open`, `/fallback` with a capacity of 20 over 2 expected nodes), plus
/// `/exact` (`fail_closed`, capacity 50) for exactness once Redis serves again.
pub(crate) fn failure_policy_gateway(redis_url: &str, deadline_ms: u64) -> Gateway {
    let echo = spawn_echo("echo");
    let policy = |mode: &str, capacity: u64| {
        format!(
            "[{{ kind: rate_limit, config: {{ policies: [{{ name: {}, key: [client_ip], capacity: {capacity}, refill: {{ tokens: 1, every: 1h }}, backend: redis, on_redis_error: {mode}, expected_nodes: 2 }}] }} }}]",
            unique_name(mode)
        )
    };
    Gateway::start(&format!(
        r#"
redis: {{ url: "{redis_url}", command_timeout: {deadline_ms}ms }}
upstreams: [{{ name: echo, targets: [{{ address: "{echo}" }}] }}]
routes:
  - {{ name: closed, match: {{ paths: [{{ exact: /closed }}] }}, upstream: echo, filters: {closed} }}
  - {{ name: open, match: {{ paths: [{{ exact: /open }}] }}, upstream: echo, filters: {open} }}
  - {{ name: fallback, match: {{ paths: [{{ exact: /fallback }}] }}, upstream: echo, filters: {fallback} }}
  - {{ name: exact, match: {{ paths: [{{ exact: /exact }}] }}, upstream: echo, filters: {exact} }}
"#,
        closed = policy("fail_closed", 1000),
        open = policy("fail_open", 1000),
        fallback = policy("local_fallback", 20),
        exact = policy("fail_closed", 50),
    ))
}

/// Sends `rounds` requests to each of `/closed`, `/open` and `/fallback` and returns each
/// route's statuses; every request must be answered within `limit`. Tracks the slowest answer.
pub(crate) struct Phases {
    client: crate::support::KeepAlive,
    limit: std::time::Duration,
    pub slowest: std::time::Duration,
}

impl Phases {
    pub fn new(gateway: &Gateway, limit: std::time::Duration) -> Phases {
        Phases {
            client: crate::support::KeepAlive::new(gateway.addr),
            limit,
            slowest: std::time::Duration::ZERO,
        }
    }

    pub fn run(&mut self, label: &str, rounds: usize) -> [Vec<u16>; 3] {
        let mut statuses: [Vec<u16>; 3] = Default::default();
        for _ in 0..rounds {
            for (index, path) in ["/closed", "/open", "/fallback"].iter().enumerate() {
                let started = std::time::Instant::now();
                let status = self.client.get(path).expect("request");
                let elapsed = started.elapsed();
                self.slowest = self.slowest.max(elapsed);
                assert!(
                    elapsed <= self.limit,
                    "{label} {path}: answered after {elapsed:?}"
                );
                statuses[index].push(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        statuses
    }
}

/// While Redis does not serve: `fail_closed` refuses, `fail_open` admits, `local_fallback`
/// admits this node's share (20 / 2 nodes) and then 429.
pub(crate) fn assert_failure_modes(label: &str, [closed, open, fallback]: &[Vec<u16>; 3]) {
    assert_all(closed, 503, &format!("{label}: fail_closed"));
    assert_all(open, 200, &format!("{label}: fail_open"));
    let admitted = fallback.iter().filter(|&&status| status == 200).count();
    assert_eq!(admitted, 10, "{label}: local_fallback: {fallback:?}");
    assert_all(
        &fallback[10..],
        429,
        &format!("{label}: local_fallback once spent"),
    );
}

#[test]
fn redis_paused_stopped_and_restarted_mid_run() {
    const DEADLINE_MS: u64 = 100;
    // What a loaded machine may add to an answer: its threads wait to be scheduled. A paused
    // Redis without a deadline would hold every request until it resumed.
    const SLACK_MS: u64 = 400;
    let port = crate::support::free_port();
    let mut redis = PrivateRedis::start(port);
    let gateway = failure_policy_gateway(&format!("redis://127.0.0.1:{port}"), DEADLINE_MS);
    wait_for_redis_state(&gateway, "up");
    let mut phases = Phases::new(
        &gateway,
        std::time::Duration::from_millis(DEADLINE_MS + SLACK_MS),
    );
    let mut phase = |label: &str, rounds: usize| phases.run(label, rounds);
    let [closed, open, fallback] = phase("healthy", 3);
    assert!(closed
        .iter()
        .chain(&open)
        .chain(&fallback)
        .all(|&status| status == 200));
    assert_eq!(redis_state(&gateway), "up");

    redis.signal("STOP");
    assert_failure_modes("paused", &phase("paused", 15));
    assert_eq!(redis_state(&gateway), "down");

    redis.signal("CONT");
    wait_for_redis_state(&gateway, "up");
    let [closed, open, _] = phase("resumed", 2);
    assert!(closed.iter().chain(&open).all(|&status| status == 200));

    redis.signal("TERM");
    let _ = redis.child.wait();
    let [closed, open, fallback] = phase("stopped", 10);
    assert_all(&closed, 503, "fail_closed");
    assert_all(&open, 200, "fail_open");
    assert_all(&fallback, 429, "local_fallback, still spent");
    assert_eq!(redis_state(&gateway), "down");
    let metrics = gateway.metrics();
    assert!(
        metrics.contains("gatehouse_redis_up{url=\"redis://127.0.0.1:"),
        "{metrics}"
    );
    assert!(metrics.contains("} 0\n"), "{metrics}");
    for mode in ["fail_closed", "fail_open", "local_fallback"] {
        assert!(
            metrics.lines().any(
                |line| line.starts_with("gatehouse_ratelimit_fallback_total")
                    && line.contains(&format!("mode=\"{mode}\""))
                    && !line.ends_with(" 0")
            ),
            "no {mode} fallbacks counted: {metrics}"
        );
    }

    // Redis comes back, empty: the node finds it without a restart, and admission is exact.
    redis = PrivateRedis::start(port);
    wait_for_redis_state(&gateway, "up");
    let statuses = concurrent_statuses(gateway.addr, "/exact", 200);
    let admitted = statuses.iter().filter(|&&status| status == 200).count();
    assert_eq!(admitted, 50, "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|&status| status == 200 || status == 429),
        "{statuses:?}"
    );
    assert!(gateway
        .metrics()
        .lines()
        .any(|line| line.starts_with("gatehouse_redis_up{") && line.ends_with(" 1")));
    println!(
        "slowest answer while Redis was paused or stopped: {:?} (deadline {DEADLINE_MS} ms)",
        phases.slowest
    );
    drop(redis);
}

/// Three gateways on one Redis, under steady overload for 10 s: the cluster admits the
/// configured global rate, within 2% with plain `redis` and within the documented bound with
/// leasing.
#[test]
fn three_gateways_share_one_global_rate() {
    const CAPACITY: f64 = 20.0;
    const RATE: f64 = 100.0;
    const LEASE: f64 = 10.0;
    const NODES: usize = 3;
    const SECONDS: u64 = 10;
    let plain = unique_name("cluster-plain");
    let leased = unique_name("cluster-lease");
    let echo = spawn_echo("echo");
    let config = format!(
        r#"
redis: {{ url: "{redis}", command_timeout: {EXACT} }}
upstreams: [{{ name: echo, targets: [{{ address: "{echo}" }}] }}]
routes:
  - name: plain
    match: {{ paths: [{{ exact: /plain }}] }}
    upstream: echo
    filters: [{{ kind: rate_limit, config: {{ policies: [{{ name: {plain}, key: [route], capacity: {CAPACITY}, refill: {{ tokens: {RATE}, every: 1s }}, backend: redis, on_redis_error: fail_closed }}] }} }}]
  - name: leased
    match: {{ paths: [{{ exact: /leased }}] }}
    upstream: echo
    filters: [{{ kind: rate_limit, config: {{ policies: [{{ name: {leased}, key: [route], capacity: {CAPACITY}, refill: {{ tokens: {RATE}, every: 1s }}, backend: redis, on_redis_error: fail_closed, lease: {{ tokens: {LEASE}, max_age: 1s }} }}] }} }}]
"#,
        redis = redis_url(),
    );
    let gateways: Vec<Gateway> = (0..NODES).map(|_| Gateway::start(&config)).collect();
    for gateway in &gateways {
        wait_for_redis_state(gateway, "up");
    }
    // Offered load: three times the rate on each route, spread over the nodes, paced.
    let per_thread_interval = std::time::Duration::from_secs_f64(2.0 * NODES as f64 / (3.0 * RATE));
    let started = std::time::Instant::now();
    let stop_at = started + std::time::Duration::from_secs(SECONDS);
    let mut threads = Vec::new();
    for gateway in &gateways {
        for path in ["/plain", "/leased"] {
            for _ in 0..2 {
                let address = gateway.addr;
                threads.push(std::thread::spawn(move || {
                    let mut client = crate::support::KeepAlive::new(address);
                    let (mut admitted, mut limited, mut other) = (0u64, 0u64, 0u64);
                    let mut first: Option<std::time::Instant> = None;
                    let mut next = std::time::Instant::now();
                    while std::time::Instant::now() < stop_at {
                        first.get_or_insert_with(std::time::Instant::now);
                        match client.get(path) {
                            Ok(200) => admitted += 1,
                            Ok(429) => limited += 1,
                            _ => other += 1,
                        }
                        next += per_thread_interval;
                        if let Some(wait) = next.checked_duration_since(std::time::Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    (
                        path,
                        admitted,
                        limited,
                        other,
                        first.unwrap(),
                        std::time::Instant::now(),
                    )
                }));
            }
        }
    }
    let mut totals: HashMap<&str, (u64, u64, u64, std::time::Instant, std::time::Instant)> =
        HashMap::new();
    for thread in threads {
        let (path, admitted, limited, other, first, last) = thread.join().unwrap();
        let entry = totals.entry(path).or_insert((0, 0, 0, first, last));
        entry.0 += admitted;
        entry.1 += limited;
        entry.2 += other;
        entry.3 = entry.3.min(first);
        entry.4 = entry.4.max(last);
    }
    for (path, bound) in [("/plain", 0.0), ("/leased", 1.5 * NODES as f64 * LEASE)] {
        let (admitted, limited, other, first, last) = totals[path];
        let window = last.duration_since(first).as_secs_f64();
        let expected = CAPACITY + RATE * window;
        let deviation = admitted as f64 - expected;
        println!(
            "{path}: {admitted} admitted, {limited} limited, {other} other in {window:.2} s; \
             the bucket allows {expected:.0} ({:+.2}%; bound {bound} tokens + 2%)",
            100.0 * deviation / expected
        );
        assert_eq!(other, 0, "{path}: only 200 and 429 are expected");
        assert!(
            limited as f64 > admitted as f64,
            "{path}: the load must overload the limit"
        );
        assert!(
            deviation.abs() <= 0.02 * expected + bound,
            "{path}: {admitted} admitted, the bucket allows {expected:.0}"
        );
    }
    drop(gateways);
}

/// With leasing, a node takes tokens in batches: fewer Redis commands, and the RateLimit header
/// still counts down.
#[test]
fn leasing_spends_tokens_locally_between_redis_round_trips() {
    let name = unique_name("lease");
    let gateway = connected_redis_gateway(
        &redis_url(),
        &format!("{{ name: {name}, key: [client_ip], capacity: 300, refill: {{ tokens: 1, every: 1h }}, backend: redis, lease: {{ tokens: 10, max_age: 5s }} }}"),
    );
    let commands = |gateway: &Gateway| -> u64 {
        gateway
            .metrics()
            .lines()
            .find(|line| {
                line.starts_with("gatehouse_redis_commands_total")
                    && line.contains("outcome=\"ok\"")
            })
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|count| count.parse().ok())
            .unwrap_or(0)
    };
    let before = commands(&gateway);
    let mut client = crate::support::KeepAlive::new(gateway.addr);
    for _ in 0..40 {
        assert_eq!(client.get("/x").unwrap(), 200);
    }
    let used = commands(&gateway) - before;
    // One lease per 10 requests, plus the one fetched ahead when half a lease is left.
    assert!(
        used <= 5,
        "40 requests with leases of 10 took {used} Redis commands"
    );
    // Concurrent requests on one key share the lease: while it is refilled they wait for that
    // one call instead of each asking Redis.
    let before = commands(&gateway);
    let statuses = concurrent_statuses(gateway.addr, "/x", 200);
    let used = commands(&gateway) - before;
    assert_all(&statuses, 200, "within the capacity");
    assert!(
        used <= 22,
        "200 concurrent requests with leases of 10 took {used} Redis commands"
    );
    // Exact in total: whatever is left in Redis or in this node's lease, and not one more.
    let mut admitted = 240;
    while client.get("/x").unwrap() == 200 {
        admitted += 1;
        assert!(admitted <= 300, "more admitted than the bucket held");
    }
    assert_eq!(admitted, 300);
    // An empty bucket is remembered until it can have a token again: no more round trips.
    let before = commands(&gateway);
    for _ in 0..20 {
        assert_eq!(client.get("/x").unwrap(), 429);
    }
    assert_eq!(commands(&gateway), before);
}

#[test]
fn a_lease_needs_the_redis_backend_and_a_sane_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gatehouse.yaml");
    std::fs::write(
        &path,
        r#"
version: 1
upstreams: [{ name: echo, targets: [{ address: "127.0.0.1:9" }] }]
routes:
  - name: r
    match: { paths: [{ prefix: / }] }
    upstream: echo
    filters:
      - kind: rate_limit
        config:
          policies:
            - { name: p, key: [client_ip], capacity: 10, refill: { tokens: 1, every: 1s }, lease: { tokens: 20 } }
"#,
    )
    .unwrap();
    let (code, _, stderr) =
        crate::support::run_cli(&["validate", path.to_str().unwrap()], dir.path());
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("lease: leasing takes tokens from Redis"),
        "{stderr}"
    );
    assert!(
        stderr.contains("lease.tokens: must be between the cost and the capacity"),
        "{stderr}"
    );
}

/// Decision rows are per route (two routes may name a policy alike) and leave `/metrics` when
/// a reload removes their policy, while the remaining rows keep their counts.
#[test]
fn decision_rows_carry_their_route_and_leave_with_their_policy() {
    let echo = spawn_echo("echo");
    let config = |with_b: bool| {
        let limit = "filters: [{ kind: rate_limit, config: { policies: [{ name: shared, key: [client_ip], capacity: 1, refill: { tokens: 1, every: 1h } }] } }]";
        format!(
            "upstreams: [{{ name: echo, targets: [{{ address: \"{echo}\" }}] }}]\nroutes:\n  - {{ name: a, upstream: echo, match: {{ paths: [{{ prefix: /a }}] }}, {limit} }}\n  - {{ name: b, upstream: echo, match: {{ paths: [{{ prefix: /b }}] }}{} }}\n",
            if with_b { format!(", {limit}") } else { String::new() }
        )
    };
    let gateway = Gateway::start(&config(true));
    assert_eq!(gateway.get("/a").status, 200);
    assert_eq!(gateway.get("/a").status, 429);
    // The same policy name on another route is another bucket and another row.
    assert_eq!(gateway.get("/b").status, 200);
    let row = |result: &str, route: &str| {
        format!("gatehouse_ratelimit_decisions_total{{policy=\"shared\",result=\"{result}\",route=\"{route}\"}}")
    };
    let metrics = gateway.metrics();
    for (result, route, count) in [
        ("allowed", "a", 1),
        ("limited", "a", 1),
        ("allowed", "b", 1),
    ] {
        assert!(
            metrics.contains(&format!("{} {count}\n", row(result, route))),
            "{result} on {route}:\n{metrics}"
        );
    }

    let version = gateway.config_version();
    gateway.write_config(&config(false));
    gateway.wait_for_version_above(version);
    assert_eq!(
        gateway.get("/b").status,
        200,
        "route b has no limit any more"
    );
    let metrics = gateway.metrics();
    assert!(!metrics.contains(&row("allowed", "b")), "{metrics}");
    assert!(
        metrics.contains(&format!("{} 1\n", row("allowed", "a"))),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("{} 1\n", row("limited", "a"))),
        "{metrics}"
    );
}

/// A request refused by a later policy costs nothing in Redis either: the token an earlier
/// `redis` policy took is given back.
#[test]
fn a_refusal_gives_back_the_tokens_taken_in_redis() {
    let name = unique_name("refund");
    let gateway = limited_gateway_with(
        &format!("redis: {{ url: \"{}\", command_timeout: {EXACT} }}", redis_url()),
        &[
            &format!("{{ name: {name}-shared, key: [route], capacity: 2, refill: {{ tokens: 1, every: 1h }}, backend: redis }}"),
            &format!("{{ name: {name}-per-user, key: [{{ header: x-user }}], capacity: 1, refill: {{ tokens: 1, every: 1h }} }}"),
        ],
    );
    wait_for_redis_state(&gateway, "up");
    let get = |user: &str| {
        gateway
            .request("GET", "/x", &[("x-user", user)], b"")
            .status
    };
    assert_eq!(get("ann"), 200, "shared 2 -> 1");
    // Refused by the per-user policy: the shared token goes back to Redis.
    for _ in 0..5 {
        assert_eq!(get("ann"), 429);
    }
    assert_eq!(get("bob"), 200, "the shared bucket still had its token");
    assert_eq!(get("cid"), 429, "and now it is empty");
}

/// While Redis is away, `local_fallback` limits each node to its share. A token taken from
/// Redis and refunded when a later policy refused the request goes back to Redis, never into
/// the fallback bucket, so the fallback share cannot grow beyond `capacity / expected_nodes`.
#[test]
fn refunds_never_grow_the_fallback_share() {
    let port = crate::support::free_port();
    let redis = PrivateRedis::start(port);
    let name = unique_name("fallback-refund");
    let gateway = limited_gateway_with(
        &format!("redis: {{ url: \"redis://127.0.0.1:{port}\", command_timeout: 100ms }}"),
        &[
            &format!("{{ name: {name}, key: [route], capacity: 10, refill: {{ tokens: 1, every: 1h }}, backend: redis, on_redis_error: local_fallback, expected_nodes: 2 }}"),
            &format!("{{ name: {name}-per-user, key: [{{ header: x-user }}], capacity: 1, refill: {{ tokens: 1, every: 1h }} }}"),
        ],
    );
    wait_for_redis_state(&gateway, "up");
    let get = |user: &str| {
        gateway
            .request("GET", "/x", &[("x-user", user)], b"")
            .status
    };
    // Redis away: the fallback bucket (10 / 2 nodes = 5) gives one token.
    redis.signal("STOP");
    assert_eq!(get("user-0"), 200);
    redis.signal("CONT");
    wait_for_redis_state(&gateway, "up");
    // Redis back: each of these takes a Redis token that the per-user policy's refusal gives
    // back; the fallback bucket is not touched.
    for _ in 0..20 {
        assert_eq!(get("user-0"), 429);
    }
    // Redis away again: the fallback bucket still holds the 4 tokens of its share.
    redis.signal("STOP");
    let admitted = (1..=10)
        .filter(|user| get(&format!("user-{user}")) == 200)
        .count();
    redis.signal("CONT");
    assert_eq!(admitted, 4);
}

/// A relay to Redis that holds every new connection for `delay` before passing bytes either
/// way: a Redis that is slow to connect to, as a fresh node may meet it.
fn slow_redis_relay(delay: std::time::Duration) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let redis: std::net::SocketAddr = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("GATEHOUSE_TEST_REDIS_URL as redis://IP:PORT");
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let Ok(server) = std::net::TcpStream::connect(redis) else {
                    return;
                };
                let (mut client_read, mut server_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut client_read, &mut server_write));
                let (mut server_read, mut client_write) = (server, client);
                let _ = std::io::copy(&mut server_read, &mut client_write);
            });
        }
    });
    address
}

/// Three fresh nodes whose Redis takes a while to connect: each reports ready only once it
/// has, so traffic sent the moment `/readyz` says 200 meets an exact shared limit (decided
/// before the connection, it would have been decided by the local fallback, and 60 admitted).
#[test]
fn a_fresh_node_is_ready_only_once_redis_has_connected() {
    let relay = slow_redis_relay(std::time::Duration::from_millis(600));
    let name = unique_name("ready-exact");
    let echo = spawn_echo("echo");
    let config = format!(
        r#"
redis: {{ url: "redis://{relay}", command_timeout: {EXACT}, connect_timeout: 3s }}
upstreams: [{{ name: echo, targets: [{{ address: "{echo}" }}] }}]
routes:
  - name: limited
    match: {{ paths: [{{ prefix: / }}] }}
    upstream: echo
    filters: [{{ kind: rate_limit, config: {{ policies: [{{ name: {name}, key: [route], capacity: 50, refill: {{ tokens: 1, every: 1h }}, backend: redis }}] }} }}]
"#
    );
    let nodes: Vec<Gateway> = (0..3).map(|_| Gateway::start_unready(&config)).collect();
    let threads: Vec<_> = nodes
        .iter()
        .map(|node| {
            let (ops, address) = (node.ops, node.addr);
            std::thread::spawn(move || {
                let mut waited_for = Vec::new();
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
                loop {
                    let ready = crate::support::get(ops, "/readyz");
                    waited_for.push(ready.json()["redis_startup"].clone());
                    if ready.status == 200 {
                        assert_eq!(ready.json()["redis_startup"], "connected");
                        break;
                    }
                    assert!(std::time::Instant::now() < deadline, "never ready");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                let mut client = crate::support::KeepAlive::new(address);
                let admitted = (0..20).filter(|_| client.get("/x").unwrap() == 200).count();
                (admitted, waited_for)
            })
        })
        .collect();
    let mut admitted = 0;
    for thread in threads {
        let (count, waited_for) = thread.join().unwrap();
        assert_eq!(waited_for[0], "waiting", "{waited_for:?}");
        admitted += count;
    }
    assert_eq!(admitted, 50);

    // Once ready, a node stays ready: a reload naming a Redis that never answers serves in each
    // policy's failure mode, and says the new client is still waiting.
    let dead = free_dead_address();
    let version = nodes[0].config_version();
    nodes[0].write_config(&config.replace(&relay.to_string(), &dead.to_string()));
    nodes[0].wait_for_version_above(version);
    let ready = crate::support::get(nodes[0].ops, "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["redis_startup"], "waiting");

    // A Redis that never answers: the node is ready once `ready_timeout` has passed, and says
    // it serves in fallback mode.
    let dead = free_dead_address();
    let node = Gateway::start_unready(&format!(
        r#"
redis: {{ url: "redis://{dead}", ready_timeout: 1500ms }}
upstreams: [{{ name: echo, targets: [{{ address: "{echo}" }}] }}]
routes:
  - name: limited
    match: {{ paths: [{{ prefix: / }}] }}
    upstream: echo
    filters: [{{ kind: rate_limit, config: {{ policies: [{{ name: {name}-dead, key: [route], capacity: 5, refill: {{ tokens: 1, every: 1h }}, backend: redis }}] }} }}]
"#
    ));
    let first = crate::support::get(node.ops, "/readyz");
    assert_eq!(first.status, 503, "{}", first.text());
    assert_eq!(first.json()["redis_startup"], "waiting");
    node.wait_ready();
    let ready = crate::support::get(node.ops, "/readyz");
    assert_eq!(
        ready.json()["redis_startup"],
        "fallback",
        "{}",
        ready.text()
    );
}

/// An address where nothing listens (from the range the harness gives gateways, not the one
/// test servers get theirs from).
fn free_dead_address() -> std::net::SocketAddr {
    format!("127.0.0.1:{}", crate::support::free_port())
        .parse()
        .unwrap()
}
