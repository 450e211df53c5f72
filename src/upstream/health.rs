//! Active health checks. One supervisor probes every target of every pool that has a
//! `health_check`, each target on its own jittered timer, off the request path. On every config
//! swap it reconciles its probes with the new config, by (pool, address): a kept target keeps its
//! probe and its state (a weight change resets nothing), a removed target stops being probed, a
//! new one starts as configured (`initial`). Targets found by DNS are reconciled the same way
//! whenever a name's addresses change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::task::JoinHandle;

use super::{ProbeTransport, TargetState};
use crate::config::error::ConfigError;
use crate::config::model::{HealthCheckConfig, HealthCheckKind, InitialHealth};
use crate::config::ConfigStore;

/// A pool's health check, compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    pub path: String,
    /// Inclusive status ranges that pass.
    pub expect: Vec<(u16, u16)>,
    pub interval: Duration,
    pub jitter: f64,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub initial_healthy: bool,
}

impl HealthCheck {
    pub fn build(
        path: &str,
        config: &HealthCheckConfig,
        errors: &mut Vec<ConfigError>,
    ) -> Option<HealthCheck> {
        let before = errors.len();
        let mut expect = Vec::new();
        for (index, range) in config.expect_status.iter().enumerate() {
            let parsed = match range.split_once('-') {
                Some((low, high)) => low.trim().parse().ok().zip(high.trim().parse().ok()),
                None => range.trim().parse().ok().map(|status| (status, status)),
            };
            match parsed {
                Some((low, high)) if (100..=599).contains(&low) && low <= high && high <= 599 => {
                    expect.push((low, high))
                }
                _ => errors.push(ConfigError::new(
                    format!("{path}.expect_status[{index}]"),
                    format!("\"{range}\" is not a status or a range like \"200-299\""),
                )),
            }
        }
        if config.kind == HealthCheckKind::Http {
            if expect.is_empty() && config.expect_status.is_empty() {
                errors.push(ConfigError::new(
                    format!("{path}.expect_status"),
                    "give the statuses that pass",
                ));
            }
            if !config.path.starts_with('/') {
                errors.push(ConfigError::new(
                    format!("{path}.path"),
                    "must start with \"/\"",
                ));
            }
        }
        if config.interval.get() < Duration::from_millis(10) {
            errors.push(ConfigError::new(
                format!("{path}.interval"),
                "must be at least 10ms",
            ));
        }
        if config.timeout.get().is_zero() {
            errors.push(ConfigError::new(
                format!("{path}.timeout"),
                "must be longer than zero",
            ));
        }
        for (key, value) in [
            ("healthy_threshold", config.healthy_threshold),
            ("unhealthy_threshold", config.unhealthy_threshold),
        ] {
            if value == 0 {
                errors.push(ConfigError::new(
                    format!("{path}.{key}"),
                    "must be at least 1",
                ));
            }
        }
        if errors.len() != before {
            return None;
        }
        Some(HealthCheck {
            kind: config.kind,
            path: config.path.clone(),
            expect,
            interval: config.interval.get(),
            jitter: config.jitter.fraction(),
            timeout: config.timeout.get(),
            healthy_threshold: config.healthy_threshold,
            unhealthy_threshold: config.unhealthy_threshold,
            initial_healthy: config.initial == InitialHealth::Healthy,
        })
    }

    fn passes(&self, status: u16) -> bool {
        self.expect
            .iter()
            .any(|(low, high)| (*low..=*high).contains(&status))
    }

    /// The wait before the next probe: the interval, give or take the jitter.
    fn next_wait(&self) -> Duration {
        let spread = self.jitter * (2.0 * fastrand::f64() - 1.0);
        self.interval.mul_f64((1.0 + spread).max(0.0))
    }
}

/// What one probe task does; a change restarts the task (the target's state stays).
#[derive(Clone, Debug, PartialEq)]
struct ProbeSpec {
    check: HealthCheck,
    transport: ProbeTransport,
}

struct Probe {
    spec: ProbeSpec,
    task: JoinHandle<()>,
}

/// The background service that runs the probes.
pub struct HealthSupervisor {
    pub store: Arc<ConfigStore>,
    /// Tells when a pool's targets change between config swaps (DNS answers).
    pub registry: super::UpstreamRegistry,
}

#[async_trait]
impl BackgroundService for HealthSupervisor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.store.subscribe();
        let mut discovered = self.registry.subscribe();
        let mut probes: HashMap<(Arc<str>, SocketAddr), Probe> = HashMap::new();
        loop {
            self.reconcile(&mut probes);
            tokio::select! {
                _ = shutdown.changed() => break,
                changed = changes.changed() => if changed.is_err() { break },
                changed = discovered.changed() => if changed.is_err() { break },
            }
        }
        for probe in probes.values() {
            probe.task.abort();
        }
    }
}

