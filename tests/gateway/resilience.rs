//! Resilience through the real gateway with real targets: health checks, outlier ejection,
//! retries and their budget, timeouts, circuit breakers, failover to a backup pool, reloads
//! during an outage, flapping, the panic threshold and traffic splits, with the metrics and
//! `/config` reports that go with them.
//!
//! Intervals are short (probes every 50–100 ms, ejections of a second) so the file runs in
//! about a minute and a half, but each test keeps the shape the requirement states. The tests
//! of this file run one at a time: several assert latency bounds (5 ms, 50 ms) that a load run
//! beside them on a two-core machine would break for reasons that are not the gateway's.

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::load::{concurrent, quantile, Connection, OpenLoop};
use crate::support::target::{sha256_hex, Blackhole, Target};
use crate::support::{free_port, get, request, Gateway, Reply};

static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the file's lock for the test's length; a test that failed does not block the others.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The retry policy of a route in front of a pool: three attempts on every kind of failure and on
/// 503, idempotent methods only past a failed connection, 2 s per try (shorter where a test
/// says so).
const RETRY: &str = "retry: { attempts: 3, on: [connect_failure, reset, timeout, gateway_error], statuses: [503], methods: [GET, HEAD, OPTIONS, PUT, DELETE], per_try_timeout: 2s, backoff: { base: 25ms, max: 250ms } }";

/// Active checks every 100 ms: a dead target is out within 3 × 100 ms + 100 ms, a revived one
/// back within 2 × 100 ms + 100 ms.
const INTERVAL: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_millis(100);
const UNHEALTHY_THRESHOLD: u32 = 3;
const HEALTHY_THRESHOLD: u32 = 2;

fn health_check(initial: &str) -> String {
    format!(
        "health_check: {{ kind: http, path: /healthz, expect_status: [\"200-299\"], interval: {}ms, jitter: \"10%\", timeout: {}ms, healthy_threshold: {HEALTHY_THRESHOLD}, unhealthy_threshold: {UNHEALTHY_THRESHOLD}, initial: {initial} }}",
        INTERVAL.as_millis(),
        PROBE_TIMEOUT.as_millis(),
    )
}

/// The YAML list of `addresses` as targets, with their weights when given.
fn targets_yaml(addresses: &[SocketAddr], weights: Option<&[u32]>) -> String {
    let items: Vec<String> = addresses
        .iter()
        .enumerate()
        .map(|(index, address)| match weights {
            Some(weights) => format!("{{ address: \"{address}\", weight: {} }}", weights[index]),
            None => format!("{{ address: \"{address}\" }}"),
        })
        .collect();
    format!("[{}]", items.join(", "))
}

fn addresses(targets: &[Target]) -> Vec<SocketAddr> {
    targets.iter().map(|target| target.address).collect()
}

/// A metric's value: the row of `name` whose labels include all of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (label_text, value) = match rest.strip_prefix('{') {
            Some(rest) => rest.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let matches = labels
            .iter()
            .all(|(key, wanted)| label_text.contains(&format!("{key}=\"{wanted}\"")));
        matches.then(|| value.trim().parse().ok()).flatten()
    })
}

/// `/config`'s report of one pool.
fn pool_report(gateway: &Gateway, pool: &str) -> Value {
    let config = get(gateway.ops, "/config").json();
    config["upstreams"]
        .as_array()
        .expect("/config has an upstreams array")
        .iter()
        .find(|report| report["name"] == pool)
        .unwrap_or_else(|| panic!("/config has no upstream {pool}: {config}"))
        .clone()
}

