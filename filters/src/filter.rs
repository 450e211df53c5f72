//! The `Filter` trait: one method per proxy phase, each a no-op by default.

use async_trait::async_trait;
use bytes::Bytes;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::{Problem, RequestContext, Response};

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

/// A filter, built once per configuration snapshot and shared by all requests.
///
/// Request phases run in chain order; response phases run in reverse (onion order). Per-request
/// state goes into `ctx.state`, never into the filter.
#[async_trait]
pub trait Filter: Send + Sync + 'static {
    /// The registry kind this filter was built from.
    fn kind(&self) -> &'static str;

    /// Whether this filter identifies callers. A route's `auth: required` is enforced after the
    /// last of these has run.
    fn is_auth(&self) -> bool {
        false
    }

    /// Whether the filter can serve (e.g. its keys have been fetched). `/readyz` waits for all.
    fn ready(&self) -> bool {
        true
    }

    /// The request head arrived (after routing). May answer the request itself.
    async fn request(&self, _request: &mut RequestHeader, _ctx: &mut RequestContext) -> Decision {
        Decision::Continue
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

    /// The request is over (answered, or failed).
    fn log(&self, _ctx: &RequestContext) {}
}

/// What `build` gets besides its own config: shared clients and settings of the snapshot.
#[derive(Clone, Debug, Default)]
pub struct BuildCtx {
    /// The consumers of the snapshot and their credentials.
    pub consumers: std::sync::Arc<crate::consumers::ConsumerRegistry>,
    /// The shared Redis client, when the config has a `redis` section.
    pub redis: Option<std::sync::Arc<crate::shared::Redis>>,
}

/// Why a filter could not be built from its config. Each error names the config path below the
/// filter's `config` where the problem is ("" for the whole config).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct BuildError {
    pub path: String,
    pub message: String,
}

impl BuildError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        BuildError {
            path: path.into(),
            message: message.into(),
        }
    }
}
