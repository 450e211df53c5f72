//! Targets found by DNS, through the real gateway and a DNS server the test controls.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse_loadtest::{spawn_echo_on, EchoOptions};

use crate::support::dns::{Answer, DnsServer};
use crate::support::{get, Gateway};

const HOST: &str = "api.svc.test";

/// Echo servers named after their address, on one port of several loopback addresses.
fn echoes_on_one_port(count: u8) -> (u16, Vec<Ipv4Addr>) {
    loop {
        let port = crate::support::free_port();
        let addresses: Vec<Ipv4Addr> = (1..=count)
            .map(|last| Ipv4Addr::new(127, 0, 0, last))
            .collect();
        // The port is free on 127.0.0.1; make sure it is on the others before starting any.
        if addresses
            .iter()
            .all(|address| TcpListener::bind((*address, port)).is_ok())
        {
            for address in &addresses {
                spawn_echo_on(
                    EchoOptions::named(&address.to_string()),
                    SocketAddr::from((*address, port)),
                );
            }
            return (port, addresses);
        }
    }
}

fn gateway(dns: &DnsServer, port: u16, upstream_extra: &str) -> Gateway {
    Gateway::start_with(
        &format!(
            "  dns: {{ resolvers: [\"{}\"], min_ttl: 100ms, max_ttl: 1s, timeout: 500ms }}",
            dns.address
        ),
        &format!(
            r#"
upstreams:
  - name: api
    targets: [{{ address: "{HOST}:{port}" }}]
    {upstream_extra}
routes:
  - {{ name: all, upstream: api, match: {{ paths: [{{ prefix: / }}] }} }}
"#
        ),
    )
}

/// Requests sent one after another from a background thread, until stopped.
struct Load {
    running: Arc<AtomicBool>,
    replies: Arc<Mutex<Vec<(u16, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(address: SocketAddr) -> Load {
        let running = Arc::new(AtomicBool::new(true));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let running = running.clone();
            let replies = replies.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while running.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let reply = get(address, "/x");
                    let upstream = reply.header("x-upstream-name").unwrap_or("").to_string();
                    replies.lock().unwrap().push((reply.status, upstream));
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
        };
        Load {
            running,
            replies,
            thread: Some(thread),
        }
    }

    /// Replies so far.
    fn count(&self) -> usize {
        self.replies.lock().unwrap().len()
    }

