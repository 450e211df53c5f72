//! The proxy-wasm ABI as a module sees it, with small modules written in WAT (no wasm target
//! needed): header maps and pseudo-headers, local responses, properties, isolation, and the
//! faults a module can have (trap, endless loop, unbounded memory, size caps), each stopped
//! and answered by the fail policy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gatehouse_filters::{BuildCtx, Decision, Filter, FilterKind, Metrics, RequestContext};
use gatehouse_wasm::Wasm;
use pingora_http::RequestHeader;
use sha2::{Digest, Sha256};

/// Every import a test module may use.
const IMPORTS: &str = r#"
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
"#;

/// A module: memory, a bump allocator reset per request, `extra` functions and `data`.
fn module(on_request_headers: &str, extra: &str, data: &str) -> Vec<u8> {
    let text = String::from_utf8(module_text(on_request_headers, extra, data)).unwrap();
    wat::parse_str(&text).unwrap_or_else(|error| panic!("{error}\n{text}"))
}

/// The text of [`module`]; the `(import ...)` lines of `extra` go with the others, before
/// every definition, as WAT wants.
fn module_text(on_request_headers: &str, extra: &str, data: &str) -> Vec<u8> {
    let (imports, definitions): (Vec<&str>, Vec<&str>) = extra
        .lines()
        .partition(|line| line.trim_start().starts_with("(import "));
    let imports = imports.join("\n");
    let definitions = definitions.join("\n");
    format!(
        r#"(module {IMPORTS}
  {imports}
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 8192))
  (global $count (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32) (local $at i32)
    global.get $heap local.set $at
    global.get $heap local.get $size i32.add global.set $heap
    local.get $at)
  (func (export "proxy_on_context_create") (param i32 i32) (global.set $heap (i32.const 8192)))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    {on_request_headers})
  {definitions}
  {data})"#
    )
    .into_bytes()
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn write_module(bytes: &[u8]) -> (String, String) {
    let path = std::env::temp_dir().join(format!(
        "gatehouse-wasm-abi-{}-{}.wasm",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, bytes).unwrap();
    (
        path.to_string_lossy().into_owned(),
        hex::encode(Sha256::digest(bytes)),
    )
}

fn build(bytes: &[u8], extra: serde_json::Value, metrics: &Metrics) -> Result<Wasm, String> {
    build_named(bytes, "abi", extra, metrics)
}

/// Builds the filter from `bytes` under the plugin name `name` (shared data is per name).
fn build_named(
    bytes: &[u8],
    name: &str,
    extra: serde_json::Value,
    metrics: &Metrics,
) -> Result<Wasm, String> {
    let (path, sha256) = write_module(bytes);
    let mut config = serde_json::json!({"path": path, "sha256": sha256, "name": name});
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    let config: gatehouse_wasm::Config = serde_json::from_value(config).unwrap();
    let ctx = BuildCtx {
        metrics: metrics.clone(),
        ..BuildCtx::default()
    };
    let built = Wasm::build(config, &ctx).map_err(|errors| {
        errors
            .iter()
            .map(|error| error.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    });
    // The module is read once, at the build.
    let _ = std::fs::remove_file(&path);
    built
}

fn request(path: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut request = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
    request.insert_header("host", "api.example").unwrap();
    for (name, value) in headers {
        request.append_header(name.to_string(), *value).unwrap();
    }
    request
}

fn run(filter: &Wasm, request: &mut RequestHeader) -> (Decision, RequestContext) {
    let mut ctx = RequestContext::new(Instant::now());
    ctx.route = Some("orders".into());
    let decision = filter
        .try_request(request, &mut ctx)
        .expect("no call: decided at once");
    (decision, ctx)
}

fn header<'a>(request: &'a RequestHeader, name: &str) -> Option<&'a str> {
    request
        .headers
        .get(name)
        .map(|value| value.to_str().unwrap())
}

