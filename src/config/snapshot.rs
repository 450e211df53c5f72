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
    pub rewrite: Option<PathRewrite>,
    pub read_timeout: Option<Duration>,
    /// The global filters followed by the route's own, in request order, with the route's
    /// `auth` gate after the last filter that identifies callers.
    pub chain: Chain,
    pub metrics: RouteMetrics,
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
    /// The global chain, run for requests that match no route (so e.g. request ids still apply).
    pub global_chain: Chain,
    pub limits: Limits,
    pub trusted_proxies: Vec<IpNet>,
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
