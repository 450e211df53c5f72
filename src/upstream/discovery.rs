//! Service discovery by DNS. A target given as `HOST:PORT` is resolved in the background, off
//! the request path and outside the compile step:
//!
//! - every address the name has becomes a target with the configured weight;
//! - the name is looked up again when its records' TTL runs out, no sooner than
//!   `server.dns.min_ttl` and no later than `server.dns.max_ttl`;
//! - a changed answer rebuilds the target set of every pool naming it; addresses that stay keep
//!   their state (health, ejection, latency), since that is kept by (pool, address);
//! - a failed lookup keeps the last good set, is counted in
//!   `gatehouse_dns_lookups_total{host,result="failure"}`, and is retried with a backoff that
//!   starts at `min_ttl` and doubles up to 30 s (or `max_ttl`, if that is shorter);
//! - a request that finds its pool empty only because a name has not had its first answer yet
//!   waits for that answer (up to `server.dns.timeout`), and `/readyz` says not ready until
//!   every name has had one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use gatehouse_filters::metrics::{Row, SampledRow};
use gatehouse_filters::Metrics;
use hickory_resolver::config::{
    NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{Resolver, TokioResolver};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus::IntCounter;
use tokio::task::JoinHandle;

use super::UpstreamRegistry;
use crate::config::error::ConfigError;
use crate::config::model::DnsConfig;
use crate::config::ConfigStore;

/// The longest wait between lookups of a name whose lookups fail.
const FAILURE_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// `server.dns`, compiled.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DnsSettings {
    /// Empty: the system's resolvers.
    pub resolvers: Vec<SocketAddr>,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub timeout: Duration,
}

impl DnsSettings {
    pub fn build(config: &DnsConfig, errors: &mut Vec<ConfigError>) -> DnsSettings {
        let mut resolvers = Vec::new();
        for (index, text) in config.resolvers.iter().enumerate() {
            let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
                text.parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            match parsed {
                Some(address) => resolvers.push(address),
                None => errors.push(ConfigError::new(
                    format!("server.dns.resolvers[{index}]"),
                    format!("\"{text}\" is not an IP address or IP:PORT"),
                )),
            }
        }
        if config.min_ttl.get().is_zero() {
            errors.push(ConfigError::new(
                "server.dns.min_ttl",
                "must be longer than zero",
            ));
        }
        if config.max_ttl < config.min_ttl {
            errors.push(ConfigError::new(
                "server.dns.max_ttl",
                "must be at least `min_ttl`",
            ));
        }
        if config.timeout.get().is_zero() {
            errors.push(ConfigError::new(
                "server.dns.timeout",
                "must be longer than zero",
            ));
        }
        DnsSettings {
            resolvers,
            min_ttl: config.min_ttl.get(),
            max_ttl: config.max_ttl.get(),
            timeout: config.timeout.get(),
        }
    }

    /// The wait before the next lookup after `failures` failed ones in a row.
    fn backoff(&self, failures: u32) -> Duration {
        let cap = FAILURE_BACKOFF_CAP.min(self.max_ttl).max(self.min_ttl);
        self.min_ttl
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(cap)
    }
}

/// What is known of one host name: shared by every pool that names it, and kept across config
/// versions for as long as one names it.
pub struct NameRecord {
    pub host: String,
    /// The addresses of the last good answer (sorted); `None` before the first one.
    addresses: Mutex<Option<Arc<[IpAddr]>>>,
    /// Whether a lookup has finished, well or not.
    looked_up: AtomicBool,
    answered: tokio::sync::Notify,
    failures_in_a_row: AtomicU32,
    status: Mutex<Status>,
    succeeded: Row<IntCounter>,
    failed: Row<IntCounter>,
    addresses_row: OnceLock<SampledRow>,
}

#[derive(Default)]
struct Status {
    error: Option<String>,
    last_lookup: Option<std::time::SystemTime>,
    next_lookup_in: Option<Duration>,
}

