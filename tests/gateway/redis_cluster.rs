//! Rate limiting on a real Redis Cluster (`redis-cluster://` seed nodes) and through a Sentinel
//! (`redis-sentinel://`): exact admission with
//! buckets spread over the masters, each failure policy's answer while a master is dead, and
//! exact limiting again once the cluster heals, by the master's return or by a replica's
//! promotion.

use std::time::{Duration, Instant};

use crate::rate_limit::{
    assert_failure_modes, failure_policy_gateway, limited_gateway, redis_state,
    unique_name as unique, Phases,
};
use crate::support::redis_cluster::{RedisCluster, RedisSentinel};
use crate::support::Gateway;

/// Waits up to `within` for `/readyz` to show Redis `wanted`.
fn wait_for_redis_state(gateway: &Gateway, wanted: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while redis_state(gateway) != wanted {
        assert!(
            Instant::now() < deadline,
            "/readyz never showed Redis {wanted}: {}",
            crate::support::get(gateway.ops, "/readyz").text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `count` concurrent requests (20 threads) to `path` with `headers`; how many got 200. Every
/// answer must be 200 or 429.
fn admitted(gateway: &Gateway, path: &str, headers: &[(&str, &str)], count: usize) -> usize {
    let threads: Vec<_> = (0..20)
        .map(|thread| {
            let address = gateway.addr;
            let path = path.to_string();
            let headers: Vec<(String, String)> = headers
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect();
            std::thread::spawn(move || {
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_str()))
                    .collect();
                let mut admitted = 0;
                for _ in (thread..count).step_by(20) {
                    let reply = crate::support::request(address, "GET", &path, &headers, b"");
                    match reply.status {
                        200 => admitted += 1,
                        429 => {}
                        other => panic!("{path}: unexpected {other}: {}", reply.text()),
                    }
                }
                admitted
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|thread| thread.join().unwrap())
        .sum()
}

/// One route limited per `x-tenant` header by the `redis` policy `name`, `fail_closed`.
fn tenant_gateway(url: &str, deadline: &str, name: &str, capacity: u64) -> Gateway {
    limited_gateway(
        &format!("redis: {{ url: \"{url}\", command_timeout: {deadline} }}"),
        &format!("{{ name: {name}, key: [{{ header: x-tenant }}], capacity: {capacity}, refill: {{ tokens: 1, every: 1h }}, backend: redis, on_redis_error: fail_closed }}"),
    )
}

#[test]
fn a_redis_cluster_limits_exactly_with_buckets_spread_over_its_masters() {
    let cluster = RedisCluster::start(3, 0);
    let name = unique("tenant");
    let gateway = tenant_gateway(&cluster.url(), "1s", &name, 20);
    wait_for_redis_state(&gateway, "up", Duration::from_secs(10));
    let ready = crate::support::get(gateway.ops, "/readyz").json();
    assert!(
        ready["redis"]["url"]
            .as_str()
            .unwrap()
            .starts_with("redis-cluster://127.0.0.1:"),
        "{ready}"
    );

    // Twelve tenants, 40 concurrent requests each: exactly 20 admitted per tenant.
    for tenant in 0..12 {
        let tenant = format!("t{tenant}");
        let got = admitted(&gateway, "/x", &[("x-tenant", &tenant)], 40);
        assert_eq!(got, 20, "tenant {tenant}");
    }
    // Each bucket is one hash-tagged key; together they live on more than one master.
    let keys = cluster.keys(&format!("gatehouse:ratelimit:*{name}"));
    assert_eq!(keys.len(), 12, "{keys:?}");
    let mut masters: Vec<u16> = keys.iter().map(|(port, _)| *port).collect();
    masters.sort_unstable();
    masters.dedup();
    assert!(masters.len() >= 2, "all buckets on one master: {keys:?}");
}

#[test]
fn a_dead_cluster_master_gives_each_policy_its_failure_mode_and_exact_limits_once_it_returns() {
    const DEADLINE_MS: u64 = 100;
    const SLACK_MS: u64 = 400;
    let mut cluster = RedisCluster::start(3, 0);
    let gateway = failure_policy_gateway(&cluster.url(), DEADLINE_MS);
    wait_for_redis_state(&gateway, "up", Duration::from_secs(10));
    let mut phases = Phases::new(&gateway, Duration::from_millis(DEADLINE_MS + SLACK_MS));
    let [closed, open, fallback] = phases.run("healthy", 3);
    assert!(
        closed
            .iter()
            .chain(&open)
            .chain(&fallback)
            .all(|&status| status == 200),
        "{closed:?} {open:?} {fallback:?}"
    );

    // A master dies: once the cluster knows, no slot is served (cluster_state:fail), and each
    // policy answers by its failure mode within the command deadline.
    let victim = cluster.master_ports()[0];
    cluster.kill(victim);
    cluster.wait_failed();
    assert_failure_modes("master down", &phases.run("master down", 15));
    assert_eq!(redis_state(&gateway), "down");

    // The master returns (empty): the cluster heals, the node finds it without a restart, and
    // admission is exact again.
    cluster.restart(victim);
    wait_for_redis_state(&gateway, "up", Duration::from_secs(15));
    assert_eq!(admitted(&gateway, "/exact", &[], 200), 50);
}

#[test]
fn a_replica_promoted_in_place_of_a_dead_master_limits_exactly() {
    const DEADLINE_MS: u64 = 100;
    let mut cluster = RedisCluster::start(3, 1);
    let name = unique("promoted");
    let gateway = tenant_gateway(&cluster.url(), &format!("{DEADLINE_MS}ms"), &name, 30);
    wait_for_redis_state(&gateway, "up", Duration::from_secs(10));
    assert_eq!(admitted(&gateway, "/", &[("x-tenant", "before")], 60), 30);
    let keys = cluster.keys(&format!("gatehouse:ratelimit:*{name}"));
    assert_eq!(keys.len(), 1, "{keys:?}");
    let (victim, key) = keys[0].clone();
    cluster.wait_replicated();

    // The master holding the bucket dies; its replica takes over after the node timeout. Until
    // then, requests for it are refused (fail_closed) within the deadline, never hung.
    cluster.kill(victim);
    let started = Instant::now();
    let mut during = Vec::new();
    while cluster.master_ports().len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no replica was promoted"
        );
        let asked = Instant::now();
        let reply =
            crate::support::request(gateway.addr, "GET", "/", &[("x-tenant", "during")], b"");
        assert!(
            asked.elapsed() <= Duration::from_millis(DEADLINE_MS + 400),
            "answered after {:?}",
            asked.elapsed()
        );
        during.push(reply.status);
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.wait_ok();
    assert!(
        during
            .iter()
            .all(|&status| [200, 429, 503].contains(&status)),
        "{during:?}"
    );
    let promoted = cluster.master_of(&key);
    assert_ne!(promoted, victim);

    // The gateway follows the new topology without a restart: exact admission for a new
    // tenant, and the replicated bucket of the old one is still spent.
    wait_for_redis_state(&gateway, "up", Duration::from_secs(15));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // The first requests after the failover may still meet the old topology (503).
        let reply =
            crate::support::request(gateway.addr, "GET", "/", &[("x-tenant", "probe")], b"");
        if reply.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never served again: {}",
            reply.status
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(admitted(&gateway, "/", &[("x-tenant", "after")], 60), 30);
    let before = admitted(&gateway, "/", &[("x-tenant", "before")], 20);
    assert!(
        before <= 2,
        "the promoted replica lost the spent bucket: {before} admitted"
    );
}

#[test]
fn through_sentinel_the_primary_it_names_limits_exactly() {
    let sentinel = RedisSentinel::start();
    let name = unique("sentinel");
    let gateway = tenant_gateway(&sentinel.url(), "1s", &name, 20);
    wait_for_redis_state(&gateway, "up", Duration::from_secs(10));
    assert_eq!(admitted(&gateway, "/", &[("x-tenant", "s")], 40), 20);
    // The bucket lives on the primary the Sentinel named.
    let keys = crate::support::redis_cluster::redis_cli(
        sentinel.primary_port,
        &[
            "--scan",
            "--pattern",
            &format!("gatehouse:ratelimit:*{name}"),
        ],
    );
    assert_eq!(keys.lines().count(), 1, "{keys}");
}
