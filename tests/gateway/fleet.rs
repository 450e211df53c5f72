//! Three nodes as Gatehouse is deployed: HAProxy in `mode tcp` spreads connections over them
//! (health checks on `/readyz`), and they share one PostgreSQL config store and one Redis. Under
//! open-loop load: a config change applies to all three, one node is SIGTERMed and restarted,
//! and a global rate limit holds across the fleet, with no failed request.
//!
//! `make test` runs each load phase for a few seconds; `make soak` sets
//! `GATEHOUSE_FLEET_SECONDS` for a long run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::haproxy::Haproxy;
use crate::support::load::{OpenLoop, Outcome};
use crate::support::pg::TestDatabase;
use crate::support::{free_port, get, spawn_echo, Gateway};

/// Seconds of each load phase (`GATEHOUSE_FLEET_SECONDS`, default 4).
fn phase_length() -> Duration {
    let seconds = std::env::var("GATEHOUSE_FLEET_SECONDS")
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(4)
        .max(3);
    Duration::from_secs(seconds)
}

/// Requests per second of the open-loop load.
const RATE: f64 = 150.0;
/// The global limit of `/limited`, shared by the fleet through Redis.
const GLOBAL_CAPACITY: usize = 60;

/// The shared config: `/` answers with the config's marker (`x-config`), `/limited` is limited
/// fleet-wide.
fn shared_config(echo: SocketAddr, redis: &str, bucket: &str, marker: &str) -> String {
    format!(
        r#"version: 1
redis: {{ url: "{redis}", command_timeout: 1s }}
upstreams:
  - {{ name: echo, targets: [{{ address: "{echo}" }}] }}
routes:
  - name: main
    match: {{ paths: [{{ prefix: / }}] }}
    upstream: echo
    filters: [{{ kind: response_headers, config: {{ set: {{ x-config: {marker} }} }} }}]
  - name: limited
    match: {{ paths: [{{ prefix: /limited }}] }}
    upstream: echo
    filters:
      - kind: rate_limit
        config:
          policies:
            - {{ name: {bucket}, key: [route], capacity: {GLOBAL_CAPACITY}, refill: {{ tokens: 1, every: 1h }}, backend: redis, on_redis_error: fail_closed }}
"#
    )
}

/// HAProxy in `mode tcp` over the nodes, each checked with `GET /readyz` on its ops port; a
/// connection a node refuses is retried on another.
struct Balancer {
    _haproxy: Haproxy,
    address: SocketAddr,
}

impl Balancer {
    fn start(nodes: &[&Gateway]) -> Balancer {
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let servers: String = nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                format!(
                    "  server node{index} {} check port {}\n",
                    node.addr,
                    node.ops.port()
                )
            })
            .collect();
        let config = format!(
            "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  retries 3\n  option redispatch\nfrontend fleet\n  bind {address}\n  default_backend nodes\nbackend nodes\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n  default-server inter 200ms fastinter 100ms fall 2 rise 2\n{servers}"
        );
        let haproxy = Haproxy::start(&config);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(address).is_err() {
            assert!(Instant::now() < deadline, "HAProxy never listened");
            std::thread::sleep(Duration::from_millis(25));
        }
        Balancer {
            _haproxy: haproxy,
            address,
        }
    }
}

/// Requests of route `route` a node has served (its `gatehouse_requests_total`).
fn served(node: &Gateway, route: &str) -> u64 {
    node.metrics()
        .lines()
        .filter(|line| {
            line.starts_with("gatehouse_requests_total{")
                && line.contains(&format!("route=\"{route}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn assert_none_failed(label: &str, outcomes: &[Outcome]) {
    let failed: Vec<&Outcome> = outcomes.iter().filter(|outcome| !outcome.ok()).collect();
    assert!(
        failed.is_empty(),
        "{label}: {} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(10)]
    );
    println!("{label}: {} requests, none failed", outcomes.len());
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_fleet_behind_an_l4_balancer_changes_config_restarts_a_node_and_shares_a_limit() {
    let length = phase_length();
    let database = TestDatabase::create();
    let echo = spawn_echo("echo");
    let redis = std::env::var("GATEHOUSE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let bucket = format!("fleet-{}-{}", std::process::id(), fastrand::u64(..));
    database.push(&shared_config(echo, &redis, &bucket, "v0"));
    let source = format!(
        "config: {{ source: postgres, postgres: {{ url: \"{}\", resync_interval: 1s }} }}",
        database.url
    );
    // Behind an L4 balancer a kept-alive connection stays on its node: closing each after 50
    // requests lets the balancer spread the load again, and send a restarted node its share.
    let mut nodes: Vec<Gateway> = (0..3)
        .map(|_| Gateway::start_with("  max_requests_per_connection: 50", &source))
        .collect();
    let balancer = Balancer::start(&nodes.iter().collect::<Vec<_>>());
    wait_until("every node to serve v0", Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|node| get(node.addr, "/").header("x-config") == Some("v0"))
    });

    // 1. A config change through PostgreSQL, under load, reaches every node.
    let load = OpenLoop::start(balancer.address, "/", RATE, length, 8);
    std::thread::sleep(length / 3);
    database.execute(
        "UPDATE filters SET config = '{\"set\": {\"x-config\": \"v1\"}}' WHERE route = 'main' AND kind = 'response_headers'",
    );
    wait_until("every node to serve v1", Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|node| get(node.addr, "/").header("x-config") == Some("v1"))
    });
    let outcomes = load.finish();
    assert_none_failed("config change", &outcomes);
    for (index, node) in nodes.iter().enumerate() {
        assert!(served(node, "main") > 0, "node {index} got no traffic");
    }

    // 2. One node is SIGTERMed and restarted under load: the other two absorb its traffic, and
    // it takes its share again once HAProxy sees it ready.
    let load = OpenLoop::start(balancer.address, "/", RATE, length * 2, 8);
    std::thread::sleep(length / 3);
    let restarted = &mut nodes[1];
    restarted.signal("TERM");
    let child = restarted.child.as_mut().unwrap();
    let stopped = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "the node did not exit"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    restarted.spawn(false);
    restarted.wait_ready();
    wait_until("the restarted node to get traffic", length * 2, || {
        served(&nodes[1], "main") > 0
    });
    let outcomes = load.finish();
    assert_none_failed("SIGTERM and restart", &outcomes);
    assert_eq!(get(nodes[1].addr, "/").header("x-config"), Some("v1"));

    // 3. A global limit through Redis: the fleet admits the capacity once, spread over nodes.
    let replies = crate::support::load::concurrent(balancer.address, 12, 150, |_, connection| {
        // A fresh connection per request, so HAProxy spreads them over the nodes.
        connection.send("GET", "/limited", &[("Connection", "close")], b"")
    });
    let mut admitted = 0;
    for (_, reply) in &replies {
        match reply.as_ref().map(|reply| reply.status) {
            Ok(200) => admitted += 1,
            Ok(429) => {}
            other => panic!("/limited: {other:?}"),
        }
    }
    assert_eq!(admitted, GLOBAL_CAPACITY, "the fleet-wide limit");
    let nodes_limiting = nodes
        .iter()
        .filter(|node| served(node, "limited") > 0)
        .count();
    assert!(
        nodes_limiting >= 2,
        "one node served every /limited request"
    );
}
