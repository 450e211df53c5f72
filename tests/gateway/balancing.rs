//! Load-balancing policies through the real gateway.

use std::collections::HashMap;

use crate::support::{spawn_echo, Gateway};

fn pool_gateway(balance: &str, extra: &str, weights: [u32; 3]) -> Gateway {
    let a = spawn_echo("a");
    let b = spawn_echo("b");
    let c = spawn_echo("c");
    Gateway::start(&format!(
        r#"
upstreams:
  - name: pool
    balance: {balance}
    {extra}
    targets:
      - {{ address: "{a}", weight: {wa} }}
      - {{ address: "{b}", weight: {wb} }}
      - {{ address: "{c}", weight: {wc} }}
routes:
  - {{ name: all, upstream: pool, match: {{ paths: [{{ prefix: / }}] }} }}
"#,
        wa = weights[0],
        wb = weights[1],
        wc = weights[2],
    ))
}

fn distribution(
    gateway: &Gateway,
    count: usize,
    headers: &[(&str, &str)],
) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..count {
        let reply = gateway.request("GET", "/x", headers, b"");
        assert_eq!(reply.status, 200);
        *seen.entry(reply.upstream()).or_default() += 1;
    }
    seen
}

#[test]
fn round_robin_spreads_evenly() {
    let gateway = pool_gateway("round_robin", "", [1, 1, 1]);
    let seen = distribution(&gateway, 30, &[]);
    assert_eq!(seen.len(), 3, "{seen:?}");
    for count in seen.values() {
        assert_eq!(*count, 10, "{seen:?}");
    }
}

#[test]
fn weighted_follows_weights() {
    let gateway = pool_gateway("weighted", "", [4, 1, 1]);
    let seen = distribution(&gateway, 60, &[]);
    assert_eq!(seen["a"], 40, "{seen:?}");
    assert_eq!(seen["b"], 10, "{seen:?}");
    assert_eq!(seen["c"], 10, "{seen:?}");
}

#[test]
fn consistent_hash_by_header_cookie_and_client_ip() {
    let gateway = pool_gateway(
        "consistent_hash",
        "hash_on: { header: x-user-id }",
        [1, 1, 1],
    );
    let mut owners = HashMap::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let first = distribution(&gateway, 3, &[("x-user-id", &user)]);
        assert_eq!(first.len(), 1, "{user} moved between targets: {first:?}");
        owners.insert(user, first.into_keys().next().unwrap());
    }
    let targets: std::collections::HashSet<_> = owners.values().collect();
    assert!(
        targets.len() >= 2,
        "30 keys all hashed to one target: {owners:?}"
    );
    drop(gateway);

    let gateway = pool_gateway("consistent_hash", "hash_on: { cookie: session }", [1, 1, 1]);
    let seen = distribution(&gateway, 5, &[("Cookie", "theme=dark; session=abc123")]);
    assert_eq!(seen.len(), 1, "{seen:?}");
    drop(gateway);

    let gateway = pool_gateway("consistent_hash", "hash_on: { client_ip: true }", [1, 1, 1]);
    let seen = distribution(&gateway, 6, &[]);
    assert_eq!(seen.len(), 1, "one client address, one target: {seen:?}");
}

#[test]
fn least_requests_avoids_the_busy_target() {
    let gateway = pool_gateway("least_requests", "", [1, 1, 1]);
    let address = gateway.addr;
    // Two slow requests occupy two targets.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                crate::support::request(
                    address,
                    "GET",
                    "/slow",
                    &[("x-echo-delay-ms", "1500")],
                    b"",
                )
                .upstream()
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let quick = distribution(&gateway, 6, &[]);
    let busy: Vec<String> = slow
        .into_iter()
        .map(|handle| handle.join().unwrap())
        .collect();
    assert_ne!(busy[0], busy[1], "the two slow requests went to one target");
    assert_eq!(
        quick.len(),
        1,
        "quick requests spread over busy targets: {quick:?}"
    );
    let idle = quick.keys().next().unwrap();
    assert!(!busy.contains(idle), "quick requests went to a busy target");
}
