//! REST/JSON clients calling the gRPC example service through the `grpc_json` filter, with a
//! real `grpcio` server (tests/grpc/peer.py) behind the gateway.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::grpc::{descriptor, descriptor_extra, sha256, GrpcServer};
use crate::support::load::OpenLoop;
use crate::support::Gateway;

fn config(server: SocketAddr, descriptor: &Path) -> String {
    format!(
        r#"
upstreams:
  - {{ name: grpc, protocol: h2, targets: [{{ address: "{server}" }}] }}
routes:
  - name: rest
    match: {{ paths: [{{ prefix: /v1/ }}] }}
    upstream: grpc
    filters:
      - {{ kind: request_limits, config: {{ max_body_bytes: 2KiB }} }}
      - kind: grpc_json
        config: {{ descriptor: "{path}", sha256: "{sum}", reject_unknown_methods: true }}
  - name: lines
    match: {{ paths: [{{ prefix: /ndjson/ }}] }}
    upstream: grpc
    strip_prefix: /ndjson
    filters:
      - kind: grpc_json
        config: {{ descriptor: "{path}", sha256: "{sum}", streaming: ndjson }}
"#,
        path = descriptor.display(),
        sum = sha256(descriptor),
    )
}

fn post(gateway: &Gateway, path: &str, body: &Value) -> crate::support::Reply {
    gateway.request(
        "POST",
        path,
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

#[test]
fn rest_calls_get_the_grpc_services_answers_as_json() {
    let server = GrpcServer::start();
    let gateway = Gateway::start(&config(server.addr, &descriptor()));

    // POST with a body: the proto3 JSON mapping both ways (int64 as a string, Timestamp,
    // Duration, a wrapper, an enum by name).
    let sent = json!({
        "text": "hi", "count": "9007199254740993", "when": "2026-12-06T01:02:03.500Z",
        "wait": "1.500s", "limit": 7, "mood": "HAPPY"
    });
    let reply = post(&gateway, "/v1/say", &sent);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    for field in ["text", "count", "when", "wait", "limit", "mood"] {
        assert_eq!(body[field], sent[field], "{field}: {body}");
    }
    // The service got a gRPC call: its metadata went with it.
    let reply = gateway.request(
        "POST",
        "/v1/say",
        &[
            ("content-type", "application/json"),
            ("authorization", "Bearer t"),
        ],
        b"{\"text\":\"x\"}",
    );
    assert_eq!(reply.json()["authorization"], "Bearer t", "{reply:?}");

    // GET with path and query bindings (answered by the filter's own call: no body).
    let reply = gateway.get("/v1/items/42?view=full");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.json(),
        json!({"id": "42", "name": "item 42", "view": "full"})
    );
    let reply = gateway.get("/v1/shelves/s1/items/7");
    assert_eq!(reply.json()["view"], "s1", "{reply:?}");

    // Server streaming: 50 messages, in order, as a JSON array, or as NDJSON.
    let reply = post(&gateway, "/v1/items:list", &json!({"count": 50}));
    assert_eq!(reply.status, 200, "{reply:?}");
    let items = reply.json();
    let items = items.as_array().unwrap();
    assert_eq!(items.len(), 50);
    for (index, item) in items.iter().enumerate() {
        assert_eq!(item["name"], format!("item {index}"));
    }
    let reply = post(&gateway, "/ndjson/v1/items:list", &json!({"count": 50}));
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = reply
        .text()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 50);
    assert_eq!(lines[49]["name"], "item 49");
}