impl NameRecord {
    pub(super) fn new(host: &str, metrics: &Metrics) -> Arc<NameRecord> {
        let lookups = metrics.counters(
            "gatehouse_dns_lookups_total",
            "Lookups of upstream host names, by host and result (success, failure)",
            &["host", "result"],
        );
        let record = Arc::new(NameRecord {
            host: host.to_string(),
            addresses: Mutex::new(None),
            looked_up: AtomicBool::new(false),
            answered: tokio::sync::Notify::new(),
            failures_in_a_row: AtomicU32::new(0),
            status: Mutex::new(Status::default()),
            succeeded: lookups.row(&[host, "success"]),
            failed: lookups.row(&[host, "failure"]),
            addresses_row: OnceLock::new(),
        });
        let weak = Arc::downgrade(&record);
        let row = metrics
            .sampled(
                "gatehouse_dns_addresses",
                "Addresses an upstream host name has, from its last good lookup",
                &["host"],
            )
            .row(&[host], move || {
                weak.upgrade()
                    .and_then(|record| record.addresses())
                    .map_or(0, |addresses| addresses.len() as i64)
            });
        let _ = record.addresses_row.set(row);
        record
    }

    /// The addresses of the last good answer.
    pub fn addresses(&self) -> Option<Arc<[IpAddr]>> {
        self.addresses.lock().expect("name record lock").clone()
    }

    /// Whether a lookup has finished (well or not).
    pub fn looked_up(&self) -> bool {
        self.looked_up.load(Ordering::Acquire)
    }

    /// Waits for the first lookup to finish, up to `limit`.
    pub async fn first_answer(&self, limit: Duration) {
        let answered = self.answered.notified();
        if self.looked_up() {
            return;
        }
        let _ = tokio::time::timeout(limit, answered).await;
    }

    /// A good answer; whether it changed the addresses.
    fn answer(&self, mut addresses: Vec<IpAddr>, next: Duration) -> bool {
        addresses.sort();
        addresses.dedup();
        self.succeeded.inc();
        self.failures_in_a_row.store(0, Ordering::Relaxed);
        let changed = {
            let mut current = self.addresses.lock().expect("name record lock");
            let changed = current.as_deref() != Some(addresses.as_slice());
            if changed {
                *current = Some(addresses.into());
            }
            changed
        };
        {
            let mut status = self.status.lock().expect("name record lock");
            status.error = None;
            status.last_lookup = Some(std::time::SystemTime::now());
            status.next_lookup_in = Some(next);
        }
        self.finished();
        changed
    }

    /// A failed lookup: the addresses stay.
    fn fail(&self, error: String, next: Duration) {
        self.failed.inc();
        {
            let mut status = self.status.lock().expect("name record lock");
            status.error = Some(error);
            status.last_lookup = Some(std::time::SystemTime::now());
            status.next_lookup_in = Some(next);
        }
        self.finished();
    }

    fn finished(&self) {
        if !self.looked_up.swap(true, Ordering::AcqRel) {
            self.answered.notify_waiters();
        }
    }

    /// What `/config` shows about the name.
    pub fn report(&self, port: u16) -> serde_json::Value {
        let status = self.status.lock().expect("name record lock");
        serde_json::json!({
            "host": self.host,
            "port": port,
            "addresses": self.addresses().map(|addresses| {
                addresses.iter().map(ToString::to_string).collect::<Vec<_>>()
            }),
            "error": status.error,
            "last_lookup": status
                .last_lookup
                .map(|at| humantime::format_rfc3339_millis(at).to_string()),
            "next_lookup_in_ms": status.next_lookup_in.map(|wait| wait.as_millis() as u64),
        })
    }
}

/// The background service that looks names up.
pub struct Discovery {
    pub store: Arc<ConfigStore>,
    pub registry: UpstreamRegistry,
}

struct Lookup {
    settings: DnsSettings,
    task: JoinHandle<()>,
}

#[async_trait]
impl BackgroundService for Discovery {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.store.subscribe();
        let mut lookups: HashMap<String, Lookup> = HashMap::new();
        loop {
            self.reconcile(&mut lookups);
            tokio::select! {
                _ = shutdown.changed() => break,
                changed = changes.changed() => if changed.is_err() { break },
            }
        }
        for lookup in lookups.values() {
            lookup.task.abort();
        }
    }
}

impl Discovery {
    /// Makes the running lookups those the live config names, and gives its pools the
    /// addresses known so far (a config compiled while an answer came in may have missed it).
    fn reconcile(&self, lookups: &mut HashMap<String, Lookup>) {
        let snapshot = self.store.load();
        let mut wanted = HashMap::new();
        let mut changed = false;
        for pool in &snapshot.upstreams {
            for record in pool.names() {
                wanted.insert(record.host.clone(), record.clone());
            }
            changed |= pool.refresh();
        }
        if changed {
            self.registry.targets_changed();
        }
        lookups.retain(|host, lookup| {
            let keep = wanted.contains_key(host) && lookup.settings == snapshot.dns;
            if !keep {
                lookup.task.abort();
            }
            keep
        });
        for (host, record) in wanted {
            if lookups.contains_key(&host) {
                continue;
            }
            let task = tokio::spawn(look_up_forever(
                record,
                snapshot.dns.clone(),
                self.store.clone(),
                self.registry.clone(),
            ));
            lookups.insert(
                host,
                Lookup {
                    settings: snapshot.dns.clone(),
                    task,
                },
            );
        }
    }
}

