//! The `json_body` filter's price per body: a response of 1 KiB and of 64 KiB rewritten by one
//! `set`, and by three operations (set, remove, rename), as the proxy runs them (request head,
//! response head, the whole body as one piece), plain and gzip-encoded; and the request side on
//! 1 KiB.

use std::time::Instant;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use gatehouse_filters::codec::{self, Coding};
use gatehouse_filters::{BuildCtx, Filter, Registry, RequestContext};
use pingora_http::{RequestHeader, ResponseHeader};
use serde_json::json;

fn filter(config: serde_json::Value) -> std::sync::Arc<dyn Filter> {
    Registry::builtin()
        .build("json_body", &config, &BuildCtx::default())
        .unwrap_or_else(|errors| panic!("the json_body bench config is refused: {errors:?}"))
}

fn request() -> RequestHeader {
    let mut request = RequestHeader::build("POST", b"/orders", None).unwrap();
    request.insert_header("host", "api.example.com").unwrap();
    request
}

/// One response through the filter: request head, response head, body; the bytes sent.
fn respond(filter: &dyn Filter, body: &Bytes, coding: Option<&str>) -> Option<Bytes> {
    let mut ctx = RequestContext::new(Instant::now());
    let mut head = request();
    filter.try_request(&mut head, &mut ctx);
    let mut response = ResponseHeader::build(200, None).unwrap();
    response
        .insert_header("content-type", "application/json")
        .unwrap();
    if let Some(coding) = coding {
        response.insert_header("content-encoding", coding).unwrap();
    }
    filter.response(&mut response, &mut ctx);
    let mut piece = Some(body.clone());
    filter.response_body(&mut piece, true, &mut ctx);
    piece
}

fn responses(criterion: &mut Criterion) {
    let one =
        filter(json!({ "response": [{ "op": "set", "path": "/gateway", "value": "gatehouse" }] }));
    let three = filter(json!({ "response": [
        { "op": "set", "path": "/gateway", "value": "gatehouse" },
        { "op": "remove", "path": "/paid" },
        { "op": "rename", "from": "/status", "path": "/state" },
    ] }));
    let mut group = criterion.benchmark_group("json_body_response");
    for size in [1usize << 10, 64 << 10] {
        let body = gatehouse_loadtest::json_body(size);
        let gzipped = Bytes::from(codec::encode(Coding::Gzip, &body));
        assert!(respond(&*one, &body, None)
            .unwrap()
            .ends_with(b",\"gateway\":\"gatehouse\"}"));
        group.bench_with_input(BenchmarkId::new("one_set", size), &body, |bencher, body| {
            bencher.iter(|| black_box(respond(&*one, body, None)))
        });
        group.bench_with_input(
            BenchmarkId::new("three_ops", size),
            &body,
            |bencher, body| bencher.iter(|| black_box(respond(&*three, body, None))),
        );
        group.bench_with_input(
            BenchmarkId::new("one_set_gzip", size),
            &gzipped,
            |bencher, body| bencher.iter(|| black_box(respond(&*one, body, Some("gzip")))),
        );
    }
    group.finish();
}

fn requests(criterion: &mut Criterion) {
    let filter = filter(json!({ "request": [
        { "op": "set", "path": "/tenant", "value": "${request.header.host}" },
        { "op": "remove", "path": "/paid" },
        { "op": "rename", "from": "/status", "path": "/state" },
    ] }));
    let body = gatehouse_loadtest::json_body(1 << 10);
    let length = body.len().to_string();
    criterion.bench_function("json_body_request/three_ops/1024", |bencher| {
        bencher.iter(|| {
            let mut ctx = RequestContext::new(Instant::now());
            let mut head = request();
            head.insert_header("content-type", "application/json")
                .unwrap();
            head.insert_header("content-length", length.as_str())
                .unwrap();
            filter.try_request(&mut head, &mut ctx);
            let mut piece = Some(body.clone());
            filter.request_body(&mut piece, true, &mut ctx).unwrap();
            black_box(piece)
        })
    });
}

criterion_group!(benches, responses, requests);
criterion_main!(benches);
