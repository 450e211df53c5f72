//! A real Redis Cluster of the test's own: `redis-server --cluster-enabled yes` masters (and
//! optionally one replica each) on free ports, joined by `redis-cli --cluster create`, and
//! stopped with the test.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a node may be silent before the others count it as failed (and a replica takes
/// over): short, so failover happens within a test.
const NODE_TIMEOUT_MS: u64 = 1000;

pub struct RedisCluster {
    pub dir: tempfile::TempDir,
    /// Every node: the masters first, then the replicas.
    nodes: Vec<Node>,
    masters: usize,
}

struct Node {
    port: u16,
    child: Option<Child>,
}

/// A port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = super::free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed (make test installs redis-tools)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl RedisCluster {
    /// `masters` masters, each with `replicas_each` replicas; returns once every node reports
    /// `cluster_state:ok`.
    pub fn start(masters: usize, replicas_each: usize) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = RedisCluster {
            dir,
            nodes: Vec::new(),
            masters,
        };
        for _ in 0..masters * (1 + replicas_each) {
            let port = cluster_port();
            let mut node = Node { port, child: None };
            cluster.spawn(&mut node);
            cluster.nodes.push(node);
        }
        for node in &cluster.nodes {
            wait_for(
                || redis_cli(node.port, &["PING"]).trim() == "PONG",
                "a cluster node to start",
            );
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args([
                "--cluster-replicas",
                &replicas_each.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.wait_ok();
        if replicas_each > 0 {
            wait_for(
                || {
                    cluster
                        .master_ports()
                        .into_iter()
                        .map(|port| {
                            redis_cli(port, &["INFO", "replication"])
                                .lines()
                                .find_map(|line| line.strip_prefix("connected_slaves:"))
                                .and_then(|value| value.trim().parse::<usize>().ok())
                                .unwrap_or(0)
                        })
                        .sum::<usize>()
                        == masters * replicas_each
                },
                "every replica attached",
            );
            cluster.wait_replicated();
        }
        cluster
    }

    fn spawn(&self, node: &mut Node) {
        let port = node.port.to_string();
        let dir = self.dir.path().display().to_string();
        node.child = Some(
            Command::new("redis-server")
                .args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("{dir}/nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    &NODE_TIMEOUT_MS.to_string(),
                    // A replica may take over however long ago it last heard from its master
                    // (in a fresh cluster, it may not have yet).
                    "--cluster-replica-validity-factor",
                    "0",
                    "--dir",
                    &dir,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server is installed (make test installs it)"),
        );
    }

    /// `redis-cluster://` with every master as a seed node.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes[..self.masters]
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    /// The ports of the nodes that are masters now (a failover changes them).
    pub fn master_ports(&self) -> Vec<u16> {
        self.running()
            .filter(|node| redis_cli(node.port, &["ROLE"]).starts_with("master"))
            .map(|node| node.port)
            .collect()
    }

    fn running(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|node| node.child.is_some())
    }

    /// The port of the master that holds `key` now.
    pub fn master_of(&self, key: &str) -> u16 {
        self.master_ports()
            .into_iter()
            .find(|&port| redis_cli(port, &["EXISTS", key]).trim() == "1")
            .unwrap_or_else(|| panic!("no master holds {key}"))
    }

    /// Keys matching `pattern`, with the master port each is on.
    pub fn keys(&self, pattern: &str) -> Vec<(u16, String)> {
        let mut keys = Vec::new();
        for port in self.master_ports() {
            for key in redis_cli(port, &["--scan", "--pattern", pattern]).lines() {
                if !key.is_empty() {
                    keys.push((port, key.to_string()));
                }
            }
        }
        keys
    }

    /// SIGKILLs the node on `port` (no goodbye to the cluster, as a crash).
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the node on `port` again, with its cluster identity (`nodes-<port>.conf`) and no
    /// data, and waits until the cluster is whole.
    pub fn restart(&mut self, port: u16) {
        let index = self
            .nodes
            .iter()
            .position(|node| node.port == port)
            .expect("a node of this cluster");
        let mut node = Node { port, child: None };
        self.spawn(&mut node);
        self.nodes[index] = node;
        wait_for(
            || redis_cli(port, &["PING"]).trim() == "PONG",
            "the node to restart",
        );
        self.wait_ok();
    }

    /// Waits until every master's replicas are online and have all it wrote.
    pub fn wait_replicated(&self) {
        wait_for(
            || {
                self.master_ports().into_iter().all(|port| {
                    let info = redis_cli(port, &["INFO", "replication"]);
                    let offset = info
                        .lines()
                        .find_map(|line| line.strip_prefix("master_repl_offset:"))
                        .map(|value| value.trim().to_string());
                    let replicas: Vec<&str> = info
                        .lines()
                        .filter(|line| line.starts_with("slave") && line.contains("ip="))
                        .collect();
                    let expected = info
                        .lines()
                        .find_map(|line| line.strip_prefix("connected_slaves:"))
                        .and_then(|value| value.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    replicas.len() == expected
                        && replicas.iter().all(|line| {
                            line.contains("state=online")
                                && offset.as_ref().is_some_and(|offset| {
                                    line.contains(&format!("offset={offset},"))
                                })
                        })
                })
            },
            "every replica online and caught up",
        );
    }

    /// Waits until every running node says `cluster_state:ok`.
    pub fn wait_ok(&self) {
        wait_for(
            || {
                self.running().all(|node| {
                    redis_cli(node.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
                })
            },
            "cluster_state:ok on every node",
        );
    }

    /// Waits until every running node says `cluster_state:fail` (a master's slots are
    /// uncovered).
    pub fn wait_failed(&self) {
        wait_for(
            || {
                self.running().all(|node| {
                    redis_cli(node.port, &["CLUSTER", "INFO"]).contains("cluster_state:fail")
                })
            },
            "cluster_state:fail on every node",
        );
    }
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A Redis primary watched by one Sentinel (`redis-server --sentinel`), under the service name
/// `gatehouse`.
pub struct RedisSentinel {
    pub dir: tempfile::TempDir,
    pub primary_port: u16,
    pub sentinel_port: u16,
    children: Vec<Child>,
}

impl RedisSentinel {
    pub fn start() -> RedisSentinel {
        let dir = tempfile::tempdir().unwrap();
        let primary_port = super::free_port();
        let sentinel_port = super::free_port();
        let primary = Command::new("redis-server")
            .args(["--port", &primary_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (make test installs it)");
        let config = dir.path().join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {sentinel_port}\nbind 127.0.0.1\ndir {}\nsentinel monitor gatehouse 127.0.0.1 {primary_port} 1\nsentinel down-after-milliseconds gatehouse 1000\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let sentinel = Command::new("redis-server")
            .arg(&config)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let watched = RedisSentinel {
            dir,
            primary_port,
            sentinel_port,
            children: vec![primary, sentinel],
        };
        wait_for(
            || {
                redis_cli(
                    sentinel_port,
                    &["SENTINEL", "get-master-addr-by-name", "gatehouse"],
                )
                .contains(&primary_port.to_string())
            },
            "the Sentinel to name the primary",
        );
        watched
    }

    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}/gatehouse",
            self.sentinel_port
        )
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
