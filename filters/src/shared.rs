//! Clients shared by filters and config versions: a small I/O runtime for background work
//! (key-set fetches, Redis connections) and one Redis client per URL, with its health.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fred::prelude::*;
use once_cell::sync::Lazy;

/// Background I/O that must not depend on which runtime a request runs on.
pub static IO: Lazy<tokio::runtime::Runtime> = Lazy::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gatehouse-io")
        .enable_all()
        .build()
        .expect("start the I/O runtime")
});

/// How Gatehouse talks to Redis.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RedisSettings {
    pub url: String,
    /// Every command's deadline; a command past it fails, and the caller's failure policy applies.
    pub command_timeout: Duration,
    pub connect_timeout: Duration,
    /// Commands that may wait for a connection; beyond it they fail at once.
    pub max_queue: usize,
}

/// One Redis server as Gatehouse sees it: the client, and whether it has been answering.
///
/// After a failed command, callers skip Redis for a short back-off (50 ms, doubling up to 1 s)
/// and take their failure policy at once instead of each waiting for the deadline; the first
/// command after the back-off tries it again. While it is down a background probe PINGs it every
/// 200 ms, so it shows `up` again as soon as it answers, with or without traffic.
pub struct Redis {
    client: Client,
    /// The URL without its password, for `/readyz` and logs.
    pub display_url: String,
    pub command_timeout: Duration,
    health: Arc<Health>,
    /// Keeps `gatehouse_redis_up{url}` exported while this client is in use.
    _up: crate::metrics::SampledRow,
    /// Lua scripts callers run with EVALSHA: loaded into Redis when registered and again after
    /// every (re)connection, since a restarted Redis has forgotten them.
    scripts: Arc<Mutex<Vec<&'static str>>>,
    reload_scripts: tokio::task::JoinHandle<Result<(), fred::error::Error>>,
    /// The clients made for request threads (see [`Redis::local`]), closed with this one.
    local_clients: Mutex<Vec<Client>>,
}

/// What a request thread's Redis deadline allows beyond `command_timeout` for the thread's own
/// scheduling (see [`Redis::local`]).
pub const SCHEDULING_GRACE: Duration = Duration::from_millis(2);

thread_local! {
    /// This thread's clients, one per Redis in use: (whose, client). An entry whose Redis is
    /// gone is dropped when the next one is added.
    static LOCAL_CLIENTS: std::cell::RefCell<Vec<(Weak<Health>, Client)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

struct Health {
    display_url: String,
    consecutive_failures: AtomicU64,
    /// Milliseconds since `epoch` before which Redis is not tried.
    skip_until: AtomicU64,
    /// Wall-clock milliseconds of the first failure of the current outage (0 when up).
    down_since: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// `gatehouse_redis_commands_total{url, outcome}`.
    commands_ok: crate::metrics::Row<prometheus::IntCounter>,
    commands_failed: crate::metrics::Row<prometheus::IntCounter>,
    /// When the client was created; readiness waits from here for the first connection.
    epoch: Instant,
    /// The client has had a connection (or a command answered) at least once.
    connected_once: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Redis")
            .field("url", &self.display_url)
            .finish_non_exhaustive()
    }
}

impl std::ops::Deref for Redis {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// What `/readyz` and `/metrics` show about a Redis server.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RedisStatus {
    pub url: String,
    /// `up`; `connecting` before the first connection (or while reconnecting, before a command
    /// failed); `down` once commands fail or time out (policies use their failure mode).
    pub state: &'static str,
    pub connected: bool,
    pub consecutive_failures: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_since_unix_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub commands_ok: u64,
    pub commands_failed: u64,
}

