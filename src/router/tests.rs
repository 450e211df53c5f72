use super::*;
use crate::config::model::{MatchConfig, RouteConfig};

fn route(name: &str, priority: i32, matcher: MatchConfig) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        priority,
        matcher,
        upstream: "u".into(),
        strip_prefix: None,
        rewrite: None,
        auth: None,
        timeout: None,
        backup: None,
        retry: None,
        split: Vec::new(),
        mirror: None,
        server_timing: None,
        metrics: Default::default(),
        websocket: None,
        filters: Vec::new(),
    }
}

fn paths(paths: Vec<PathMatch>) -> MatchConfig {
    MatchConfig {
        paths,
        ..Default::default()
    }
}

fn find(
    router: &Router,
    method: &str,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
    query: Option<&str>,
) -> Option<String> {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let view = RequestView {
        method: &method,
        host,
        path,
        query,
        headers: &map,
    };
    router
        .find(&view)
        .map(|found| router.routes[found.route].name.clone())
}

#[test]
fn exact_beats_prefix_and_longer_prefix_beats_shorter() {
    let router = Router::build(&[
        route("root", 0, paths(vec![PathMatch::Prefix("/".into())])),
        route("users", 0, paths(vec![PathMatch::Prefix("/users".into())])),
        route("me", 0, paths(vec![PathMatch::Exact("/users/me".into())])),
    ])
    .unwrap();
    assert_eq!(
        find(&router, "GET", None, "/users/me", &[], None).as_deref(),
        Some("me")
    );
    assert_eq!(
        find(&router, "GET", None, "/users/7", &[], None).as_deref(),
        Some("users")
    );
    assert_eq!(
        find(&router, "GET", None, "/users", &[], None).as_deref(),
        Some("users")
    );
    assert_eq!(
        find(&router, "GET", None, "/usersx", &[], None).as_deref(),
        Some("root")
    );
}

#[test]
fn priority_beats_specificity() {
    let router = Router::build(&[
        route("specific", 0, paths(vec![PathMatch::Exact("/a/b".into())])),
        route("important", 10, paths(vec![PathMatch::Prefix("/a".into())])),
    ])
    .unwrap();
    assert_eq!(
        find(&router, "GET", None, "/a/b", &[], None).as_deref(),
        Some("important")
    );
}

#[test]
fn hosts_methods_headers_and_query() {
    let router = Router::build(&[
        route(
            "exact-host",
            0,
            MatchConfig {
                hosts: vec!["api.example.com".into()],
                ..Default::default()
            },
        ),
        route(
            "wildcard-host",
            0,
            MatchConfig {
                hosts: vec!["*.example.com".into()],
                ..Default::default()
            },
        ),
        route(
            "post-only",
            0,
            MatchConfig {
                paths: vec![PathMatch::Prefix("/write".into())],
                methods: vec!["post".into()],
                ..Default::default()
            },
        ),
        route(
            "v2",
            0,
            MatchConfig {
                paths: vec![PathMatch::Prefix("/h".into())],
                headers: vec![ValueMatch {
                    name: "x-api-version".into(),
                    present: None,
                    equals: Some("2".into()),
                    regex: None,
                }],
                query: vec![ValueMatch {
                    name: "preview".into(),
                    present: Some(true),
                    equals: None,
                    regex: None,
                }],
                ..Default::default()
            },
        ),
    ])
    .unwrap();
    assert_eq!(
        find(&router, "GET", Some("api.example.com"), "/x", &[], None).as_deref(),
        Some("exact-host")
    );
    assert_eq!(
        find(&router, "GET", Some("a.b.example.com"), "/x", &[], None).as_deref(),
        Some("wildcard-host")
    );
    assert_eq!(
        find(&router, "GET", Some("example.com"), "/x", &[], None),
        None
    );
    assert_eq!(
        find(&router, "POST", None, "/write", &[], None).as_deref(),
        Some("post-only")
    );
    assert_eq!(find(&router, "GET", None, "/write", &[], None), None);
    assert_eq!(
        find(
            &router,
            "GET",
            None,
            "/h",
            &[("x-api-version", "2")],
            Some("preview")
        )
        .as_deref(),
        Some("v2")
    );
    assert_eq!(
        find(
            &router,
            "GET",
            None,
            "/h",
            &[("x-api-version", "1")],
            Some("preview")
        ),
        None
    );
    assert_eq!(
        find(
            &router,
            "GET",
            None,
            "/h",
            &[("x-api-version", "2")],
            Some("other=1")
        ),
        None
    );
}

#[test]
fn regex_paths_capture_named_groups() {
    let router = Router::build(&[route(
        "versioned",
        0,
        paths(vec![PathMatch::Regex(
            "/v(?P<version>[0-9]+)/users/(?P<id>[^/]+)".into(),
        )]),
    )])
    .unwrap();
    let method = Method::GET;
    let headers = HeaderMap::new();
    let view = RequestView {
        method: &method,
        host: None,
        path: "/v2/users/42",
        query: None,
        headers: &headers,
    };
    let found = router.find(&view).unwrap();
    assert_eq!(
        found.captures,
        vec![
            ("version".to_string(), "2".to_string()),
            ("id".to_string(), "42".to_string())
        ]
    );
    // Anchored: a longer path does not match.
    assert_eq!(
        find(&router, "GET", None, "/v2/users/42/extra", &[], None),
        None
    );
}

#[test]
fn all_errors_are_reported_with_paths() {
    let errors = Router::build(&[route(
        "bad",
        0,
        MatchConfig {
            hosts: vec!["*.".into()],
            paths: vec![
                PathMatch::Regex("(".into()),
                PathMatch::Prefix("nope".into()),
            ],
            methods: vec!["GE T".into()],
            ..Default::default()
        },
    )])
    .unwrap_err();
    let paths: Vec<_> = errors.iter().map(|error| error.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "routes[0].match.hosts[0]",
            "routes[0].match.methods[0]",
            "routes[0].match.paths[0].regex",
            "routes[0].match.paths[1]"
        ]
    );
}

#[test]
fn explain_names_the_winner_and_why_others_lost() {
    let router = Router::build(&[
        route("root", 0, paths(vec![PathMatch::Prefix("/".into())])),
        route("users", 0, paths(vec![PathMatch::Prefix("/users".into())])),
        route(
            "posts-only",
            0,
            MatchConfig {
                paths: vec![PathMatch::Prefix("/users".into())],
                methods: vec!["POST".into()],
                ..Default::default()
            },
        ),
    ])
    .unwrap();
    let method = Method::GET;
    let headers = HeaderMap::new();
    let view = RequestView {
        method: &method,
        host: None,
        path: "/users/1",
        query: None,
        headers: &headers,
    };
    let (winner, candidates) = router.explain(&view);
    assert_eq!(winner, Some(1));
    let outcome = |name: &str| {
        candidates
            .iter()
            .find(|c| c.route == name)
            .unwrap()
            .outcome
            .clone()
    };
    assert_eq!(outcome("users"), "selected");
    assert_eq!(outcome("root"), "beaten: less specific path");
    assert_eq!(outcome("posts-only"), "rejected: method did not match");
}

#[test]
fn request_host_strips_port_and_lowercases() {
    let uri: http::Uri = "/x".parse().unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(http::header::HOST, "API.Example.com:8080".parse().unwrap());
    assert_eq!(request_host(&uri, &headers).unwrap(), "api.example.com");
    headers.insert(http::header::HOST, "[::1]:8080".parse().unwrap());
    assert_eq!(request_host(&uri, &headers).unwrap(), "[::1]");
}
