use std::time::Instant;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Value};
use serde_json::json;

use super::*;

/// A field of a `FileDescriptorProto` in its JSON form.
fn field(
    name: &str,
    number: u32,
    kind: &str,
    type_name: Option<&str>,
    repeated: bool,
) -> serde_json::Value {
    let mut field = json!({
        "name": name,
        "number": number,
        "label": if repeated { "LABEL_REPEATED" } else { "LABEL_OPTIONAL" },
        "type": kind,
    });
    if let Some(type_name) = type_name {
        field["typeName"] = json!(type_name);
    }
    field
}

fn file(pool: &DescriptorPool, descriptor: serde_json::Value) -> DynamicMessage {
    let message = pool
        .get_message_by_name("google.protobuf.FileDescriptorProto")
        .unwrap();
    DynamicMessage::deserialize(message, descriptor).unwrap()
}

/// A descriptor set as `protoc --include_imports` writes it: the well-known types,
/// `google/api/http.proto` and `annotations.proto`, and `demo.proto` whose methods carry
/// `google.api.http` options.
fn descriptor_set() -> Vec<u8> {
    let global = DescriptorPool::global();
    let http = file(
        &global,
        json!({
            "name": "google/api/http.proto",
            "package": "google.api",
            "syntax": "proto3",
            "messageType": [
                {
                    "name": "HttpRule",
                    "field": [
                        field("selector", 1, "TYPE_STRING", None, false),
                        {"name": "get", "number": 2, "label": "LABEL_OPTIONAL", "type": "TYPE_STRING", "oneofIndex": 0},
                        {"name": "put", "number": 3, "label": "LABEL_OPTIONAL", "type": "TYPE_STRING", "oneofIndex": 0},
                        {"name": "post", "number": 4, "label": "LABEL_OPTIONAL", "type": "TYPE_STRING", "oneofIndex": 0},
                        {"name": "delete", "number": 5, "label": "LABEL_OPTIONAL", "type": "TYPE_STRING", "oneofIndex": 0},
                        {"name": "patch", "number": 6, "label": "LABEL_OPTIONAL", "type": "TYPE_STRING", "oneofIndex": 0},
                        field("body", 7, "TYPE_STRING", None, false),
                        {"name": "custom", "number": 8, "label": "LABEL_OPTIONAL", "type": "TYPE_MESSAGE", "typeName": ".google.api.CustomHttpPattern", "oneofIndex": 0},
                        field("additional_bindings", 11, "TYPE_MESSAGE", Some(".google.api.HttpRule"), true),
                        field("response_body", 12, "TYPE_STRING", None, false),
                    ],
                    "oneofDecl": [{"name": "pattern"}],
                },
                {
                    "name": "CustomHttpPattern",
                    "field": [
                        field("kind", 1, "TYPE_STRING", None, false),
                        field("path", 2, "TYPE_STRING", None, false),
                    ],
                },
            ],
        }),
    );
    let annotations = file(
        &global,
        json!({
            "name": "google/api/annotations.proto",
            "package": "google.api",
            "syntax": "proto3",
            "dependency": ["google/api/http.proto", "google/protobuf/descriptor.proto"],
            "extension": [{
                "name": "http",
                "number": 72295728,
                "label": "LABEL_OPTIONAL",
                "type": "TYPE_MESSAGE",
                "typeName": ".google.api.HttpRule",
                "extendee": ".google.protobuf.MethodOptions",
            }],
        }),
    );
    let mut pool = global.clone();
    pool.add_file_descriptor_protos([
        http.transcode_to::<prost_reflect::prost_types::FileDescriptorProto>()
            .unwrap(),
        annotations
            .transcode_to::<prost_reflect::prost_types::FileDescriptorProto>()
            .unwrap(),
    ])
    .unwrap();
    // Read with the extension known, so the methods' options carry it.
    let method = |name: &str,
                  input: &str,
                  output: &str,
                  server: bool,
                  client: bool,
                  http: Option<serde_json::Value>| {
        let mut method = json!({
            "name": name,
            "inputType": input,
            "outputType": output,
            "serverStreaming": server,
            "clientStreaming": client,
        });
        if let Some(http) = http {
            method["options"] = json!({ "[google.api.http]": http });
        }
        method
    };
    let demo = file(
        &pool,
        json!({
            "name": "demo.proto",
            "package": "demo",
            "syntax": "proto3",
            "dependency": [
                "google/api/annotations.proto",
                "google/protobuf/timestamp.proto",
                "google/protobuf/duration.proto",
                "google/protobuf/wrappers.proto",
            ],
            "enumType": [{
                "name": "Mood",
                "value": [
                    {"name": "MOOD_UNSPECIFIED", "number": 0},
                    {"name": "HAPPY", "number": 1},
                    {"name": "SAD", "number": 2},
                ],
            }],
            "messageType": [
                {
                    "name": "Inner",
                    "field": [
                        field("label", 1, "TYPE_STRING", None, false),
                        field("level", 2, "TYPE_INT32", None, false),
                    ],
                },
                {
                    "name": "SayRequest",
                    "field": [
                        field("name", 1, "TYPE_STRING", None, false),
                        field("count", 2, "TYPE_INT64", None, false),
                        field("mood", 3, "TYPE_ENUM", Some(".demo.Mood"), false),
                        field("inner", 4, "TYPE_MESSAGE", Some(".demo.Inner"), false),
                        field("tags", 5, "TYPE_STRING", None, true),
                        field("loud", 6, "TYPE_BOOL", None, false),
                        field("when", 7, "TYPE_MESSAGE", Some(".google.protobuf.Timestamp"), false),
                        field("wait", 8, "TYPE_MESSAGE", Some(".google.protobuf.Duration"), false),
                        field("note", 9, "TYPE_MESSAGE", Some(".google.protobuf.StringValue"), false),
                        field("user_id", 10, "TYPE_UINT64", None, false),
                    ],
                },
                {
                    "name": "SayReply",
                    "field": [
                        field("text", 1, "TYPE_STRING", None, false),
                        field("count", 2, "TYPE_INT64", None, false),
                        field("mood", 3, "TYPE_ENUM", Some(".demo.Mood"), false),
                        field("when", 4, "TYPE_MESSAGE", Some(".google.protobuf.Timestamp"), false),
                        field("wait", 5, "TYPE_MESSAGE", Some(".google.protobuf.Duration"), false),
                        field("note", 6, "TYPE_MESSAGE", Some(".google.protobuf.StringValue"), false),
                        field("inner", 7, "TYPE_MESSAGE", Some(".demo.Inner"), false),
                        field("user_id", 8, "TYPE_UINT64", None, false),
                    ],
                },
            ],
            "service": [{
                "name": "Greeter",
                "method": [
                    method("Say", ".demo.SayRequest", ".demo.SayReply", false, false, Some(json!({
                        "post": "/v1/{name=messages/*}:say",
                        "body": "*",
                        "additionalBindings": [{"get": "/v1/{name=messages/*}"}],
                    }))),
                    method("Get", ".demo.SayRequest", ".demo.SayReply", false, false, Some(json!({
                        "get": "/v1/greetings/{count}/{inner.label}",
                    }))),
                    method("Label", ".demo.SayRequest", ".demo.SayReply", false, false, Some(json!({
                        "put": "/v1/labels/{name}",
                        "body": "inner",
                        "responseBody": "inner",
                    }))),
                    method("Files", ".demo.SayRequest", ".demo.SayReply", false, false, Some(json!({
                        "custom": {"kind": "HEAD", "path": "/v1/files/{name=**}"},
                    }))),
                    method("Stream", ".demo.SayRequest", ".demo.SayReply", true, false, Some(json!({
                        "get": "/v1/stream/{name}",
                        "additionalBindings": [{"post": "/v1/stream", "body": "*"}],
                    }))),
                    method("Upload", ".demo.SayRequest", ".demo.SayReply", false, true, None),
                ],
            }],
        }),
    );
    let mut set = prost_reflect::prost_types::FileDescriptorSet {
        file: pool.file_descriptor_protos().cloned().collect(),
    }
    .encode_to_vec();
    // The demo file as encoded bytes, so the extension in its options is kept.
    let demo = demo.encode_to_vec();
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut set);
    prost::encoding::encode_varint(demo.len() as u64, &mut set);
    set.extend_from_slice(&demo);
    set
}