impl Redis {
    /// The client requests on this thread use: its own connection, made on this thread's
    /// runtime the first time it asks, so a command and its answer are handled by the runtime
    /// that awaits them, with no wake-up of another thread on the way (a shared client's
    /// connection task lives on one runtime, and every command of every worker went through it).
    /// Outside a runtime, and until this thread's connection is up (a cluster client must learn
    /// the slots first, and commands sent before would fail), the shared client.
    pub fn local(&self) -> Client {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.client.clone();
        }
        let owner = Arc::as_ptr(&self.health);
        LOCAL_CLIENTS.with(|clients| {
            if let Some((_, client)) = clients
                .borrow()
                .iter()
                .find(|(health, _)| std::ptr::eq(health.as_ptr(), owner))
            {
                return if client.is_connected() {
                    client.clone()
                } else {
                    self.client.clone()
                };
            }
            let client = self.client.clone_new();
            // The deadline is the caller's: `command_timeout` plus the 2 ms the rate limiter
            // grants for scheduling. This client's answers are read by the request thread itself,
            // and on a saturated thread they wait behind its other requests before they are read.
            let mut performance = client.perf_config();
            performance.default_command_timeout = self.command_timeout + SCHEDULING_GRACE;
            client.update_perf_config(performance);
            let _connection = client.connect();
            if let Ok(mut all) = self.local_clients.lock() {
                all.push(client.clone());
            }
            let mut clients = clients.borrow_mut();
            clients.retain(|(health, _)| health.strong_count() > 0);
            clients.push((Arc::downgrade(&self.health), client));
            self.client.clone()
        })
    }

    /// Loads `script` into Redis now and after every reconnection, so EVALSHA finds it instead
    /// of every caller paying a NOSCRIPT round trip after a Redis restart.
    pub fn preload(&self, script: &'static str) {
        {
            let mut scripts = self.scripts.lock().expect("Redis script list lock");
            if scripts.contains(&script) {
                return;
            }
            scripts.push(script);
        }
        let client = self.client.clone();
        IO.spawn(async move {
            let _ = load_script(&client, script).await;
        });
    }

    /// False while a recent failure's back-off runs: the caller should not wait on Redis now.
    pub fn available(&self) -> bool {
        self.health.available()
    }

    pub fn record_success(&self) {
        self.health.record_success();
    }

    pub fn record_failure(&self, error: &str) {
        if self.health.record_failure(error) {
            let client = self.client.clone();
            let health = Arc::downgrade(&self.health);
            let timeout = self.command_timeout;
            IO.spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let Some(health) = health.upgrade() else {
                        return;
                    };
                    if health.consecutive_failures.load(Ordering::Relaxed) == 0 {
                        return;
                    }
                    if let Ok(true) = tokio::time::timeout(timeout, answers(&client)).await {
                        health.record_success();
                        return;
                    }
                }
            });
        }
    }

    /// Where this client stands for the node's readiness: `connected` once it has had a
    /// connection; before that `waiting`, or `fallback` once `ready_timeout` has passed (the
    /// node then serves, and each policy decides by its failure mode until Redis answers).
    pub fn startup(&self, ready_timeout: Duration) -> &'static str {
        let health = &self.health;
        if health.connected_once.load(Ordering::Relaxed) {
            return "connected";
        }
        if self.client.is_connected() || health.commands_ok.get() > 0 {
            health.connected_once.store(true, Ordering::Relaxed);
            return "connected";
        }
        if health.epoch.elapsed() >= ready_timeout {
            "fallback"
        } else {
            "waiting"
        }
    }

    pub fn status(&self) -> RedisStatus {
        let health = &self.health;
        let failures = health.consecutive_failures.load(Ordering::Relaxed);
        let down_since = health.down_since.load(Ordering::Relaxed);
        RedisStatus {
            url: self.display_url.clone(),
            state: state(failures, self.client.is_connected()),
            connected: self.client.is_connected(),
            consecutive_failures: failures,
            down_since_unix_ms: (down_since != 0).then_some(down_since),
            last_error: if failures == 0 {
                None
            } else {
                health.last_error.lock().ok().and_then(|last| last.clone())
            },
            commands_ok: health.commands_ok.get(),
            commands_failed: health.commands_failed.get(),
        }
    }
}

/// `up`, `connecting` (no connection yet, and no command failed) or `down`.
fn state(consecutive_failures: u64, connected: bool) -> &'static str {
    match (consecutive_failures, connected) {
        (0, true) => "up",
        (0, false) => "connecting",
        _ => "down",
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // No config uses this server any more: close its connection.
        self.reload_scripts.abort();
        let mut clients = vec![self.client.clone()];
        if let Ok(mut local) = self.local_clients.lock() {
            clients.append(&mut local);
        }
        IO.spawn(async move {
            for client in clients {
                let _ = client.quit().await;
            }
        });
    }
}

