//! Upstream pools: their targets and the state kept about them across config versions, load
//! balancing over the targets a request may use, active health checks (`health`), passive
//! ejection (`target`), circuit breakers (`breaker`), retry budgets (`budget`), and the Pingora
//! peer each target is reached through.

mod balance;
pub mod breaker;
pub mod budget;
pub mod health;
mod target;

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

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
#[derive(Clone, Default)]
pub struct UpstreamRegistry {
    inner: Arc<Mutex<Registry>>,
}

#[derive(Default)]
struct Registry {
    pools: HashMap<String, Weak<PoolState>>,
    targets: HashMap<(String, SocketAddr), Weak<TargetState>>,
}

impl UpstreamRegistry {
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
}

/// How probes reach a pool's targets: its TLS and protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeTransport {
    /// `(sni, verify, ca_file)` for TLS pools.
    pub tls: Option<(String, bool, Option<String>)>,
    pub h2: bool,
}

/// A named pool of targets with its balancing and resilience settings.
pub struct UpstreamPool {
    pub name: Arc<str>,
    pub targets: Vec<Target>,
    pub balancer: Balancer,
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
        let mut targets = Vec::new();
        for (index, target) in config.targets.iter().enumerate() {
            let target_path = format!("{path}.targets[{index}]");
            if target.weight == 0 {
                errors.push(ConfigError::new(
                    format!("{target_path}.weight"),
                    "weight must be at least 1",
                ));
            }
            let address = match target.address.to_socket_addrs() {
                Ok(mut addresses) => match addresses.next() {
                    Some(address) => address,
                    None => {
                        errors.push(ConfigError::new(
                            format!("{target_path}.address"),
                            "resolves to no address",
                        ));
                        continue;
                    }
                },
                Err(error) => {
                    errors.push(ConfigError::new(
                        format!("{target_path}.address"),
                        format!(
                            "\"{}\" is not a reachable host:port ({error})",
                            target.address
                        ),
                    ));
                    continue;
                }
            };
            let tls = config.tls.is_some();
            let sni = config
                .tls
                .as_ref()
                .map(|tls| tls.sni.clone())
                .unwrap_or_default();
            let mut peer = HttpPeer::new(address, tls, sni);
            let timeouts = &config.timeouts;
            peer.options.connection_timeout = Some(timeouts.connect.get());
            peer.options.read_timeout = Some(timeouts.read.get());
            peer.options.write_timeout = Some(timeouts.write.get());
            peer.options.idle_timeout = Some(timeouts.idle.get());
            if let Some(tls) = &config.tls {
                peer.options.verify_cert = tls.verify;
                peer.options.verify_hostname = tls.verify;
                peer.options.ca.clone_from(&ca);
            }
            peer.options.alpn = match (config.protocol, tls) {
                (UpstreamProtocol::Http1, _) => ALPN::H1,
                (UpstreamProtocol::H2, true) => ALPN::H2,
                // Plain TCP: HTTP/2 with prior knowledge.
                (UpstreamProtocol::H2, false) => ALPN::H2,
            };
            targets.push(Target {
                state: registry.target(&name, address, initial_healthy, metrics),
                weight: target.weight.max(1),
                peer,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let balancer = Balancer::new(config.balance, &targets);
        Ok(UpstreamPool {
            shared: registry.pool(&config.name, metrics),
            name,
            targets,
            balancer,
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
        })
    }

    /// Picks a target for an attempt, by the pool's balancer, among the usable ones (healthy
    /// and not ejected; all of them when fewer than `panic_threshold` are usable) that the
    /// request has not tried yet, or has tried when that is all there is. `None` when no target
    /// is usable at all.
    pub fn select(
        &self,
        key: Option<HashKey<'_>>,
        tried: &[SocketAddr],
        now: u64,
    ) -> Option<usize> {
        let checked = self.health_check.is_some();
        let watched = checked || self.outlier.is_some();
        let usable = |index: usize| self.targets[index].state.usable(checked, now);
        let panic = watched && {
            let count = (0..self.targets.len())
                .filter(|&index| usable(index))
                .count();
            if count == 0 {
                return None;
            }
            (count as f64) < self.panic_threshold * self.targets.len() as f64
        };
        let allowed = |index: usize| !watched || panic || usable(index);
        let untried = |index: usize| !tried.contains(&self.targets[index].state.address);
        if tried.is_empty() {
            return self.balancer.pick(&self.targets, key, allowed);
        }
        self.balancer
            .pick(&self.targets, key, |index| allowed(index) && untried(index))
            .or_else(|| self.balancer.pick(&self.targets, key, allowed))
    }

    /// Whether any target is usable now.
    pub fn has_usable(&self, now: u64) -> bool {
        let checked = self.health_check.is_some();
        self.targets
            .iter()
            .any(|target| target.state.usable(checked, now))
    }

    /// A fresh peer for the chosen target, with this attempt's connect and read deadlines.
    pub fn peer(&self, target: usize, connect: Duration, read: Duration) -> Box<HttpPeer> {
        let mut peer = Box::new(self.targets[target].peer.clone());
        peer.options.connection_timeout = Some(connect);
        peer.options.read_timeout = Some(read);
        peer
    }

    /// Whether the pool may eject one more target now (`max_ejection_percent`; one always may
    /// be).
    pub fn may_eject(&self, outlier: &OutlierConfig, now: u64) -> bool {
        let ejected = self
            .targets
            .iter()
            .filter(|target| target.state.ejected(now))
            .count();
        let allowed =
            ((outlier.max_ejection_percent.fraction() * self.targets.len() as f64).floor()
                as usize)
                .max(1);
        ejected < allowed
    }

    /// What `/config` shows about the pool: its breaker, and each target's state and why.
    pub fn report(&self, now: u64) -> serde_json::Value {
        let checked = self.health_check.is_some();
        serde_json::json!({
            "name": self.name.as_ref(),
            "circuit": self.breaker.as_ref().map(|_| serde_json::json!({
                "state": self.shared.breaker.state(now).as_str(),
                "in_flight": self.shared.breaker.in_flight(),
            })),
            "targets": self
                .targets
                .iter()
                .map(|target| target.state.report(checked, target.weight, now))
                .collect::<Vec<_>>(),
        })
    }
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