#[test]
fn grpc_errors_map_to_their_http_statuses_and_bad_json_names_the_field() {
    let server = GrpcServer::start();
    let gateway = Gateway::start(&config(server.addr, &descriptor()));
    for (code, name, status) in [
        (3, "INVALID_ARGUMENT", 400),
        (16, "UNAUTHENTICATED", 401),
        (7, "PERMISSION_DENIED", 403),
        (5, "NOT_FOUND", 404),
        (6, "ALREADY_EXISTS", 409),
        (8, "RESOURCE_EXHAUSTED", 429),
        (12, "UNIMPLEMENTED", 501),
        (14, "UNAVAILABLE", 503),
        (4, "DEADLINE_EXCEEDED", 504),
        (13, "INTERNAL", 500),
    ] {
        let message = format!("no, {name} (ünïcode kept)");
        let reply = post(
            &gateway,
            "/v1/fail",
            &json!({"code": code, "message": message}),
        );
        assert_eq!(reply.status, status, "{name}: {reply:?}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
        let problem = reply.json();
        assert_eq!(problem["detail"], message, "{problem}");
        assert_eq!(problem["grpc_status"], name, "{problem}");
        assert_eq!(problem["status"], status, "{problem}");
    }

    // A wrong type: 400, naming the field.
    let reply = post(&gateway, "/v1/say", &json!({"text": "a", "count": "many"}));
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("count"),
        "{reply:?}"
    );
    let reply = post(&gateway, "/v1/say", &json!({"when": "yesterday"}));
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("when"),
        "{reply:?}"
    );
    // An unknown field, and JSON that is not JSON.
    let reply = post(&gateway, "/v1/say", &json!({"txet": "a"}));
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("txet"),
        "{reply:?}"
    );
    let reply = gateway.request(
        "POST",
        "/v1/say",
        &[("content-type", "application/json")],
        b"{\"text\": ",
    );
    assert_eq!(reply.status, 400, "{reply:?}");
    // A path binding of the wrong type, and an unknown query parameter.
    let reply = gateway.get("/v1/items/forty-two");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("id"),
        "{reply:?}"
    );
    let reply = gateway.get("/v1/items/42?colour=red");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply.json()["detail"].as_str().unwrap().contains("colour"),
        "{reply:?}"
    );
    // Over the route's body limit: 413.
    let reply = post(&gateway, "/v1/say", &json!({"text": "x".repeat(4096)}));
    assert_eq!(reply.status, 413, "{reply:?}");
    // The same, chunked (counted while the service already has the call): 413, at once.
    let started = std::time::Instant::now();
    let text = "x".repeat(3000);
    let chunk = format!("{{\"text\":\"{text}\"}}");
    let raw = format!(
        "POST /v1/say HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let reply = crate::support::send_raw(gateway.addr, raw.as_bytes()).unwrap();
    assert_eq!(reply.status, 413, "{reply:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // No service ever saw the refused requests, and nothing was lost: the gateway still serves.
    assert_eq!(
        post(&gateway, "/v1/say", &json!({"text": "ok"})).status,
        200
    );
}

#[test]
fn a_reloaded_descriptor_set_adds_a_method_under_load() {
    let server = GrpcServer::start();
    let gateway = Gateway::start(&config(server.addr, &descriptor()));
    assert_eq!(
        post(&gateway, "/v1/shout", &json!({"text": "a"})).status,
        404
    );
    let load = OpenLoop::start(
        gateway.addr,
        "/v1/items/5",
        100.0,
        Duration::from_secs(4),
        8,
    );
    std::thread::sleep(Duration::from_secs(1));
    let version = gateway.config_version();
    gateway.write_config(&config(server.addr, &descriptor_extra()));
    gateway.wait_for_version_above(version);
    let reply = post(&gateway, "/v1/shout", &json!({"text": "loud"}));
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["text"], "LOUD");
    let outcomes = load.finish();
    let failed: Vec<_> = outcomes.iter().filter(|outcome| !outcome.ok()).collect();
    assert!(outcomes.len() >= 350, "{}", outcomes.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );

    // A descriptor set that does not match its SHA-256 is refused, and the last good one stays.
    let version = gateway.config_version();
    gateway.write_config(
        &config(server.addr, &descriptor())
            .replace(&sha256(&descriptor()), &sha256(&descriptor_extra())),
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(gateway.config_version(), version);
    assert_eq!(
        post(&gateway, "/v1/shout", &json!({"text": "a"})).status,
        200
    );
}
