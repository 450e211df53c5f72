//! OpenTelemetry traces through the real binary, exported to a real OTLP/HTTP receiver.

use std::time::Duration;

use crate::support::otlp::{ReceivedSpan, Receiver, CLIENT, SERVER};
use crate::support::recorder::Recorder;
use crate::support::target::{sha256_hex, Blackhole, Target};
use crate::support::Gateway;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// A sampled `traceparent` of trace `trace` (32 hex digits).
fn traceparent(trace: &str) -> String {
    format!("00-{trace}-{PARENT}-01")
}

/// `telemetry.tracing` sending to `receiver`, with `extra` keys.
fn tracing(receiver: &str, extra: &str) -> String {
    format!("tracing: {{ endpoint: \"{receiver}\"{extra} }}")
}

fn one(spans: &[ReceivedSpan], kind: i32) -> ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|span| span.kind == kind).collect();
    assert_eq!(found.len(), 1, "kind {kind}: {spans:#?}");
    found[0].clone()
}

#[test]
fn a_callers_trace_is_continued_and_the_upstream_learns_our_client_span() {
    let receiver = Receiver::start();
    let upstream = Recorder::start(&[], "ok");
    // Ratio 0: only the caller's sampled flag records this trace (parent-based sampling).
    let gateway = Gateway::start_with_telemetry(
        &tracing(&receiver.endpoint(), ", sample_ratio: 0.0"),
        &format!(
            r#"
upstreams: [{{ name: api, targets: [{{ address: "{upstream}" }}] }}]
routes: [{{ name: orders, match: {{ paths: [{{ prefix: /orders }}] }}, upstream: api }}]
"#,
            upstream = upstream.address
        ),
    );
    let reply = gateway.request(
        "GET",
        "/orders/7",
        &[
            ("traceparent", &traceparent(TRACE)),
            ("tracestate", "vendor=opaque,other=1"),
            ("user-agent", "trace-test/1.0"),
        ],
        b"",
    );
    assert_eq!(reply.status, 200);
    let seen = upstream.last();
    let sent = seen
        .header("traceparent")
        .expect("the upstream got a traceparent");
    assert_eq!(seen.header("tracestate"), Some("vendor=opaque,other=1"));

    let spans = receiver.wait_for_trace(TRACE, 2);
    let server = one(&spans, SERVER);
    let client = one(&spans, CLIENT);
    assert_eq!(server.service, "gatehouse");
    assert_eq!(server.parent_span_id, PARENT, "{server:#?}");
    assert_eq!(server.name, "GET orders");
    assert_eq!(server.attribute("gatehouse.route"), Some("orders"));
    assert_eq!(server.attribute("gatehouse.upstream"), Some("api"));
    assert_eq!(server.attribute("gatehouse.config_version"), Some("1"));
    assert_eq!(server.attribute("http.request.method"), Some("GET"));
    assert_eq!(server.attribute("url.path"), Some("/orders/7"));
    assert_eq!(server.attribute("http.response.status_code"), Some("200"));
    assert_eq!(
        server.attribute("user_agent.original"),
        Some("trace-test/1.0")
    );
    assert_eq!(server.status, 0, "a 200 is no error");
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(client.attribute("http.response.status_code"), Some("200"));
    assert_eq!(
        client.attribute("server.port"),
        Some(upstream.address.port().to_string().as_str())
    );
    assert_eq!(sent, format!("00-{TRACE}-{}-01", client.span_id));

    // The access log names the same trace and SERVER span (its writer runs ten times a second).
    let path = gateway.dir.path().join("access.log");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut log = String::new();
    while log.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        log = std::fs::read_to_string(&path).unwrap_or_default();
    }
    let line: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(line["trace_id"], TRACE);
    assert_eq!(line["span_id"], server.span_id.as_str());
}