impl HealthSupervisor {
    /// Makes the running probes those the live config asks for.
    fn reconcile(&self, probes: &mut HashMap<(Arc<str>, SocketAddr), Probe>) {
        let snapshot = self.store.load();
        let mut wanted = HashMap::new();
        for pool in &snapshot.upstreams {
            let Some(check) = &pool.health_check else {
                continue;
            };
            let spec = ProbeSpec {
                check: check.clone(),
                transport: pool.transport.clone(),
            };
            for target in &pool.targets().targets {
                wanted.insert(
                    (pool.name.clone(), target.state.address),
                    (spec.clone(), target.state.clone()),
                );
            }
        }
        probes.retain(|key, probe| {
            let keep = wanted.get(key).is_some_and(|(spec, _)| *spec == probe.spec);
            if !keep {
                probe.task.abort();
            }
            keep
        });
        for (key, (spec, state)) in wanted {
            if probes.contains_key(&key) {
                continue;
            }
            let task = tokio::spawn(probe_forever(state, spec.clone()));
            probes.insert(key, Probe { spec, task });
        }
    }
}

async fn probe_forever(state: Arc<TargetState>, spec: ProbeSpec) {
    let client = match (spec.check.kind, http_client(&spec, state.address)) {
        (HealthCheckKind::Tcp, _) => None,
        (HealthCheckKind::Http, Ok(client)) => Some(client),
        (HealthCheckKind::Http, Err(error)) => {
            tracing::error!(upstream = %state.pool, target = %state.address, %error, "cannot build the health-check client; the target is not probed");
            return;
        }
    };
    let url = probe_url(&spec, state.address);
    loop {
        let outcome = match &client {
            None => tcp_probe(state.address, spec.check.timeout).await,
            Some(client) => http_probe(client, &url, &spec.check).await,
        };
        let (passed, detail) = match &outcome {
            Ok(()) => (true, String::new()),
            Err(detail) => (false, detail.clone()),
        };
        let check = &spec.check;
        match state.record_probe(
            passed,
            check.healthy_threshold,
            check.unhealthy_threshold,
            &detail,
        ) {
            Some(true) => {
                tracing::info!(upstream = %state.pool, target = %state.address, "target healthy")
            }
            Some(false) => {
                tracing::warn!(upstream = %state.pool, target = %state.address, detail, "target unhealthy")
            }
            None => {}
        }
        tokio::time::sleep(check.next_wait()).await;
    }
}

async fn tcp_probe(address: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(format!("connect: {error}")),
        Err(_) => Err(format!("no connection within {timeout:?}")),
    }
}

async fn http_probe(
    client: &reqwest::Client,
    url: &str,
    check: &HealthCheck,
) -> Result<(), String> {
    match client.get(url).send().await {
        Ok(response) if check.passes(response.status().as_u16()) => Ok(()),
        Ok(response) => Err(format!("status {}", response.status().as_u16())),
        Err(error) if error.is_timeout() => Err(format!("no answer within {:?}", check.timeout)),
        Err(error) if error.is_connect() => Err("connection refused or failed".into()),
        Err(error) => Err(error.to_string()),
    }
}

fn probe_url(spec: &ProbeSpec, address: SocketAddr) -> String {
    match &spec.transport.tls {
        Some((sni, _, _)) if !sni.is_empty() => {
            format!("https://{sni}:{}{}", address.port(), spec.check.path)
        }
        Some(_) => format!("https://{address}{}", spec.check.path),
        None => format!("http://{address}{}", spec.check.path),
    }
}

/// A client that reaches this one target (a TLS pool's server name resolves to its address),
/// opens a new connection per probe (a probe checks that the target still accepts them) and
/// reports redirects as they are.
fn http_client(spec: &ProbeSpec, address: SocketAddr) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(spec.check.timeout)
        .connect_timeout(spec.check.timeout)
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("gatehouse-health-check");
    if spec.transport.h2 && spec.transport.tls.is_none() {
        builder = builder.http2_prior_knowledge();
    }
    if let Some((sni, verify, ca_file)) = &spec.transport.tls {
        if !sni.is_empty() {
            builder = builder.resolve(sni, address);
        }
        if !verify {
            builder = builder.danger_accept_invalid_certs(true);
        }
        if let Some(file) = ca_file {
            let pem = std::fs::read(file).map_err(|error| format!("{file}: {error}"))?;
            for certificate in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|error| format!("{file}: {error}"))?
            {
                builder = builder.add_root_certificate(certificate);
            }
        }
    }
    builder.build().map_err(|error| error.to_string())
}
