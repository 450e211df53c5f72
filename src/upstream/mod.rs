//! Upstream pools: their targets and the state kept about them across config versions, load
//! balancing over the targets a request may use, active health checks (`health`), passive
//! ejection (`target`), circuit breakers (`breaker`), the retry policy (`retry`) and retry
//! budgets (`budget`), targets found by DNS (`discovery`), and the Pingora peer each target is
//! reached through.
//!
//! A pool's target set is swapped whole when a host name's addresses change; a request keeps
//! the target it picked (an `Arc` of its state) whatever set comes next.

mod balance;
pub mod breaker;
pub mod budget;
pub mod discovery;
pub mod health;
pub mod retry;
mod target;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

use gatehouse_filters::metrics::{Row, SampledRow};
use gatehouse_filters::Metrics;
use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;
use prometheus::IntCounter;

use crate::config::error::ConfigError;
use crate::config::model::{
    Balance, BreakerConfig, HashOn, OutlierConfig, RetryBudgetConfig, UpstreamConfig,
    UpstreamProtocol,
};
pub use balance::{Balancer, HashKey};
pub use breaker::Breaker;
pub use budget::RetryBudget;
pub use discovery::NameRecord;
pub use health::HealthCheck;
pub use target::TargetState;

/// Milliseconds on one clock shared by every upstream's state, from when the process started.
pub mod clock {
    use once_cell::sync::Lazy;
    use std::time::Instant;

    static START: Lazy<Instant> = Lazy::new(Instant::now);

    pub fn now() -> u64 {
        START.elapsed().as_millis() as u64 + 1
    }
}