#[test]
fn a_trace_starts_here_without_a_valid_traceparent_or_when_callers_are_not_trusted() {
    let receiver = Receiver::start();
    let upstream = Recorder::start(&[], "ok");
    let rest = format!(
        r#"
upstreams: [{{ name: api, targets: [{{ address: "{upstream}" }}] }}]
routes: [{{ name: all, match: {{ paths: [{{ prefix: / }}] }}, upstream: api }}]
"#,
        upstream = upstream.address
    );
    let gateway =
        Gateway::start_with_telemetry(&tracing(&receiver.endpoint(), ", sample_ratio: 1.0"), &rest);
    // The trace id the upstream was told, for a request with these headers.
    let sent_trace = |headers: &[(&str, &str)]| {
        assert_eq!(gateway.request("GET", "/x", headers, b"").status, 200);
        let sent = upstream.last();
        let traceparent = sent
            .header("traceparent")
            .expect("a traceparent")
            .to_string();
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "{traceparent}");
        assert_eq!(parts[3], "01", "sampled: {traceparent}");
        parts[1].to_string()
    };
    let roots = |trace: &str| {
        let spans = receiver.wait_for_trace(trace, 2);
        let server = one(&spans, SERVER);
        assert_eq!(
            server.parent_span_id, "",
            "a new trace starts at the SERVER span: {server:#?}"
        );
    };

    let fresh = sent_trace(&[]);
    assert_ne!(fresh, "0".repeat(32));
    roots(&fresh);
    let invalid = sent_trace(&[("traceparent", "00-zzzz-00f067aa0ba902b7-01")]);
    roots(&invalid);
    let all_zero = sent_trace(&[(
        "traceparent",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    )]);
    assert_ne!(all_zero, "0".repeat(32));
    roots(&all_zero);

    // trust_incoming: false, by reload: a valid traceparent is ignored.
    let version = gateway.config_version();
    gateway.write_config_edited(&rest, |text| {
        text.replace(
            "access.log\" } }",
            &format!(
                "access.log\" }}, {} }}",
                tracing(
                    &receiver.endpoint(),
                    ", sample_ratio: 1.0, trust_incoming: false"
                )
            ),
        )
    });
    gateway.wait_for_version_above(version);
    let ignored = sent_trace(&[("traceparent", &traceparent(TRACE))]);
    assert_ne!(ignored, TRACE);
    roots(&ignored);
}