fn failures(metrics: &Metrics, reason: &str) -> u64 {
    let text = String::from_utf8(metrics.render()).unwrap();
    let row = format!("gatehouse_wasm_failures_total{{plugin=\"abi\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&row))
        .map_or(0, |count| count.trim().parse().unwrap())
}

#[test]
fn header_operations_reach_the_request_with_pseudo_headers() {
    // add x-added: yes; :path := /rewritten; remove x-remove; x-copy := x-in; x-method := :method
    let body = r#"
      (drop (call $add (i32.const 0) (i32.const 1024) (i32.const 7) (i32.const 1040) (i32.const 3)))
      (drop (call $get (i32.const 0) (i32.const 1056) (i32.const 4) (i32.const 2000) (i32.const 2004)))
      (drop (call $add (i32.const 0) (i32.const 1064) (i32.const 6) (i32.load (i32.const 2000)) (i32.load (i32.const 2004))))
      (drop (call $get (i32.const 0) (i32.const 1096) (i32.const 7) (i32.const 2000) (i32.const 2004)))
      (drop (call $add (i32.const 0) (i32.const 1104) (i32.const 8) (i32.load (i32.const 2000)) (i32.load (i32.const 2004))))
      (drop (call $replace (i32.const 0) (i32.const 1072) (i32.const 5) (i32.const 1080) (i32.const 10)))
      (drop (call $remove (i32.const 0) (i32.const 1120) (i32.const 8)))
      (i32.const 0)"#;
    let data = r#"
      (data (i32.const 1024) "x-added")
      (data (i32.const 1040) "yes")
      (data (i32.const 1056) "x-in")
      (data (i32.const 1064) "x-copy")
      (data (i32.const 1072) ":path")
      (data (i32.const 1080) "/rewritten")
      (data (i32.const 1096) ":method")
      (data (i32.const 1104) "x-method")
      (data (i32.const 1120) "x-remove")"#;
    let filter = build(
        &module(body, "", data),
        serde_json::json!({}),
        &Metrics::new(),
    )
    .unwrap();
    let mut request = request(
        "/original?q=1",
        &[("x-in", "copied value"), ("x-remove", "1")],
    );
    let (decision, _ctx) = run(&filter, &mut request);
    assert!(matches!(decision, Decision::Continue));
    assert_eq!(header(&request, "x-added"), Some("yes"));
    assert_eq!(header(&request, "x-copy"), Some("copied value"));
    assert_eq!(header(&request, "x-method"), Some("GET"));
    assert_eq!(header(&request, "x-remove"), None);
    assert_eq!(request.uri.to_string(), "/rewritten");
}

#[test]
fn a_map_read_and_written_back_whole_is_the_same_map() {
    // pairs -> set_pairs with the same bytes; then the serialised length as a header.
    let body = r#"
      (drop (call $pairs (i32.const 0) (i32.const 2000) (i32.const 2004)))
      (drop (call $set_pairs (i32.const 0) (i32.load (i32.const 2000)) (i32.load (i32.const 2004))))
      (i32.const 0)"#;
    let filter = build(
        &module(body, "", ""),
        serde_json::json!({}),
        &Metrics::new(),
    )
    .unwrap();
    let mut request = request("/a?b=c", &[("x-one", "1"), ("x-two", "2"), ("x-two", "3")]);
    let before: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_string()))
        .collect();
    let (decision, _ctx) = run(&filter, &mut request);
    assert!(matches!(decision, Decision::Continue));
    let after: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_string()))
        .collect();
    assert_eq!(before, after);
    assert_eq!(request.uri.to_string(), "/a?b=c");
}

#[test]
fn a_local_response_is_the_answer() {
    // Headers map: 1 pair, "content-type" (12) = "text/plain" (10).
    let body = r#"
      (drop (call $local (i32.const 418) (i32.const 0) (i32.const 0)
        (i32.const 1024) (i32.const 6) (i32.const 1100) (i32.const 37) (i32.const -1)))
      (i32.const 1)"#;
    let data = r#"
      (data (i32.const 1024) "teapot")
      (data (i32.const 1100) "\01\00\00\00\0c\00\00\00\0a\00\00\00content-type\00text/plain\00")"#;
    let filter = build(
        &module(body, "", data),
        serde_json::json!({}),
        &Metrics::new(),
    )
    .unwrap();
    let (decision, _ctx) = run(&filter, &mut request("/", &[]));
    let Decision::Respond(response) = decision else {
        panic!("{decision:?}")
    };
    assert_eq!(response.status, 418);
    assert_eq!(&response.body[..], b"teapot");
    assert_eq!(response.headers[0].0.as_str(), "content-type");
    assert_eq!(response.headers[0].1, "text/plain");
}