/// The state of every pool and target that outlives a config version, by pool name and target
/// address: a new config finds the state of what it keeps (health, ejections, the breaker),
/// and what it drops goes with the last config that used it.
#[derive(Clone)]
pub struct UpstreamRegistry {
    inner: Arc<Mutex<Registry>>,
    /// Bumped when a pool's target set changes outside a config swap (a DNS answer), for the
    /// health checks.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for UpstreamRegistry {
    fn default() -> Self {
        UpstreamRegistry {
            inner: Arc::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

#[derive(Default)]
struct Registry {
    pools: HashMap<String, Weak<PoolState>>,
    targets: HashMap<(String, SocketAddr), Weak<TargetState>>,
    names: HashMap<String, Weak<NameRecord>>,
}

impl UpstreamRegistry {
    /// Changes whenever a pool's target set changes between config swaps.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn targets_changed(&self) {
        self.changes.send_modify(|count| *count += 1);
    }

    fn name(&self, host: &str, metrics: &Metrics) -> Arc<NameRecord> {
        let mut registry = self.inner.lock().expect("upstream registry lock");
        registry.names.retain(|_, name| name.strong_count() > 0);
        if let Some(record) = registry.names.get(host).and_then(Weak::upgrade) {
            return record;
        }
        let record = NameRecord::new(host, metrics);
        registry
            .names
            .insert(host.to_string(), Arc::downgrade(&record));
        record
    }

    fn pool(&self, name: &str, metrics: &Metrics) -> Arc<PoolState> {
        let mut registry = self.inner.lock().expect("upstream registry lock");
        registry.pools.retain(|_, pool| pool.strong_count() > 0);
        if let Some(pool) = registry.pools.get(name).and_then(Weak::upgrade) {
            return pool;
        }
        let pool = PoolState::new(name, metrics);
        registry
            .pools
            .insert(name.to_string(), Arc::downgrade(&pool));
        pool
    }

    fn target(
        &self,
        pool: &Arc<str>,
        address: SocketAddr,
        healthy: bool,
        metrics: &Metrics,
    ) -> Arc<TargetState> {
        let mut registry = self.inner.lock().expect("upstream registry lock");
        registry
            .targets
            .retain(|_, target| target.strong_count() > 0);
        let key = (pool.to_string(), address);
        if let Some(target) = registry.targets.get(&key).and_then(Weak::upgrade) {
            return target;
        }
        let target = TargetState::new(pool.clone(), address, healthy, metrics);
        registry.targets.insert(key, Arc::downgrade(&target));
        target
    }
}

/// What a pool keeps across config versions: its circuit breaker and its retry budget.
pub struct PoolState {
    pub breaker: Breaker,
    pub budget: RetryBudget,
    pub budget_exhausted: Row<IntCounter>,
    /// Attempts whose connection to a target failed (refused, timed out, TLS handshake).
    pub connect_errors: Row<IntCounter>,
    circuit_row: OnceLock<SampledRow>,
}

impl PoolState {
    fn new(name: &str, metrics: &Metrics) -> Arc<PoolState> {
        let pool = Arc::new(PoolState {
            breaker: Breaker::default(),
            budget: RetryBudget::default(),
            budget_exhausted: metrics
                .counters(
                    "gatehouse_retry_budget_exhausted_total",
                    "Retries not made because the upstream's retry budget was spent",
                    &["upstream"],
                )
                .row(&[name]),
            connect_errors: metrics
                .counters(
                    "gatehouse_upstream_connect_errors_total",
                    "Upstream attempts whose connection failed (refused, timed out, TLS handshake), by upstream",
                    &["upstream"],
                )
                .row(&[name]),
            circuit_row: OnceLock::new(),
        });
        let weak = Arc::downgrade(&pool);
        let row = metrics
            .sampled(
                "gatehouse_circuit_state",
                "The upstream's circuit breaker: 0 closed, 1 open, 2 half-open",
                &["upstream"],
            )
            .row(&[name], move || {
                weak.upgrade()
                    .map_or(0, |pool| pool.breaker.state(clock::now()).code())
            });
        let _ = pool.circuit_row.set(row);
        pool
    }
}

/// One target of a pool in this config version.
#[derive(Debug)]
pub struct Target {
    pub state: Arc<TargetState>,
    pub weight: u32,
    /// The peer template; cloned per attempt.
    peer: HttpPeer,
    /// The target's `Host`, for routes that send it (the `rewrite` filter's `host: target`).
    host: http::HeaderValue,
}

/// How probes reach a pool's targets: its TLS and protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeTransport {
    /// `(sni, verify, ca_file)` for TLS pools.
    pub tls: Option<(String, bool, Option<String>)>,
    pub h2: bool,
}

/// The targets a pool balances over, swapped whole when they change.
pub struct TargetSet {
    pub targets: Vec<Target>,
    balancer: Balancer,
}

/// A target as configured: an address, or a host name that gives one target per address.
enum TargetSpec {
    Fixed {
        address: SocketAddr,
        weight: u32,
    },
    Named {
        record: Arc<NameRecord>,
        port: u16,
        weight: u32,
    },
}

/// The `Host` a target is asked with: its host name (or its address), with the port unless it
/// is the scheme's default.
fn target_host(name: Option<&str>, address: SocketAddr, tls: bool) -> http::HeaderValue {
    let default_port = if tls { 443 } else { 80 };
    let mut text = match (name, address.ip()) {
        (Some(name), _) => name.to_string(),
        (None, IpAddr::V4(ip)) => ip.to_string(),
        (None, IpAddr::V6(ip)) => format!("[{ip}]"),
    };
    if address.port() != default_port {
        text.push_str(&format!(":{}", address.port()));
    }
    http::HeaderValue::from_str(&text).unwrap_or_else(|_| http::HeaderValue::from_static(""))
}

/// A target a request picked: its state (held until the attempt ends) and its peer.
pub struct Pick {
    pub state: Arc<TargetState>,
    pub peer: Box<HttpPeer>,
    /// The target's host name (or address) as configured, with its port unless it is the
    /// scheme's default.
    pub host: http::HeaderValue,
}

/// A named pool of targets with its balancing and resilience settings.
pub struct UpstreamPool {
    pub name: Arc<str>,
    specs: Vec<TargetSpec>,
    set: ArcSwap<TargetSet>,
    /// Every target's peer, but for its address (and, for a named TLS target without a
    /// configured SNI, its server name).
    template: HttpPeer,
    balance: Balance,
    initial_healthy: bool,
    registry: UpstreamRegistry,
    metrics: Metrics,
    pub hash_on: Option<HashOn>,
    pub health_check: Option<HealthCheck>,
    pub outlier: Option<OutlierConfig>,
    pub breaker: Option<BreakerConfig>,
    pub retry_budget: RetryBudgetConfig,
    pub panic_threshold: f64,
    pub transport: ProbeTransport,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub shared: Arc<PoolState>,
}

impl UpstreamPool {
    pub fn build(
        path: &str,
        config: &UpstreamConfig,
        ca_file_cache: &mut CaCache,
        registry: &UpstreamRegistry,
        metrics: &Metrics,
    ) -> Result<UpstreamPool, Vec<ConfigError>> {
        let mut errors = Vec::new();
        if config.targets.is_empty() {
            errors.push(ConfigError::new(
                format!("{path}.targets"),
                "an upstream needs at least one target",
            ));
        }
        match (&config.balance, &config.hash_on) {
            (Balance::ConsistentHash, None) => errors.push(ConfigError::new(
                format!("{path}.hash_on"),
                "`consistent_hash` needs `hash_on` ({header: NAME}, {cookie: NAME} or {client_ip: true})",
            )),
            (Balance::ConsistentHash, Some(HashOn::Header(name))) if http::HeaderName::from_bytes(name.as_bytes()).is_err() => {
                errors.push(ConfigError::new(format!("{path}.hash_on.header"), format!("\"{name}\" is not a valid header name")))
            }
            (Balance::ConsistentHash, _) | (_, None) => {}
            (_, Some(_)) => errors.push(ConfigError::new(
                format!("{path}.hash_on"),
                "`hash_on` is used only with `balance: consistent_hash`",
            )),
        }
        let health_check = config.health_check.as_ref().and_then(|check| {
            HealthCheck::build(&format!("{path}.health_check"), check, &mut errors)
        });
        check_resilience(path, config, &mut errors);
        let ca = match config.tls.as_ref().and_then(|tls| tls.ca_file.as_deref()) {
            Some(file) => match ca_file_cache.load(file) {
                Ok(ca) => Some(ca),
                Err(message) => {
                    errors.push(ConfigError::new(format!("{path}.tls.ca_file"), message));
                    None
                }
            },
            None => None,
        };
        let name: Arc<str> = config.name.as_str().into();
        let initial_healthy = health_check
            .as_ref()
            .is_none_or(|check| check.initial_healthy);
        let mut specs = Vec::new();
        for (index, target) in config.targets.iter().enumerate() {
            let target_path = format!("{path}.targets[{index}]");
            if target.weight == 0 {
                errors.push(ConfigError::new(
                    format!("{target_path}.weight"),
                    "weight must be at least 1",
                ));
            }
            let weight = target.weight.max(1);
            match parse_target(&target.address) {
                Ok(Address::Fixed(address)) => specs.push(TargetSpec::Fixed { address, weight }),
                Ok(Address::Named(host, port)) => specs.push(TargetSpec::Named {
                    record: registry.name(&host, metrics),
                    port,
                    weight,
                }),
                Err(message) => {
                    errors.push(ConfigError::new(format!("{target_path}.address"), message))
                }
            }
        }
        let tls = config.tls.is_some();
        let sni = config
            .tls
            .as_ref()
            .map(|tls| tls.sni.clone())
            .unwrap_or_default();
        let mut template = HttpPeer::new(SocketAddr::from(([0, 0, 0, 0], 0)), tls, sni);
        let timeouts = &config.timeouts;
        template.options.connection_timeout = Some(timeouts.connect.get());
        template.options.read_timeout = Some(timeouts.read.get());
        template.options.write_timeout = Some(timeouts.write.get());
        template.options.idle_timeout = Some(timeouts.idle.get());
        if let Some(tls) = &config.tls {
            template.options.verify_cert = tls.verify;
            template.options.verify_hostname = tls.verify;
            template.options.ca.clone_from(&ca);
        }
        template.options.alpn = match (config.protocol, tls) {
            (UpstreamProtocol::Http1, _) => ALPN::H1,
            (UpstreamProtocol::H2, true) => ALPN::H2,
            // Plain TCP: HTTP/2 with prior knowledge.
            (UpstreamProtocol::H2, false) => ALPN::H2,
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut pool = UpstreamPool {
            shared: registry.pool(&config.name, metrics),
            name,
            specs,
            set: ArcSwap::from_pointee(TargetSet {
                targets: Vec::new(),
                balancer: Balancer::new(config.balance, &[]),
            }),
            template,
            balance: config.balance,
            initial_healthy,
            registry: registry.clone(),
            metrics: metrics.clone(),
            hash_on: config.hash_on.clone(),
            health_check,
            outlier: config.outlier_detection.clone(),
            breaker: config.circuit_breaker.clone(),
            retry_budget: config.retry_budget.clone(),
            panic_threshold: config.panic_threshold.fraction(),
            transport: ProbeTransport {
                tls: config
                    .tls
                    .as_ref()
                    .map(|tls| (tls.sni.clone(), tls.verify, tls.ca_file.clone())),
                h2: config.protocol == UpstreamProtocol::H2,
            },
            connect_timeout: config.timeouts.connect.get(),
            read_timeout: config.timeouts.read.get(),
        };
        pool.set = ArcSwap::from_pointee(pool.build_set());
        Ok(pool)
    }

    /// The targets as they are now.
    pub fn targets(&self) -> arc_swap::Guard<Arc<TargetSet>> {
        self.set.load()
    }

    /// The host names the pool's targets are given by.
    pub fn names(&self) -> impl Iterator<Item = &Arc<NameRecord>> {
        self.specs.iter().filter_map(|spec| match spec {
            TargetSpec::Named { record, .. } => Some(record),
            TargetSpec::Fixed { .. } => None,
        })
    }

    /// A host name of the pool that has not had its first answer yet.
    pub fn awaiting_name(&self) -> Option<&Arc<NameRecord>> {
        self.names().find(|record| !record.looked_up())
    }

    /// The target set from the configured targets and the names' last good answers. An
    /// address given twice is one target (the first one's weight).
    fn build_set(&self) -> TargetSet {
        let mut targets: Vec<Target> = Vec::with_capacity(self.specs.len());
        let mut add = |address: SocketAddr, weight: u32, host: Option<&str>| {
            if targets.iter().any(|target| target.state.address == address) {
                return;
            }
            let mut peer = self.template.clone();
            peer._address = pingora_core::protocols::l4::socket::SocketAddr::Inet(address);
            if let Some(host) = host {
                if peer.is_tls() && peer.sni.is_empty() {
                    peer.sni = host.to_string();
                }
            }
            let host = target_host(host, address, peer.is_tls());
            targets.push(Target {
                host,
                state: self.registry.target(
                    &self.name,
                    address,
                    self.initial_healthy,
                    &self.metrics,
                ),
                weight,
                peer,
            });
        };
        for spec in &self.specs {
            match spec {
                TargetSpec::Fixed { address, weight } => add(*address, *weight, None),
                TargetSpec::Named {
                    record,
                    port,
                    weight,
                } => {
                    for ip in record
                        .addresses()
                        .iter()
                        .flat_map(|addresses| addresses.iter())
                    {
                        add(SocketAddr::new(*ip, *port), *weight, Some(&record.host));
                    }
                }
            }
        }
        let balancer = Balancer::new(self.balance, &targets);
        TargetSet { targets, balancer }
    }

    /// Rebuilds the target set from the names' last good answers; whether it changed.
    pub fn refresh(&self) -> bool {
        if self.names().next().is_none() {
            return false;
        }
        let next = self.build_set();
        let current = self.set.load();
        let same = current.targets.len() == next.targets.len()
            && current
                .targets
                .iter()
                .zip(&next.targets)
                .all(|(a, b)| a.state.address == b.state.address && a.weight == b.weight);
        if same {
            return false;
        }
        tracing::info!(
            upstream = %self.name,
            targets = ?next.targets.iter().map(|target| target.state.address).collect::<Vec<_>>(),
            "upstream targets changed"
        );
        self.set.store(Arc::new(next));
        true
    }

    /// Picks a target for an attempt, by the pool's balancer, among the usable ones (healthy
    /// and not ejected; all of them when fewer than `panic_threshold` are usable) that the
    /// request has not tried yet, or (`again`) may have tried. `None` when there is none.
    pub fn select(
        &self,
        key: Option<HashKey<'_>>,
        tried: &[SocketAddr],
        again: bool,
        now: u64,
    ) -> Option<Pick> {
        let set = self.set.load();
        let targets = &set.targets;
        let checked = self.health_check.is_some();
        let watched = checked || self.outlier.is_some();
        let usable = |index: usize| targets[index].state.usable(checked, now);
        let panic = watched && {
            let count = (0..targets.len()).filter(|&index| usable(index)).count();
            if count == 0 {
                return None;
            }
            (count as f64) < self.panic_threshold * targets.len() as f64
        };
        let allowed = |index: usize| !watched || panic || usable(index);
        let untried = |index: usize| !tried.contains(&targets[index].state.address);
        let index = if tried.is_empty() || again {
            set.balancer.pick(targets, key, allowed)
        } else {
            set.balancer
                .pick(targets, key, |index| allowed(index) && untried(index))
        }?;
        let target = &targets[index];
        Some(Pick {
            state: target.state.clone(),
            peer: Box::new(target.peer.clone()),
            host: target.host.clone(),
        })
    }

    /// Whether any target is usable now.
    pub fn has_usable(&self, now: u64) -> bool {
        let checked = self.health_check.is_some();
        self.set
            .load()
            .targets
            .iter()
            .any(|target| target.state.usable(checked, now))
    }

    /// Whether the pool may eject one more target now (`max_ejection_percent`; one always may
    /// be).
    pub fn may_eject(&self, outlier: &OutlierConfig, now: u64) -> bool {
        let set = self.set.load();
        let ejected = set
            .targets
            .iter()
            .filter(|target| target.state.ejected(now))
            .count();
        let allowed = ((outlier.max_ejection_percent.fraction() * set.targets.len() as f64).floor()
            as usize)
            .max(1);
        ejected < allowed
    }

    /// What `/config` shows about the pool: its breaker, each target's state and why, and the
    /// host names its targets come from.
    pub fn report(&self, now: u64) -> serde_json::Value {
        let checked = self.health_check.is_some();
        let names: Vec<_> = self
            .specs
            .iter()
            .filter_map(|spec| match spec {
                TargetSpec::Named { record, port, .. } => Some(record.report(*port)),
                TargetSpec::Fixed { .. } => None,
            })
            .collect();
        serde_json::json!({
            "name": self.name.as_ref(),
            "circuit": self.breaker.as_ref().map(|_| serde_json::json!({
                "state": self.shared.breaker.state(now).as_str(),
                "in_flight": self.shared.breaker.in_flight(),
            })),
            "targets": self
                .set
                .load()
                .targets
                .iter()
                .map(|target| target.state.report(checked, target.weight, now))
                .collect::<Vec<_>>(),
            "names": names,
        })
    }
}

/// A target's address as written: `IP:PORT` (`[IPv6]:PORT`), or `HOST:PORT`.
enum Address {
    Fixed(SocketAddr),
    Named(String, u16),
}

fn parse_target(text: &str) -> Result<Address, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(Address::Fixed(address));
    }
    let invalid = || format!("\"{text}\" is not IP:PORT or HOST:PORT");
    let (host, port) = text.rsplit_once(':').ok_or_else(invalid)?;
    let port: u16 = port.parse().map_err(|_| invalid())?;
    if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
        return Err(invalid());
    }
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
        return Err(format!("\"{host}\" is not a valid host name"));
    }
    Ok(Address::Named(host.to_ascii_lowercase(), port))
}

