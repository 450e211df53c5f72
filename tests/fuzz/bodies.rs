//! What each fuzz target does with one input. The cargo-fuzz targets (`fuzz_targets/`, run with
//! a nightly toolchain) and the corpus replay under stable (`tests/fuzz_corpora.rs`, part of
//! `make test`) call the same functions, so every input a fuzzing run kept is checked by every
//! test run. A target must never panic, whatever the input.

use std::sync::OnceLock;

/// The PROXY protocol header parser: never panics, never claims more bytes than it was given,
/// and reads the same header with anything after it.
pub fn proxy_header(data: &[u8]) {
    use gatehouse::edge::proxy_protocol::{parse, Parse};
    if let Ok(Parse::Complete { header, length }) = parse(data) {
        assert!(length <= data.len());
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(parse(&longer), Ok(Parse::Complete { header, length }));
    }
}

/// Path normalisation: a normalised path is absolute, has no dot segments and normalises to
/// itself.
pub fn path(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Some(normalized)) = gatehouse::router::normalize::normalize_path(text) {
        assert!(normalized.starts_with('/'), "{normalized:?}");
        assert!(
            !normalized
                .split('/')
                .any(|segment| segment == "." || segment == ".."),
            "{normalized:?}"
        );
        match gatehouse::router::normalize::normalize_path(&normalized) {
            Ok(None) => {}
            Ok(Some(again)) => assert_eq!(again, normalized),
            Err(error) => panic!("{normalized:?} does not normalise again: {error:?}"),
        }
    }
}

/// The config compile step, from YAML text: every input is a config or a list of errors.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Inputs that would reach out of the process (Redis, PostgreSQL, JWKS, DNS) or read files
    // are not what this target is about.
    for outside in [
        "redis",
        "postgres",
        "jwks",
        "file:",
        "env:",
        "tls",
        "introspection",
    ] {
        if text.contains(outside) {
            return;
        }
    }
    static ENV: OnceLock<gatehouse::config::CompileEnv> = OnceLock::new();
    let env = ENV.get_or_init(gatehouse::config::CompileEnv::default);
    if let Ok(loaded) = gatehouse::config::load::parse_yaml(text) {
        let _ = gatehouse::config::compile(loaded, "fuzz", 1, env);
    }
}

/// A bearer token through the `jwt` filter (RS256, one static key).
pub fn jwt(data: &[u8]) {
    use gatehouse_filters::{BuildCtx, Filter, FilterKind};
    static FILTER: OnceLock<gatehouse_filters::jwt::Jwt> = OnceLock::new();
    let filter = FILTER.get_or_init(|| {
        let config = serde_json::json!({
            "issuer": "https://id.test",
            "algorithms": ["RS256"],
            "keys": [{ "kid": "k1", "algorithm": "RS256", "public_key": include_str!("../support/keys/rsa1.pub") }],
        });
        gatehouse_filters::jwt::Jwt::build(
            serde_json::from_value(config).expect("a valid jwt config"),
            &BuildCtx::default(),
        )
        .unwrap_or_else(|errors| panic!("{errors:?}"))
    });
    let mut value = b"Bearer ".to_vec();
    value.extend_from_slice(data);
    let Ok(value) = http::HeaderValue::from_bytes(&value) else {
        return;
    };
    let mut request = pingora_http::RequestHeader::build("GET", b"/", None).expect("a request");
    request
        .insert_header(http::header::AUTHORIZATION, value)
        .expect("a header");
    let mut ctx = gatehouse_filters::RequestContext::new(std::time::Instant::now());
    if let Some(decision) = filter.try_request(&mut request, &mut ctx) {
        // Nothing the fuzzer makes is signed by the key.
        assert!(
            !matches!(decision, gatehouse_filters::Decision::Continue) || ctx.consumer.is_none(),
            "an unsigned token was accepted"
        );
    }
}

/// The template parser: a template that parses renders without panicking.
pub fn template(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(template) = gatehouse_filters::template::Template::parse(text) {
        let mut ctx = gatehouse_filters::RequestContext::new(std::time::Instant::now());
        ctx.client_addr = Some(std::net::Ipv4Addr::LOCALHOST.into());
        let rendered = template.render(&mut ctx, |_| Some("value"));
        if let Some(literal) = template.as_literal() {
            assert_eq!(rendered, literal);
        }
    }
}
