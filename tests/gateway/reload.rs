//! Hot reload: by file change and SIGHUP, under load with no failed request, and rejection of a
//! broken config while the old one keeps serving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{request, spawn_echo, Gateway};

fn routes(
    blue: std::net::SocketAddr,
    green: std::net::SocketAddr,
    live: &str,
    marker: usize,
) -> String {
    format!(
        r#"
upstreams:
  - {{ name: blue, targets: [{{ address: "{blue}" }}] }}
  - {{ name: green, targets: [{{ address: "{green}" }}] }}
routes:
  - name: app
    match: {{ paths: [{{ prefix: /app }}] }}
    upstream: {live}
    filters:
      - kind: response_headers
        config: {{ set: {{ x-config-marker: "{marker}" }} }}
"#
    )
}

#[test]
fn reload_under_load_drops_no_request() {
    let blue = spawn_echo("blue");
    let green = spawn_echo("green");
    let gateway = Gateway::start(&routes(blue, green, "blue", 0));
    let address = gateway.addr;
    let done = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let mut seen = std::collections::HashSet::new();
                let mut count = 0;
                while count < 500 {
                    let reply = request(address, "GET", "/app/x", &[], b"");
                    if reply.status != 200 {
                        failures.push(format!("{} {}", reply.status, reply.text()));
                    } else {
                        // Each response comes whole from one config: the upstream and the marker agree.
                        let marker: usize =
                            reply.header("x-config-marker").unwrap().parse().unwrap();
                        let expected = if marker.is_multiple_of(2) {
                            "blue"
                        } else {
                            "green"
                        };
                        assert_eq!(reply.upstream(), expected, "a response mixed two configs");
                        seen.insert(marker);
                    }
                    count += 1;
                }
                let _ = done;
                (failures, seen)
            })
        })
        .collect();
    let mut version = gateway.config_version();
    for rewrite in 1..=20usize {
        let live = if rewrite.is_multiple_of(2) {
            "blue"
        } else {
            "green"
        };
        gateway.write_config(&routes(blue, green, live, rewrite));
        version = gateway.wait_for_version_above(version);
        std::thread::sleep(Duration::from_millis(30));
    }
    done.store(true, Ordering::Relaxed);
    let mut markers = std::collections::HashSet::new();
    for client in clients {
        let (failures, seen) = client.join().unwrap();
        assert!(
            failures.is_empty(),
            "failed requests during reload: {failures:?}"
        );
        markers.extend(seen);
    }
    assert_eq!(version, 21, "each of the 20 rewrites was applied");
    assert!(
        markers.len() > 2,
        "requests saw only {markers:?} of 21 configs"
    );
}

#[test]
fn invalid_config_is_rejected_and_the_old_one_keeps_serving() {
    let blue = spawn_echo("blue");
    let green = spawn_echo("green");
    let gateway = Gateway::start(&routes(blue, green, "blue", 0));
    let version = gateway.config_version();
    gateway.write_config(&routes(blue, green, "billing", 1));
    // The rejection is counted; wait for it rather than sleeping.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gateway
        .metrics()
        .contains("gatehouse_config_reloads_total{result=\"rejected\"} 1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no rejection counted:\n{}",
            gateway.metrics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(gateway.config_version(), version);
    let reply = gateway.get("/app/x");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.upstream(), "blue");
    assert!(
        gateway
            .stderr()
            .contains("routes[0].upstream: no upstream named \\\"billing\\\"")
            || gateway
                .stderr()
                .contains("routes[0].upstream: no upstream named \"billing\""),
        "the rejection is logged with its path:\n{}",
        gateway.stderr()
    );

    // Broken YAML is rejected the same way.
    std::fs::write(&gateway.config_path, "version: 1\nroutes: [\n").unwrap();
    while !gateway
        .metrics()
        .contains("gatehouse_config_reloads_total{result=\"rejected\"} 2")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no second rejection counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(gateway.get("/app/x").upstream(), "blue");

    // A good config afterwards applies.
    gateway.write_config(&routes(blue, green, "green", 2));
    gateway.wait_for_version_above(version);
    assert_eq!(gateway.get("/app/x").upstream(), "green");
}

#[test]
fn sighup_reloads_when_watching_is_off() {
    let blue = spawn_echo("blue");
    let green = spawn_echo("green");
    let with_watch_off = |live: &str| {
        format!(
            "config: {{ watch: false }}\n{}",
            routes(blue, green, live, 0)
        )
    };
    let gateway = Gateway::start(&with_watch_off("blue"));
    let version = gateway.config_version();
    gateway.write_config(&with_watch_off("green"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        gateway.get("/app/x").upstream(),
        "blue",
        "reloaded without being asked"
    );
    gateway.signal("HUP");
    gateway.wait_for_version_above(version);
    assert_eq!(gateway.get("/app/x").upstream(), "green");
}
