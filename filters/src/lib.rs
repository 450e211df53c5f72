//! The filter interface of Gatehouse: the `Filter` trait, the per-request context filters share,
//! the responses and problems a filter may answer with, the chain that runs filters in each
//! phase, the registry that builds filters from config, and the metrics registry they report in.
//!
//! This crate does not depend on the proxy. A filter sees request and response headers and body
//! bytes, so every filter is unit-testable without starting a server.

pub mod call;
mod chain;
pub mod codec;
pub mod consumers;
mod context;
mod filter;
pub mod metrics;
mod problem;
mod registry;
pub mod template;
pub mod units;
pub mod util;

pub mod api_key;
pub mod cors;
pub mod grpc;
pub mod grpc_json;
pub mod grpc_web;
pub mod headers;
pub mod ip_restriction;
pub mod json_body;
pub mod json_doc;
pub mod jwt;
mod login;
pub mod mtls;
pub mod oauth2;
pub mod rate_limit;
pub mod request_id;
pub mod request_limits;
pub mod response_headers;
pub mod rewrite;
pub mod shared;

pub use chain::{AuthGate, Chain};
pub use context::{ConnectionInfo, Consumer, RateLimitNote, RateLimitResult, RequestContext};
pub use filter::{
    BuildCtx, BuildError, BuildErrorKind, Decision, Filter, FilterKind, Phases, Stage,
    GLOBAL_ROUTE_LABEL,
};
pub use metrics::Metrics;
pub use problem::{Problem, ProblemType, Response};
pub use registry::Registry;