/// The resilience settings' own limits.
fn check_resilience(path: &str, config: &UpstreamConfig, errors: &mut Vec<ConfigError>) {
    if let Some(outlier) = &config.outlier_detection {
        let path = format!("{path}.outlier_detection");
        if outlier.consecutive_failures == 0 {
            errors.push(ConfigError::new(
                format!("{path}.consecutive_failures"),
                "must be at least 1",
            ));
        }
        if outlier.base_ejection_time.get().is_zero() {
            errors.push(ConfigError::new(
                format!("{path}.base_ejection_time"),
                "must be longer than zero",
            ));
        }
        if outlier.max_ejection_time < outlier.base_ejection_time {
            errors.push(ConfigError::new(
                format!("{path}.max_ejection_time"),
                "must be at least `base_ejection_time`",
            ));
        }
    }
    if let Some(breaker) = &config.circuit_breaker {
        let path = format!("{path}.circuit_breaker");
        if breaker.max_requests == 0 {
            errors.push(ConfigError::new(
                format!("{path}.max_requests"),
                "must be at least 1",
            ));
        }
        if breaker.consecutive_failures == Some(0) {
            errors.push(ConfigError::new(
                format!("{path}.consecutive_failures"),
                "must be at least 1",
            ));
        }
        if breaker.half_open_probes == 0 {
            errors.push(ConfigError::new(
                format!("{path}.half_open_probes"),
                "must be at least 1",
            ));
        }
        if breaker.open_duration.get().is_zero() {
            errors.push(ConfigError::new(
                format!("{path}.open_duration"),
                "must be longer than zero",
            ));
        }
        if breaker.max_open_duration < breaker.open_duration {
            errors.push(ConfigError::new(
                format!("{path}.max_open_duration"),
                "must be at least `open_duration`",
            ));
        }
        if let Some(rate) = &breaker.failure_rate {
            if rate.window.get() < Duration::from_millis(10) {
                errors.push(ConfigError::new(
                    format!("{path}.failure_rate.window"),
                    "must be at least 10ms",
                ));
            }
            if rate.threshold.fraction() == 0.0 {
                errors.push(ConfigError::new(
                    format!("{path}.failure_rate.threshold"),
                    "must be more than 0%",
                ));
            }
        }
    }
}

/// CA bundles read once per config load, shared by pools that name the same file.
#[derive(Default)]
pub struct CaCache {
    loaded: std::collections::HashMap<String, Arc<pingora_core::protocols::tls::CaType>>,
}

impl CaCache {
    fn load(&mut self, file: &str) -> Result<Arc<pingora_core::protocols::tls::CaType>, String> {
        use pingora_core::utils::tls::{parse_x509, WrappedX509};
        if let Some(ca) = self.loaded.get(file) {
            return Ok(ca.clone());
        }
        let pem =
            std::fs::read(file).map_err(|error| format!("cannot read \"{file}\": {error}"))?;
        let mut certificates = Vec::new();
        for item in rustls_pemfile::certs(&mut pem.as_slice()) {
            let der = item.map_err(|error| format!("\"{file}\" is not a PEM file: {error}"))?;
            certificates.push(WrappedX509::new(der.to_vec(), parse_x509));
        }
        if certificates.is_empty() {
            return Err(format!("\"{file}\" holds no PEM certificate"));
        }
        let ca: Arc<pingora_core::protocols::tls::CaType> = certificates.into();
        self.loaded.insert(file.to_string(), ca.clone());
        Ok(ca)
    }
}