fn resolver(settings: &DnsSettings) -> Result<TokioResolver, String> {
    let mut builder = if settings.resolvers.is_empty() {
        Resolver::builder_tokio()
            .map_err(|error| format!("cannot read the system's DNS configuration: {error}"))?
    } else {
        let mut servers = NameServerConfigGroup::new();
        for address in &settings.resolvers {
            servers.push(NameServerConfig::new(*address, Protocol::Udp));
            servers.push(NameServerConfig::new(*address, Protocol::Tcp));
        }
        Resolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), servers),
            TokioConnectionProvider::default(),
        )
    };
    let options = builder.options_mut();
    options.timeout = settings.timeout;
    options.attempts = 1;
    // Each lookup asks the servers: the TTL is ours to honour, bounded by min/max.
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Always;
    Ok(builder.build())
}

async fn look_up_forever(
    record: Arc<NameRecord>,
    settings: DnsSettings,
    store: Arc<ConfigStore>,
    registry: UpstreamRegistry,
) {
    let resolver = resolver(&settings);
    loop {
        let started = Instant::now();
        let outcome = match &resolver {
            Err(error) => Err(error.clone()),
            Ok(resolver) => {
                match tokio::time::timeout(
                    settings.timeout,
                    resolver.lookup_ip(record.host.as_str()),
                )
                .await
                {
                    Err(_) => Err(format!("no answer within {:?}", settings.timeout)),
                    Ok(Err(error)) => Err(error.to_string()),
                    Ok(Ok(answer)) => {
                        let ttl = answer.valid_until().saturating_duration_since(started);
                        let addresses: Vec<IpAddr> = answer.iter().collect();
                        if addresses.is_empty() {
                            Err("the answer holds no address".to_string())
                        } else {
                            Ok((addresses, ttl))
                        }
                    }
                }
            }
        };
        let wait = match outcome {
            Ok((addresses, ttl)) => {
                let wait = ttl.clamp(settings.min_ttl, settings.max_ttl);
                let first = !record.looked_up();
                if record.answer(addresses, wait) || first {
                    tracing::info!(
                        host = %record.host,
                        addresses = ?record.addresses().as_deref().unwrap_or_default(),
                        "upstream host name resolved"
                    );
                    let snapshot = store.load();
                    let mut changed = false;
                    for pool in &snapshot.upstreams {
                        if pool.names().any(|named| Arc::ptr_eq(named, &record)) {
                            changed |= pool.refresh();
                        }
                    }
                    if changed {
                        registry.targets_changed();
                    }
                }
                wait
            }
            Err(error) => {
                let failures = record.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
                let wait = settings.backoff(failures);
                record.fail(error.clone(), wait);
                tracing::warn!(
                    host = %record.host,
                    %error,
                    failures,
                    retry_in_ms = wait.as_millis() as u64,
                    "upstream host name lookup failed; its last known addresses stay in use"
                );
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_backoff_doubles_from_the_minimum_up_to_its_cap() {
        let settings = DnsSettings {
            resolvers: Vec::new(),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            timeout: Duration::from_secs(1),
        };
        let waits: Vec<u64> = (1..=7)
            .map(|failures| settings.backoff(failures).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        let short = DnsSettings {
            max_ttl: Duration::from_secs(5),
            ..settings
        };
        assert_eq!(short.backoff(10), Duration::from_secs(5));
    }

    #[test]
    fn resolvers_take_a_default_port_and_bad_ones_are_reported() {
        let mut errors = Vec::new();
        let config = DnsConfig {
            resolvers: vec!["127.0.0.1".into(), "10.0.0.2:5353".into(), "dns".into()],
            ..DnsConfig::default()
        };
        let settings = DnsSettings::build(&config, &mut errors);
        assert_eq!(
            settings.resolvers,
            [
                "127.0.0.1:53".parse().unwrap(),
                "10.0.0.2:5353".parse().unwrap()
            ]
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "server.dns.resolvers[2]");
    }
}
