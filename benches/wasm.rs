//! The price of a `wasm` filter on a request: one `on_request_headers` call doing three header
//! operations (read `x-tenant`, add `x-plugin`, remove `x-debug`), with the request's whole
//! plugin lifecycle around it (instance checkout, context create, done/log/delete, give
//! back), against the native `headers` filter doing the same; and the SDK-built `add_header`
//! example (a JSON plugin_config, one header added).

use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gatehouse_filters::{BuildCtx, Filter, Registry, RequestContext};
use pingora_http::RequestHeader;
use sha2::{Digest, Sha256};

const THREE_OPS: &str = r#"(module
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 8192))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32) (local $at i32)
    global.get $heap local.set $at
    global.get $heap local.get $size i32.add global.set $heap
    local.get $at)
  (func (export "proxy_on_context_create") (param i32 i32) (global.set $heap (i32.const 8192)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $get (i32.const 0) (i32.const 1024) (i32.const 8) (i32.const 2000) (i32.const 2004)))
    (drop (call $add (i32.const 0) (i32.const 1040) (i32.const 8) (i32.const 1056) (i32.const 9)))
    (drop (call $remove (i32.const 0) (i32.const 1072) (i32.const 7)))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
  (data (i32.const 1024) "x-tenant")
  (data (i32.const 1040) "x-plugin")
  (data (i32.const 1056) "gatehouse")
  (data (i32.const 1072) "x-debug"))"#;

fn registry() -> Registry {
    let mut registry = Registry::builtin();
    registry.register::<gatehouse_wasm::Wasm>();
    registry
}

fn module_file(name: &str, bytes: &[u8]) -> (String, String) {
    let path = std::env::temp_dir().join(format!(
        "gatehouse-bench-{name}-{}.wasm",
        std::process::id()
    ));
    std::fs::write(&path, bytes).unwrap();
    (
        path.to_string_lossy().into_owned(),
        hex::encode(Sha256::digest(bytes)),
    )
}

fn request() -> RequestHeader {
    let mut request = RequestHeader::build("GET", b"/v2/orders/42?page=3", None).unwrap();
    request.insert_header("host", "api.example.com").unwrap();
    request.insert_header("x-tenant", "acme").unwrap();
    request.insert_header("x-debug", "1").unwrap();
    request.insert_header("accept", "application/json").unwrap();
    request
}

fn one_request(filter: &dyn Filter, template: &RequestHeader) {
    let mut request = template.clone();
    let mut ctx = RequestContext::new(Instant::now());
    let decision = filter.try_request(&mut request, &mut ctx);
    black_box(&decision);
    black_box(&request);
    // The request ends: the plugin's context is deleted and the instance given back.
    drop(ctx);
}

fn wasm(criterion: &mut Criterion) {
    let registry = registry();
    let build = BuildCtx::default();
    let (path, sha256) = module_file("three", &wat::parse_str(THREE_OPS).unwrap());
    let three = registry
        .build(
            "wasm",
            &serde_json::json!({"path": path, "sha256": sha256}),
            &build,
        )
        .unwrap();
    let native = registry
        .build(
            "headers",
            &serde_json::json!({"request": {"set": {"x-plugin": "gatehouse"}, "remove": ["x-debug"]}}),
            &build,
        )
        .unwrap();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/wasm/examples");
    let sdk_path = format!("{examples}/add_header/add_header.wasm");
    let sdk_bytes = std::fs::read(&sdk_path).unwrap();
    let sdk = registry
        .build(
            "wasm",
            &serde_json::json!({
                "path": sdk_path,
                "sha256": hex::encode(Sha256::digest(&sdk_bytes)),
                "plugin_config": {"name": "x-plugin", "value": "gatehouse"},
            }),
            &build,
        )
        .unwrap();
    let template = request();
    let mut group = criterion.benchmark_group("wasm_request_headers");
    group.bench_function("wat_three_header_ops", |bencher| {
        bencher.iter(|| one_request(three.as_ref(), &template))
    });
    group.bench_function("sdk_add_header", |bencher| {
        bencher.iter(|| one_request(sdk.as_ref(), &template))
    });
    group.bench_function("native_headers_filter", |bencher| {
        bencher.iter(|| one_request(native.as_ref(), &template))
    });
    group.finish();
}

criterion_group!(benches, wasm);
criterion_main!(benches);
