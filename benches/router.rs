//! Router micro-benchmarks: matching against 1,000 routes (prefix, exact, regex and host
//! routes mixed), and path normalisation.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gatehouse::config::load::parse_yaml;
use gatehouse::router::normalize::normalize_path;
use gatehouse::router::RequestView;
use http::{HeaderMap, Method};

fn thousand_routes() -> gatehouse::config::Snapshot {
    let mut yaml = String::from(
        "version: 1\nserver: { listeners: [{ name: public, address: \"127.0.0.1:0\" }] }\nupstreams: [{ name: u, targets: [{ address: \"127.0.0.1:9001\" }] }]\nroutes:\n",
    );
    for index in 0..1000 {
        let route = match index % 4 {
            0 => format!("  - {{ name: r{index}, upstream: u, match: {{ paths: [{{ prefix: /service{index}/api }}] }} }}\n"),
            1 => format!("  - {{ name: r{index}, upstream: u, match: {{ paths: [{{ exact: /service{index}/status }}], methods: [GET] }} }}\n"),
            2 => format!("  - {{ name: r{index}, upstream: u, match: {{ hosts: [\"tenant{index}.example.com\"], paths: [{{ prefix: /t }}] }} }}\n"),
            _ => format!("  - {{ name: r{index}, upstream: u, match: {{ paths: [{{ regex: \"/v[0-9]+/items{index}/(?P<id>[^/]+)\" }}] }} }}\n"),
        };
        yaml.push_str(&route);
    }
    gatehouse::config::compile(parse_yaml(&yaml).unwrap(), "bench", 1, &Default::default()).unwrap()
}

fn router(criterion: &mut Criterion) {
    let snapshot = thousand_routes();
    let headers = HeaderMap::new();
    let method = Method::GET;
    let mut group = criterion.benchmark_group("router_1000_routes");
    for (name, host, path) in [
        ("prefix", None, "/service500/api/users/42"),
        ("exact", None, "/service501/status"),
        ("host", Some("tenant502.example.com"), "/t/x"),
        ("regex", None, "/v2/items503/abc"),
        ("miss", None, "/nothing/here"),
    ] {
        group.bench_function(name, |bencher| {
            bencher.iter(|| {
                let view = RequestView {
                    method: &method,
                    host,
                    path: black_box(path),
                    query: None,
                    headers: &headers,
                };
                black_box(snapshot.router.find(&view))
            })
        });
    }
    group.finish();
}

fn normalisation(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("normalize_path");
    group.bench_function("already_normal", |bencher| {
        bencher.iter(|| normalize_path(black_box("/service500/api/users/42")))
    });
    group.bench_function("dot_segments_and_escapes", |bencher| {
        bencher.iter(|| normalize_path(black_box("/service500/./api/%7Eusers/../users//42")))
    });
    group.finish();
}

criterion_group!(benches, router, normalisation);
criterion_main!(benches);