#[test]
fn properties_name_the_route_the_path_and_the_plugin() {
    // x-route := gatehouse.route; x-url-path := request.url_path; x-plugin := plugin_name;
    // an unknown property is NotFound (1), answered as x-unknown: 1.
    let body = r#"
      (drop (call $property (i32.const 1024) (i32.const 15) (i32.const 2000) (i32.const 2004)))
      (drop (call $add (i32.const 0) (i32.const 1100) (i32.const 7) (i32.load (i32.const 2000)) (i32.load (i32.const 2004))))
      (drop (call $property (i32.const 1040) (i32.const 16) (i32.const 2000) (i32.const 2004)))
      (drop (call $add (i32.const 0) (i32.const 1110) (i32.const 10) (i32.load (i32.const 2000)) (i32.load (i32.const 2004))))
      (drop (call $property (i32.const 1060) (i32.const 11) (i32.const 2000) (i32.const 2004)))
      (drop (call $add (i32.const 0) (i32.const 1130) (i32.const 8) (i32.load (i32.const 2000)) (i32.load (i32.const 2004))))
      (i32.store8 (i32.const 2010) (i32.add (i32.const 48)
        (call $property (i32.const 1080) (i32.const 7) (i32.const 2000) (i32.const 2004))))
      (drop (call $add (i32.const 0) (i32.const 1140) (i32.const 9) (i32.const 2010) (i32.const 1)))
      (i32.const 0)"#;
    let data = r#"
      (data (i32.const 1024) "gatehouse\00route")
      (data (i32.const 1040) "request\00url_path")
      (data (i32.const 1060) "plugin_name")
      (data (i32.const 1080) "nothing")
      (data (i32.const 1100) "x-route")
      (data (i32.const 1110) "x-url-path")
      (data (i32.const 1130) "x-plugin")
      (data (i32.const 1140) "x-unknown")"#;
    let filter = build(
        &module(body, "", data),
        serde_json::json!({}),
        &Metrics::new(),
    )
    .unwrap();
    let mut request = request("/orders/7?full=1", &[]);
    run(&filter, &mut request);
    assert_eq!(header(&request, "x-route"), Some("orders"));
    assert_eq!(header(&request, "x-url-path"), Some("/orders/7"));
    assert_eq!(header(&request, "x-plugin"), Some("abi"));
    assert_eq!(header(&request, "x-unknown"), Some("1"));
}

