//! The `grpc_json` filter's price per call, for a message of about 1 KiB: the JSON request to a
//! gRPC frame (request head and body, as the proxy runs them), and a gRPC reply frame back to
//! JSON (response head, body, trailers).

use std::time::Instant;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gatehouse_filters::{BuildCtx, Filter, Registry, RequestContext};
use pingora_http::{RequestHeader, ResponseHeader};
use serde_json::json;

fn filter() -> std::sync::Arc<dyn Filter> {
    let root = env!("CARGO_MANIFEST_DIR");
    let path = format!("{root}/conf/grpc/echo.pb");
    let sum = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&path).unwrap()))
    };
    Registry::builtin()
        .build(
            "grpc_json",
            &json!({ "descriptor": path, "sha256": sum }),
            &BuildCtx::default(),
        )
        .unwrap_or_else(|errors| panic!("the grpc_json bench config is refused: {errors:?}"))
}

/// A `SayRequest` of about 1 KiB in JSON, every kind of field set.
fn body() -> Bytes {
    let value = json!({
        "text": "a".repeat(900),
        "count": "9007199254740993",
        "when": "2026-12-06T01:02:03.500Z",
        "wait": "1.500s",
        "limit": 7,
        "mood": "HAPPY",
    });
    Bytes::from(value.to_string())
}

fn request(body: &Bytes) -> RequestHeader {
    let mut request = RequestHeader::build("POST", b"/v1/say", None).unwrap();
    request.insert_header("host", "api.example.com").unwrap();
    request
        .insert_header("content-type", "application/json")
        .unwrap();
    request.insert_header("content-length", body.len()).unwrap();
    request
}

/// The request through the filter: its head, then its body as one piece; the frame sent.
fn to_frame(filter: &dyn Filter, body: &Bytes, ctx: &mut RequestContext) -> Bytes {
    let mut head = request(body);
    filter.try_request(&mut head, ctx);
    let mut piece = Some(body.clone());
    filter.request_body(&mut piece, true, ctx).unwrap();
    piece.unwrap()
}

/// The reply through the filter: head, the frame, trailers; the JSON sent.
fn to_json(filter: &dyn Filter, frame: &Bytes, ctx: &mut RequestContext) -> Vec<u8> {
    let mut response = ResponseHeader::build(200, None).unwrap();
    response
        .insert_header("content-type", "application/grpc")
        .unwrap();
    filter.response(&mut response, ctx);
    let mut out = Vec::new();
    let mut piece = Some(frame.clone());
    filter.response_body(&mut piece, false, ctx);
    out.extend_from_slice(piece.as_deref().unwrap_or_default());
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    if let Some(last) = filter.response_trailers(&mut trailers, ctx) {
        out.extend_from_slice(&last);
    }
    out
}

fn bench(c: &mut Criterion) {
    let filter = filter();
    let body = body();
    // SayReply shares SayRequest's field numbers, so the request's frame is a valid reply.
    let frame = to_frame(&*filter, &body, &mut RequestContext::new(Instant::now()));
    let json = to_json(&*filter, &frame, &mut {
        let mut ctx = RequestContext::new(Instant::now());
        to_frame(&*filter, &body, &mut ctx);
        ctx
    });
    let reply: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(reply["count"], "9007199254740993", "{reply}");
    let mut group = c.benchmark_group("grpc_json_1KiB");
    group.bench_function("json_to_protobuf", |b| {
        b.iter(|| {
            let mut ctx = RequestContext::new(Instant::now());
            black_box(to_frame(&*filter, black_box(&body), &mut ctx))
        })
    });
    group.bench_function("round_trip", |b| {
        b.iter(|| {
            let mut ctx = RequestContext::new(Instant::now());
            to_frame(&*filter, black_box(&body), &mut ctx);
            black_box(to_json(&*filter, black_box(&frame), &mut ctx))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