#[test]
fn refusals_retries_and_failures_carry_their_events_and_status() {
    let receiver = Receiver::start();
    let good = Target::start("good");
    let flaky = Target::start("flaky");
    flaky.set_status(503);
    // A port nothing listens on, outside the range test servers get theirs from.
    let dead_address: std::net::SocketAddr = format!("127.0.0.1:{}", crate::support::free_port())
        .parse()
        .unwrap();
    let key = "trace-test-key";
    let gateway = Gateway::start_with_telemetry(
        &tracing(&receiver.endpoint(), ", sample_ratio: 0.0"),
        &format!(
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
    filters:
      - {{ kind: api_key, config: {{ header: x-api-key }} }}
      - kind: rate_limit
        config:
          policies: [{{ name: per-consumer, key: [consumer], capacity: 1, refill: {{ tokens: 1, every: 1h }} }}]
  - name: retried
    match: {{ paths: [{{ prefix: /retried }}] }}
    upstream: pair
    retry: {{ attempts: 2, statuses: [503] }}
  - name: broken
    match: {{ paths: [{{ prefix: /broken }}] }}
    upstream: gone
    retry: {{ attempts: 1 }}
"#,
            hash = sha256_hex(key.as_bytes()),
            good = good.address,
            flaky = flaky.address,
        ),
    );
    // Each request in a trace of its own, sampled by its caller.
    let traced = |trace: &str, path: &str, headers: &[(&str, &str)]| {
        let parent = traceparent(trace);
        let mut all = vec![("traceparent", parent.as_str())];
        all.extend_from_slice(headers);
        gateway.request("GET", path, &all, b"").status
    };
    let unknown = format!("{:032x}", 1);
    let admitted = format!("{:032x}", 2);
    let limited = format!("{:032x}", 3);
    let failed = format!("{:032x}", 4);
    assert_eq!(traced(&unknown, "/keyed/a", &[("x-api-key", "wrong")]), 401);
    assert_eq!(traced(&admitted, "/keyed/a", &[("x-api-key", key)]), 200);
    assert_eq!(traced(&limited, "/keyed/a", &[("x-api-key", key)]), 429);
    assert_eq!(traced(&failed, "/broken/a", &[]), 502);

    let server = one(&receiver.wait_for_trace(&unknown, 1), SERVER);
    let auth = server.event("auth").expect("an auth event");
    assert_eq!(auth["gatehouse.auth.method"], "api_key");
    assert_eq!(auth["gatehouse.auth.result"], "unknown_key");
    assert_eq!(server.attribute("http.response.status_code"), Some("401"));
    assert_eq!(server.attribute("gatehouse.source"), Some("gateway"));

    let spans = receiver.wait_for_trace(&admitted, 2);
    let server = one(&spans, SERVER);
    assert_eq!(server.event("auth").unwrap()["gatehouse.auth.result"], "ok");
    let rate = server.event("rate_limit").expect("a rate_limit event");
    assert_eq!(rate["gatehouse.rate_limit.result"], "allowed");
    assert_eq!(rate["gatehouse.rate_limit.remaining"], "0");
    assert_eq!(server.attribute("gatehouse.consumer"), Some("alice"));

    let server = one(&receiver.wait_for_trace(&limited, 1), SERVER);
    let rate = server.event("rate_limit").expect("a rate_limit event");
    assert_eq!(rate["gatehouse.rate_limit.result"], "limited");
    assert_eq!(rate["gatehouse.rate_limit.policy"], "per-consumer");

    // 5xx: the SERVER span is an error, and so is the attempt whose connection was refused.
    let spans = receiver.wait_for_trace(&failed, 2);
    assert_eq!(one(&spans, SERVER).status, 2, "{spans:#?}");
    let attempt = one(&spans, CLIENT);
    assert_eq!(attempt.status, 2, "{attempt:#?}");
    assert!(attempt.attribute("error.type").is_some(), "{attempt:#?}");

    // A retry: two CLIENT spans, siblings under the SERVER span; the second is a resend.
    let mut retried = None;
    for round in 10..20 {
        let trace = format!("{round:032x}");
        let before = flaky.requests();
        assert_eq!(traced(&trace, "/retried/a", &[]), 200);
        if flaky.requests() > before {
            retried = Some(trace);
            break;
        }
    }
    let trace = retried.expect("round robin sent a first attempt to the 503 target");
    let spans = receiver.wait_for_trace(&trace, 3);
    let server = one(&spans, SERVER);
    assert!(server.event("retry").is_some(), "{server:#?}");
    let attempts: Vec<&ReceivedSpan> = spans.iter().filter(|span| span.kind == CLIENT).collect();
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    assert!(attempts
        .iter()
        .all(|span| span.parent_span_id == server.span_id));
    let first = attempts
        .iter()
        .find(|span| span.attribute("http.request.resend_count").is_none())
        .expect("the first attempt");
    assert_eq!(first.attribute("http.response.status_code"), Some("503"));
    assert_eq!(first.status, 2);
    let second = attempts
        .iter()
        .find(|span| span.attribute("http.request.resend_count") == Some("1"))
        .expect("the resend");
    assert_eq!(second.attribute("http.response.status_code"), Some("200"));
}

