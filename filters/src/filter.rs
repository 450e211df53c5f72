//! The `Filter` trait (one method per proxy phase, each a no-op by default), the `FilterKind`
//! that builds a filter from its typed config, the phases a filter takes part in, and what a
//! build gets besides its config.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_http::{RequestHeader, ResponseHeader};
use serde::de::DeserializeOwned;

use crate::{Metrics, Problem, RequestContext, Response};

/// What the request phase of a filter decided.
#[derive(Debug)]
pub enum Decision {
    /// Go on with the next filter, then the upstream.
    Continue,
    /// Answer now with this response; no later filter and no upstream sees the request.
    Respond(Response),
    /// Answer now with this problem document.
    Reject(Problem),
}

/// The phases a filter takes part in. A chain calls a filter only in the phases it declares, so
/// a phase no filter of a route wants costs that route nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Phases(u8);

impl Phases {
    pub const NONE: Phases = Phases(0);
    pub const REQUEST: Phases = Phases(1);
    pub const REQUEST_BODY: Phases = Phases(1 << 1);
    pub const UPSTREAM_REQUEST: Phases = Phases(1 << 2);
    pub const RESPONSE: Phases = Phases(1 << 3);
    pub const RESPONSE_BODY: Phases = Phases(1 << 4);
    pub const LOG: Phases = Phases(1 << 5);
    pub const RESPONSE_TRAILERS: Phases = Phases(1 << 6);
    pub const ALL: Phases = Phases((1 << 7) - 1);

    /// The phases of both.
    pub const fn and(self, other: Phases) -> Phases {
        Phases(self.0 | other.0)
    }

    /// Whether every phase of `other` is in `self`.
    pub const fn contains(self, other: Phases) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Phases {
    type Output = Phases;

    fn bitor(self, other: Phases) -> Phases {
        self.and(other)
    }
}

/// Where a filter's request phase runs in its chain. Every filter of an earlier stage runs before
/// any filter of a later one, whatever their positions in the global and the route's lists (a
/// CORS preflight must be answered before an auth filter the config lists first); within a
/// stage, the lists' order holds. Response phases run in the reverse of that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Gives the request its identity (its request id), so every answer can carry it.
    Identify,
    /// Answers CORS preflights, before any check a preflight cannot pass.
    Preflight,
    /// Admission checks that need no caller identity (client address, method, size), before
    /// authentication spends any work on the request.
    Admission,
    /// Authentication, rate limits, transforms: everything else, in list order. The route's
    /// `auth` gate runs among these, after the last auth filter.
    Main,
}

/// A filter, built once per configuration snapshot and shared by all requests.
///
/// Request phases run in chain order; response phases run in reverse (onion order). Per-request
/// state goes into `ctx.state`, never into the filter.
#[async_trait]
pub trait Filter: Send + Sync + 'static {
    /// The registry kind this filter was built from.
    fn kind(&self) -> &'static str;

    /// The phases this filter overrides. The default, every phase, is always correct; a filter
    /// that names only its own phases is skipped in the others.
    fn phases(&self) -> Phases {
        Phases::ALL
    }

    /// Whether this filter identifies callers. A route's `auth: required` is enforced after the
    /// last of these has run.
    fn is_auth(&self) -> bool {
        false
    }

    /// Where the filter runs in its chain, whatever its position in the config's lists.
    fn stage(&self) -> Stage {
        Stage::Main
    }

    /// Whether the filter can serve (e.g. its keys have been fetched). `/readyz` waits for all.
    fn ready(&self) -> bool {
        true
    }

    /// The request head arrived (after routing), and the filter can decide without waiting:
    /// `Some(decision)`, which may be an answer of its own. `None` has the chain call (and await)
    /// [`Filter::request`] instead, so a filter that waits only sometimes (a key fetch, a Redis
    /// call) skips, on most requests, the boxed future every call of the async phase costs.
    /// Return `None` before changing the request or the context.
    fn try_request(
        &self,
        _request: &mut RequestHeader,
        _ctx: &mut RequestContext,
    ) -> Option<Decision> {
        None
    }

    /// The request head arrived (after routing), for a filter that must wait. May answer the
    /// request itself. By default, what [`Filter::try_request`] decides.
    async fn request(&self, request: &mut RequestHeader, ctx: &mut RequestContext) -> Decision {
        self.try_request(request, ctx).unwrap_or(Decision::Continue)
    }

    /// A piece of the request body arrived. An error answers the request with that problem.
    fn request_body(
        &self,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        _ctx: &mut RequestContext,
    ) -> Result<(), Problem> {
        Ok(())
    }

    /// The request is about to be sent to the upstream.
    fn upstream_request(&self, _request: &mut RequestHeader, _ctx: &mut RequestContext) {}

    /// The response head is about to be sent to the client.
    fn response(&self, _response: &mut ResponseHeader, _ctx: &mut RequestContext) {}

    /// A piece of the response body is about to be sent to the client.
    fn response_body(
        &self,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        _ctx: &mut RequestContext,
    ) {
    }

    /// The upstream's trailers arrived (an HTTP/2 upstream: gRPC's `grpc-status`). The filter
    /// may change them, or end the body with bytes of its own instead (`Some`: the bytes are
    /// the body's last piece and the trailers are dropped; filters after it in response order
    /// see neither). Without trailers this phase is not called: the body's last piece has
    /// `end_of_stream`.
    fn response_trailers(
        &self,
        _trailers: &mut http::HeaderMap,
        _ctx: &mut RequestContext,
    ) -> Option<Bytes> {
        None
    }

    /// The request is over (answered, or failed).
    fn log(&self, _ctx: &RequestContext) {}
}