impl Health {
    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn available(&self) -> bool {
        self.millis() >= self.skip_until.load(Ordering::Relaxed)
    }

    fn record_success(&self) {
        self.commands_ok.inc();
        if self.consecutive_failures.swap(0, Ordering::Relaxed) != 0 {
            self.down_since.store(0, Ordering::Relaxed);
            self.skip_until.store(0, Ordering::Relaxed);
            tracing::info!(redis = %self.display_url, "Redis answers again");
        }
    }

    /// Returns true when this failure starts an outage.
    fn record_failure(&self, error: &str) -> bool {
        self.commands_failed.inc();
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let backoff = 50u64 << (failures - 1).min(5);
        self.skip_until
            .store(self.millis() + backoff.min(1_000), Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.to_string());
        }
        if failures == 1 {
            self.down_since
                .store(crate::util::now_millis(), Ordering::Relaxed);
            tracing::warn!(redis = %self.display_url, error, "Redis did not answer; rate-limit policies use their failure mode");
        }
        failures == 1
    }
}

/// Whether Redis serves commands again: a server answers `PING`; a cluster says
/// `cluster_state:ok` (while a master's slots are uncovered every node still answers `PING`,
/// but refuses commands with `CLUSTERDOWN`).
async fn answers(client: &Client) -> bool {
    if client.is_clustered() {
        let command = fred::types::CustomCommand::new_static(
            "CLUSTER",
            fred::types::ClusterHash::Random,
            false,
        );
        client
            .custom::<String, &str>(command, vec!["INFO"])
            .await
            .is_ok_and(|info| info.contains("cluster_state:ok"))
    } else {
        client.ping::<()>(None).await.is_ok()
    }
}

/// Loads a Lua script where EVALSHA will look for it: the server, or every primary of a
/// cluster (a key's slot decides which primary runs it).
async fn load_script(client: &Client, script: &'static str) -> Result<(), fred::error::Error> {
    use fred::prelude::LuaInterface;
    if client.is_clustered() {
        client.script_load_cluster::<(), _>(script).await
    } else {
        client.script_load::<String, _>(script).await.map(|_| ())
    }
}

/// The URL with its password masked, for `/readyz`, metrics and logs. Cluster and Sentinel
/// URLs name several hosts (`host:port,host:port`), which a URL parser refuses, so the
/// credentials are found by hand: between `://` and the authority's last `@`.
fn display_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(invalid URL)".to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((credentials, hosts)) => match credentials.split_once(':') {
            Some((user, _password)) => {
                format!("{scheme}://{user}:****@{hosts}{}", mask_query(tail))
            }
            None => format!("{scheme}://{credentials}@{hosts}{}", mask_query(tail)),
        },
        None => format!("{scheme}://{authority}{}", mask_query(tail)),
    }
}