/// Counts requests in a global and tells the count: pooled instances remember, per-request
/// ones start afresh.
#[test]
fn per_request_isolation_gives_each_request_a_fresh_instance() {
    let body = r#"
      (global.set $count (i32.add (global.get $count) (i32.const 1)))
      (i32.store8 (i32.const 2010) (i32.add (i32.const 48) (global.get $count)))
      (drop (call $add (i32.const 0) (i32.const 1024) (i32.const 7) (i32.const 2010) (i32.const 1)))
      (i32.const 0)"#;
    let data = r#"(data (i32.const 1024) "x-count")"#;
    let bytes = module(body, "", data);
    let counts = |isolation: &str| {
        let filter = build(
            &bytes,
            serde_json::json!({"isolation": isolation}),
            &Metrics::new(),
        )
        .unwrap();
        (0..3)
            .map(|_| {
                let mut request = request("/", &[]);
                // The context (and with it the checked-out instance) ends with the request.
                drop(run(&filter, &mut request));
                header(&request, "x-count").unwrap().to_string()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(counts("pooled"), ["1", "2", "3"]);
    assert_eq!(counts("per_request"), ["1", "1", "1"]);
}

fn assert_fails(
    on_request_headers: &str,
    extra: &str,
    reason: &str,
    settings: serde_json::Value,
) -> Duration {
    let metrics = Metrics::new();
    let filter = build(
        &module(on_request_headers, extra, ""),
        settings.clone(),
        &metrics,
    )
    .unwrap();
    let started = Instant::now();
    let (decision, _ctx) = run(&filter, &mut request("/", &[]));
    let took = started.elapsed();
    let Decision::Reject(problem) = decision else {
        panic!("{reason}: {decision:?}")
    };
    assert_eq!(problem.status, 500);
    assert_eq!(problem.kind.uri(), "urn:gatehouse:problem:plugin-failed");
    assert_eq!(failures(&metrics, reason), 1, "{reason}");
    // The instance that failed is gone; the next request gets a fresh one, which fails too.
    let (decision, _ctx) = run(&filter, &mut request("/", &[]));
    assert!(matches!(decision, Decision::Reject(_)));
    assert_eq!(failures(&metrics, reason), 2, "{reason}");
    // Fail open: the request goes on, untouched.
    let mut open = settings;
    open["fail_policy"] = "open".into();
    let filter = build(&module(on_request_headers, extra, ""), open, &metrics).unwrap();
    let mut untouched = request("/", &[]);
    let (decision, _ctx) = run(&filter, &mut untouched);
    assert!(matches!(decision, Decision::Continue), "{decision:?}");
    took
}

#[test]
fn a_trap_fails_the_request_by_its_policy() {
    assert_fails("(unreachable)", "", "trap", serde_json::json!({}));
}

#[test]
fn an_endless_loop_is_stopped_at_max_cpu_per_call() {
    let took = assert_fails(
        "(loop $forever (br $forever)) (i32.const 0)",
        "",
        "timeout",
        serde_json::json!({"max_cpu_per_call": "20ms"}),
    );
    // Interrupted: an endless loop ends only by the deadline (20ms, in 1ms epoch ticks).
    assert!(took >= Duration::from_millis(15), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn memory_growth_past_max_memory_is_refused_and_fails_the_request() {
    // Grows a page at a time until refused, then traps as an allocator would.
    let grow = r#"
      (block $refused (loop $more
        (br_if $refused (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $more)))
      (unreachable)"#;
    assert_fails(
        grow,
        "",
        "memory",
        serde_json::json!({"max_memory": "1MiB"}),
    );
}

#[test]
fn a_header_past_the_size_cap_fails_the_request() {
    // A 100 KiB header value.
    let body = r#"(drop (call $add (i32.const 0) (i32.const 1024) (i32.const 5) (i32.const 0) (i32.const 102400))) (i32.const 0)"#;
    assert_fails(body, "", "limit", serde_json::json!({}));
}

#[test]
fn a_module_whose_digest_differs_is_refused() {
    let bytes = module("(i32.const 0)", "", "");
    let (path, _) = write_module(&bytes);
    let config: gatehouse_wasm::Config = serde_json::from_value(serde_json::json!({
        "path": path, "sha256": "00".repeat(32)
    }))
    .unwrap();
    let errors = Wasm::build(config, &BuildCtx::default()).err().unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(errors[0].path, "sha256");
    assert!(errors[0].message.contains("it is refused"), "{}", errors[0]);
}

#[test]
fn a_module_that_refuses_its_configuration_is_a_config_error() {
    let refuse =
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 0))"#;
    let error = build(
        &module("(i32.const 0)", refuse, ""),
        serde_json::json!({}),
        &Metrics::new(),
    )
    .err()
    .unwrap();
    assert!(error.contains("refused its plugin_config"), "{error}");
    let not_proxy_wasm = wat::parse_str(r#"(module (memory (export "memory") 1))"#).unwrap();
    let error = build(&not_proxy_wasm, serde_json::json!({}), &Metrics::new())
        .err()
        .unwrap();
    assert!(error.contains("not a proxy-wasm module"), "{error}");
}

#[test]
fn the_plugin_configuration_is_what_on_configure_reads() {
    // on_configure copies the plugin configuration; on_request_headers adds it as x-config.
    let extra = r#"
      (global $config_ptr (mut i32) (i32.const 0))
      (global $config_len (mut i32) (i32.const 0))
      (func (export "proxy_on_configure") (param i32) (param $size i32) (result i32)
        (drop (call $buffer (i32.const 7) (i32.const 0) (local.get $size) (i32.const 3000) (i32.const 3004)))
        ;; Copied out of the bump heap, which each request resets.
        (memory.copy (i32.const 4096) (i32.load (i32.const 3000)) (i32.load (i32.const 3004)))
        (global.set $config_len (i32.load (i32.const 3004)))
        (i32.const 1))"#;
    let body = r#"
      (drop (call $add (i32.const 0) (i32.const 1024) (i32.const 8) (i32.const 4096) (global.get $config_len)))
      (i32.const 0)"#;
    let data = r#"(data (i32.const 1024) "x-config")"#;
    let filter = build(
        &module(body, extra, data),
        serde_json::json!({"plugin_config": {"greeting": "hello"}}),
        &Metrics::new(),
    )
    .unwrap();
    let mut request = request("/", &[]);
    run(&filter, &mut request);
    assert_eq!(
        header(&request, "x-config"),
        Some(r#"{"greeting":"hello"}"#)
    );
}

/// Shared data with compare-and-swap, as a module sees it: `x-set` is the status of a store
/// with no CAS (0: Ok), `x-stale` of a store with a CAS other than the current (8:
/// CasMismatch), `x-get` of a read of a key nobody stored (1: NotFound), and `x-value` what
/// the first store left, read back with its CAS.
#[test]
fn shared_data_keeps_values_and_refuses_a_stale_compare_and_swap() {
    let extra = r#"
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (func $digit (param $name i32) (param $len i32) (param $status i32)
    (i32.store8 (i32.const 2020) (i32.add (i32.const 48) (local.get $status)))
    (drop (call $add (i32.const 0) (local.get $name) (local.get $len) (i32.const 2020) (i32.const 1))))"#;
    let body = r#"
      (call $digit (i32.const 1100) (i32.const 5)
        (call $set_shared (i32.const 1024) (i32.const 3) (i32.const 1040) (i32.const 5) (i32.const 0)))
      (drop (call $get_shared (i32.const 1024) (i32.const 3) (i32.const 2000) (i32.const 2004) (i32.const 2008)))
      (drop (call $add (i32.const 0) (i32.const 1110) (i32.const 7) (i32.load (i32.const 2000)) (i32.load (i32.const 2004))))
      ;; The CAS read back is the current one; any other is stale (0 would mean no CAS).
      (call $digit (i32.const 1120) (i32.const 7)
        (call $set_shared (i32.const 1024) (i32.const 3) (i32.const 1040) (i32.const 5)
          (i32.add (i32.load (i32.const 2008)) (i32.const 1))))
      (call $digit (i32.const 1130) (i32.const 5)
        (call $get_shared (i32.const 1060) (i32.const 4) (i32.const 2000) (i32.const 2004) (i32.const 2008)))
      (i32.const 0)"#;
    let data = r#"
      (data (i32.const 1024) "key")
      (data (i32.const 1040) "first")
      (data (i32.const 1060) "none")
      (data (i32.const 1100) "x-set")
      (data (i32.const 1110) "x-value")
      (data (i32.const 1120) "x-stale")
      (data (i32.const 1130) "x-get")"#;
    // The imports go before every definition: put them first in `extra`'s place by building
    // the text here.
    let text = String::from_utf8(module_text(body, extra, data)).unwrap();
    let bytes = wat::parse_str(&text).unwrap();
    let metrics = Metrics::new();
    let filter = build_named(&bytes, "shared-test", serde_json::json!({}), &metrics).unwrap();
    let mut request = request("/", &[]);
    run(&filter, &mut request);
    assert_eq!(header(&request, "x-set"), Some("0"));
    assert_eq!(header(&request, "x-value"), Some("first"));
    assert_eq!(header(&request, "x-stale"), Some("8"));
    assert_eq!(header(&request, "x-get"), Some("1"));
}

/// A root context that asks for ticks gets them, on an instance of its own: each tick stores
/// a value in shared data, which a request then reads.
#[test]
fn ticks_run_on_the_root_context() {
    let extra = r#"
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick_period (param i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $tick_period (i32.const 10)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $set_shared (i32.const 1024) (i32.const 5) (i32.const 1040) (i32.const 6) (i32.const 0))))"#;
    let body = r#"
      (i32.store8 (i32.const 2020) (i32.add (i32.const 48)
        (call $get_shared (i32.const 1024) (i32.const 5) (i32.const 2000) (i32.const 2004) (i32.const 2008))))
      (drop (call $add (i32.const 0) (i32.const 1060) (i32.const 6) (i32.const 2020) (i32.const 1)))
      (i32.const 0)"#;
    let data = r#"
      (data (i32.const 1024) "ticks")
      (data (i32.const 1040) "ticked")
      (data (i32.const 1060) "x-tick")"#;
    let bytes = wat::parse_str(String::from_utf8(module_text(body, extra, data)).unwrap()).unwrap();
    let filter = build_named(&bytes, "tick-test", serde_json::json!({}), &Metrics::new()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut request = request("/", &[]);
        run(&filter, &mut request);
        if header(&request, "x-tick") == Some("0") {
            break;
        }
        assert_eq!(
            header(&request, "x-tick"),
            Some("1"),
            "NotFound until the first tick"
        );
        assert!(Instant::now() < deadline, "no tick in 5s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Two builds of one module (a reload naming the same file) compile it once.
#[test]
fn a_module_is_compiled_once_per_content() {
    let bytes = module(
        "(i32.const 0)",
        "",
        r#"(data (i32.const 1024) "compiled-once")"#,
    );
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let first = build(&bytes, serde_json::json!({}), &Metrics::new()).unwrap();
    let second = build(&bytes, serde_json::json!({}), &Metrics::new()).unwrap();
    assert_eq!(gatehouse_wasm::times_compiled(&sha256), 1);
    // Once no filter uses it, the next build compiles it again.
    drop((first, second));
    let third = build(&bytes, serde_json::json!({}), &Metrics::new()).unwrap();
    assert_eq!(gatehouse_wasm::times_compiled(&sha256), 2);
    drop(third);
}

#[test]
fn a_request_paused_with_nothing_to_wait_for_fails_by_its_policy() {
    assert_fails("(i32.const 1)", "", "stalled", serde_json::json!({}));
}

/// Framing, hop-by-hop and forwarding headers are the gateway's: a module's writes to them are
/// ignored (and logged once); its other changes apply.
#[test]
fn headers_the_gateway_keeps_to_itself_are_not_the_plugins() {
    let body = r#"
      (drop (call $add (i32.const 0) (i32.const 1024) (i32.const 14) (i32.const 1100) (i32.const 1)))
      (drop (call $add (i32.const 0) (i32.const 1040) (i32.const 10) (i32.const 1110) (i32.const 5)))
      (drop (call $replace (i32.const 0) (i32.const 1056) (i32.const 15) (i32.const 1120) (i32.const 7)))
      (drop (call $remove (i32.const 0) (i32.const 1080) (i32.const 17)))
      (drop (call $add (i32.const 0) (i32.const 1140) (i32.const 4) (i32.const 1100) (i32.const 1)))
      (i32.const 0)"#;
    let data = r#"
      (data (i32.const 1024) "content-length")
      (data (i32.const 1040) "connection")
      (data (i32.const 1056) "x-forwarded-for")
      (data (i32.const 1080) "transfer-encoding")
      (data (i32.const 1100) "5")
      (data (i32.const 1110) "close")
      (data (i32.const 1120) "6.6.6.6")
      (data (i32.const 1140) "x-ok")"#;
    let filter = build(
        &module(body, "", data),
        serde_json::json!({}),
        &Metrics::new(),
    )
    .unwrap();
    let mut request = request("/", &[("transfer-encoding", "chunked")]);
    run(&filter, &mut request);
    assert_eq!(header(&request, "content-length"), None);
    assert_eq!(header(&request, "connection"), None);
    assert_eq!(header(&request, "x-forwarded-for"), None);
    assert_eq!(header(&request, "transfer-encoding"), Some("chunked"));
    assert_eq!(header(&request, "x-ok"), Some("5"));
}

/// A plugin's own metrics: defined, incremented and read back (`x-metric: 3`).
#[test]
fn a_plugin_defines_and_reads_its_own_metrics() {
    let extra = r#"
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $get_metric (param i32 i32) (result i32)))"#;
    let body = r#"
      (drop (call $define (i32.const 0) (i32.const 1024) (i32.const 8) (i32.const 2000)))
      (drop (call $increment (i32.load (i32.const 2000)) (i64.const 3)))
      (drop (call $get_metric (i32.load (i32.const 2000)) (i32.const 2008)))
      (i32.store8 (i32.const 2020) (i32.add (i32.const 48) (i32.load (i32.const 2008))))
      (drop (call $add (i32.const 0) (i32.const 1040) (i32.const 8) (i32.const 2020) (i32.const 1)))
      (i32.const 0)"#;
    let data = r#"(data (i32.const 1024) "requests") (data (i32.const 1040) "x-metric")"#;
    let filter = build(
        &module(body, extra, data),
        serde_json::json!({"isolation": "per_request"}),
        &Metrics::new(),
    )
    .unwrap();
    let mut request = request("/", &[]);
    run(&filter, &mut request);
    assert_eq!(header(&request, "x-metric"), Some("3"));
}

/// With `max_instances` alive, a request that finds none free gets the fail policy's answer.
#[test]
fn requests_past_max_instances_get_the_fail_policy() {
    let metrics = Metrics::new();
    let filter = build(
        &module("(i32.const 0)", "", ""),
        serde_json::json!({"max_instances": 1}),
        &metrics,
    )
    .unwrap();
    let (first, holding) = run(&filter, &mut request("/", &[]));
    assert!(matches!(first, Decision::Continue));
    let (second, _ctx) = run(&filter, &mut request("/", &[]));
    assert!(matches!(second, Decision::Reject(_)), "{second:?}");
    assert_eq!(failures(&metrics, "unavailable"), 1);
    drop(holding);
    let (third, _ctx) = run(&filter, &mut request("/", &[]));
    assert!(
        matches!(third, Decision::Continue),
        "the instance came back"
    );
}

/// A local response from `on_response_headers` replaces the upstream's answer; on an answer
/// that has no body (204), the replacement has none either and says no length.
#[test]
fn a_local_response_from_the_response_head_replaces_the_answer() {
    let extra = r#"
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $local (i32.const 451) (i32.const 0) (i32.const 0)
      (i32.const 1024) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1))"#;
    let data = r#"(data (i32.const 1024) "gone")"#;
    let filter = build(
        &module("(i32.const 0)", extra, data),
        serde_json::json!({}),
        &Metrics::new(),
    )
    .unwrap();
    for (upstream_status, length, body) in
        [(200u16, Some("4"), Some("gone")), (204, Some("0"), None)]
    {
        let (_decision, mut ctx) = run(&filter, &mut request("/", &[]));
        let mut response = pingora_http::ResponseHeader::build(upstream_status, None).unwrap();
        if upstream_status == 200 {
            response.insert_header("content-length", "11").unwrap();
            response.insert_header("x-upstream", "1").unwrap();
        }
        filter.response(&mut response, &mut ctx);
        assert_eq!(response.status.as_u16(), 451);
        assert!(response.headers.get("x-upstream").is_none());
        assert_eq!(
            response
                .headers
                .get("content-length")
                .map(|value| value.to_str().unwrap()),
            length
        );
        let mut piece = Some(bytes::Bytes::from_static(b"upstream body"));
        filter.response_body(&mut piece, true, &mut ctx);
        assert_eq!(piece.as_deref(), body.map(str::as_bytes));
    }
}

/// The gateway's own answers (a refusal, an error) stand: a local response from
/// `on_response_headers` does not replace them.
#[test]
fn the_gateways_own_answers_are_not_replaced() {
    let extra = r#"
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $local (i32.const 451) (i32.const 0) (i32.const 0)
      (i32.const 1024) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const -1)))
    (i32.const 1))"#;
    let data = r#"(data (i32.const 1024) "gone")"#;
    let filter = build(
        &module("(i32.const 0)", extra, data),
        serde_json::json!({}),
        &Metrics::new(),
    )
    .unwrap();
    let (_decision, mut ctx) = run(&filter, &mut request("/", &[]));
    ctx.own_answer = true;
    let mut response = pingora_http::ResponseHeader::build(404, None).unwrap();
    response.insert_header("content-length", "120").unwrap();
    filter.response(&mut response, &mut ctx);
    assert_eq!(response.status.as_u16(), 404);
    assert_eq!(response.headers.get("content-length").unwrap(), "120");
    let mut piece = Some(bytes::Bytes::from_static(b"problem document"));
    filter.response_body(&mut piece, true, &mut ctx);
    assert_eq!(piece.as_deref(), Some(&b"problem document"[..]));
}
