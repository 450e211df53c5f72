//! The Snapshot: one immutable, versioned, hashed, fully built configuration. A request pins
//! one Snapshot for its whole life.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gatehouse_filters::Chain;
use ipnet::IpNet;

use super::model::Config;
use crate::router::{PathRewrite, Router};
use crate::telemetry::metrics::RouteMetrics;
use crate::upstream::UpstreamPool;

/// A route ready to serve.
pub struct Route {
    pub name: Arc<str>,
    pub upstream: usize,
    /// Used when `upstream` has no usable target or its breaker is open.
    pub backup: Option<usize>,
    /// Other pools and the share of requests (per ten thousand, cumulative) each takes.
    pub split: Vec<(usize, u32)>,
    pub mirror: Option<Mirror>,
    pub rewrite: Option<PathRewrite>,
    /// The whole exchange with the upstream, across attempts.
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    /// The global filters followed by the route's own, in request order, with the route's
    /// `auth` gate after the last filter that identifies callers.
    pub chain: Chain,
    pub metrics: RouteMetrics,
    /// Whether responses carry `Server-Timing`.
    pub server_timing: bool,
    /// Accepted WebSocket upgrades, and their limits; `None`: upgrades are refused.
    pub websocket: Option<WebSocket>,
}

/// The limits of a route's WebSocket connections.
#[derive(Clone, Copy, Debug)]
pub struct WebSocket {
    pub idle_timeout: Duration,
    pub max_lifetime: Duration,
}

/// Where a route's requests are copied.
pub struct Mirror {
    pub pool: usize,
    /// The share of requests copied.
    pub share: f64,
    /// Copies under way; beyond them a copy is dropped, so a slow mirror cannot pile up work.
    pub slots: Arc<tokio::sync::Semaphore>,
}

/// Copies a route may have under way at once.
pub const MIRROR_SLOTS: usize = 256;

/// When a route tries again, compiled from its `retry` section.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub on_timeout: bool,
    /// 502, 503 and 504.
    pub on_gateway_error: bool,
    pub statuses: Vec<u16>,
    /// The route's own retry budget share, in place of the pool's.
    pub budget_percent: Option<f64>,
    /// Methods tried again after a target may have seen them (any method is tried again after
    /// a failed connection).
    pub methods: Vec<http::Method>,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// Without a `retry` section: a failed connection (nothing reached the upstream) is tried
    /// once more, on another target.
    pub fn connect_failures_once() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            on_connect_failure: true,
            on_reset: false,
            on_timeout: false,
            on_gateway_error: false,
            statuses: Vec::new(),
            budget_percent: None,
            methods: Vec::new(),
            per_try_timeout: None,
            backoff_base: Duration::ZERO,
            backoff_max: Duration::ZERO,
        }
    }
}

/// A listener's connection-level settings, found by the address a connection arrived on.
#[derive(Clone, Debug)]
pub struct ListenerPolicy {
    pub name: std::sync::Arc<str>,
    pub address: std::net::SocketAddr,
    pub proxy_protocol: Option<ProxyProtocolPolicy>,
    pub h2c: bool,
}

#[derive(Clone, Debug)]
pub struct ProxyProtocolPolicy {
    pub trusted: Vec<IpNet>,
    pub timeout: Duration,
}

impl ListenerPolicy {
    /// Whether a connection to `local` arrived on this listener (one bound to an unspecified
    /// address takes connections to any address of its port).
    pub fn serves(&self, local: std::net::SocketAddr) -> bool {
        self.address.port() == local.port()
            && (self.address.ip() == local.ip() || self.address.ip().is_unspecified())
    }
}

impl Snapshot {
    /// The listener a connection to `local` arrived on. A listener bound to the exact address
    /// wins over one bound to the unspecified address of the same port.
    pub fn listener(&self, local: std::net::SocketAddr) -> Option<&ListenerPolicy> {
        self.listeners
            .iter()
            .find(|listener| listener.address == local)
            .or_else(|| {
                self.listeners
                    .iter()
                    .find(|listener| listener.serves(local))
            })
    }
}