/// The descriptor set in a file of its own, and its SHA-256.
fn descriptor_file() -> (String, String) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let bytes = descriptor_set();
    let path = std::env::temp_dir().join(format!(
        "gatehouse-grpc-json-{}-{}.pb",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, &bytes).unwrap();
    (
        path.to_string_lossy().into_owned(),
        hex::encode(sha2::Sha256::digest(&bytes)),
    )
}

fn build(extra: serde_json::Value) -> Result<GrpcJson, Vec<BuildError>> {
    let (path, sha256) = descriptor_file();
    let mut config = json!({ "descriptor": path, "sha256": sha256 });
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    let result = GrpcJson::build(
        serde_json::from_value(config).unwrap(),
        &BuildCtx::default(),
    );
    std::fs::remove_file(&path).ok();
    result
}

fn filter() -> GrpcJson {
    build(json!({})).unwrap()
}

fn head(method: &str, target: &str, body_length: Option<usize>) -> RequestHeader {
    let mut request = RequestHeader::build(method, target.as_bytes(), None).unwrap();
    request
        .insert_header("content-type", "application/json")
        .unwrap();
    request.insert_header("accept-encoding", "gzip").unwrap();
    if let Some(length) = body_length {
        request.insert_header("content-length", length).unwrap();
    }
    request
}