/// Masks `sentinelPassword=` in a query.
fn mask_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("sentinelPassword") => {
                format!("{name}=****")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

/// fred's config for a Redis URL:
/// - `redis://` / `rediss://` `[user:password@]host:port[/db]`: one server;
/// - `redis-cluster://[user:password@]host:port[,host:port...]`: a Redis Cluster, from these
///   seed nodes (fred's own `?node=host:port` form is accepted too);
/// - `redis-sentinel://[user:password@]host:port[,host:port...]/service[/db]`: the primary
///   that these Sentinels name for `service` (or fred's `?sentinelServiceName=` form).
pub fn redis_config(url: &str) -> Result<Config, String> {
    let normalized = normalize_url(url)?;
    let mut config =
        Config::from_url(&normalized).map_err(|error| format!("invalid Redis URL: {error}"))?;
    if let ServerConfig::Clustered { policy, .. } = &mut config.server {
        // Rediscover the cluster from every node it last named, not only the seeds: a seed
        // that is down does not hide the others.
        *policy = fred::types::config::ClusterDiscoveryPolicy::UseCache;
    }
    Ok(config)
}

fn normalize_url(url: &str) -> Result<String, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("invalid Redis URL: no scheme (redis://, rediss://, redis-cluster://, redis-sentinel://)".into());
    };
    let clustered = scheme.ends_with("-cluster");
    let sentinel = scheme.ends_with("-sentinel");
    if !clustered && !sentinel {
        return Ok(url.to_string());
    }
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (credentials, hosts) = match authority.rsplit_once('@') {
        Some((credentials, hosts)) => (Some(credentials), hosts),
        None => (None, authority),
    };
    let mut hosts = hosts
        .split(',')
        .map(str::trim)
        .filter(|host| !host.is_empty());
    let Some(first) = hosts.next() else {
        return Err(format!("invalid Redis URL: {scheme}:// names no host"));
    };
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    let mut params: Vec<String> = query
        .into_iter()
        .flat_map(|query| query.split('&'))
        .filter(|pair| !pair.is_empty())
        .map(str::to_string)
        .collect();
    params.extend(hosts.map(|host| format!("node={host}")));
    let mut path = path.to_string();
    if sentinel
        && !params
            .iter()
            .any(|pair| pair.starts_with("sentinelServiceName="))
    {
        // `/service[/db]`: the service name first.
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let service = parts.next().unwrap_or_default().to_string();
        let database = parts.next().unwrap_or_default().to_string();
        if service.is_empty() {
            return Err(format!(
                "invalid Redis URL: {scheme}:// needs the service name: {scheme}://host:port,host:port/<service>[/db]"
            ));
        }
        params.push(format!("sentinelServiceName={service}"));
        path = if database.is_empty() {
            String::new()
        } else {
            format!("/{database}")
        };
    }
    let credentials = credentials
        .map(|credentials| format!("{credentials}@"))
        .unwrap_or_default();
    let query = if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    };
    Ok(format!("{scheme}://{credentials}{first}{path}{query}"))
}

static CLIENTS: Lazy<Mutex<HashMap<RedisSettings, Weak<Redis>>>> = Lazy::new(Default::default);