#[test]
fn a_black_holed_collector_costs_requests_nothing_and_its_dropped_spans_are_counted() {
    let collector = Blackhole::start();
    let target = Target::start("t");
    let gateway = Gateway::start_with_telemetry(
        &tracing(
            &format!("http://{}/v1/traces", collector.address),
            ", sample_ratio: 1.0, max_queue: 4, max_batch: 2, export_timeout: 1s",
        ),
        &format!(
            r#"
upstreams: [{{ name: api, targets: [{{ address: "{target}" }}] }}]
routes: [{{ name: all, match: {{ paths: [{{ prefix: / }}] }}, upstream: api }}]
"#,
            target = target.address
        ),
    );
    for _ in 0..50 {
        assert_eq!(gateway.get("/x").status, 200);
    }
    // 100 spans into a queue of 4 behind an exporter stuck on its first connection.
    let dropped = |text: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix("gatehouse_trace_spans_dropped_total "))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let metrics = gateway.metrics();
    assert!(dropped(&metrics) >= 80.0, "{metrics}");
}

#[test]
fn a_reload_changes_the_sample_ratio() {
    let receiver = Receiver::start();
    let target = Target::start("t");
    let rest = format!(
        r#"
upstreams: [{{ name: api, targets: [{{ address: "{target}" }}] }}]
routes: [{{ name: all, match: {{ paths: [{{ prefix: / }}] }}, upstream: api }}]
"#,
        target = target.address
    );
    // The collector's base URL this time (`otlp_endpoint`): /v1/traces is added.
    let with_ratio = |ratio: &str| {
        let telemetry = format!(
            "tracing: {{ otlp_endpoint: \"http://{}\", sample_ratio: {ratio} }}",
            receiver.address
        );
        move |text: String| {
            text.replace(
                "access.log\" } }",
                &format!("access.log\" }}, {telemetry} }}"),
            )
        }
    };
    let gateway = Gateway::start_edited(&rest, with_ratio("0.0"));
    for _ in 0..10 {
        assert_eq!(gateway.get("/unsampled").status, 200);
    }
    // A sampled caller's trace as a marker: once it is in, nothing else was recorded.
    let marker = format!("{:032x}", 99);
    let parent = traceparent(&marker);
    gateway.request("GET", "/marker", &[("traceparent", &parent)], b"");
    receiver.wait_for_trace(&marker, 2);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        receiver.spans().iter().all(|span| span.trace_id == marker),
        "{:#?}",
        receiver.spans()
    );

    let version = gateway.config_version();
    gateway.write_config_edited(&rest, with_ratio("1.0"));
    gateway.wait_for_version_above(version);
    assert_eq!(gateway.get("/sampled").status, 200);
    let spans = receiver.wait_for(4);
    assert!(
        spans
            .iter()
            .any(|span| span.attribute("url.path") == Some("/sampled")),
        "{spans:#?}"
    );
}

#[test]
fn spans_still_queued_are_exported_when_the_process_stops() {
    let receiver = Receiver::start();
    let target = Target::start("t");
    let mut gateway = Gateway::start_with_telemetry(
        &tracing(&receiver.endpoint(), ", sample_ratio: 1.0, max_batch: 512"),
        &format!(
            r#"
upstreams: [{{ name: api, targets: [{{ address: "{target}" }}] }}]
routes: [{{ name: all, match: {{ paths: [{{ prefix: / }}] }}, upstream: api }}]
"#,
            target = target.address
        ),
    );
    let trace = format!("{:032x}", 7);
    let parent = traceparent(&trace);
    assert_eq!(
        gateway
            .request("GET", "/last", &[("traceparent", &parent)], b"")
            .status,
        200
    );
    // At once, well before a batch would be due: a fast shutdown.
    crate::support::signal_pid(gateway.pid(), "INT");
    let status = gateway.wait_exit(Duration::from_secs(10));
    assert!(status.is_some(), "gatehouse did not exit");
    assert!(
        receiver.spans().iter().any(|span| span.trace_id == trace),
        "{:#?}",
        receiver.spans()
    );
}