fn ctx() -> RequestContext {
    let mut ctx = RequestContext::new(Instant::now());
    ctx.set_request_id("req-1".into());
    ctx
}

fn input(filter: &GrpcJson, name: &str) -> prost_reflect::MessageDescriptor {
    filter
        .transcoder()
        .methods
        .iter()
        .find(|method| method.name == name)
        .unwrap()
        .input
        .clone()
}

/// The request message a method + path + body becomes.
fn message(
    filter: &GrpcJson,
    method: &str,
    target: &str,
    body: &str,
) -> Result<DynamicMessage, Problem> {
    let uri: http::Uri = target.parse().unwrap();
    let (binding, values) = filter
        .transcoder()
        .find(&method.parse().unwrap(), uri.path())
        .expect("a binding matches");
    let bound = filter.transcoder().bind(binding, values, uri.query())?;
    filter.transcoder().request_message(&bound, body.as_bytes())
}

/// A reply message of `demo.SayReply`, as JSON, encoded.
fn reply(filter: &GrpcJson, json: serde_json::Value) -> Vec<u8> {
    let output = filter.transcoder().methods[0].output.clone();
    DynamicMessage::deserialize(output, json)
        .unwrap()
        .encode_to_vec()
}

fn frames(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for message in messages {
        grpc::encode_frame(0, message, &mut out);
    }
    out.to_vec()
}

fn grpc_head(status: Option<(&str, &str)>) -> ResponseHeader {
    let mut response = ResponseHeader::build(200, None).unwrap();
    response
        .insert_header("content-type", "application/grpc")
        .unwrap();
    if let Some((code, message)) = status {
        response.insert_header("grpc-status", code).unwrap();
        response.insert_header("grpc-message", message).unwrap();
    }
    response
}

fn trailers(code: &str, message: &str) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_str(code).unwrap());
    trailers.insert("grpc-message", HeaderValue::from_str(message).unwrap());
    trailers
}

/// Runs a transcoded request through the filter's phases: the head, the JSON body, the reply's
/// head, its body in `pieces`, and its trailers. The response head and the body the client gets.
fn exchange(
    filter: &GrpcJson,
    method: &str,
    target: &str,
    body: &str,
    pieces: &[&[u8]],
    end: Option<http::HeaderMap>,
) -> (ResponseHeader, String) {
    let mut ctx = ctx();
    let mut request = head(method, target, Some(body.len()));
    assert!(matches!(
        filter.try_request(&mut request, &mut ctx),
        Some(Decision::Continue)
    ));
    let mut piece = Some(Bytes::copy_from_slice(body.as_bytes()));
    filter.request_body(&mut piece, true, &mut ctx).unwrap();
    let mut response = grpc_head(None);
    filter.response(&mut response, &mut ctx);
    let mut out = Vec::new();
    for (index, piece) in pieces.iter().enumerate() {
        let mut body = Some(Bytes::copy_from_slice(piece));
        let last = end.is_none() && index + 1 == pieces.len();
        filter.response_body(&mut body, last, &mut ctx);
        out.extend_from_slice(&body.unwrap_or_default());
    }
    if let Some(mut trailers) = end {
        let last = filter.response_trailers(&mut trailers, &mut ctx).unwrap();
        out.extend_from_slice(&last);
    }
    (response, String::from_utf8(out).unwrap())
}

#[test]
fn annotations_mappings_and_defaults_bind() {
    let filter = build(json!({
        "mappings": [{ "post": "/v2/say/{name}", "method": "demo.Greeter/Say" }],
    }))
    .unwrap();
    let transcoder = filter.transcoder();
    let called = |method: &str, path: &str| {
        transcoder
            .find(&method.parse().unwrap(), path)
            .map(|(binding, values)| (transcoder.method(binding).name.clone(), values))
    };
    assert_eq!(
        called("POST", "/v1/messages/42:say"),
        Some(("demo.Greeter/Say".into(), vec!["messages/42".into()]))
    );
    assert_eq!(
        called("GET", "/v1/messages/42"),
        Some(("demo.Greeter/Say".into(), vec!["messages/42".into()]))
    );
    assert_eq!(called("GET", "/v1/messages/42/x"), None);
    assert_eq!(called("DELETE", "/v1/messages/42"), None);
    assert_eq!(
        called("POST", "/demo.Greeter/Get"),
        Some(("demo.Greeter/Get".into(), vec![]))
    );
    assert_eq!(
        called("POST", "/v2/say/bob"),
        Some(("demo.Greeter/Say".into(), vec!["bob".into()]))
    );
    assert_eq!(
        called("HEAD", "/v1/files/a/b%2Fc"),
        Some(("demo.Greeter/Files".into(), vec!["a/b%2Fc".into()]))
    );
    assert_eq!(
        called("POST", "/v1/stream"),
        Some(("demo.Greeter/Stream".into(), vec![]))
    );
    // The client-streaming method has no default binding.
    assert_eq!(called("POST", "/demo.Greeter/Upload"), None);
}