/// The client for these settings, created and connected (in the background) on first use, and
/// shared by every config version that uses the same settings; it is closed when no config
/// holds it any more.
///
/// Explicit client settings: every command has `command_timeout` and one attempt; reconnects
/// back off exponentially (up to 2 s); at most `max_queue` commands wait for a connection;
/// commands from concurrent requests are pipelined on the one connection.
pub fn redis_client(
    settings: &RedisSettings,
    metrics: &crate::Metrics,
) -> Result<Arc<Redis>, String> {
    let mut clients = CLIENTS.lock().expect("Redis client registry lock");
    clients.retain(|_, client| client.strong_count() > 0);
    if let Some(client) = clients.get(settings).and_then(Weak::upgrade) {
        return Ok(client);
    }
    let config = redis_config(&settings.url)?;
    let command_timeout = settings.command_timeout;
    let connect_timeout = settings.connect_timeout;
    let max_queue = settings.max_queue;
    let client = Builder::from_config(config)
        .with_performance_config(|performance| {
            performance.default_command_timeout = command_timeout;
            // Commands of concurrent requests share the connection without waiting for each
            // other's replies (fred always pipelines); up to this many are written per flush.
            performance.max_feed_count = 200;
        })
        .with_connection_config(|connection| {
            connection.connection_timeout = connect_timeout;
            connection.internal_command_timeout = connect_timeout;
            connection.max_command_attempts = 1;
            // A bounded queue: while Redis is away, commands fail instead of piling up.
            connection.max_command_buffer_len = max_queue;
            connection.tcp = TcpConfig {
                nodelay: Some(true),
                ..Default::default()
            };
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2_000, 2))
        .build()
        .map_err(|error| format!("cannot create the Redis client: {error}"))?;
    let scripts: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let reload_scripts = {
        let _runtime = IO.enter();
        let loader = client.clone();
        let registered = Arc::downgrade(&scripts);
        let listener = client.on_reconnect(move |_server| {
            let loader = loader.clone();
            let scripts: Vec<&'static str> = registered
                .upgrade()
                .and_then(|scripts| scripts.lock().ok().map(|scripts| scripts.clone()))
                .unwrap_or_default();
            async move {
                for script in scripts {
                    let _ = load_script(&loader, script).await;
                }
                Ok(())
            }
        });
        let _connection = client.connect();
        listener
    };
    let shown = display_url(&settings.url);
    let commands = metrics.counters(
        "gatehouse_redis_commands_total",
        "Redis commands, by outcome",
        &["url", "outcome"],
    );
    let health = Arc::new(Health {
        display_url: shown.clone(),
        consecutive_failures: AtomicU64::new(0),
        skip_until: AtomicU64::new(0),
        down_since: AtomicU64::new(0),
        last_error: Mutex::new(None),
        commands_ok: commands.row(&[&shown, "ok"]),
        commands_failed: commands.row(&[&shown, "failed"]),
        epoch: Instant::now(),
        connected_once: std::sync::atomic::AtomicBool::new(false),
    });
    let up = {
        let health = Arc::downgrade(&health);
        let client = client.clone();
        metrics
            .sampled(
                "gatehouse_redis_up",
                "Whether Redis answers commands (1) or not (0)",
                &["url"],
            )
            .row(&[&shown], move || {
                let failures = health.upgrade().map_or(1, |health| {
                    health.consecutive_failures.load(Ordering::Relaxed)
                });
                i64::from(state(failures, client.is_connected()) == "up")
            })
    };
    let redis = Arc::new(Redis {
        client,
        display_url: shown,
        command_timeout,
        health,
        _up: up,
        scripts,
        reload_scripts,
        local_clients: Mutex::new(Vec::new()),
    });
    clients.insert(settings.clone(), Arc::downgrade(&redis));
    Ok(redis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_and_sentinel_urls_name_several_hosts() {
        assert_eq!(
            normalize_url("redis-cluster://u:p@10.0.0.1:7000,10.0.0.2:7001, 10.0.0.3:7002")
                .unwrap(),
            "redis-cluster://u:p@10.0.0.1:7000?node=10.0.0.2:7001&node=10.0.0.3:7002"
        );
        assert_eq!(
            normalize_url("redis-cluster://a:7000?node=b:7001").unwrap(),
            "redis-cluster://a:7000?node=b:7001"
        );
        assert_eq!(
            normalize_url("redis-sentinel://s1:26379,s2:26379/mymaster/2").unwrap(),
            "redis-sentinel://s1:26379/2?node=s2:26379&sentinelServiceName=mymaster"
        );
        assert!(normalize_url("redis-sentinel://s1:26379").is_err());
        assert!(normalize_url("redis-cluster://").is_err());
        let config = redis_config("redis-cluster://u:p@10.0.0.1:7000,10.0.0.2:7001").unwrap();
        assert!(config.server.is_clustered());
        assert_eq!(config.password.as_deref(), Some("p"));
        let config = redis_config("redis-sentinel://s1:26379,s2:26380/mymaster").unwrap();
        assert!(config.server.is_sentinel());
        assert_eq!(
            display_url("redis-cluster://u:secret@a:1,b:2"),
            "redis-cluster://u:****@a:1,b:2"
        );
        assert_eq!(
            display_url("redis-sentinel://a:1/m?sentinelPassword=x&node=b:2"),
            "redis-sentinel://a:1/m?sentinelPassword=****&node=b:2"
        );
        assert_eq!(
            display_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
    }

    #[test]
    fn failures_back_off_and_one_success_clears_them() {
        let redis = redis_client(
            &RedisSettings {
                url: "redis://user:secret@127.0.0.1:1".into(),
                command_timeout: Duration::from_millis(5),
                connect_timeout: Duration::from_millis(50),
                max_queue: 10,
            },
            &crate::Metrics::new(),
        )
        .unwrap();
        assert_eq!(redis.display_url, "redis://user:****@127.0.0.1:1");
        assert!(redis.available());
        assert_eq!(redis.status().state, "connecting", "nothing listens there");
        redis.record_failure("timeout");
        assert!(!redis.available(), "a failure starts a back-off");
        let status = redis.status();
        assert_eq!(status.state, "down");
        assert_eq!(status.last_error.as_deref(), Some("timeout"));
        assert!(status.down_since_unix_ms.is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(redis.available(), "the back-off ends after 50 ms");
        redis.record_success();
        let status = redis.status();
        assert_eq!(status.state, "connecting");
        assert_eq!(status.consecutive_failures, 0);
        assert!(status.last_error.is_none());
    }
}
