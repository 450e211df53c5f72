//! Template rendering, the per-request price of `${...}` values: a literal (no rendering at
//! all), one variable, a header value built from the context, a claim, a query parameter and a
//! path capture, and the `headers` filter applying three request and three response
//! operations as the proxy runs them.

use std::sync::Arc;
use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gatehouse_filters::template::Template;
use gatehouse_filters::{BuildCtx, Consumer, Registry, RequestContext};
use pingora_http::{RequestHeader, ResponseHeader};
use serde_json::json;

fn request() -> RequestHeader {
    let mut request =
        RequestHeader::build("GET", b"/v2/orders/42?tenant=acme&page=3", None).unwrap();
    request.insert_header("host", "api.example.com").unwrap();
    request.insert_header("x-tenant", "acme").unwrap();
    request.insert_header("accept", "application/json").unwrap();
    request
}

fn context() -> RequestContext {
    let mut ctx = RequestContext::new(Instant::now());
    ctx.set_request_id("0b6f2c3e-4d5a-4e6f-8a7b-9c0d1e2f3a4b".into());
    ctx.route = Some("orders".into());
    ctx.consumer = Some(Consumer {
        id: "acme".into(),
        username: Some("acme-corp".into()),
        tags: Arc::from(Vec::new()),
    });
    ctx.claims = Some(Arc::new(
        json!({ "sub": "alice", "tier": "gold", "exp": 2_000_000_000u64 }),
    ));
    ctx.path_captures = vec![("id".into(), "42".into())];
    ctx
}

fn render(criterion: &mut Criterion) {
    let request = request();
    let mut ctx = context();
    let mut group = criterion.benchmark_group("template_render");
    for (name, text) in [
        ("literal", "gatehouse"),
        ("one_variable", "${consumer.id}"),
        (
            "header_value",
            "${consumer.id}/${request.header.x-tenant}; route=${route}",
        ),
        ("claim", "tier=${jwt.claim.tier}"),
        (
            "query_and_capture",
            "${query.tenant}:${path.id}:${host}:${method}",
        ),
        ("request_id", "${request_id}"),
    ] {
        let template = Template::parse(text).unwrap();
        group.bench_function(name, |bencher| {
            bencher.iter(|| {
                black_box(match template.as_literal() {
                    Some(literal) => literal.to_string(),
                    None => template.render_from(&mut ctx, &request),
                })
            })
        });
    }
    group.finish();
}

fn headers_filter(criterion: &mut Criterion) {
    let filter = Registry::builtin()
        .build(
            "headers",
            &json!({
                "request": {
                    "set": { "x-tenant": "${consumer.id}" },
                    "add": { "x-gateway": "gatehouse" },
                    "remove": ["x-debug"],
                },
                "response": {
                    "set": { "x-served-by": "gatehouse" },
                    "append": { "x-route": "${route}" },
                    "remove": ["server"],
                },
            }),
            &BuildCtx::default(),
        )
        .unwrap_or_else(|errors| panic!("the headers bench config is refused: {errors:?}"));
    let client = request();
    let mut ctx = context();
    criterion.bench_function("headers_filter/three_request_three_response", |bencher| {
        bencher.iter(|| {
            let mut upstream = client.clone();
            filter.upstream_request(&mut upstream, &mut ctx);
            let mut response = ResponseHeader::build(200, None).unwrap();
            response.insert_header("server", "upstream").unwrap();
            filter.response(&mut response, &mut ctx);
            black_box((upstream, response))
        })
    });
}

criterion_group!(benches, render, headers_filter);
criterion_main!(benches);
