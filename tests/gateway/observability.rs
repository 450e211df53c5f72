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
