//! The filter interface of Gatehouse: the `Filter` trait, the per-request context filters share,
//! the responses a filter may answer with, and the registry that builds filters from config.
//!
//! This crate does not depend on the proxy. A filter sees request and response headers and body
//! bytes, so every filter is unit-testable without starting a server.

pub mod consumers;
mod context;
mod filter;
mod problem;
mod registry;
pub mod template;
pub mod util;

pub mod api_key;
pub mod jwt;
mod login;
pub mod oauth2;
pub mod rate_limit;
pub mod request_id;
pub mod response_headers;
pub mod shared;

pub use context::{Consumer, RequestContext};
pub use filter::{BuildCtx, BuildError, Decision, Filter};
pub use problem::{Problem, Response};
pub use registry::{build_filter, filter_kinds, schema_for_kind, FilterKind};