/// `/config`'s report of one target; `Value::Null` when the pool does not list it.
fn target_report(gateway: &Gateway, pool: &str, address: SocketAddr) -> Value {
    pool_report(gateway, pool)["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|target| target["address"] == address.to_string())
        .cloned()
        .unwrap_or(Value::Null)
}

/// Polls `condition` every 5 ms; how long it took, or `None` past `limit`.
fn time_until(limit: Duration, mut condition: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if condition() {
            return Some(started.elapsed());
        }
        if started.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_for(limit: Duration, what: &str, condition: impl FnMut() -> bool) -> Duration {
    time_until(limit, condition).unwrap_or_else(|| panic!("{what}: not within {limit:?}"))
}

fn is_problem(reply: &Reply, slug: &str) -> bool {
    reply.header("content-type") == Some("application/problem+json")
        && reply.json()["type"] == format!("urn:gatehouse:problem:{slug}")
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

/// A target killed under load costs no request: 10 s of 200 requests a second, open loop, to a
/// pool of three with active checks (every 100 ms), outlier detection and the retry
/// policy; one target is killed at 3 s and restarted at 6 s.
#[test]
fn a_target_killed_under_load_costs_no_request_and_comes_back_when_restarted() {
    let _serial = one_at_a_time();
    let targets = Target::start_many("t", 3);
    let gateway = Gateway::start(&format!(
        r#"
upstreams:
  - name: api
    balance: round_robin
    targets: {targets}
    {health_check}
    outlier_detection: {{ consecutive_failures: 5, base_ejection_time: 30s, max_ejection_time: 300s, max_ejection_percent: 50 }}
routes:
  - name: orders
    upstream: api
    match: {{ paths: [{{ prefix: / }}] }}
    timeout: 10s
    {RETRY}
"#,
        targets = targets_yaml(&addresses(&targets), None),
        health_check = health_check("healthy"),
    ));
    let victim = &targets[1];
    let load = OpenLoop::start(gateway.addr, "/orders", 200.0, Duration::from_secs(10), 32);

    std::thread::sleep(
        (load.started + Duration::from_secs(3)).saturating_duration_since(Instant::now()),
    );
    victim.kill();
    let killed_at = load.started.elapsed();
    let detection = time_until(Duration::from_secs(3), || {
        target_report(&gateway, "api", victim.address)["healthy"] == false
    });
    let report_when_down = target_report(&gateway, "api", victim.address);
    let healthy_gauge_when_down = metric(
        &gateway.metrics(),
        "gatehouse_upstream_target_healthy",
        &[("upstream", "api"), ("target", &victim.address.to_string())],
    );

    std::thread::sleep(
        (load.started + Duration::from_secs(6)).saturating_duration_since(Instant::now()),
    );
    let before_restart = victim.requests();
    victim.restart();
    let restarted_at = load.started.elapsed();
    let recovery = time_until(Duration::from_secs(3), || {
        victim.requests() > before_restart
    });
    let outcomes = load.finish();
    let report_at_end = target_report(&gateway, "api", victim.address);
    let healthy_gauge_at_end = metric(
        &gateway.metrics(),
        "gatehouse_upstream_target_healthy",
        &[("upstream", "api"), ("target", &victim.address.to_string())],
    );

    let failures: Vec<_> = outcomes.iter().filter(|outcome| !outcome.ok()).collect();
    let latencies: Vec<Duration> = outcomes.iter().map(|outcome| outcome.latency).collect();
    let victim_at_the_end = outcomes
        .iter()
        .filter(|outcome| outcome.due > restarted_at + Duration::from_secs(1))
        .filter(|outcome| outcome.target.as_deref() == Some(victim.name.as_str()))
        .count();
    let detection_window = INTERVAL * UNHEALTHY_THRESHOLD + PROBE_TIMEOUT;
    let healthy_window = INTERVAL * HEALTHY_THRESHOLD + PROBE_TIMEOUT;
    println!(
        "kill under load: {} requests, {} not 2xx, p50 {}, p99 {}, max {}; killed at {killed_at:?}, \
         marked unhealthy after {detection:?} (window {detection_window:?}); restarted at {restarted_at:?}, \
         first request after {recovery:?} (window {healthy_window:?}); victim answered {victim_at_the_end} requests \
         in the last 3 s\n  report when down: {report_when_down}\n  report at the end: {report_at_end}\n  \
         healthy gauge: {healthy_gauge_when_down:?} when down, {healthy_gauge_at_end:?} at the end",
        outcomes.len(),
        failures.len(),
        milliseconds(quantile(&latencies, 0.5)),
        milliseconds(quantile(&latencies, 0.99)),
        milliseconds(quantile(&latencies, 1.0)),
    );
    assert!(
        outcomes.len() >= 1990,
        "the run sent {} requests",
        outcomes.len()
    );
    assert!(
        failures.is_empty(),
        "{} requests failed, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let detection = detection.expect("the killed target was never marked unhealthy");
    assert!(
        detection <= detection_window,
        "marked unhealthy after {detection:?}, beyond interval × unhealthy_threshold + timeout = {detection_window:?}"
    );
    assert!(
        report_when_down["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("unhealthy"),
        "/config does not say why the target is out: {report_when_down}"
    );
    assert_eq!(healthy_gauge_when_down, Some(0.0));
    // The first request after the target is healthy again comes within a few milliseconds at
    // this rate; 25 ms covers it.
    let recovery = recovery.expect("the restarted target got no request within 3 s");
    assert!(
        recovery <= healthy_window + Duration::from_millis(25),
        "the restarted target got its first request after {recovery:?}, beyond interval × healthy_threshold + timeout = {healthy_window:?}"
    );
    assert_eq!(report_at_end["usable"], true, "{report_at_end}");
    assert_eq!(healthy_gauge_at_end, Some(1.0));
}

/// Sends GETs one at a time until `/config` shows `target` ejected; every answer must be a 200.
/// Returns how many requests the target had received then, and the ejection `/config` reports.
fn drive_until_ejected(
    gateway: &Gateway,
    connection: &mut Connection,
    target: &Target,
) -> (usize, Value) {
    for _ in 0..300 {
        let reply = connection.get("/orders").expect("request");
        assert_eq!(
            reply.status,
            200,
            "a client saw {}: {}",
            reply.status,
            reply.text()
        );
        let report = target_report(gateway, "api", target.address);
        if !report["ejected_for_ms"].is_null() {
            return (target.requests(), report);
        }
    }
    panic!("{} was never ejected", target.name);
}

/// A target that answers 503 (and accepts connections) is ejected after
/// `consecutive_failures`, clients see no error, a repeat ejection lasts longer, and with two
/// bad targets of three `max_ejection_percent` keeps at most one out.
#[test]
fn a_target_answering_503_is_ejected_for_longer_each_time_and_within_the_ejection_limit() {
    let _serial = one_at_a_time();
    let pool = |targets: &[Target]| {
        format!(
            r#"
upstreams:
  - name: api
    balance: round_robin
    targets: {targets}
    outlier_detection: {{ consecutive_failures: 5, base_ejection_time: 1s, max_ejection_time: 10s, max_ejection_percent: 50 }}
routes:
  - name: orders
    upstream: api
    match: {{ paths: [{{ prefix: / }}] }}
    timeout: 10s
    {RETRY}
"#,
            targets = targets_yaml(&addresses(targets), None),
        )
    };
    let targets = Target::start_many("t", 3);
    let bad = &targets[1];
    bad.set_status(503);
    let gateway = Gateway::start(&pool(&targets));
    let mut connection = Connection::new(gateway.addr);
    let labels = [("upstream", "api"), ("target", &bad.address.to_string())];

    let (seen_at_first, first) = drive_until_ejected(&gateway, &mut connection, bad);
    let gauge_while_ejected = metric(
        &gateway.metrics(),
        "gatehouse_upstream_target_healthy",
        &labels,
    );
    let first_length = wait_for(Duration::from_secs(5), "the first ejection ends", || {
        target_report(&gateway, "api", bad.address)["ejected_for_ms"].is_null()
    });
    let (_, second) = drive_until_ejected(&gateway, &mut connection, bad);
    let second_length = wait_for(Duration::from_secs(10), "the second ejection ends", || {
        target_report(&gateway, "api", bad.address)["ejected_for_ms"].is_null()
    });
    let ejections = metric(
        &gateway.metrics(),
        "gatehouse_upstream_ejections_total",
        &labels,
    );
    println!(
        "ejection: first after {seen_at_first} requests, reported {first}, lasted {first_length:?}; \
         second reported {second}, lasted {second_length:?}; ejections_total {ejections:?}"
    );
    assert_eq!(
        seen_at_first, 5,
        "ejected after {seen_at_first} failed requests"
    );
    assert_eq!(gauge_while_ejected, Some(0.0));
    assert!(
        first["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("ejected"),
        "{first}"
    );
    assert!(
        first_length >= Duration::from_millis(900) && first_length <= Duration::from_millis(1300),
        "the first ejection lasted {first_length:?}, not base_ejection_time (1 s)"
    );
    assert!(
        second_length >= first_length + Duration::from_millis(700),
        "the second ejection ({second_length:?}) is not longer than the first ({first_length:?})"
    );
    assert_eq!(ejections, Some(2.0));
    drop(gateway);

    // Two bad targets of three: 50 % of three is one target out at a time.
    let targets = Target::start_many("u", 3);
    targets[1].set_status(503);
    targets[2].set_status(503);
    let gateway = Gateway::start(&pool(&targets));
    let mut connection = Connection::new(gateway.addr);
    let mut most_ejected = 0;
    let mut statuses = std::collections::BTreeMap::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let reply = connection.get("/orders").expect("request");
        *statuses.entry(reply.status).or_insert(0) += 1;
        let ejected = pool_report(&gateway, "api")["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|target| !target["ejected_for_ms"].is_null())
            .count();
        most_ejected = most_ejected.max(ejected);
    }
    let metrics = gateway.metrics();
    let ejections: Vec<_> = targets
        .iter()
        .map(|target| {
            metric(
                &metrics,
                "gatehouse_upstream_ejections_total",
                &[("upstream", "api"), ("target", &target.address.to_string())],
            )
            .unwrap_or(0.0)
        })
        .collect();
    println!(
        "two bad of three: at most {most_ejected} ejected at once; ejections by target {ejections:?}; \
         client statuses {statuses:?}"
    );
    assert_eq!(
        most_ejected, 1,
        "max_ejection_percent: 50 of three targets is one"
    );
    assert!(ejections[1] + ejections[2] >= 2.0, "{ejections:?}");
    assert_eq!(ejections[0], 0.0, "the good target was ejected");
}

/// A POST is never sent twice; one refused by a dead port goes to another target.
#[test]
fn a_post_reaches_the_targets_at_most_once() {
    let _serial = one_at_a_time();
    let targets = Target::start_many("t", 3);
    for target in &targets {
        target.set_drop_after_body(true);
    }
    let gateway = retry_gateway(&addresses(&targets), "", RETRY);
    let copies = |path: &str| -> usize {
        targets
            .iter()
            .map(|target| target.seen_at(path).len())
            .sum()
    };
    for index in 0..3 {
        let path = format!("/orders/{index}");
        let reply = gateway.request("POST", &path, &[], format!("order {index}").as_bytes());
        assert_eq!(reply.status, 502, "{}", reply.text());
        assert!(is_problem(&reply, "upstream-unavailable"), "{:?}", reply);
        assert_eq!(
            copies(&path),
            1,
            "{path} reached the targets more than once"
        );
    }
    // The same failure on an idempotent method is tried again: the single POST above is the
    // method rule at work, not a missing retry.
    let reply = gateway.request("PUT", "/orders/put", &[], b"order put");
    assert_eq!(reply.status, 502);
    assert_eq!(copies("/orders/put"), 3, "a PUT is tried `attempts` times");
    drop(gateway);

    let good = Target::start("good");
    let refused = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gateway = retry_gateway(&[refused, good.address], "balance: round_robin", RETRY);
    for index in 0..4 {
        let path = format!("/pay/{index}");
        let body = format!("payment {index}");
        let reply = gateway.request("POST", &path, &[], body.as_bytes());
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-target"), Some("good"));
        let seen = good.seen_at(&path);
        assert_eq!(seen.len(), 1, "{path} landed {} times", seen.len());
        assert_eq!(seen[0].body_sha256, sha256_hex(body.as_bytes()));
    }
    let retried = metric(
        &gateway.metrics(),
        "gatehouse_retries_total",
        &[("route", "orders"), ("reason", "connect_failure")],
    );
    println!("POST to a refused port: connect_failure retries {retried:?}");
    assert!(
        retried.unwrap_or(0.0) >= 1.0,
        "no POST met the refused port"
    );
    drop(gateway);

    // A 503 means the target saw the POST: it is not sent again, 503 or not.
    let failing = Target::start("failing");
    failing.set_status(503);
    let gateway = retry_gateway(
        &[failing.address, good.address],
        "balance: round_robin",
        RETRY,
    );
    let mut answered_503 = 0;
    for index in 0..4 {
        let path = format!("/refund/{index}");
        let reply = gateway.request("POST", &path, &[], b"refund");
        let copies = failing.seen_at(&path).len() + good.seen_at(&path).len();
        assert_eq!(copies, 1, "{path} reached the targets {copies} times");
        if reply.status == 503 {
            answered_503 += 1;
        } else {
            assert_eq!(reply.status, 200);
        }
    }
    assert!(answered_503 >= 1, "no POST met the failing target");
}

/// A retried 32 KiB PUT arrives whole at the second target; a 100 KiB one
/// (beyond the 64 KiB Pingora keeps for replay) is attempted once.
#[test]
fn a_retried_body_is_replayed_whole_and_a_large_one_is_not_retried() {
    let _serial = one_at_a_time();
    let failing = Target::start("failing");
    let good = Target::start("good");
    failing.set_status(503);
    let gateway = retry_gateway(
        &[failing.address, good.address],
        "balance: round_robin",
        RETRY,
    );
    let body = |size: usize, seed: u8| -> Vec<u8> {
        (0..size)
            .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    let mut retried = 0;
    for index in 0..4 {
        let path = format!("/documents/{index}");
        let sent = body(32 * 1024, index as u8);
        let reply = gateway.request("PUT", &path, &[], &sent);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let arrived = good.seen_at(&path);
        assert_eq!(arrived.len(), 1);
        assert_eq!(arrived[0].body_bytes, sent.len());
        assert_eq!(
            arrived[0].body_sha256,
            sha256_hex(&sent),
            "the replayed body differs"
        );
        retried += failing.seen_at(&path).len();
    }
    assert!(retried >= 1, "no 32 KiB PUT met the failing target first");

    // Both targets fail now: a small body is tried `attempts` times, a large one once.
    good.set_status(503);
    let small = body(32 * 1024, 7);
    let reply = gateway.request("PUT", "/small", &[], &small);
    assert_eq!(reply.status, 503);
    let small_copies = failing.seen_at("/small").len() + good.seen_at("/small").len();
    let large = body(100 * 1024, 9);
    let reply = gateway.request("PUT", "/large", &[], &large);
    let large_copies = failing.seen_at("/large").len() + good.seen_at("/large").len();
    println!(
        "body replay: {retried} of 4 small PUTs retried; all failing: 32 KiB tried {small_copies} times, \
         100 KiB tried {large_copies} times (status {})",
        reply.status
    );
    assert_eq!(small_copies, 3);
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(
        large_copies, 1,
        "a 100 KiB PUT was attempted {large_copies} times"
    );
}

/// Every target answers 503 to 500 requests a second for 4 s; the
/// attempts the targets count stay within 1.2 × the requests + `min_per_second` × seconds.
#[test]
fn retries_stay_within_the_budget_when_every_target_fails() {
    let _serial = one_at_a_time();
    let targets = Target::start_many("t", 3);
    for target in &targets {
        target.set_status(503);
    }
    let gateway = retry_gateway(
        &addresses(&targets),
        "retry_budget: { percent: 20, min_per_second: 10 }",
        RETRY,
    );
    // The budget counts by whole seconds of the gateway's clock, which starts with its first
    // use; `/config` uses it, so the run below starts half-way through one of its seconds, as
    // any run may.
    get(gateway.ops, "/config");
    std::thread::sleep(Duration::from_millis(500));
    let length = Duration::from_secs(4);
    let outcomes = OpenLoop::start(gateway.addr, "/orders", 500.0, length, 64).finish();
    let requests = outcomes.len();
    let attempts: usize = targets.iter().map(Target::requests).sum();
    let metrics = gateway.metrics();
    let retries: f64 = [
        "connect_failure",
        "reset",
        "timeout",
        "gateway_error",
        "status",
    ]
    .iter()
    .filter_map(|reason| {
        metric(
            &metrics,
            "gatehouse_retries_total",
            &[("route", "orders"), ("reason", reason)],
        )
    })
    .sum();
    let exhausted = metric(
        &metrics,
        "gatehouse_retry_budget_exhausted_total",
        &[("upstream", "api")],
    );
    let not_503 = outcomes
        .iter()
        .filter(|outcome| outcome.status != Ok(503))
        .count();
    let bound = 1.2 * requests as f64 + 10.0 * length.as_secs_f64();
    println!(
        "retry budget: {requests} requests, {attempts} attempts at the targets (bound {bound}), \
         retries_total {retries}, budget_exhausted_total {exhausted:?}, {not_503} answers not 503"
    );
    assert!(requests >= 1990, "the run sent {requests} requests");
    assert!(attempts > requests, "nothing was retried");
    assert!(
        attempts as f64 <= bound,
        "{attempts} attempts for {requests} requests: beyond 1.2 × requests + 10/s × 4 s = {bound}"
    );
    assert_eq!(
        retries as usize,
        attempts - requests,
        "gatehouse_retries_total"
    );
    assert!(
        exhausted.unwrap_or(0.0) > 0.0,
        "budget_exhausted_total did not move"
    );
    assert_eq!(
        not_503, 0,
        "clients saw something else than the targets' 503"
    );
}

/// With `per_try_timeout: 300ms`, one of three targets sleeps 5 s;
/// every request gets a 200 from another, with p99 ≤ per_try_timeout + 0.6 s. A third of the
/// requests meet the sleeper and need a retry, more than the default budget's 20 % at the ~75
/// requests a second this sends, so the budget is 50 % here (it has its own test).
#[test]
fn a_sleeping_target_costs_at_most_one_per_try_timeout() {
    let _serial = one_at_a_time();
    let targets = Target::start_many("t", 3);
    targets[0].set_delay(Duration::from_secs(5));
    let gateway = retry_gateway(
        &addresses(&targets),
        "retry_budget: { percent: 50, min_per_second: 10 }",
        &RETRY.replace("per_try_timeout: 2s", "per_try_timeout: 300ms"),
    );
    let results = concurrent(gateway.addr, 9, 90, |_, connection| {
        connection.get("/orders")
    });
    let latencies: Vec<Duration> = results.iter().map(|(latency, _)| *latency).collect();
    let failures: Vec<_> = results
        .iter()
        .filter(|(_, reply)| !matches!(reply, Ok(reply) if reply.status == 200))
        .collect();
    let from_sleeper = results
        .iter()
        .filter(|(_, reply)| matches!(reply, Ok(reply) if reply.header("x-target") == Some("t0")))
        .count();
    let timeouts = metric(
        &gateway.metrics(),
        "gatehouse_retries_total",
        &[("route", "orders"), ("reason", "timeout")],
    );
    let p99 = quantile(&latencies, 0.99);
    println!(
        "one sleeping target: 90 requests, {} failed, p50 {}, p99 {}, max {}; the sleeper got {} \
         attempts; timeout retries {timeouts:?}",
        failures.len(),
        milliseconds(quantile(&latencies, 0.5)),
        milliseconds(p99),
        milliseconds(quantile(&latencies, 1.0)),
        targets[0].requests(),
    );
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(3)]
    );
    assert_eq!(from_sleeper, 0);
    assert!(
        targets[0].requests() >= 10,
        "the sleeping target was hardly tried"
    );
    assert!(
        p99 <= Duration::from_millis(300 + 600),
        "p99 {p99:?} beyond per_try_timeout + 0.6 s"
    );
    assert!(timeouts.unwrap_or(0.0) >= 10.0, "{timeouts:?}");
    // Attempts cut short by their deadline give their place back: a count that leaked would
    // tilt `least_requests` and `peak_ewma` away from the target for good.
    let in_flight: Vec<Value> = pool_report(&gateway, "api")["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|target| target["in_flight"].clone())
        .collect();
    assert!(in_flight.iter().all(|count| *count == 0), "{in_flight:?}");
}

/// Every target is slow: the answer is a 504 at the route's
/// `timeout`, never later, with per-try timeouts and retries (1 s) and without (700 ms, where
/// the targets' own read timeout is 30 s). "Never later" allows 50 ms for timers and the
/// client's own connection.
#[test]
fn every_target_slow_gives_a_504_at_the_route_timeout() {
    let _serial = one_at_a_time();
    let targets = Target::start_many("t", 3);
    for target in &targets {
        target.set_delay(Duration::from_secs(5));
    }
    let gateway = Gateway::start(&format!(
        r#"
upstreams:
  - name: api
    targets: {targets}
routes:
  - name: retried
    upstream: api
    match: {{ paths: [{{ prefix: /retried }}] }}
    timeout: 1s
    {retry}
  - name: single
    upstream: api
    match: {{ paths: [{{ prefix: /single }}] }}
    timeout: 700ms
"#,
        targets = targets_yaml(&addresses(&targets), None),
        retry = RETRY.replace("per_try_timeout: 2s", "per_try_timeout: 400ms"),
    ));
    for (path, timeout) in [
        ("/retried", Duration::from_secs(1)),
        ("/single", Duration::from_millis(700)),
    ] {
        let results = concurrent(gateway.addr, 4, 4, move |_, connection| {
            connection.get(path)
        });
        for (latency, reply) in &results {
            let reply = reply.as_ref().expect("an answer");
            println!(
                "all slow, {path}: {} after {}",
                reply.status,
                milliseconds(*latency)
            );
            assert_eq!(reply.status, 504, "{}", reply.text());
            assert!(is_problem(reply, "upstream-timeout"), "{}", reply.text());
            assert!(
                *latency >= timeout - Duration::from_millis(20)
                    && *latency <= timeout + Duration::from_millis(50),
                "{path}: 504 after {latency:?}, the route's timeout is {timeout:?}"
            );
        }
    }
}

/// `clients` GETs released together, each on a new connection; their latencies and answers.
fn at_once(address: SocketAddr, clients: usize) -> Vec<(Duration, Reply)> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                let reply = request(address, "GET", "/orders", &[], b"");
                (started.elapsed(), reply)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .collect()
}

fn breaker_gateway(target: &Target, breaker: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
upstreams:
  - name: api
    targets: {targets}
    circuit_breaker: {breaker}
routes:
  - name: orders
    upstream: api
    match: {{ paths: [{{ prefix: / }}] }}
"#,
        targets = targets_yaml(&[target.address], None),
    ))
}

fn circuit(gateway: &Gateway) -> String {
    pool_report(gateway, "api")["circuit"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn circuit_gauge(gateway: &Gateway) -> Option<f64> {
    metric(
        &gateway.metrics(),
        "gatehouse_circuit_state",
        &[("upstream", "api")],
    )
}

/// Once the failure rate trips it, the breaker answers a 503 problem in
/// under 5 ms (the median of 100, each on a new connection) and the target sees nothing.
#[test]
fn an_open_breaker_answers_503_at_once() {
    let _serial = one_at_a_time();
    let target = Target::start("t");
    target.set_status(500);
    let gateway = breaker_gateway(
        &target,
        "{ max_requests: 1024, failure_rate: { threshold: 50%, min_requests: 10, window: 10s }, open_duration: 30s, half_open_probes: 3 }",
    );
    assert_eq!(circuit_gauge(&gateway), Some(0.0));
    for _ in 0..10 {
        assert_eq!(gateway.get("/orders").status, 500);
    }
    assert_eq!(circuit(&gateway), "open");
    assert_eq!(circuit_gauge(&gateway), Some(1.0));
    let mut latencies = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        let reply = gateway.get("/orders");
        latencies.push(started.elapsed());
        assert_eq!(reply.status, 503);
        assert!(is_problem(&reply, "circuit-open"), "{}", reply.text());
    }
    let median = quantile(&latencies, 0.5);
    println!(
        "open breaker: median {}, p90 {}, max {}",
        milliseconds(median),
        milliseconds(quantile(&latencies, 0.9)),
        milliseconds(quantile(&latencies, 1.0)),
    );
    assert_eq!(
        target.requests(),
        10,
        "requests reached the target while open"
    );
    assert!(median < Duration::from_millis(5), "median {median:?}");
}

/// A gateway with pool `api` (its `targets` and `pool_extra`, YAML at the pool's level) and
/// route `orders` with a 10 s timeout and the `retry` section given.
fn retry_gateway(targets: &[SocketAddr], pool_extra: &str, retry: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
upstreams:
  - name: api
    targets: {targets}
    {pool_extra}
routes:
  - name: orders
    upstream: api
    match: {{ paths: [{{ prefix: / }}] }}
    timeout: 10s
    {retry}
"#,
        targets = targets_yaml(targets, None),
    ))
}

/// The route's backup takes the requests while the primary pool's
/// breaker is open.
/// Route `orders` to pool `api` (with `pool_extra` keys) backed by `api-backup` (with
/// `backup_extra`); `route_extra` adds keys to the route.
fn backup_gateway(
    primary: &[SocketAddr],
    pool_extra: &str,
    backup: &[SocketAddr],
    backup_extra: &str,
    route_extra: &str,
) -> Gateway {
    Gateway::start(&format!(
        r#"
upstreams:
  - name: api
    targets: {primary}
    {pool_extra}
  - name: api-backup
    targets: {backup}
    {backup_extra}
routes:
  - name: orders
    upstream: api
    backup: api-backup
    match: {{ paths: [{{ prefix: / }}] }}
    {route_extra}
"#,
        primary = targets_yaml(primary, None),
        backup = targets_yaml(backup, None),
    ))
}

#[test]
fn an_open_breaker_sends_requests_to_the_backup() {
    let _serial = one_at_a_time();
    let primary = Target::start("primary");
    let backup = Target::start("backup");
    primary.set_status(500);
    let gateway = backup_gateway(
        &[primary.address],
        "circuit_breaker: { failure_rate: { threshold: 50%, min_requests: 5, window: 10s }, open_duration: 30s }",
        &[backup.address],
        "",
        "",
    );
    for _ in 0..5 {
        assert_eq!(gateway.get("/orders").status, 500);
    }
    assert_eq!(circuit(&gateway), "open");
    for _ in 0..20 {
        let reply = gateway.get("/orders");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-target"), Some("backup"));
    }
    assert_eq!(primary.requests(), 5);
}

/// A retry goes to a target the request has not tried, the backup's before the primary's again:
/// with the primary's only target answering 503 and nothing yet ejecting it, every request is
/// answered by the backup, and the primary sees each request once.
#[test]
fn a_retry_tries_the_backup_before_a_target_it_tried_already() {
    let _serial = one_at_a_time();
    let primary = Target::start("primary");
    primary.set_status(503);
    let backup = Target::start("backup");
    let gateway = backup_gateway(&[primary.address], "", &[backup.address], "", RETRY);
    for _ in 0..10 {
        let reply = gateway.get("/orders");
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-target"), Some("backup"));
    }
    assert_eq!(primary.requests(), 10, "the primary was tried again");
    assert_eq!(backup.requests(), 10);
}

/// The answers the gateway gives for its upstreams (502, 503, 504) on a kept-alive connection:
/// either they say `connection: close`, or the connection takes the next request. A client
/// cannot tell a connection closed after an answer that promised keep-alive from a lost one,
/// and may not send a POST again.
#[test]
fn an_error_answer_keeps_its_word_about_the_connection() {
    let _serial = one_at_a_time();
    let slow = Target::start("slow");
    slow.set_delay(Duration::from_secs(5));
    let good = Target::start("good");
    let refused: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gateway = Gateway::start(&format!(
        r#"
upstreams:
  - name: dead
    targets: {dead}
  - name: checked
    targets: {dead}
    health_check: {{ kind: tcp, interval: 50ms, timeout: 50ms, unhealthy_threshold: 1 }}
  - name: slow
    targets: {slow}
  - name: good
    targets: {good}
routes:
  - name: dead
    upstream: dead
    match: {{ paths: [{{ prefix: /dead }}] }}
  - name: checked
    upstream: checked
    match: {{ paths: [{{ prefix: /checked }}] }}
  - name: slow
    upstream: slow
    timeout: 200ms
    match: {{ paths: [{{ prefix: /slow }}] }}
  - name: good
    upstream: good
    match: {{ paths: [{{ prefix: /good }}] }}
"#,
        dead = targets_yaml(&[refused], None),
        slow = targets_yaml(&[slow.address], None),
        good = targets_yaml(&[good.address], None),
    ));
    wait_for(
        Duration::from_secs(2),
        "the checked target unhealthy",
        || target_report(&gateway, "checked", refused)["healthy"] == false,
    );
    // A GET read whole: whatever the answer says about the connection holds. After a failure in
    // the proxy phase Pingora closes the client's connection, so these say close; were one to
    // say keep-alive, the next request on it must be served.
    for (path, status) in [("/dead", 502), ("/checked", 503), ("/slow", 504)] {
        let mut raw = std::net::TcpStream::connect(gateway.addr).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        std::io::Write::write_all(&mut raw, request.as_bytes()).unwrap();
        let (reply, rest) = read_one_response(&mut raw);
        assert_eq!(reply.status, status, "{path}: {}", reply.text());
        let closes = reply
            .header("connection")
            .is_some_and(|value| value.eq_ignore_ascii_case("close"));
        if closes {
            // Closed, as it said: no more bytes, and an end rather than a wait.
            let mut after = rest;
            let mut buffer = [0u8; 512];
            loop {
                match std::io::Read::read(&mut raw, &mut buffer) {
                    Ok(0) => break,
                    Ok(read) => after.extend_from_slice(&buffer[..read]),
                    Err(error) => {
                        panic!("{path} ({status}) said close, then kept the connection: {error}")
                    }
                }
            }
            assert!(
                after.is_empty(),
                "{path}: bytes after a closing answer: {after:?}"
            );
        } else {
            std::io::Write::write_all(&mut raw, b"GET /good HTTP/1.1\r\nHost: test\r\n\r\n")
                .unwrap();
            let (next, _) = read_one_response(&mut raw);
            assert_eq!(
                next.status,
                200,
                "{path} ({status}) said keep-alive, then: {}",
                next.text()
            );
        }
    }
    // A body the gateway did not read (a 502 before it was sent on): the answer says close.
    let mut raw = std::net::TcpStream::connect(gateway.addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    std::io::Write::write_all(
        &mut raw,
        b"POST /dead HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\npartial",
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut raw, &mut answer);
    let reply = crate::support::parse_response(&answer).expect("an answer");
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(
        reply.header("connection").map(str::to_ascii_lowercase),
        Some("close".to_string())
    );
}

/// Half-open: 50 clients at once after the open period; at most
/// `half_open_probes` reach the target at once, the failed probe opens the breaker for twice as
/// long, and a passing one closes it.
#[test]
fn a_half_open_breaker_lets_few_probes_through_and_backs_off() {
    let _serial = one_at_a_time();
    let target = Target::start("t");
    target.set_status(500);
    let gateway = breaker_gateway(
        &target,
        "{ max_requests: 1024, failure_rate: { threshold: 50%, min_requests: 5, window: 10s }, open_duration: 1s, max_open_duration: 10s, half_open_probes: 3 }",
    );
    for _ in 0..5 {
        assert_eq!(gateway.get("/orders").status, 500);
    }
    assert_eq!(circuit(&gateway), "open");
    let first_open = wait_for(
        Duration::from_secs(3),
        "half-open after open_duration",
        || circuit(&gateway) == "half_open",
    );
    assert_eq!(circuit_gauge(&gateway), Some(2.0));

    // The probes fail slowly, so the 50 clients all arrive while they are under way.
    target.set_delay(Duration::from_millis(500));
    let before = target.requests();
    let results = at_once(gateway.addr, 50);
    let probes = target.requests() - before;
    let refused: Vec<&(Duration, Reply)> = results
        .iter()
        .filter(|(_, reply)| reply.status == 503)
        .collect();
    let slowest_refusal = refused.iter().map(|(latency, _)| *latency).max();
    assert_eq!(
        circuit(&gateway),
        "open",
        "a failed probe opens the breaker again"
    );
    let second_open = wait_for(Duration::from_secs(5), "half-open again", || {
        circuit(&gateway) == "half_open"
    });
    println!(
        "half-open: {probes} probes reached the target, at most {} at once; {} clients refused \
         (slowest {slowest_refusal:?}); open for {first_open:?}, then after the failed probe for {second_open:?}",
        target.max_in_flight(),
        refused.len(),
    );
    assert!(
        (1..=3).contains(&probes),
        "{probes} requests reached the half-open target"
    );
    assert!(target.max_in_flight() <= 3);
    assert_eq!(refused.len(), 50 - probes);
    for (_, reply) in &refused {
        assert!(is_problem(reply, "circuit-open"), "{}", reply.text());
    }
    assert!(
        first_open >= Duration::from_millis(900) && first_open <= Duration::from_millis(1200),
        "open for {first_open:?}, open_duration is 1 s"
    );
    assert!(
        second_open >= Duration::from_millis(1800) && second_open <= Duration::from_millis(2300),
        "open again for {second_open:?}, twice open_duration is 2 s"
    );

    target.set_delay(Duration::ZERO);
    target.set_status(200);
    assert_eq!(gateway.get("/orders").status, 200);
    assert_eq!(circuit(&gateway), "closed");
    assert_eq!(circuit_gauge(&gateway), Some(0.0));
}

/// A half-open probe has its own deadline, the open period: a probe to a target that now hangs
/// fails at it (a 504 to its client, not a wait for the pool's 60 s read timeout) and opens the
/// breaker again, rather than keeping it half-open with its slot taken.
#[test]
fn a_half_open_probe_that_hangs_fails_at_its_own_deadline() {
    let _serial = one_at_a_time();
    let target = Target::start("t");
    target.set_status(500);
    let gateway = breaker_gateway(
        &target,
        "{ consecutive_failures: 2, open_duration: 300ms, max_open_duration: 10s, half_open_probes: 1 }",
    );
    for _ in 0..2 {
        assert_eq!(gateway.get("/orders").status, 500);
    }
    assert_eq!(circuit(&gateway), "open");
    wait_for(Duration::from_secs(2), "half-open", || {
        circuit(&gateway) == "half_open"
    });
    target.set_status(200);
    target.set_delay(Duration::from_secs(30));
    let started = Instant::now();
    let probe = crate::support::try_get(gateway.addr, "/orders");
    let took = started.elapsed();
    let probe = probe.expect("an answer to the probe");
    println!("a hanging probe: {} after {took:?}", probe.status);
    assert_eq!(probe.status, 504, "{}", probe.text());
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "the probe took {took:?}; its deadline is open_duration (300 ms)"
    );
    assert_eq!(
        circuit(&gateway),
        "open",
        "a failed probe opens the breaker again"
    );
}

/// `max_requests: 5`: 20 clients at once on a target that takes 500 ms; it never
/// sees more than 5 at once, and the other clients get a fast 503.
#[test]
fn max_requests_caps_the_concurrency_a_target_sees() {
    let _serial = one_at_a_time();
    let target = Target::start("t");
    target.set_delay(Duration::from_millis(500));
    let gateway = breaker_gateway(
        &target,
        "{ max_requests: 5, open_duration: 10s, half_open_probes: 3 }",
    );
    let results = at_once(gateway.addr, 20);
    let served = results
        .iter()
        .filter(|(_, reply)| reply.status == 200)
        .count();
    let refused: Vec<Duration> = results
        .iter()
        .filter(|(_, reply)| reply.status == 503 && is_problem(reply, "circuit-open"))
        .map(|(latency, _)| *latency)
        .collect();
    let slowest_refusal = quantile(&refused, 1.0);
    println!(
        "max_requests 5: target saw at most {} at once, {served} served, {} refused (slowest {})",
        target.max_in_flight(),
        refused.len(),
        milliseconds(slowest_refusal),
    );
    assert!(target.max_in_flight() <= 5, "{}", target.max_in_flight());
    assert_eq!(target.max_in_flight(), 5, "the 20 clients did not overlap");
    assert_eq!(served + refused.len(), 20);
    assert!(
        slowest_refusal < Duration::from_millis(100),
        "a refusal took {slowest_refusal:?}"
    );

    // A client that hangs up while its request is under way gives its place back too: places
    // that leaked would refuse every request once `max_requests` of them are gone.
    let before_hangups = target.requests();
    for _ in 0..6 {
        let mut stream = std::net::TcpStream::connect(gateway.addr).unwrap();
        std::io::Write::write_all(
            &mut stream,
            b"GET /orders HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n",
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for(Duration::from_secs(3), "the target idle", || {
        target.in_flight() == 0
    });
    std::thread::sleep(Duration::from_millis(100));
    let circuit_in_flight = pool_report(&gateway, "api")["circuit"]["in_flight"].clone();
    let after = at_once(gateway.addr, 5);
    println!(
        "after 6 clients hung up: the breaker counts {circuit_in_flight} in flight; 5 new clients got {:?}",
        after.iter().map(|(_, reply)| reply.status).collect::<Vec<_>>()
    );
    assert!(
        target.requests() - before_hangups >= 5 + 5,
        "the requests of the clients that hung up did not reach the target"
    );
    assert_eq!(circuit_in_flight, 0);
    assert!(after.iter().all(|(_, reply)| reply.status == 200));
}

/// Every primary target killed under 100 requests a second; once the health
/// checks have seen it, the backup pool answers everything.
#[test]
fn a_dead_pool_fails_over_to_its_backup_once_detected() {
    let _serial = one_at_a_time();
    let primaries = Target::start_many("primary", 2);
    let backup = Target::start("backup");
    let gateway = backup_gateway(
        &addresses(&primaries),
        &health_check("healthy"),
        &[backup.address],
        "",
        &format!("timeout: 10s\n    {RETRY}"),
    );
    let load = OpenLoop::start(gateway.addr, "/orders", 100.0, Duration::from_secs(3), 16);
    std::thread::sleep(
        (load.started + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
    );
    for primary in &primaries {
        primary.kill();
    }
    let killed_at = load.started.elapsed();
    let detection = wait_for(Duration::from_secs(3), "both primaries unhealthy", || {
        pool_report(&gateway, "api")["targets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|target| target["healthy"] == false)
    });
    let detected_at = killed_at + detection;
    let outcomes = load.finish();
    let during: Vec<_> = outcomes
        .iter()
        .filter(|outcome| outcome.due >= killed_at && outcome.due < detected_at)
        .filter(|outcome| !outcome.ok())
        .collect();
    let after: Vec<_> = outcomes
        .iter()
        .filter(|outcome| outcome.due >= detected_at)
        .collect();
    let after_failures: Vec<_> = after.iter().filter(|outcome| !outcome.ok()).collect();
    let after_from_backup = after
        .iter()
        .filter(|outcome| outcome.target.as_deref() == Some("backup"))
        .count();
    println!(
        "failover: primaries killed at {killed_at:?}, both unhealthy {detection:?} later; \
         {} failures while detecting, {} of {} failed after, {after_from_backup} answered by the backup",
        during.len(),
        after_failures.len(),
        after.len(),
    );
    assert!(
        detection <= INTERVAL * UNHEALTHY_THRESHOLD + PROBE_TIMEOUT,
        "{detection:?}"
    );
    assert!(after.len() > 100);
    assert!(
        after_failures.is_empty(),
        "{:?}",
        &after_failures[..after_failures.len().min(5)]
    );
    assert_eq!(after_from_backup, after.len());
}

/// No target anywhere: every target of the pool and of its backup blackholes
/// connections (a connect would wait for its 1 s timeout); once the health checks (HTTP for the
/// pool, TCP for the backup) have marked them all, the answer is a 503 problem within 50 ms.
#[test]
fn with_no_target_anywhere_the_answer_is_a_fast_503() {
    let _serial = one_at_a_time();
    let holes: Vec<Blackhole> = (0..3).map(|_| Blackhole::start()).collect();
    let gateway = backup_gateway(
        &[holes[0].address, holes[1].address],
        &health_check("healthy"),
        &[holes[2].address],
        &health_check("healthy").replace("kind: http", "kind: tcp"),
        &format!("timeout: 10s\n    {RETRY}"),
    );
    wait_for(Duration::from_secs(3), "every target unhealthy", || {
        ["api", "api-backup"].iter().all(|pool| {
            pool_report(&gateway, pool)["targets"]
                .as_array()
                .unwrap()
                .iter()
                .all(|target| target["healthy"] == false)
        })
    });
    let mut latencies = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let reply = gateway.get("/orders");
        latencies.push(started.elapsed());
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert!(
            is_problem(&reply, "no-healthy-upstream"),
            "{}",
            reply.text()
        );
    }
    let slowest = quantile(&latencies, 1.0);
    println!(
        "no target anywhere: median {}, slowest {}",
        milliseconds(quantile(&latencies, 0.5)),
        milliseconds(slowest)
    );
    assert!(slowest < Duration::from_millis(50), "{slowest:?}");
}

/// Reloads while a target is down. Its health survives a reload that changes
/// weights and removes another target; the removed target is probed no more and leaves
/// `/metrics`; a target added with `initial: unhealthy` gets nothing before its first passing
/// probe, and adding it resets nobody. The pool keeps at least half its targets usable, so the
/// panic threshold (50 %) never sends traffic to unhealthy targets on purpose.
#[test]
fn reloads_during_an_outage_keep_health_and_stop_probing_removed_targets() {
    let _serial = one_at_a_time();
    let [a, b, c, d, e] = ["a", "b", "c", "d", "e"].map(Target::start);
    let config = |targets: &[&Target], weights: &[u32], initial: &str| {
        format!(
            r#"
upstreams:
  - name: api
    balance: weighted
    targets: {targets}
    {health_check}
routes:
  - name: orders
    upstream: api
    match: {{ paths: [{{ prefix: / }}] }}
"#,
            targets = targets_yaml(
                &targets
                    .iter()
                    .map(|target| target.address)
                    .collect::<Vec<_>>(),
                Some(weights)
            ),
            health_check = health_check(initial),
        )
    };
    let gateway = Gateway::start(&config(&[&a, &b, &c, &e], &[1, 1, 1, 1], "healthy"));
    let healthy =
        |target: &Target| target_report(&gateway, "api", target.address)["healthy"].clone();
    let send = |count: usize| {
        let mut connection = Connection::new(gateway.addr);
        for _ in 0..count {
            let reply = connection.get("/orders").expect("request");
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    };
    let c_gauge = || {
        metric(
            &gateway.metrics(),
            "gatehouse_upstream_target_healthy",
            &[("upstream", "api"), ("target", &c.address.to_string())],
        )
    };
    assert_eq!(c_gauge(), Some(1.0));
    // `a` fails its probes but would answer requests: any request it gets is a leak.
    a.set_health_status(503);
    wait_for(Duration::from_secs(2), "a unhealthy", || {
        healthy(&a) == false
    });

    let version = gateway.config_version();
    gateway.write_config(&config(&[&a, &b, &e], &[2, 3, 1], "healthy"));
    let version = gateway.wait_for_version_above(version);
    let a_after_weight_change = target_report(&gateway, "api", a.address);
    std::thread::sleep(Duration::from_millis(150));
    let c_probes_after_removal = c.probes();
    let a_before = a.requests();
    send(60);
    let a_leak = a.requests() - a_before;
    std::thread::sleep(Duration::from_millis(500));
    let c_probes_later = c.probes();
    let c_gauge_gone = time_until(Duration::from_secs(2), || c_gauge().is_none());
    println!(
        "reload 1: a after the weight change {a_after_weight_change}; a got {a_leak} of 60; c probed \
         {c_probes_after_removal} times before, {c_probes_later} by 650 ms after its removal; its \
         healthy gauge gone after {c_gauge_gone:?}"
    );
    assert_eq!(
        a_after_weight_change["healthy"], false,
        "a weight change reset a's health"
    );
    assert_eq!(a_after_weight_change["weight"], 2);
    assert_eq!(a_leak, 0, "the dead target got traffic after the reload");
    assert_eq!(
        c_probes_later, c_probes_after_removal,
        "the removed target is still probed"
    );
    assert!(
        c_gauge_gone.is_some(),
        "the removed target is still in /metrics"
    );

    // `d` is added with `initial: unhealthy` and fails its first probes.
    d.set_health_status(503);
    gateway.write_config(&config(&[&a, &b, &e, &d], &[2, 3, 1, 1], "unhealthy"));
    gateway.wait_for_version_above(version);
    let d_at_reload = target_report(&gateway, "api", d.address);
    let a_at_reload = healthy(&a);
    let b_at_reload = healthy(&b);
    send(60);
    std::thread::sleep(Duration::from_millis(400));
    send(30);
    let d_before_passing = d.requests();
    let d_probes_failed = d.probes();
    d.set_health_status(200);
    let mut connection = Connection::new(gateway.addr);
    let first_d_request = time_until(Duration::from_secs(2), || {
        connection.get("/orders").expect("request");
        d.requests() > 0
    });
    let first_pass = d.probe_log().into_iter().find(|probe| probe.passed);
    let first_seen = d.seen().first().map(|seen| seen.at);
    println!(
        "reload 2: d at the reload {d_at_reload}; a {a_at_reload}, b {b_at_reload}; d got \
         {d_before_passing} requests over {d_probes_failed} failing probes, its first one \
         {first_d_request:?} after it began to pass"
    );
    assert_eq!(d_at_reload["healthy"], false, "{d_at_reload}");
    assert_eq!(a_at_reload, false, "adding a target reset a's health");
    assert_eq!(b_at_reload, true);
    assert!(d_probes_failed >= 2, "d was not probed");
    assert_eq!(
        d_before_passing, 0,
        "d got traffic before its first passing probe"
    );
    assert!(
        first_d_request.is_some(),
        "d got no traffic once its probes passed"
    );
    let (first_pass, first_seen) = (first_pass.unwrap(), first_seen.unwrap());
    assert!(
        first_seen >= first_pass.at,
        "d got a request before its first passing probe"
    );
    assert_eq!(a.requests(), a_before, "the dead target got traffic");
    assert_eq!(
        c.probes(),
        c_probes_later,
        "the removed target is still probed"
    );
}

/// Flapping, over 10 s of probes every 50 ms (200 probes, where 60 s at a 5 s interval makes
/// 12): a target failing every other probe never changes state with thresholds 2/3.
#[test]
fn a_target_failing_every_other_probe_does_not_flap() {
    let _serial = one_at_a_time();
    let [steady, flappy] = ["steady", "flappy"].map(Target::start);
    flappy.set_health_alternating(true);
    let gateway = Gateway::start(&format!(
        r#"
upstreams:
  - name: api
    targets: {targets}
    health_check: {{ kind: http, path: /healthz, expect_status: ["200-299"], interval: 50ms, jitter: "10%", timeout: 50ms, healthy_threshold: 2, unhealthy_threshold: 3 }}
routes:
  - name: orders
    upstream: api
    match: {{ paths: [{{ prefix: / }}] }}
"#,
        targets = targets_yaml(&[steady.address, flappy.address], None),
    ));
    let labels = [("upstream", "api"), ("target", &flappy.address.to_string())];
    let mut states = Vec::new();
    let mut gauges = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        states.push(target_report(&gateway, "api", flappy.address)["healthy"].clone());
        gauges.push(metric(
            &gateway.metrics(),
            "gatehouse_upstream_target_healthy",
            &labels,
        ));
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = flappy.probe_log();
    let failed = log.iter().filter(|probe| !probe.passed).count();
    let alternates = log.windows(2).all(|pair| pair[0].passed != pair[1].passed);
    let transitions = states.windows(2).filter(|pair| pair[0] != pair[1]).count();
    let mut connection = Connection::new(gateway.addr);
    let mut served = std::collections::BTreeMap::new();
    for _ in 0..20 {
        let reply = connection.get("/orders").expect("request");
        *served
            .entry(reply.header("x-target").unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }
    println!(
        "flapping: {} probes ({failed} failed, alternating: {alternates}); {} looks at /config, \
         {transitions} transitions; states seen {:?}; traffic after {served:?}",
        log.len(),
        states.len(),
        states
            .iter()
            .map(Value::to_string)
            .collect::<std::collections::BTreeSet<_>>()
    );
    assert!(log.len() >= 150, "only {} probes", log.len());
    assert!(alternates, "the probes did not alternate");
    assert_eq!(transitions, 0);
    assert!(
        states.iter().all(|state| *state == true),
        "the flappy target was marked unhealthy"
    );
    assert!(gauges.iter().all(|gauge| *gauge == Some(1.0)));
    assert!(
        !gateway.stderr().contains("target unhealthy"),
        "{}",
        gateway.stderr()
    );
    assert_eq!(served.get("flappy"), Some(&10));
}

/// Panic: with one of three unhealthy the other two take everything; with two
/// of three unhealthy (below `panic_threshold: 50%`) traffic spreads over all three again.
#[test]
fn below_the_panic_threshold_every_target_is_used() {
    let _serial = one_at_a_time();
    let targets = Target::start_many("t", 3);
    let gateway = Gateway::start(&format!(
        r#"
upstreams:
  - name: api
    balance: round_robin
    targets: {targets}
    {health_check}
    panic_threshold: 50%
routes:
  - name: orders
    upstream: api
    match: {{ paths: [{{ prefix: / }}] }}
"#,
        targets = targets_yaml(&addresses(&targets), None),
        health_check = health_check("healthy"),
    ));
    let spread = || {
        let before: Vec<usize> = targets.iter().map(Target::requests).collect();
        let mut connection = Connection::new(gateway.addr);
        for _ in 0..60 {
            assert_eq!(connection.get("/orders").unwrap().status, 200);
        }
        targets
            .iter()
            .zip(before)
            .map(|(target, before)| target.requests() - before)
            .collect::<Vec<_>>()
    };
    let unhealthy = |target: &Target| {
        target.set_health_status(503);
        wait_for(Duration::from_secs(2), "unhealthy", || {
            target_report(&gateway, "api", target.address)["healthy"] == false
        });
    };
    unhealthy(&targets[2]);
    let one_down = spread();
    unhealthy(&targets[1]);
    let two_down = spread();
    println!("panic threshold: one of three down {one_down:?}; two of three down {two_down:?}");
    assert_eq!(
        one_down[2], 0,
        "an unhealthy target got traffic above the panic threshold"
    );
    assert!(two_down.iter().all(|count| *count >= 15), "{two_down:?}");
}

/// 10,000 requests to a route that sends 10 % to a canary pool
/// land within ±2 points of 90/10.
#[test]
fn a_ninety_ten_split_lands_within_two_points() {
    let _serial = one_at_a_time();
    let main = Target::start("main");
    let canary = Target::start("canary");
    let gateway = Gateway::start(&format!(
        r#"
upstreams:
  - name: api
    targets: {main}
  - name: api-canary
    targets: {canary}
routes:
  - name: orders
    upstream: api
    split: [{{ upstream: api-canary, weight: 10 }}]
    match: {{ paths: [{{ prefix: / }}] }}
"#,
        main = targets_yaml(&[main.address], None),
        canary = targets_yaml(&[canary.address], None),
    ));
    let results = concurrent(gateway.addr, 8, 10_000, |_, connection| {
        connection.get("/orders")
    });
    let failures = results
        .iter()
        .filter(|(_, reply)| !matches!(reply, Ok(reply) if reply.status == 200))
        .count();
    let share = canary.requests() as f64 / 10_000.0 * 100.0;
    println!(
        "split: main {}, canary {} ({share:.2} %), {failures} failures",
        main.requests(),
        canary.requests()
    );
    assert_eq!(failures, 0);
    assert_eq!(main.requests() + canary.requests(), 10_000);
    assert!(
        (8.0..=12.0).contains(&share),
        "{share:.2} % went to the canary"
    );
}

/// A route whose requests are copied to `shadow`.
fn mirror_gateway(main: &Target, shadow: SocketAddr, shadow_timeouts: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
upstreams:
  - name: api
    targets: {main}
  - name: shadow
    targets: {shadow}
    {shadow_timeouts}
routes:
  - name: orders
    upstream: api
    mirror: {{ upstream: shadow, percent: 100 }}
    match: {{ paths: [{{ prefix: / }}] }}
"#,
        main = targets_yaml(&[main.address], None),
        shadow = targets_yaml(&[shadow], None),
    ))
}

fn mirror_count(gateway: &Gateway, result: &str) -> f64 {
    metric(
        &gateway.metrics(),
        "gatehouse_mirror_requests_total",
        &[("route", "orders"), ("result", result)],
    )
    .unwrap_or(0.0)
}

/// Every request reaches the mirror too: the same method, path and body (by SHA-256), and the
/// client gets the primary's answer. A body over 1 MiB is not copied, and that is counted.
#[test]
fn the_mirror_receives_a_copy_of_each_request() {
    let _serial = one_at_a_time();
    let main = Target::start("main");
    let shadow = Target::start("shadow");
    let gateway = mirror_gateway(&main, shadow.address, "");
    let mut connection = Connection::new(gateway.addr);
    let mut sums = Vec::new();
    for index in 0..20 {
        let body = format!("order {index} ").repeat(100 * (index + 1));
        sums.push(sha256_hex(body.as_bytes()));
        let reply = connection
            .send("POST", &format!("/orders/{index}"), &[], body.as_bytes())
            .unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["target"], "main");
    }
    let bodiless = connection.get("/orders/get").unwrap();
    assert_eq!(bodiless.status, 200);
    // `seen` (not `requests`, which counts a request as its head arrives): every copy's body
    // has been read.
    wait_for(Duration::from_secs(5), "21 copies at the mirror", || {
        shadow.seen().len() == 21
    });
    let seen = shadow.seen();
    for (index, sum) in sums.iter().enumerate() {
        let copy = seen
            .iter()
            .find(|seen| seen.path == format!("/orders/{index}"))
            .unwrap_or_else(|| panic!("no copy of /orders/{index}"));
        assert_eq!(copy.method, "POST");
        assert_eq!(&copy.body_sha256, sum, "/orders/{index}");
    }
    assert_eq!(shadow.seen_at("/orders/get")[0].method, "GET");
    assert_eq!(main.requests(), 21);
    wait_for(Duration::from_secs(2), "the sent copies counted", || {
        mirror_count(&gateway, "sent") == 21.0
    });

    let large = vec![b'x'; 1536 * 1024];
    let reply = connection
        .send("PUT", "/orders/large", &[], &large)
        .unwrap();
    assert_eq!(reply.status, 200);
    wait_for(
        Duration::from_secs(2),
        "the large copy counted as dropped",
        || mirror_count(&gateway, "dropped") == 1.0,
    );
    assert!(shadow.seen_at("/orders/large").is_empty());
    assert_eq!(main.seen_at("/orders/large")[0].body_bytes, large.len());
}

/// A mirror that takes 2 s to answer adds nothing to the client's wait: each request is
/// answered long before its copy is.
#[test]
fn a_slow_mirror_adds_nothing_to_client_latency() {
    let _serial = one_at_a_time();
    let main = Target::start("main");
    let shadow = Target::start("shadow");
    shadow.set_delay(Duration::from_secs(2));
    let gateway = mirror_gateway(
        &main,
        shadow.address,
        "timeouts: { connect: 1s, read: 5s, write: 5s, idle: 60s }",
    );
    let mut connection = Connection::new(gateway.addr);
    let mut latencies = Vec::new();
    for index in 0..10 {
        let started = Instant::now();
        let reply = connection
            .send("POST", &format!("/orders/{index}"), &[], b"{\"item\":1}")
            .unwrap();
        latencies.push(started.elapsed());
        assert_eq!(reply.status, 200);
    }
    let slowest = latencies.iter().max().unwrap();
    println!(
        "slow mirror: slowest client answer {}",
        milliseconds(*slowest)
    );
    // The copies are still at the mirror, waiting out its 2 s.
    assert!(shadow.in_flight() > 0, "the copies were not sent");
    assert!(
        *slowest < Duration::from_secs(1),
        "a client waited {} with a 2 s mirror",
        milliseconds(*slowest)
    );
    wait_for(Duration::from_secs(10), "10 copies answered", || {
        mirror_count(&gateway, "sent") == 10.0
    });
}

/// A mirror that refuses connections, or answers 500, or hangs up, is invisible to clients;
/// the failed copies are counted.
#[test]
fn mirror_failures_never_reach_the_client() {
    let _serial = one_at_a_time();
    let main = Target::start("main");
    let refused: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let gateway = mirror_gateway(&main, refused, "");
    for index in 0..10 {
        let reply = request(
            gateway.addr,
            "POST",
            &format!("/orders/{index}"),
            &[],
            b"{}",
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["target"], "main");
    }
    wait_for(Duration::from_secs(5), "10 failed copies counted", || {
        mirror_count(&gateway, "failed") == 10.0
    });
    drop(gateway);

    let hanging_up = Target::start("shadow");
    hanging_up.set_drop_after_body(true);
    let gateway = mirror_gateway(&main, hanging_up.address, "");
    for index in 0..10 {
        let reply = request(gateway.addr, "PUT", &format!("/orders/{index}"), &[], b"{}");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    wait_for(Duration::from_secs(5), "10 more failed copies", || {
        mirror_count(&gateway, "failed") == 10.0
    });
    assert_eq!(hanging_up.requests(), 10);
}

/// Reads one response with a `content-length` from a raw connection: it and any bytes after it.
fn read_one_response(stream: &mut std::net::TcpStream) -> (crate::support::Reply, Vec<u8>) {
    let mut data = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        if let Some(head_end) = data.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().unwrap());
            let total = head_end + 4 + length;
            if data.len() >= total {
                let rest = data.split_off(total);
                let reply = crate::support::parse_response(&data).expect("a response");
                return (reply, rest);
            }
        }
        let read = std::io::Read::read(stream, &mut buffer).expect("the rest of the response");
        assert!(
            read > 0,
            "the connection closed inside a response: {data:?}"
        );
        data.extend_from_slice(&buffer[..read]);
    }
}