#[test]
fn path_and_query_values_set_typed_fields() {
    let filter = filter();
    let message = message(
        &filter,
        "GET",
        "/v1/greetings/9007199254740993/hello%20there?mood=HAPPY&tags=a&tags=b%26c&loud=true&inner.level=3&when=2024-01-02T03:04:05Z&userId=7",
        "",
    )
    .unwrap();
    let expected = DynamicMessage::deserialize(
        input(&filter, "demo.Greeter/Get"),
        json!({
            "count": "9007199254740993",
            "mood": "HAPPY",
            "tags": ["a", "b&c"],
            "loud": true,
            "inner": {"label": "hello there", "level": 3},
            "when": "2024-01-02T03:04:05Z",
            "user_id": "7",
        }),
    )
    .unwrap();
    assert_eq!(message, expected);
    assert_eq!(
        message.get_field_by_name("count").unwrap().as_ref(),
        &Value::I64(9_007_199_254_740_993)
    );
}

#[test]
fn bad_values_and_unknown_parameters_are_400_naming_the_field() {
    let filter = filter();
    let problem = message(&filter, "GET", "/v1/greetings/abc/x", "").unwrap_err();
    assert_eq!(problem.status, 400);
    let detail = problem.detail.unwrap();
    assert!(
        detail.contains("\"count\"") && detail.contains("int64"),
        "{detail}"
    );
    let detail = message(&filter, "GET", "/v1/greetings/1/x?mood=GLAD", "")
        .unwrap_err()
        .detail
        .unwrap();
    assert!(
        detail.contains("\"mood\"") && detail.contains("HAPPY"),
        "{detail}"
    );
    let detail = message(&filter, "GET", "/v1/greetings/1/x?inner.levl=2", "")
        .unwrap_err()
        .detail
        .unwrap();
    assert!(
        detail.contains("unknown query parameter \"inner.levl\""),
        "{detail}"
    );
    let detail = message(&filter, "GET", "/v1/greetings/1/x?loud=yes", "")
        .unwrap_err()
        .detail
        .unwrap();
    assert!(detail.contains("\"loud\" (bool)"), "{detail}");
    let lenient = build(json!({ "ignore_unknown_query_parameters": true })).unwrap();
    assert!(message(&lenient, "GET", "/v1/greetings/1/x?api_key=k", "").is_ok());
    // Through the filter: a 400 before anything else.
    let mut request = head("GET", "/v1/greetings/abc/x", None);
    assert!(matches!(
        filter.try_request(&mut request, &mut ctx()),
        Some(Decision::Reject(problem)) if problem.status == 400
    ));
}

#[test]
fn json_bodies_become_one_frame_with_path_values_on_top() {
    let filter = filter();
    let body = r#"{"name":"ignored","count":"12","mood":"SAD","tags":["x"],"inner":{"label":"l"}}"#;
    let mut ctx = ctx();
    let mut request = head("POST", "/v1/messages/7:say?loud=true", Some(body.len()));
    assert!(matches!(
        filter.try_request(&mut request, &mut ctx),
        Some(Decision::Continue)
    ));
    assert_eq!(request.uri.to_string(), "/demo.Greeter/Say");
    assert_eq!(request.method, http::Method::POST);
    assert_eq!(request.headers["content-type"], "application/grpc");
    assert_eq!(request.headers["te"], "trailers");
    assert!(!request.headers.contains_key("accept-encoding"));
    assert!(ctx.buffers_request_body);
    let mut frame = Vec::new();
    for (index, piece) in [&body[..10], &body[10..]].iter().enumerate() {
        let mut piece = Some(Bytes::copy_from_slice(piece.as_bytes()));
        filter
            .request_body(&mut piece, index == 1, &mut ctx)
            .unwrap();
        frame.extend_from_slice(&piece.unwrap_or_default());
    }
    let mut decoder = grpc::FrameDecoder::new(1 << 20);
    decoder.push(&frame);
    let frame = decoder.next_frame().unwrap().unwrap();
    assert_eq!(frame.flags, 0);
    decoder.finish().unwrap();
    let decoded = DynamicMessage::decode(input(&filter, "demo.Greeter/Say"), frame.data).unwrap();
    let expected = DynamicMessage::deserialize(
        input(&filter, "demo.Greeter/Say"),
        json!({"name": "messages/7", "count": 12, "mood": "SAD", "tags": ["x"], "inner": {"label": "l"}, "loud": true}),
    )
    .unwrap();
    assert_eq!(decoded, expected);
}

