//! The per-request state of the proxy: the Snapshot the request pinned, the context it shares
//! with filters, and what the proxy itself keeps between phases.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use gatehouse_filters::{Chain, Problem, RequestContext};

use super::peer::Attempts;
use crate::config::snapshot::Route;
use crate::config::Snapshot;

pub struct RequestCtx {
    /// One config from start to end, even while a new one is swapped in.
    pub snapshot: Arc<Snapshot>,
    /// What filters read and write: request id, client, route, consumer, per-filter state.
    pub shared: Box<RequestContext>,
    /// The matched route's index.
    pub(super) route: Option<usize>,
    /// The upstream attempts: the pool, the targets tried, the current attempt, the deadline.
    pub(super) upstream: Attempts,
    /// How many filters of the chain the request reached: an answer of our own runs their
    /// response phases (and only theirs).
    pub(super) reached: usize,
    /// A copy of the request on its way to the route's mirror.
    pub(super) mirror: Option<Box<super::mirror::Copy>>,
    /// A problem to answer with when the proxy fails on our own decision (a body phase).
    pub(super) problem: Option<Problem>,
    /// The request body as rewritten by the chain, when it was read before the upstream saw
    /// the head (see `body`).
    pub(super) request_body: Option<bytes::Bytes>,
    /// The TCP peer, and whether it is a trusted proxy.
    pub(super) peer: Option<IpAddr>,
    pub(super) trusted_peer: bool,
    /// The request's spans, when tracing is on (boxed: most requests of most configs have none,
    /// and the context is copied with each request's future).
    pub(super) trace: Option<Box<crate::telemetry::traces::RequestTrace>>,
    /// A filter answered in the upstream's place once its (complete) answer head arrived.
    pub(super) answered_instead: bool,
    /// The gRPC flavour the client speaks, when its `content-type` is `application/grpc*`: the
    /// gateway's own answers are then gRPC statuses.
    pub grpc: Option<GrpcWire>,
    /// The call's gRPC status: the upstream's (head or trailers) or that of our own answer.
    pub grpc_status: Option<gatehouse_filters::grpc::Code>,
}

/// How a gRPC client frames its calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcWire {
    Grpc,
    Web,
    WebText,
}

impl GrpcWire {
    /// The flavour of a request's `content-type`, if it is gRPC.
    pub fn of(request: &pingora_http::RequestHeader) -> Option<GrpcWire> {
        let value = request.headers.get(http::header::CONTENT_TYPE)?.as_bytes();
        if !gatehouse_filters::grpc::is_grpc_content_type(value) {
            return None;
        }
        let rest = &value[b"application/grpc".len()..];
        let starts = |prefix: &[u8]| {
            rest.len() >= prefix.len() && rest[..prefix.len()].eq_ignore_ascii_case(prefix)
        };
        Some(if starts(b"-web-text") {
            GrpcWire::WebText
        } else if starts(b"-web") {
            GrpcWire::Web
        } else {
            GrpcWire::Grpc
        })
    }

    /// The `content-type` of an answer in this flavour.
    pub fn content_type(self) -> &'static str {
        match self {
            GrpcWire::Grpc => "application/grpc",
            GrpcWire::Web => "application/grpc-web+proto",
            GrpcWire::WebText => "application/grpc-web-text+proto",
        }
    }
}

impl RequestCtx {
    pub fn new(snapshot: Arc<Snapshot>) -> RequestCtx {
        RequestCtx {
            snapshot,
            shared: Box::new(RequestContext::new(Instant::now())),
            route: None,
            upstream: Attempts::default(),
            reached: 0,
            mirror: None,
            problem: None,
            request_body: None,
            peer: None,
            trusted_peer: false,
            trace: None,
            answered_instead: false,
            grpc: None,
            grpc_status: None,
        }
    }

    /// The chain the request runs: its route's, or the global one.
    pub fn chain(&self) -> &Chain {
        self.snapshot.chain(self.route)
    }

    pub fn route(&self) -> Option<&Route> {
        self.route.map(|route| &self.snapshot.routes[route])
    }

    /// Enters the matched route: filters and logs see its name and upstream.
    pub(super) fn enter(&mut self, route: usize) {
        let matched = &self.snapshot.routes[route];
        self.route = Some(route);
        self.shared.route = Some(matched.name.clone());
        self.shared.upstream = Some(self.snapshot.upstreams[matched.upstream].name.clone());
    }

    /// The header the request id goes back in on our own answers.
    pub fn request_id_header(&self) -> &http::HeaderName {
        self.shared
            .request_id_header
            .as_ref()
            .unwrap_or(&self.snapshot.request_id_header)
    }
}
#[cfg(test)]
mod tests {
    /// Pingora keeps the context inside each request's future, and boxing that future copies it
    /// on every request (callgrind: 800 bytes of context cost about 2,000 instructions a request
    /// in memcpy). Large parts go behind a pointer, like `shared`.
    #[test]
    fn the_per_request_context_stays_small() {
        let size = std::mem::size_of::<super::RequestCtx>();
        assert!(size <= 400, "RequestCtx is {size} bytes");
    }
}