    /// Waits (up to 10 s) until a reply came from `upstream`.
    fn wait_for(&self, upstream: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self
            .replies
            .lock()
            .unwrap()
            .iter()
            .any(|(_, name)| name == upstream)
        {
            assert!(Instant::now() < deadline, "no reply from {upstream}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Replies by upstream from index `from` on.
    fn since(&self, from: usize) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for (_, upstream) in &self.replies.lock().unwrap()[from..] {
            *seen.entry(upstream.clone()).or_default() += 1;
        }
        seen
    }

    fn stop(mut self) -> Vec<(u16, String)> {
        self.running.store(false, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.replies.lock().unwrap())
    }
}

fn failures(replies: &[(u16, String)]) -> Vec<&(u16, String)> {
    replies
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect()
}

#[test]
fn addresses_added_and_removed_under_load_lose_no_request() {
    let (port, addresses) = echoes_on_one_port(3);
    let dns = DnsServer::start();
    dns.set(HOST, Answer::Addresses(vec![addresses[0]], 1));
    let gateway = gateway(&dns, port, "");
    let load = Load::start(gateway.addr);
    load.wait_for("127.0.0.1");

    // Two more addresses appear: each becomes a target.
    dns.set(HOST, Answer::Addresses(addresses.clone(), 1));
    load.wait_for("127.0.0.2");
    load.wait_for("127.0.0.3");
    let config = get(gateway.ops, "/config").json();
    let pool = &config["upstreams"][0];
    assert_eq!(pool["targets"].as_array().unwrap().len(), 3, "{pool}");
    assert_eq!(pool["names"][0]["host"], HOST, "{pool}");
    assert_eq!(pool["names"][0]["addresses"].as_array().unwrap().len(), 3);

    // The first goes away: it gets no more requests once the answer has changed.
    dns.set(HOST, Answer::Addresses(addresses[1..].to_vec(), 1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(gateway.ops, "/config").json()["upstreams"][0]["targets"]
        .as_array()
        .unwrap()
        .len()
        != 2
    {
        assert!(Instant::now() < deadline, "127.0.0.1 was not removed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A request that picked 127.0.0.1 before the change finishes there (it is not lost): let
    // those in flight end before counting.
    std::thread::sleep(Duration::from_millis(200));
    let after_removal = load.count();
    std::thread::sleep(Duration::from_millis(600));
    let later = load.since(after_removal);
    let replies = load.stop();
    assert!(!later.contains_key("127.0.0.1"), "{later:?}");
    assert!(
        later.contains_key("127.0.0.2") && later.contains_key("127.0.0.3"),
        "{later:?}"
    );
    assert!(replies.len() > 100, "{} replies", replies.len());
    assert_eq!(failures(&replies), Vec::<&(u16, String)>::new());
    assert!(
        dns.queries(HOST) >= 3,
        "the name is looked up again as its TTL runs out"
    );
}

#[test]
fn a_failing_lookup_keeps_the_last_good_addresses_serving() {
    let (port, addresses) = echoes_on_one_port(2);
    let dns = DnsServer::start();
    dns.set(HOST, Answer::Addresses(addresses.clone(), 1));
    let gateway = gateway(&dns, port, "");
    let load = Load::start(gateway.addr);
    load.wait_for("127.0.0.1");
    load.wait_for("127.0.0.2");

    dns.set(HOST, Answer::Fail);
    let failed_metric =
        format!("gatehouse_dns_lookups_total{{host=\"{HOST}\",result=\"failure\"}}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = gateway.metrics();
        let failed = metrics
            .lines()
            .find(|line| line.starts_with(&failed_metric))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|count| count.parse::<u64>().ok())
            .unwrap_or(0);
        if failed >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed lookups counted:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let during_failures = load.count();
    std::thread::sleep(Duration::from_millis(500));
    let serving = load.since(during_failures);
    let name = &get(gateway.ops, "/config").json()["upstreams"][0]["names"][0];
    assert!(
        name["error"]
            .as_str()
            .is_some_and(|error| !error.is_empty()),
        "{name}"
    );
    assert_eq!(name["addresses"].as_array().unwrap().len(), 2, "{name}");
    let replies = load.stop();
    assert!(
        serving.contains_key("127.0.0.1") && serving.contains_key("127.0.0.2"),
        "{serving:?}"
    );
    assert_eq!(failures(&replies), Vec::<&(u16, String)>::new());
}

#[test]
fn an_address_that_stays_keeps_its_health() {
    let (port, addresses) = echoes_on_one_port(1);
    // 127.0.0.2 on the same port accepts connections and closes them: it fails its probes.
    let broken = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), port)).unwrap();
    std::thread::spawn(move || {
        for stream in broken.incoming() {
            drop(stream);
        }
    });
    let third = Ipv4Addr::new(127, 0, 0, 3);
    spawn_echo_on(
        EchoOptions::named("127.0.0.3"),
        SocketAddr::from((third, port)),
    );
    let dns = DnsServer::start();
    dns.set(
        HOST,
        Answer::Addresses(vec![addresses[0], Ipv4Addr::new(127, 0, 0, 2)], 1),
    );
    let gateway = gateway(
        &dns,
        port,
        "health_check: { path: /healthz, interval: 100ms, timeout: 200ms, healthy_threshold: 2, unhealthy_threshold: 2 }",
    );
    let target = |config: &serde_json::Value, address: &str| {
        config["upstreams"][0]["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|target| target["address"] == address)
            .cloned()
    };
    let broken_address = format!("127.0.0.2:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while target(&get(gateway.ops, "/config").json(), &broken_address)
        .is_none_or(|target| target["healthy"] != false)
    {
        assert!(
            Instant::now() < deadline,
            "the broken target was not marked unhealthy"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A third address joins; the broken one stays unhealthy rather than starting over as
    // healthy, and gets no request.
    dns.set(
        HOST,
        Answer::Addresses(vec![addresses[0], Ipv4Addr::new(127, 0, 0, 2), third], 1),
    );
    let load = Load::start(gateway.addr);
    load.wait_for("127.0.0.3");
    let config = get(gateway.ops, "/config").json();
    assert_eq!(
        config["upstreams"][0]["targets"].as_array().unwrap().len(),
        3
    );
    assert_eq!(target(&config, &broken_address).unwrap()["healthy"], false);
    let replies = load.stop();
    assert_eq!(failures(&replies), Vec::<&(u16, String)>::new());
}

#[test]
fn a_name_that_does_not_resolve_is_a_clear_503() {
    let dns = DnsServer::start();
    // The name is unknown to the server: the lookup fails, the node becomes ready with an
    // empty pool, and requests get a 503 problem rather than a hang.
    let gateway = gateway(&dns, 9, "");
    let ready = get(gateway.ops, "/readyz").json();
    assert_eq!(ready["upstream_names_looked_up"], true, "{ready}");
    let reply = gateway.get("/x");
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    let name = &get(gateway.ops, "/config").json()["upstreams"][0]["names"][0];
    assert!(name["error"].as_str().is_some(), "{name}");
}