/// Request limits, in plain numbers.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub max_body_bytes: u64,
    pub header_read_timeout: Duration,
}

pub struct Snapshot {
    /// Increases by one with every applied config in this process.
    pub version: u64,
    /// SHA-256 of the config as written (secret references, not their values).
    pub hash: String,
    pub loaded_at: SystemTime,
    /// Where it came from, e.g. `file:conf/gatehouse.yaml`.
    pub source: String,
    /// The config as written, for `/config` (shown with secrets masked).
    pub config: Config,
    pub router: Router,
    pub routes: Vec<Route>,
    pub upstreams: Vec<UpstreamPool>,
    /// How upstream host names are resolved (`server.dns`).
    pub dns: crate::upstream::discovery::DnsSettings,
    /// The global chain, run for requests that match no route (so e.g. request ids still apply).
    pub global_chain: Chain,
    pub limits: Limits,
    pub trusted_proxies: Vec<IpNet>,
    /// Which forwarding headers the upstream is told (`server.forwarded_headers`).
    pub forwarded_headers: ForwardedSet,
    /// What each listener asks of a connection before HTTP starts.
    pub listeners: Vec<ListenerPolicy>,
    pub unmatched_metrics: RouteMetrics,
    pub identity_headers: IdentityHeaders,
    /// The header the request id travels in, for answers given before any filter ran.
    pub request_id_header: http::HeaderName,
    /// The Redis server of the `redis` section, for its state on `/readyz` and `/metrics`.
    pub redis: Option<std::sync::Arc<gatehouse_filters::shared::Redis>>,
    /// False for the stand-in of a node that has no config yet (PostgreSQL unreachable at start
    /// and no snapshot file): it is not ready and answers 503.
    pub serving: bool,
    /// The `config_versions` id this snapshot was built from, with `source: postgres`.
    pub database_version: Option<i64>,
}

/// A set of forwarding headers, one bit each (in the order of `ForwardedHeader::ALL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardedSet(u8);

impl ForwardedSet {
    pub fn new(headers: &[crate::config::model::ForwardedHeader]) -> ForwardedSet {
        ForwardedSet(
            headers
                .iter()
                .fold(0, |bits, header| bits | Self::bit(*header)),
        )
    }

    pub const fn all() -> ForwardedSet {
        ForwardedSet(0b1_1111)
    }

    fn bit(header: crate::config::model::ForwardedHeader) -> u8 {
        1 << (header as u8)
    }

    pub fn has(self, header: crate::config::model::ForwardedHeader) -> bool {
        self.0 & Self::bit(header) != 0
    }

    pub fn is_all(self) -> bool {
        self == Self::all()
    }
}

/// Headers that tell the upstream who called.
#[derive(Clone, Debug, Default)]
pub struct IdentityHeaders {
    pub consumer_id: Option<http::HeaderName>,
    pub consumer_username: Option<http::HeaderName>,
    pub subject: Option<http::HeaderName>,
}

impl IdentityHeaders {
    pub fn names(&self) -> impl Iterator<Item = &http::HeaderName> {
        [&self.consumer_id, &self.consumer_username, &self.subject]
            .into_iter()
            .flatten()
    }
}

impl Snapshot {
    /// Whether every filter can serve (e.g. JWKS keys are fetched).
    /// Whether every upstream host name has had its first lookup (well or not).
    pub fn names_looked_up(&self) -> bool {
        self.upstreams
            .iter()
            .all(|pool| pool.awaiting_name().is_none())
    }

    pub fn filters_ready(&self) -> bool {
        self.global_chain.ready() && self.routes.iter().all(|route| route.chain.ready())
    }

    /// The chain a request runs: its route's, or the global one when it matched none.
    pub fn chain(&self, route: Option<usize>) -> &Chain {
        match route {
            Some(route) => &self.routes[route].chain,
            None => &self.global_chain,
        }
    }

    pub fn is_trusted_proxy(&self, address: std::net::IpAddr) -> bool {
        !self.trusted_proxies.is_empty()
            && self
                .trusted_proxies
                .iter()
                .any(|network| network.contains(&address))
    }
}
