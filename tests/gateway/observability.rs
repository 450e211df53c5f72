//! What Gatehouse tells operators and clients about a request's time.

use std::time::Duration;

use crate::support::target::Target;
use crate::support::Gateway;

/// `gateway;dur=X, upstream;dur=Y` as two numbers (Y absent for an answer of our own).
fn server_timing(value: &str) -> (f64, Option<f64>) {
    let mut gateway = None;
    let mut upstream = None;
    for part in value.split(',') {
        let (name, duration) = part.trim().split_once(";dur=").expect(value);
        let duration: f64 = duration.parse().expect(value);
        match name {
            "gateway" => gateway = Some(duration),
            "upstream" => upstream = Some(duration),
            other => panic!("unexpected metric {other} in {value}"),
        }
    }
    (gateway.expect(value), upstream)
}

#[test]
fn server_timing_splits_the_time_between_gateway_and_upstream_on_routes_that_ask() {
    let target = Target::start("slow");
    target.set_delay(Duration::from_millis(60));
    let gateway = Gateway::start(&format!(
        r#"
upstreams:
  - {{ name: api, targets: [{{ address: "{target}" }}] }}
routes:
  - {{ name: timed, match: {{ paths: [{{ prefix: /timed }}] }}, upstream: api, server_timing: true }}
  - {{ name: plain, match: {{ paths: [{{ prefix: /plain }}] }}, upstream: api }}
"#,
        target = target.address,
    ));
    let timed = gateway.get("/timed/x");
    assert_eq!(timed.status, 200);
    let value = timed
        .header("server-timing")
        .expect("server-timing on /timed");
    let (own, upstream) = server_timing(value);
    let upstream = upstream.expect(value);
    assert!(upstream >= 60.0, "{value}: the upstream slept 60 ms");
    assert!(own >= 0.0, "{value}");
    assert_eq!(gateway.get("/plain/x").header("server-timing"), None);
    // Off by default: an unmatched request has none either.
    let missing = gateway.get("/nowhere");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.header("server-timing"), None);
}

#[test]
fn server_timing_from_telemetry_covers_answers_of_our_own_and_routes_can_opt_out() {
    let target = Target::start("t");
    let gateway = Gateway::start_with_telemetry(
        "server_timing: true",
        &format!(
            r#"
upstreams:
  - {{ name: api, targets: [{{ address: "{target}" }}] }}
routes:
  - {{ name: open, match: {{ paths: [{{ prefix: /open }}] }}, upstream: api }}
  - {{ name: quiet, match: {{ paths: [{{ prefix: /quiet }}] }}, upstream: api, server_timing: false }}
  - name: guarded
    match: {{ paths: [{{ prefix: /guarded }}] }}
    upstream: api
    auth: required
    filters: [{{ kind: api_key }}]
"#,
            target = target.address,
        ),
    );
    let open = gateway.get("/open");
    assert_eq!(open.status, 200);
    let (_, upstream) = server_timing(open.header("server-timing").expect("on /open"));
    assert!(upstream.is_some());
    for (path, status) in [("/nowhere", 404), ("/guarded", 401)] {
        let reply = gateway.get(path);
        assert_eq!(reply.status, status);
        let value = reply.header("server-timing").expect(path);
        assert_eq!(
            server_timing(value).1,
            None,
            "{path}: {value}: no upstream was asked"
        );
    }
    assert_eq!(gateway.get("/quiet").header("server-timing"), None);
    // Only /open and /quiet reached the upstream: the 404 and the 401 were Gatehouse's own.
    assert_eq!(target.requests(), 2);
}

/// `/metrics` parsed by a Prometheus text parser, after checking what the parser lets pass:
/// every family has one `# HELP` and one `# TYPE`, declared once, and every sample belongs to a
/// declared family.
fn scrape(gateway: &Gateway) -> prometheus_parse::Scrape {
    let text = gateway.metrics();
    let mut helps = std::collections::HashSet::new();
    let mut types = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split_whitespace().next().expect(line);
            assert!(
                helps.insert(name.to_string()),
                "HELP of {name} twice:\n{text}"
            );
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let name = words.next().expect(line).to_string();
            let kind = words.next().expect(line).to_string();
            assert!(
                types.insert(name.clone(), kind).is_none(),
                "TYPE of {name} twice:\n{text}"
            );
        }
    }
    assert_eq!(
        helps,
        types.keys().cloned().collect(),
        "a family without HELP or TYPE:\n{text}"
    );
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_string())))
        .unwrap_or_else(|error| panic!("{error}:\n{text}"));
    for sample in &scrape.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = sample.metric.strip_suffix(suffix)?;
                (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(&sample.metric);
        assert!(
            types.contains_key(family),
            "{} has no TYPE:\n{text}",
            sample.metric
        );
    }
    scrape
}

