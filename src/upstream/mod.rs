//! Upstream pools: targets, load balancing, and the Pingora peer each target is reached through.

mod balance;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pingora_core::protocols::ALPN;
use pingora_core::upstreams::peer::HttpPeer;

use crate::config::error::ConfigError;
use crate::config::model::{Balance, HashOn, UpstreamConfig, UpstreamProtocol};
pub use balance::{Balancer, HashKey};

/// One target of a pool.
#[derive(Debug)]
pub struct Target {
    pub address: SocketAddr,
    pub weight: u32,
    /// Requests sent to this target and not yet finished (for `least_requests`).
    pub in_flight: AtomicUsize,
    /// The peer template; cloned per request.
    peer: HttpPeer,
}

/// A named pool of targets with its balancing policy.
#[derive(Debug)]
pub struct UpstreamPool {
    pub name: Arc<str>,
    pub targets: Vec<Target>,
    pub balancer: Balancer,
    pub hash_on: Option<HashOn>,
}

impl UpstreamPool {
    pub fn build(
        path: &str,
        config: &UpstreamConfig,
        ca_file_cache: &mut CaCache,
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
                address,
                weight: target.weight.max(1),
                in_flight: AtomicUsize::new(0),
                peer,
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let balancer = Balancer::new(config.balance, &targets);
        Ok(UpstreamPool {
            name: config.name.as_str().into(),
            targets,
            balancer,
            hash_on: config.hash_on.clone(),
        })
    }

    /// Pick a target for a request.
    pub fn select(&self, key: Option<HashKey<'_>>) -> usize {
        self.balancer.select(&self.targets, key)
    }

    /// A fresh peer for the chosen target, with an optional per-route read timeout.
    pub fn peer(&self, target: usize, read_timeout: Option<std::time::Duration>) -> Box<HttpPeer> {
        let mut peer = Box::new(self.targets[target].peer.clone());
        if let Some(timeout) = read_timeout {
            peer.options.read_timeout = Some(timeout);
        }
        peer
    }

    pub fn start_request(&self, target: usize) {
        self.targets[target]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn finish_request(&self, target: usize) {
        self.targets[target]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
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