#[test]
fn validate_explains_a_tracing_section_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tracing.yaml");
    std::fs::write(
        &file,
        r#"
version: 1
server:
  listeners: [{ name: public, address: "127.0.0.1:8080" }]
telemetry:
  log: { level: "info,[" }
  tracing:
    endpoint: http://127.0.0.1:4318/v1/traces
    otlp_endpoint: http://127.0.0.1:4318
    sample_ratio: 1.5
    max_queue: 10
    max_batch: 20
    export_timeout: 0s
upstreams: [{ name: app, targets: [{ address: "127.0.0.1:9001" }] }]
routes: [{ name: app, match: { paths: [{ prefix: / }] }, upstream: app }]
"#,
    )
    .unwrap();
    let (code, _, stderr) =
        crate::support::run_cli(&["validate", file.to_str().unwrap()], dir.path());
    assert_eq!(code, 1, "{stderr}");
    // A collector behind TLS is named as such.
    let https = dir.path().join("https.yaml");
    std::fs::write(
        &https,
        std::fs::read_to_string(&file).unwrap().replace(
            "    endpoint: http://127.0.0.1:4318/v1/traces\n    otlp_endpoint: http://127.0.0.1:4318\n",
            "    otlp_endpoint: https://collector.example:4318\n",
        ),
    )
    .unwrap();
    let (_, _, https_errors) =
        crate::support::run_cli(&["validate", https.to_str().unwrap()], dir.path());
    assert!(
        https_errors
            .contains("telemetry.tracing.otlp_endpoint: the exporter speaks plain HTTP only"),
        "{https_errors}"
    );
    for expected in [
        "telemetry.tracing.endpoint: give either `endpoint`",
        "telemetry.tracing.sample_ratio: must be between 0.0 and 1.0",
        "telemetry.tracing.max_batch: max_queue and max_batch must be at least 1",
        "telemetry.tracing.export_timeout: must be more than 0s",
        "telemetry.log.level: not a level",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn an_open_circuit_and_a_skipped_transform_are_events_of_the_request() {
    let receiver = Receiver::start();
    let failing = Target::start("failing");
    failing.set_status(500);
    // Declared JSON, but not JSON: the json_body filter lets it through unchanged.
    let broken_json = Recorder::start(&[("Content-Type", "application/json")], "{not json");
    let gateway = Gateway::start_with_telemetry(
        &tracing(&receiver.endpoint(), ", sample_ratio: 1.0"),
        &format!(
            r#"
upstreams:
  - name: failing
    targets: [{{ address: "{failing}" }}]
    circuit_breaker: {{ failure_rate: {{ threshold: 50%, min_requests: 5, window: 10s }}, open_duration: 30s }}
  - {{ name: broken, targets: [{{ address: "{broken}" }}] }}
routes:
  - {{ name: guarded, match: {{ paths: [{{ prefix: /guarded }}] }}, upstream: failing }}
  - name: reshaped
    match: {{ paths: [{{ prefix: /reshaped }}] }}
    upstream: broken
    filters: [{{ kind: json_body, config: {{ response: [{{ op: set, path: /gateway, value: gatehouse }}] }} }}]
"#,
            failing = failing.address,
            broken = broken_json.address,
        ),
    );
    for _ in 0..5 {
        assert_eq!(gateway.get("/guarded").status, 500);
    }
    let refused = format!("{:032x}", 21);
    let parent = traceparent(&refused);
    let reply = gateway.request("GET", "/guarded", &[("traceparent", &parent)], b"");
    assert_eq!(reply.status, 503, "{}", reply.text());
    let server = one(&receiver.wait_for_trace(&refused, 1), SERVER);
    let circuit = server.event("circuit_open").expect("a circuit_open event");
    assert_eq!(circuit["gatehouse.upstream"], "failing");
    assert_eq!(circuit["gatehouse.circuit.state"], "open");
    assert_eq!(server.status, 2, "a 503 is an error: {server:#?}");

    let skipped = format!("{:032x}", 22);
    let parent = traceparent(&skipped);
    let reply = gateway.request("GET", "/reshaped", &[("traceparent", &parent)], b"");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "{not json");
    let server = one(&receiver.wait_for_trace(&skipped, 2), SERVER);
    let event = server
        .event("transform_skipped")
        .expect("a transform_skipped event");
    assert_eq!(event["gatehouse.transform.reason"], "invalid_json");
}