/// The sum of the rows of `name` (a counter, a gauge, or a histogram's `_count`) whose labels
/// include all of `labels`.
fn total(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|sample| sample.metric == name)
        .filter(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .map(|sample| match &sample.value {
            prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Untyped(value) => *value,
            prometheus_parse::Value::Histogram(buckets) => {
                buckets.last().map_or(0.0, |bucket| bucket.count)
            }
            other => panic!("{name}: unexpected value {other:?}"),
        })
        .sum()
}

/// How far the rows of a family that match some labels moved in a step.
type Moved<'a> = &'a dyn Fn(&str, &[(&str, &str)]) -> f64;

/// Counts before and after a step: what moved, by how much.
struct Delta<'a> {
    before: prometheus_parse::Scrape,
    gateway: &'a Gateway,
}

impl<'a> Delta<'a> {
    fn start(gateway: &'a Gateway) -> Delta<'a> {
        Delta {
            before: scrape(gateway),
            gateway,
        }
    }

    /// Scrapes again and returns a function of (name, labels) giving the change.
    fn end(self) -> impl Fn(&str, &[(&str, &str)]) -> f64 {
        let after = scrape(self.gateway);
        let before = self.before;
        move |name, labels| total(&after, name, labels) - total(&before, name, labels)
    }
}

#[test]
fn metrics_tell_where_each_request_went_and_who_answered_it() {
    let good = Target::start("good");
    let flaky = Target::start("flaky");
    flaky.set_status(503);
    // A port nothing listens on, outside the range test servers get theirs from.
    let dead_address: std::net::SocketAddr = format!("127.0.0.1:{}", crate::support::free_port())
        .parse()
        .unwrap();
    let key = "metrics-test-key";
    let hash = crate::support::target::sha256_hex(key.as_bytes());
    let config = |limit: u32| {
        format!(
            r#"
consumers:
  - {{ id: alice, credentials: [{{ type: api_key, hash: "sha256:{hash}" }}] }}
upstreams:
  - {{ name: api, targets: [{{ address: "{good}" }}] }}
  - {{ name: pair, balance: round_robin, targets: [{{ address: "{good}" }}, {{ address: "{flaky}" }}] }}
  - {{ name: gone, targets: [{{ address: "{dead_address}" }}] }}
routes:
  - name: keyed
    match: {{ paths: [{{ prefix: /keyed }}] }}
    upstream: api
    auth: required
    metrics: {{ per_consumer: true }}
    filters:
      - {{ kind: api_key, config: {{ header: x-api-key }} }}
      - kind: rate_limit
        config:
          policies: [{{ name: per-consumer, key: [consumer], capacity: {limit}, refill: {{ tokens: 1, every: 1h }} }}]
  - name: retried
    match: {{ paths: [{{ prefix: /retried }}] }}
    upstream: pair
    retry: {{ attempts: 2, statuses: [503] }}
  - name: broken
    match: {{ paths: [{{ prefix: /broken }}] }}
    upstream: gone
    retry: {{ attempts: 1 }}
"#,
            good = good.address,
            flaky = flaky.address,
        )
    };
    let gateway = Gateway::start(&config(2));
    let routed = |route: &'static str, upstream: &'static str, class: &'static str, source| {
        [
            ("route", route),
            ("upstream", upstream),
            ("status_class", class),
            ("source", source),
        ]
    };
    // How far a `gatehouse_requests_total` row moved in a step.
    let requests = |moved: Moved<'_>, route, upstream, class, source| {
        moved(
            "gatehouse_requests_total",
            &routed(route, upstream, class, source),
        )
    };

    // Answered by the upstream: requests, both shares of the time, bandwidth, the consumer.
    let step = Delta::start(&gateway);
    let body = vec![b'x'; 1000];
    let reply = gateway.request("POST", "/keyed/a", &[("x-api-key", key)], &body);
    assert_eq!(reply.status, 200);
    let moved = step.end();
    let keyed = [("route", "keyed")];
    assert_eq!(requests(&moved, "keyed", "api", "2xx", "upstream"), 1.0);
    assert_eq!(
        moved(
            "gatehouse_upstream_duration_seconds_count",
            &[("route", "keyed"), ("upstream", "api")]
        ),
        1.0
    );
    assert_eq!(
        moved("gatehouse_gateway_duration_seconds_count", &keyed),
        1.0
    );
    assert_eq!(
        moved("gatehouse_request_duration_seconds_count", &keyed),
        1.0
    );
    assert_eq!(
        moved(
            "gatehouse_bandwidth_bytes_total",
            &[("route", "keyed"), ("direction", "ingress")]
        ),
        1000.0
    );
    assert_eq!(
        moved(
            "gatehouse_bandwidth_bytes_total",
            &[("route", "keyed"), ("direction", "egress")]
        ),
        reply.body.len() as f64
    );
    assert_eq!(
        moved(
            "gatehouse_consumer_requests_total",
            &[
                ("route", "keyed"),
                ("consumer", "alice"),
                ("status_class", "2xx")
            ]
        ),
        1.0
    );

    // An authentication failure: answered by Gatehouse, no upstream time.
    let step = Delta::start(&gateway);
    assert_eq!(gateway.get("/keyed/a").status, 401);
    let moved = step.end();
    assert_eq!(requests(&moved, "keyed", "api", "4xx", "gateway"), 1.0);
    assert_eq!(moved("gatehouse_auth_failures_total", &[]), 1.0);
    assert_eq!(
        moved("gatehouse_upstream_duration_seconds_count", &keyed),
        0.0
    );
    assert_eq!(
        moved("gatehouse_gateway_duration_seconds_count", &keyed),
        1.0
    );

    // A 429 once the consumer's two tokens are spent.
    let step = Delta::start(&gateway);
    let statuses: Vec<u16> = (0..2)
        .map(|_| {
            gateway
                .request("GET", "/keyed/a", &[("x-api-key", key)], b"")
                .status
        })
        .collect();
    assert_eq!(statuses, [200, 429]);
    let moved = step.end();
    assert_eq!(requests(&moved, "keyed", "api", "4xx", "gateway"), 1.0);
    assert_eq!(
        moved(
            "gatehouse_consumer_requests_total",
            &[("consumer", "alice"), ("status_class", "4xx")]
        ),
        1.0
    );

    // A retry: each first attempt that meets the 503 target goes again, to the good one.
    let step = Delta::start(&gateway);
    let flaky_before = flaky.requests();
    for _ in 0..4 {
        assert_eq!(gateway.get("/retried/x").status, 200);
    }
    let moved = step.end();
    let met_503 = (flaky.requests() - flaky_before) as f64;
    assert!(
        met_503 >= 1.0,
        "round robin sent no first attempt to the 503 target"
    );
    assert_eq!(requests(&moved, "retried", "pair", "2xx", "upstream"), 4.0);
    assert_eq!(
        moved("gatehouse_retries_total", &[("route", "retried")]),
        met_503
    );

    // A refused connection: counted for the upstream, answered 502 by Gatehouse.
    let step = Delta::start(&gateway);
    assert_eq!(gateway.get("/broken/x").status, 502);
    let moved = step.end();
    assert_eq!(
        moved(
            "gatehouse_upstream_connect_errors_total",
            &[("upstream", "gone")]
        ),
        1.0
    );
    assert_eq!(requests(&moved, "broken", "gone", "5xx", "gateway"), 1.0);
    assert_eq!(
        moved(
            "gatehouse_upstream_duration_seconds_count",
            &[("route", "broken")]
        ),
        1.0
    );

    // A 404: the unmatched rows.
    let step = Delta::start(&gateway);
    assert_eq!(gateway.get("/nowhere").status, 404);
    let moved = step.end();
    assert_eq!(
        moved(
            "gatehouse_requests_total",
            &routed("(none)", "(none)", "4xx", "gateway")
        ),
        1.0
    );

    // A reload: counted, the version moves, and the rows carry on.
    let step = Delta::start(&gateway);
    let version = gateway.config_version();
    gateway.write_config(&config(3));
    gateway.wait_for_version_above(version);
    let moved = step.end();
    assert_eq!(
        moved("gatehouse_config_reloads_total", &[("result", "applied")]),
        1.0
    );
    assert_eq!(moved("gatehouse_config_version", &[]), 1.0);
    let after = scrape(&gateway);
    assert_eq!(
        total(
            &after,
            "gatehouse_requests_total",
            &routed("keyed", "api", "2xx", "upstream")
        ),
        2.0
    );

    // The build, with this crate's version.
    assert_eq!(
        total(
            &after,
            "gatehouse_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // Bounded labels: no row names a request path or a credential.
    let text = gateway.metrics();
    for needle in ["/keyed/a", "/nowhere", "/retried", key] {
        assert!(!text.contains(needle), "{needle} in /metrics:\n{text}");
    }
}

/// The access log's lines, once there are `count` of them (the writer flushes within 200 ms of
/// going idle), each parsed: a line that is not whole JSON fails the test.
fn access_log_lines(gateway: &Gateway, file: &str, count: usize) -> Vec<serde_json::Value> {
    let path = gateway.dir.path().join(file);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() >= count || std::time::Instant::now() > deadline {
            assert_eq!(lines.len(), count, "{file}:\n{text}");
            return lines
                .iter()
                .map(|line| {
                    serde_json::from_str(line)
                        .unwrap_or_else(|error| panic!("{error}: a broken line {line:?}"))
                })
                .collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn access_log_tells_who_what_and_why_and_never_writes_a_secret() {
    let upstream = crate::support::recorder::Recorder::start(
        &[("Set-Cookie", "session=SECRET-SET-COOKIE")],
        "hello from the upstream",
    );
    // A port nothing listens on, outside the range test servers get theirs from.
    let dead_address: std::net::SocketAddr = format!("127.0.0.1:{}", crate::support::free_port())
        .parse()
        .unwrap();
    let key = "SECRET-API-KEY-alice";
    let hash = crate::support::target::sha256_hex(key.as_bytes());
    let gateway = Gateway::start(&format!(
        r#"
consumers:
  - {{ id: alice, credentials: [{{ type: api_key, hash: "sha256:{hash}" }}] }}
upstreams:
  - {{ name: api, targets: [{{ address: "{upstream}" }}] }}
  - {{ name: gone, targets: [{{ address: "{dead_address}" }}] }}
filters: [{{ kind: request_id }}]
routes:
  - name: keyed
    match: {{ paths: [{{ prefix: /keyed }}] }}
    upstream: api
    auth: required
    filters:
      - {{ kind: api_key, config: {{ header: x-api-key }} }}
      - kind: rate_limit
        config:
          policies: [{{ name: per-consumer, key: [consumer], capacity: 1, refill: {{ tokens: 1, every: 1h }} }}]
  - name: broken
    match: {{ paths: [{{ prefix: /broken }}] }}
    upstream: gone
    retry: {{ attempts: 1 }}
"#,
        upstream = upstream.address,
    ));
    let secrets = [
        ("authorization", "Bearer SECRET-AUTHORIZATION"),
        ("proxy-authorization", "Basic SECRET-PROXY-AUTHORIZATION"),
        ("cookie", "session=SECRET-COOKIE"),
        ("user-agent", "marker-agent/1.0"),
    ];
    let mut headers = secrets.to_vec();
    headers.push(("x-api-key", key));
    let body = b"SECRET-BODY";
    let allowed = gateway.request("POST", "/keyed/a?token=SECRET-QUERY", &headers, body);
    assert_eq!(allowed.status, 200);
    let mut wrong_key = secrets.to_vec();
    wrong_key.push(("x-api-key", "SECRET-WRONG-KEY"));
    let denied = gateway.request("GET", "/keyed/b?token=SECRET-QUERY", &wrong_key, b"");
    assert_eq!(denied.status, 401);
    let limited = gateway.request("GET", "/keyed/c", &headers, b"");
    assert_eq!(limited.status, 429);
    let failed = gateway.request("GET", "/broken/d", &secrets, b"");
    assert_eq!(failed.status, 502);

    let lines = access_log_lines(&gateway, "access.log", 4);
    let line = |path: &str| {
        lines
            .iter()
            .find(|line| line["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"))
            .clone()
    };
    let allowed = line("/keyed/a");
    assert_eq!(allowed["status"], 200, "{allowed}");
    assert_eq!(allowed["source"], "upstream", "{allowed}");
    assert_eq!(allowed["route"], "keyed", "{allowed}");
    assert_eq!(allowed["upstream"], "api", "{allowed}");
    assert_eq!(
        allowed["upstream_addr"],
        upstream.address.to_string(),
        "{allowed}"
    );
    assert_eq!(allowed["upstream_status"], 200, "{allowed}");
    assert_eq!(allowed["consumer"], "alice", "{allowed}");
    assert_eq!(allowed["auth"]["method"], "api_key", "{allowed}");
    assert_eq!(allowed["auth"]["result"], "ok", "{allowed}");
    assert_eq!(allowed["rate_limit"]["policy"], "per-consumer", "{allowed}");
    assert_eq!(allowed["rate_limit"]["result"], "allowed", "{allowed}");
    assert_eq!(allowed["rate_limit"]["remaining"], 0, "{allowed}");
    assert_eq!(allowed["retries"], 0, "{allowed}");
    assert_eq!(allowed["user_agent"], "marker-agent/1.0", "{allowed}");
    assert_eq!(allowed["bytes_in"], body.len(), "{allowed}");
    assert_eq!(
        allowed["bytes_out"],
        "hello from the upstream".len(),
        "{allowed}"
    );
    assert!(allowed["upstream_ms"].as_f64().is_some(), "{allowed}");
    assert!(allowed["gateway_ms"].as_f64().is_some(), "{allowed}");
    assert!(
        allowed["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{allowed}"
    );

    let denied = line("/keyed/b");
    assert_eq!(denied["status"], 401, "{denied}");
    assert_eq!(denied["source"], "gateway", "{denied}");
    assert_eq!(denied["auth"]["method"], "api_key", "{denied}");
    assert_eq!(denied["auth"]["result"], "unknown_key", "{denied}");
    assert!(denied["consumer"].is_null(), "{denied}");
    assert!(denied["upstream_ms"].is_null(), "{denied}");
    assert!(denied["upstream_addr"].is_null(), "{denied}");

    let limited = line("/keyed/c");
    assert_eq!(limited["status"], 429, "{limited}");
    assert_eq!(limited["source"], "gateway", "{limited}");
    assert_eq!(limited["rate_limit"]["result"], "limited", "{limited}");
    assert_eq!(limited["consumer"], "alice", "{limited}");

    let failed = line("/broken/d");
    assert_eq!(failed["status"], 502, "{failed}");
    assert_eq!(failed["source"], "gateway", "{failed}");
    assert_eq!(failed["upstream"], "gone", "{failed}");
    assert_eq!(
        failed["upstream_addr"],
        dead_address.to_string(),
        "{failed}"
    );
    assert!(failed["upstream_status"].is_null(), "{failed}");
    assert_eq!(failed["attempts"], 1, "{failed}");

    // No secret, in the access log or the process log.
    let access_log = std::fs::read_to_string(gateway.dir.path().join("access.log")).unwrap();
    for text in [access_log, gateway.stderr()] {
        assert!(!text.contains("SECRET"), "a secret was written:\n{text}");
    }
}

#[test]
fn sigusr1_reopens_the_access_log_under_load_without_losing_or_splitting_a_line() {
    let target = Target::start("t");
    let gateway = Gateway::start(&format!(
        r#"
upstreams: [{{ name: api, targets: [{{ address: "{target}" }}] }}]
routes: [{{ name: all, match: {{ paths: [{{ prefix: / }}] }}, upstream: api }}]
"#,
        target = target.address,
    ));
    let load = crate::support::load::OpenLoop::start(
        gateway.addr,
        "/rotated",
        1000.0,
        Duration::from_secs(3),
        16,
    );
    // logrotate's way: rename, then signal. Twice, so the reopened file is reopened in turn.
    let dir = gateway.dir.path();
    for rotated in ["access.log.1", "access.log.2"] {
        std::thread::sleep(Duration::from_millis(1000));
        std::fs::rename(dir.join("access.log"), dir.join(rotated)).unwrap();
        crate::support::signal_pid(gateway.pid(), "USR1");
    }
    let outcomes = load.finish();
    let answered = outcomes.iter().filter(|outcome| outcome.ok()).count();
    assert_eq!(answered, outcomes.len(), "every request is answered");
    assert_eq!(outcomes.len(), 3000);
    // Each request's line is in exactly one of the three files, whole.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let count = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_default()
            .lines()
            .count()
    };
    while count("access.log.1") + count("access.log.2") + count("access.log") < answered
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut total = 0;
    for file in ["access.log.1", "access.log.2", "access.log"] {
        let lines = access_log_lines(&gateway, file, count(file));
        assert!(!lines.is_empty(), "{file} got no line: it was not reopened");
        assert!(lines.iter().all(|line| line["path"] == "/rotated"));
        total += lines.len();
    }
    assert_eq!(total, answered, "lines lost or doubled across the rotation");
    assert!(gateway.stderr().is_empty() || !gateway.stderr().contains("cannot reopen"));
}

#[test]
fn a_reload_changes_the_log_level_and_the_access_log_sample() {
    let target = Target::start("t");
    let rest = format!(
        r#"
upstreams: [{{ name: api, targets: [{{ address: "{target}" }}] }}]
routes: [{{ name: all, match: {{ paths: [{{ prefix: / }}] }}, upstream: api }}]
"#,
        target = target.address,
    );
    let quiet = |text: String| text.replace("access.log\" }", "access.log\", sample: 0.0 }");
    let chatty = |text: String| {
        text.replace("level: warn", "level: info")
            .replace("access.log\" }", "access.log\", sample: 1.0 }")
    };
    let gateway = Gateway::start_edited(&rest, quiet);
    for _ in 0..20 {
        assert_eq!(gateway.get("/sampled-out").status, 200);
    }
    std::thread::sleep(Duration::from_millis(500));
    let log = gateway.dir.path().join("access.log");
    assert_eq!(std::fs::read_to_string(&log).unwrap_or_default(), "");

    // Up to info, everything logged: this very reload's "config applied" line shows.
    let version = gateway.config_version();
    gateway.write_config_edited(&rest, chatty);
    let version = gateway.wait_for_version_above(version);
    for _ in 0..5 {
        assert_eq!(gateway.get("/sampled-in").status, 200);
    }
    let lines = access_log_lines(&gateway, "access.log", 5);
    assert!(lines.iter().all(|line| line["path"] == "/sampled-in"));
    let stderr = gateway.stderr();
    assert!(
        stderr.contains("config applied") && stderr.contains(&format!("version={version}")),
        "{stderr}"
    );

    // Back to warn, nothing sampled: the next reload leaves no info line and no access line.
    gateway.write_config_edited(&rest, quiet);
    let version = gateway.wait_for_version_above(version);
    for _ in 0..5 {
        assert_eq!(gateway.get("/sampled-out-again").status, 200);
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(access_log_lines(&gateway, "access.log", 5).len(), 5);
    let stderr = gateway.stderr();
    assert!(!stderr.contains(&format!("version={version}")), "{stderr}");
}

#[test]
fn access_log_lines_still_buffered_are_written_when_the_process_stops() {
    let target = Target::start("t");
    let mut gateway = Gateway::start(&format!(
        r#"
upstreams: [{{ name: api, targets: [{{ address: "{target}" }}] }}]
routes: [{{ name: all, match: {{ paths: [{{ prefix: / }}] }}, upstream: api }}]
"#,
        target = target.address,
    ));
    for _ in 0..20 {
        assert_eq!(gateway.get("/last-words").status, 200);
    }
    // At once, before the writer's next round: a fast shutdown.
    crate::support::signal_pid(gateway.pid(), "INT");
    assert!(gateway.wait_exit(Duration::from_secs(10)).is_some());
    let lines = access_log_lines(&gateway, "access.log", 20);
    assert!(lines.iter().all(|line| line["path"] == "/last-words"));
}