#[test]
fn a_body_field_binding_reads_the_body_as_that_field() {
    let filter = filter();
    let message = message(
        &filter,
        "PUT",
        "/v1/labels/n1",
        r#"{"label":"x","level":2}"#,
    )
    .unwrap();
    let expected = DynamicMessage::deserialize(
        input(&filter, "demo.Greeter/Label"),
        json!({"name": "n1", "inner": {"label": "x", "level": 2}}),
    )
    .unwrap();
    assert_eq!(message, expected);
    let detail = super::tests::message(&filter, "PUT", "/v1/labels/n1", r#"{"level":"high"}"#)
        .unwrap_err()
        .detail
        .unwrap();
    assert!(
        detail.contains("invalid JSON at \"inner.level\""),
        "{detail}"
    );
    let detail = super::tests::message(&filter, "PUT", "/v1/labels/n1", r#"{"level":1} {"#)
        .unwrap_err()
        .detail
        .unwrap();
    assert!(detail.starts_with("invalid JSON"), "{detail}");
    // An empty body is an empty message.
    assert!(super::tests::message(&filter, "POST", "/demo.Greeter/Say", " ").is_ok());
}

#[test]
fn unknown_members_and_wrong_types_are_400_with_the_path() {
    let filter = filter();
    let problem = message(
        &filter,
        "POST",
        "/demo.Greeter/Say",
        r#"{"inner":{"nope":1}}"#,
    )
    .unwrap_err();
    assert_eq!(problem.status, 400);
    assert_eq!(problem.kind, ProblemType::BadRequest);
    let detail = problem.detail.unwrap();
    assert!(
        detail.contains("inner") && detail.contains("nope"),
        "{detail}"
    );
    let detail = message(&filter, "POST", "/demo.Greeter/Say", r#"{"when": 5}"#)
        .unwrap_err()
        .detail
        .unwrap();
    assert!(detail.starts_with("invalid JSON at \"when\": "), "{detail}");
    let detail = message(
        &filter,
        "POST",
        "/demo.Greeter/Say",
        r#"{"tags": ["a", 1]}"#,
    )
    .unwrap_err()
    .detail
    .unwrap();
    assert!(
        detail.starts_with("invalid JSON at \"tags[1]\""),
        "{detail}"
    );
    let detail = message(&filter, "POST", "/demo.Greeter/Say", r#"{"count": 1"#)
        .unwrap_err()
        .detail
        .unwrap();
    assert!(detail.starts_with("invalid JSON"), "{detail}");
    // Through the body phase.
    let mut ctx = ctx();
    let body = r#"{"bogus":true}"#;
    let mut request = head("POST", "/demo.Greeter/Say", Some(body.len()));
    filter.try_request(&mut request, &mut ctx);
    let mut piece = Some(Bytes::from_static(body.as_bytes()));
    let problem = filter.request_body(&mut piece, true, &mut ctx).unwrap_err();
    assert!(problem.detail.unwrap().contains("bogus"));
}

#[test]
fn request_bodies_over_the_limit_are_413() {
    let (path, sha256) = descriptor_file();
    let filter = GrpcJson::build(
        serde_json::from_value(json!({"descriptor": path, "sha256": sha256})).unwrap(),
        &BuildCtx {
            server_max_body_bytes: Some(16),
            ..BuildCtx::default()
        },
    )
    .unwrap();
    let mut ctx = ctx();
    let mut request = head("POST", "/demo.Greeter/Say", Some(100));
    assert!(matches!(
        filter.try_request(&mut request, &mut ctx),
        Some(Decision::Reject(problem)) if problem.status == 413
    ));
    let mut request = head("POST", "/demo.Greeter/Say", None);
    request
        .insert_header("transfer-encoding", "chunked")
        .unwrap();
    assert!(matches!(
        filter.try_request(&mut request, &mut ctx),
        Some(Decision::Continue)
    ));
    let mut piece = Some(Bytes::from_static(br#"{"name":"a very long name"}"#));
    let problem = filter
        .request_body(&mut piece, false, &mut ctx)
        .unwrap_err();
    assert_eq!(problem.status, 413);
}

#[test]
fn reply_frames_cut_at_every_offset_give_the_same_json() {
    let filter = filter();
    let first = reply(
        &filter,
        json!({"text": "hi", "count": "5", "mood": "HAPPY"}),
    );
    let second = reply(
        &filter,
        json!({"text": "there", "user_id": "18446744073709551615"}),
    );
    let body = frames(&[first, second]);
    let expected = r#"[{"text":"hi","count":"5","mood":"HAPPY"},{"text":"there","userId":"18446744073709551615"}]"#;
    for cut in 0..=body.len() {
        let (response, out) = exchange(
            &filter,
            "POST",
            "/v1/stream",
            "{}",
            &[&body[..cut], &body[cut..]],
            Some(trailers("0", "")),
        );
        assert_eq!(response.status, 200);
        assert_eq!(response.headers["content-type"], "application/json");
        assert_eq!(out, expected, "cut at {cut}");
    }
}

#[test]
fn unary_replies_are_one_object_and_streams_ndjson_lines() {
    let filter = filter();
    let body = frames(&[reply(
        &filter,
        json!({"text": "hi", "inner": {"label": "l"}}),
    )]);
    let (response, out) = exchange(
        &filter,
        "POST",
        "/demo.Greeter/Say",
        "{}",
        &[&body],
        Some(trailers("0", "")),
    );
    assert_eq!(response.headers["content-type"], "application/json");
    assert!(!response.headers.contains_key("content-length"));
    assert_eq!(out, r#"{"text":"hi","inner":{"label":"l"}}"#);
    // A unary OK without a message is `{}`.
    let (_, out) = exchange(
        &filter,
        "POST",
        "/demo.Greeter/Say",
        "{}",
        &[],
        Some(trailers("0", "")),
    );
    assert_eq!(out, "{}");
    // `response_body`: the reply's field only.
    let (_, out) = exchange(
        &filter,
        "PUT",
        "/v1/labels/a",
        r#"{"label":"x"}"#,
        &[&body],
        Some(trailers("0", "")),
    );
    assert_eq!(out, r#"{"label":"l","level":0}"#);
    let ndjson = build(
        json!({ "streaming": "ndjson", "preserve_proto_field_names": true, "emit_defaults": true }),
    )
    .unwrap();
    let body = frames(&[
        reply(&ndjson, json!({"text": "a", "user_id": "1"})),
        reply(&ndjson, json!({"text": "b"})),
    ]);
    let (response, out) = exchange(
        &ndjson,
        "POST",
        "/v1/stream",
        "{}",
        &[&body],
        Some(trailers("0", "")),
    );
    assert_eq!(response.headers["content-type"], "application/x-ndjson");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["user_id"], "1");
    assert_eq!(lines[1]["text"], "b");
    assert_eq!(lines[1]["count"], "0");
    assert_eq!(lines[1]["mood"], "MOOD_UNSPECIFIED");
    assert!(out.ends_with('\n'));
    // An empty array stream.
    let (_, out) = exchange(
        &filter,
        "POST",
        "/v1/stream",
        "{}",
        &[],
        Some(trailers("0", "")),
    );
    assert_eq!(out, "[]");
}

#[test]
fn trailers_only_errors_are_problems_with_the_mapped_status() {
    let filter = filter();
    let mut ctx = ctx();
    let mut request = head("POST", "/demo.Greeter/Say", Some(2));
    filter.try_request(&mut request, &mut ctx);
    let mut piece = Some(Bytes::from_static(b"{}"));
    filter.request_body(&mut piece, true, &mut ctx).unwrap();
    let mut response = grpc_head(Some(("5", "no book %22x%22")));
    response.insert_header("content-length", "0").unwrap();
    filter.response(&mut response, &mut ctx);
    // The answer replaces the upstream's, which has no body to carry it.
    let answer = ctx
        .answer_instead
        .take()
        .expect("an answer in the upstream's place");
    assert_eq!(answer.status, 404);
    assert_eq!(answer.headers[0].1, "application/problem+json");
    let problem: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(problem["type"], "urn:gatehouse:problem:grpc-error");
    assert_eq!(problem["status"], 404);
    assert_eq!(problem["detail"], "no book \"x\"");
    assert_eq!(problem["grpc_status"], "NOT_FOUND");
    assert_eq!(problem["grpc_code"], 5);
    assert_eq!(problem["request_id"], "req-1");
    // Trailers-only OK: an empty result.
    let mut ctx = self::ctx();
    let mut request = head("POST", "/v1/stream", Some(2));
    filter.try_request(&mut request, &mut ctx);
    let mut response = grpc_head(Some(("0", "")));
    filter.response(&mut response, &mut ctx);
    let answer = ctx
        .answer_instead
        .take()
        .expect("an answer in the upstream's place");
    assert_eq!(answer.status, 200);
    assert_eq!(&answer.body[..], b"[]");
}

#[test]
fn errors_after_the_head_close_the_stream_with_an_error_element() {
    let filter = filter();
    let body = frames(&[reply(&filter, json!({"text": "a"}))]);
    let (response, out) = exchange(
        &filter,
        "POST",
        "/v1/stream",
        "{}",
        &[&body],
        Some(trailers("14", "going away")),
    );
    assert_eq!(response.status, 200);
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(parsed[0]["text"], "a");
    assert_eq!(
        parsed[1],
        json!({"error": {"code": 14, "status": "UNAVAILABLE", "message": "going away", "http_status": 503}})
    );
    let ndjson = build(json!({ "streaming": "ndjson" })).unwrap();
    let (_, out) = exchange(
        &ndjson,
        "POST",
        "/v1/stream",
        "{}",
        &[&body],
        Some(trailers("8", "slow down")),
    );
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["error"]["status"], "RESOURCE_EXHAUSTED");
    // No trailers at all: UNKNOWN.
    let (_, out) = exchange(&filter, "POST", "/v1/stream", "{}", &[&body], None);
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(parsed[1]["error"]["status"], "UNKNOWN");
    // A unary error before any message: the problem document is the body.
    let (response, out) = exchange(
        &filter,
        "POST",
        "/demo.Greeter/Say",
        "{}",
        &[],
        Some(trailers("7", "no")),
    );
    assert_eq!(response.status, 200);
    let problem: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(problem["status"], 403);
    assert_eq!(problem["grpc_status"], "PERMISSION_DENIED");
    // A frame cut by the end of the stream, and a compressed message.
    let (_, out) = exchange(
        &filter,
        "POST",
        "/v1/stream",
        "{}",
        &[&body[..3]],
        Some(trailers("0", "")),
    );
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(parsed[0]["error"]["status"], "INTERNAL");
    let mut compressed = body.clone();
    compressed[0] = grpc::COMPRESSED_FLAG;
    let (_, out) = exchange(
        &filter,
        "POST",
        "/v1/stream",
        "{}",
        &[&compressed],
        Some(trailers("0", "")),
    );
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(parsed[0]["error"]["status"], "INTERNAL");
    // A message over `max_message_bytes`.
    let small = build(json!({ "max_message_bytes": 2 })).unwrap();
    let (_, out) = exchange(
        &small,
        "POST",
        "/v1/stream",
        "{}",
        &[&body],
        Some(trailers("0", "")),
    );
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(parsed[0]["error"]["code"], 13);
}

#[test]
fn well_known_types_round_trip() {
    let filter = filter();
    let message = message(
        &filter,
        "POST",
        "/demo.Greeter/Say",
        r#"{"when":"2024-05-06T07:08:09.5Z","wait":"1.250s","note":"memo"}"#,
    )
    .unwrap();
    let output = filter.transcoder().methods[0].output.clone();
    let mut as_reply = DynamicMessage::new(output);
    for name in ["when", "wait", "note"] {
        as_reply.set_field_by_name(name, message.get_field_by_name(name).unwrap().into_owned());
    }
    let binding = filter
        .transcoder()
        .find(&http::Method::POST, "/demo.Greeter/Say")
        .unwrap()
        .0;
    let mut out = Vec::new();
    filter
        .transcoder()
        .message_to_json(binding, &as_reply.encode_to_vec(), &mut out)
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"when":"2024-05-06T07:08:09.500Z","wait":"1.250s","note":"memo"}"#
    );
    // From the query too.
    let message =
        super::tests::message(&filter, "GET", "/v1/greetings/1/l?wait=3s&note=n", "").unwrap();
    let wait = message.get_field_by_name("wait").unwrap();
    assert_eq!(
        wait.as_message()
            .unwrap()
            .get_field_by_name("seconds")
            .unwrap()
            .as_ref(),
        &Value::I64(3)
    );
}

#[test]
fn descriptor_and_mapping_errors_are_build_errors() {
    let (path, sha256) = descriptor_file();
    let config = |extra: serde_json::Value| {
        let mut config = json!({ "descriptor": path, "sha256": sha256 });
        for (key, value) in extra.as_object().unwrap() {
            config[key] = value.clone();
        }
        GrpcJson::build(
            serde_json::from_value(config).unwrap(),
            &BuildCtx::default(),
        )
        .err()
        .unwrap()
    };
    let errors = config(json!({ "sha256": "00".repeat(32) }));
    assert_eq!(errors[0].path, "sha256");
    assert!(errors[0].message.contains(&path), "{errors:?}");
    let errors = config(json!({ "sha256": "xyz" }));
    assert_eq!(errors[0].path, "sha256");
    let errors = config(json!({ "services": ["demo.Nope"] }));
    assert_eq!(errors[0].path, "services[0]");
    let errors = config(json!({ "mappings": [
        { "get": "/a", "post": "/b", "method": "demo.Greeter/Say" },
        { "get": "/a", "method": "demo.Greeter/Nope" },
        { "post": "/up", "method": "demo.Greeter/Upload" },
        { "get": "/a/{nope}", "method": "demo.Greeter/Say" },
        { "post": "/a", "method": "demo.Greeter/Say", "body": "nope" },
        { "get": "a", "method": "demo.Greeter/Say" },
    ] }));
    let paths: Vec<&str> = errors.iter().map(|error| error.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "mappings[0]",
            "mappings[1].method",
            "mappings[2].method",
            "mappings[3].get",
            "mappings[4].body",
            "mappings[5].get"
        ]
    );
    std::fs::remove_file(&path).ok();
    let errors = config(json!({}));
    assert_eq!(errors[0].path, "descriptor");
    assert!(errors[0].message.contains("cannot read"), "{errors:?}");
    let garbage = std::env::temp_dir().join(format!(
        "gatehouse-grpc-json-garbage-{}",
        std::process::id()
    ));
    std::fs::write(&garbage, b"\xff\xff\xff").unwrap();
    let errors = GrpcJson::build(
        serde_json::from_value(json!({
            "descriptor": garbage,
            "sha256": hex::encode(sha2::Sha256::digest(b"\xff\xff\xff")),
        }))
        .unwrap(),
        &BuildCtx::default(),
    )
    .err()
    .unwrap();
    std::fs::remove_file(&garbage).ok();
    assert_eq!(errors[0].path, "descriptor");
    assert!(errors[0].message.contains("not a usable"), "{errors:?}");
    // The registry knows the kind; defaults are refused for want of a descriptor.
    let errors = crate::Registry::builtin()
        .build("grpc_json", &serde_json::Value::Null, &BuildCtx::default())
        .err()
        .unwrap();
    assert!(errors.iter().any(|error| error.path == "descriptor"));
}

#[tokio::test]
async fn requests_without_a_body_are_answered_by_a_call() {
    let filter = filter();
    let mut ctx = ctx();
    let mut request = head("GET", "/v1/messages/1", None);
    // The sync phase leaves it to the async one, untouched.
    assert!(filter.try_request(&mut request, &mut ctx).is_none());
    assert_eq!(request.uri.path(), "/v1/messages/1");
    assert!(!ctx.buffers_request_body);
    // Without a caller (as here): 503.
    match filter.request(&mut request, &mut ctx).await {
        Decision::Reject(problem) => assert_eq!(problem.status, 503),
        other => panic!("{other:?}"),
    }
    // A POST with a body binding but no body goes the same way.
    let mut request = head("POST", "/demo.Greeter/Say", Some(0));
    assert!(filter.try_request(&mut request, &mut ctx).is_none());
    // An HTTP/2 request need not declare its body: it goes through the proxy.
    let mut request = head("POST", "/demo.Greeter/Say", None);
    request.set_version(http::Version::HTTP_2);
    assert!(matches!(
        filter.try_request(&mut request, &mut ctx),
        Some(Decision::Continue)
    ));
    // gRPC requests and requests matching nothing pass.
    let mut request = head("POST", "/demo.Greeter/Say", Some(5));
    request
        .insert_header("content-type", "application/grpc")
        .unwrap();
    assert!(matches!(
        filter.try_request(&mut request, &mut ctx),
        Some(Decision::Continue)
    ));
    let mut request = head("GET", "/elsewhere", None);
    assert!(matches!(
        filter.try_request(&mut request, &mut ctx),
        Some(Decision::Continue)
    ));
}

#[test]
fn whole_replies_of_a_call_become_answers() {
    let filter = filter();
    let (binding, values) = filter
        .transcoder()
        .find(&http::Method::GET, "/v1/stream/x")
        .unwrap();
    let bound = filter.transcoder().bind(binding, values, None).unwrap();
    let grpc_reply = |body: Vec<u8>, trailers: http::HeaderMap| Reply {
        status: 200,
        headers: {
            let mut headers = http::HeaderMap::new();
            headers.insert("content-type", HeaderValue::from_static("application/grpc"));
            headers
        },
        body: Bytes::from(body),
        trailers,
    };
    let body = frames(&[
        reply(&filter, json!({"text": "a"})),
        reply(&filter, json!({"text": "b"})),
    ]);
    match filter.answer(&bound, &grpc_reply(body.clone(), trailers("0", "")), "id") {
        Decision::Respond(response) => {
            assert_eq!(response.status, 200);
            assert_eq!(&response.body[..], br#"[{"text":"a"},{"text":"b"}]"#);
        }
        other => panic!("{other:?}"),
    }
    match filter.answer(
        &bound,
        &grpc_reply(Vec::new(), trailers("3", "bad name")),
        "id",
    ) {
        Decision::Reject(problem) => {
            assert_eq!(problem.status, 400);
            assert_eq!(problem.kind, ProblemType::GrpcError);
            assert_eq!(problem.detail.as_deref(), Some("bad name"));
        }
        other => panic!("{other:?}"),
    }
    let not_grpc = Reply {
        status: 502,
        ..Reply::default()
    };
    assert!(matches!(
        filter.answer(&bound, &not_grpc, "id"),
        Decision::Reject(problem) if problem.status == 502
    ));
}

#[test]
fn an_http2_requests_authority_survives_the_new_path() {
    let filter = filter();
    let mut ctx = ctx();
    // An HTTP/2 request carries its authority in the URI, not in a Host header.
    let mut request = head("POST", "/demo.Greeter/Say", Some(2));
    request.set_uri("https://api.example.com/demo.Greeter/Say".parse().unwrap());
    assert!(request.uri.authority().is_some());
    filter.try_request(&mut request, &mut ctx);
    assert_eq!(request.uri.authority().unwrap().as_str(), "api.example.com");
    assert_eq!(request.uri.scheme_str(), Some("https"));
    assert_eq!(request.uri.path(), "/demo.Greeter/Say");
}