/// A filter kind: its name, its config schema, and how to build it. Registered in a
/// [`Registry`](crate::Registry) with one line.
pub trait FilterKind: Filter + Sized {
    const KIND: &'static str;
    type Config: DeserializeOwned + schemars::JsonSchema + Default;
    fn build(config: Self::Config, ctx: &BuildCtx) -> Result<Self, Vec<BuildError>>;
}

/// What `build` gets besides its own config: shared clients and settings of the snapshot.
#[derive(Clone, Debug, Default)]
pub struct BuildCtx {
    /// The consumers of the snapshot and their credentials.
    pub consumers: Arc<crate::consumers::ConsumerRegistry>,
    /// The shared Redis client, when the config has a `redis` section.
    pub redis: Option<Arc<crate::shared::Redis>>,
    /// Where the filter registers its metric families and takes its rows.
    pub metrics: Metrics,
    /// The route the filter belongs to; `None` for the global chain, which serves every route.
    pub route: Option<Arc<str>>,
    /// The server's `limits.max_body_bytes`, which a filter's own body limit must not exceed
    /// (`None`: no server limit known, as in unit tests).
    pub server_max_body_bytes: Option<u64>,
    /// The named captures of the route's regex paths, which templates may read as
    /// `${path.NAME}`; `None` for the global chain (any name).
    pub path_captures: Option<Arc<[String]>>,
    /// Headers the gateway sets itself besides the forwarding ones (the configured identity
    /// headers and the request id header), which a filter may not set or remove.
    pub gateway_headers: Arc<[http::HeaderName]>,
}

impl BuildCtx {
    /// The `route` label of the filter's metric rows: its route, or `(global)`.
    pub fn route_label(&self) -> &str {
        self.route.as_deref().unwrap_or(GLOBAL_ROUTE_LABEL)
    }

    /// The names templates of this filter may use besides the built-in variables.
    pub fn template_scope(&self) -> crate::template::Scope<'_> {
        crate::template::Scope {
            path_captures: self.path_captures.as_deref(),
            locals: &[],
        }
    }
}

/// The `route` label of metric rows of filters in the global chain.
pub const GLOBAL_ROUTE_LABEL: &str = "(global)";

/// What a [`BuildError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildErrorKind {
    /// No kind of this name is registered (the error is about `kind`, not `config`).
    UnknownKind,
    /// The config is not valid at `path`.
    InvalidConfig,
}

/// Why a filter could not be built from its config. Each error names the config path below the
/// filter's `config` where the problem is ("" for the whole config).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct BuildError {
    pub kind: BuildErrorKind,
    pub path: String,
    pub message: String,
}

impl BuildError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        BuildError {
            kind: BuildErrorKind::InvalidConfig,
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn unknown_kind(message: impl Into<String>) -> Self {
        BuildError {
            kind: BuildErrorKind::UnknownKind,
            path: String::new(),
            message: message.into(),
        }
    }
}
