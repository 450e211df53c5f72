//! The Pingora `ProxyHttp` implementation, one request top to bottom. Each phase is a few lines
//! that delegate to the room that owns the work:
//!
//! - `ctx`: the per-request state (the pinned Snapshot, the context shared with filters);
//! - `admit`: our own limits on the request head and body;
//! - `body`: request bodies a filter rewrites whole, read before the upstream sees the head;
//! - `forwarded`: who the client is, and what the upstream is told about the caller;
//! - `resolve`: normalise, route, rewrite (shared with `/explain`);
//! - the route's filter chain (`gatehouse_filters::Chain`), run in each phase it is wanted;
//! - `respond`: answers of our own, and errors mapped to problems;
//! - `peer`: upstream choice (split, backup, breaker) and each attempt's life;
//! - `retry`: whether and when a failed attempt is tried again;
//! - `mirror`: copies of a route's requests sent to its mirror pool;
//! - `observe`: metrics, filter log phases and the access log of a finished request;
//! - `deadline`: the total deadline for a request head, around the whole connection.

pub mod admit;
pub mod body;
pub mod ctx;
pub mod deadline;
pub mod forwarded;
pub mod mirror;
pub mod observe;
pub mod peer;
pub mod resolve;
pub mod respond;
pub mod retry;
pub mod timing;
mod upstream_call;
pub mod websocket;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use gatehouse_filters::{grpc, Phases, Problem, ProblemType};
use pingora_core::connectors::http::Connector;
use pingora_core::connectors::ConnectorOptions;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

pub use ctx::RequestCtx;

use crate::config::ConfigStore;
use crate::telemetry::metrics::RequestMetrics;
use crate::telemetry::traces;

pub struct Gateway {
    pub store: Arc<ConfigStore>,
    pub metrics: RequestMetrics,
    /// Connections to mirror pools, apart from the proxy's own.
    pub mirror: Arc<Connector>,
}

impl Gateway {
    pub fn new(
        store: Arc<ConfigStore>,
        metrics: RequestMetrics,
        connector: Option<ConnectorOptions>,
    ) -> Gateway {
        let mirror = Arc::new(Connector::new(connector));
        // Plugins' `http_call`s go out through a connector like the mirrors'.
        let caller = upstream_call::Caller {
            store: store.clone(),
            connector: mirror.clone(),
        };
        // Filters' own calls (a transcoded request without a body) go out the same way.
        gatehouse_filters::call::set_caller(Arc::new(caller.clone()));
        gatehouse_wasm::set_http_caller(Arc::new(caller));
        Gateway {
            store,
            metrics,
            mirror,
        }
    }
}

/// A request body a phase refused: answered through the error path. An HTTP/2 upstream's
/// stream would otherwise stay open (Pingora keeps waiting for an answer its service gives only
/// once the request ends) until the read timeout: the error is the client's side, which has
/// Pingora drop the upstream stream (a reset: the service never takes the cut body as whole).
fn refuse_body(ctx: &mut RequestCtx, refusal: Problem) -> Result<()> {
    let h2 = ctx
        .upstream
        .current
        .as_ref()
        .is_some_and(|attempt| ctx.snapshot.upstreams[attempt.pool].transport.h2);
    let error = respond::defer(ctx, refusal);
    Err(if h2 && ctx.upstream.proxying {
        error.into_down()
    } else {
        error
    })
}

/// A gRPC call to an HTTP/2 upstream says `te: trailers`, as gRPC requires: Pingora removes
/// the hop-by-hop `te` of a request that arrived over HTTP/1.1 (gRPC-Web, a transcoded call).
fn grpc_upstream_head(request: &mut pingora_http::RequestHeader) {
    if request.version == http::Version::HTTP_2
        && request
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|value| grpc::is_grpc_content_type(value.as_bytes()))
    {
        request
            .insert_header(http::header::TE, http::HeaderValue::from_static("trailers"))
            .ok();
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default adds a (disabled) compression module that every
    /// request would still pass through.
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.store.load())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        deadline::head_received();
        // A client may send its next request before this answer (RFC 9112 §9.3.2): the bytes
        // wait for their turn instead of failing this request. Answers go out in order.
        session.as_downstream_mut().set_pipelining_enabled(true);
        ctx.trace = traces::start(session.req_header());
        ctx.grpc = ctx::GrpcWire::of(session.req_header());
        forwarded::identify(session, ctx);
        // Framing a server behind us could read differently: 400, and the connection closes.
        if let Some(head) = session.as_downstream().as_http1() {
            let raw = head.get_headers_raw_bytes();
            if let Err(refusal) = admit::check_framing(&raw, session.req_header()) {
                session.set_keepalive(None);
                return respond::problem(session, ctx, refusal).await;
            }
        }
        if session
            .req_header()
            .headers
            .contains_key(http::header::CONNECTION)
        {
            match admit::connection_options(session.req_header_mut()) {
                Ok(false) => {}
                Ok(true) => session.set_keepalive(None),
                Err(refusal) => {
                    session.set_keepalive(None);
                    return respond::problem(session, ctx, refusal).await;
                }
            }
        }
        if let Err(refusal) = admit::check_head(session.req_header(), &ctx.snapshot.limits) {
            return respond::problem(session, ctx, refusal).await;
        }
        let (matched, forward) = match resolve::resolve(&ctx.snapshot, session.req_header()) {
            Ok(resolution) => (resolution.matched, resolution.forward),
            Err(refusal) => return respond::problem(session, ctx, refusal).await,
        };
        let route = matched.as_ref().map(|matched| matched.route);
        if let Some(matched) = matched {
            ctx.enter(matched.route);
            ctx.shared.path_captures = matched.captures;
            match forward {
                resolve::Forward::Unchanged => {}
                resolve::Forward::To(uri) => session.req_header_mut().set_uri(uri),
                resolve::Forward::Invalid => {
                    let refusal = Problem::new(ProblemType::InvalidPath);
                    return respond::problem(session, ctx, refusal).await;
                }
            }
            forwarded::strip_identity(session.req_header_mut(), &ctx.snapshot);
        }
        // An upgrade only where the route accepts WebSocket; refused before anything else.
        let websocket = match websocket::requested(session.req_header()) {
            None => None,
            Some(is_websocket) => {
                let accepted = ctx.route().and_then(|route| route.websocket);
                match accepted {
                    Some(limits) if is_websocket => Some(limits),
                    _ if route.is_none() => None,
                    _ => {
                        session.set_keepalive(None);
                        let refusal = websocket::refusal(is_websocket);
                        return respond::problem(session, ctx, refusal).await;
                    }
                }
            }
        };
        // A request that matched no route still runs the global chain, so e.g. its 404 carries
        // a request id.
        let RequestCtx {
            snapshot,
            shared,
            reached,
            ..
        } = ctx;
        let decision = snapshot
            .chain(route)
            .request(session.req_header_mut(), shared, reached)
            .await;
        observe::decisions(ctx);
        if respond::decision(session, ctx, decision).await? {
            return Ok(true);
        }
        if route.is_none() {
            let kind = if ctx.snapshot.serving {
                ProblemType::RouteNotFound
            } else {
                ProblemType::ConfigNotLoaded
            };
            return respond::problem(session, ctx, Problem::new(kind)).await;
        }
        if let Some(limits) = websocket {
            // Boxed: the tunnel's state is large, and every request's future would carry (and
            // copy) room for it otherwise.
            return Box::pin(websocket::tunnel(self, session, ctx, limits)).await;
        }
        if let Some(refusal) = body::read_ahead(session, ctx).await? {
            return respond::problem(session, ctx, refusal).await;
        }
        mirror::draw(ctx);
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if body::replace(ctx, body, end_of_stream) {
            if ctx.mirror.is_some() {
                mirror::body(ctx, body.as_ref(), end_of_stream, &self.mirror);
            }
            return Ok(());
        }
        if let Some(chunk) = body {
            if let Err(refusal) = admit::count_body(
                &mut ctx.shared.request_body_bytes,
                chunk.len(),
                &ctx.snapshot.limits,
            ) {
                return refuse_body(ctx, refusal);
            }
        }
        let chain = ctx.snapshot.chain(ctx.route);
        if chain.wants(Phases::REQUEST_BODY) {
            if let Err(refusal) = chain.request_body(body, end_of_stream, &mut ctx.shared) {
                return refuse_body(ctx, refusal);
            }
        }
        if ctx.mirror.is_some() {
            mirror::body(ctx, body.as_ref(), end_of_stream, &self.mirror);
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.upstream.proxying = true;
        if ctx.upstream.count > 0 {
            // Pingora replays the body read so far through `request_body_filter`.
            admit::restart_body(ctx);
        }
        retry::before_attempt(ctx).await?;
        let peer = match peer::choose(session.req_header(), ctx, true)? {
            peer::Choice::Peer(peer) => peer,
            peer::Choice::AwaitingName(record) => {
                // Only until the name's first answer: a pool found by DNS right after start
                // or a reload.
                let limit = ctx.snapshot.dns.timeout;
                record.first_answer(limit).await;
                match peer::choose(session.req_header(), ctx, false)? {
                    peer::Choice::Peer(peer) => peer,
                    peer::Choice::AwaitingName(_) => unreachable!("choose does not wait twice"),
                }
            }
        };
        if ctx.trace.is_some() {
            observe::attempt_started(session.req_header(), ctx);
        }
        Ok(peer)
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        error: Box<Error>,
    ) -> Box<Error> {
        retry::connect_failed(session, ctx, error)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        error: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let error = error.more_context(format!("Peer: {peer}"));
        if let Some(trace) = ctx.trace.as_mut() {
            trace.end_attempt(Some(error.etype().as_str()));
        }
        retry::proxy_failed(session, ctx, error, client_reused)
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if timing::wanted(ctx) {
            ctx.upstream.answered = Some(std::time::Instant::now());
        }
        ctx.upstream.status = Some(upstream_response.status.as_u16());
        if let Some(status) = upstream_response.headers.get(grpc::STATUS) {
            ctx.grpc_status = Some(grpc::Code::parse(status.as_bytes()));
        }
        if let Some(trace) = ctx.trace.as_mut() {
            trace.attempt_answered(upstream_response.status.as_u16());
        }
        retry::response_head(session, upstream_response.status.as_u16(), ctx)
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora_http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        forwarded::tell_upstream(upstream_request, ctx);
        if ctx.grpc.is_some() {
            peer::tell_deadline(upstream_request, ctx);
        }
        if let Some(traceparent) = ctx.trace.as_ref().and_then(|trace| trace.traceparent()) {
            upstream_request.insert_header(
                http::header::HeaderName::from_static("traceparent"),
                traceparent,
            )?;
        }
        let chain = ctx.snapshot.chain(ctx.route);
        if chain.wants(Phases::UPSTREAM_REQUEST) {
            chain.upstream_request(upstream_request, &mut ctx.shared);
        }
        body::frame(upstream_request, ctx);
        grpc_upstream_head(upstream_request);
        mirror::head(ctx, upstream_request);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.shared.status = Some(response.status.as_u16());
        let chain = ctx.snapshot.chain(ctx.route);
        if chain.wants(Phases::RESPONSE) {
            chain.response(response, &mut ctx.shared, ctx.reached);
            if let Some(answer) = ctx.shared.answer_instead.take() {
                // Answered in the upstream's place: through the error path, which writes it.
                ctx.shared.status = Some(answer.status);
                ctx.answered_instead = true;
                return Err(respond::defer(ctx, Problem::answer(*answer)));
            }
        }
        if let Some(value) = timing::value(ctx, std::time::Instant::now()) {
            response.insert_header(timing::HEADER, value)?;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        let chain = ctx.snapshot.chain(ctx.route);
        if chain.wants(Phases::RESPONSE_BODY) {
            chain.response_body(body, end_of_stream, &mut ctx.shared);
            if let Some(why) = ctx.shared.abort_response {
                *body = None;
                return Error::e_explain(pingora_core::ErrorType::InternalError, why);
            }
        }
        Ok(None)
    }

    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Bytes>> {
        if let Some(status) = trailers.get(grpc::STATUS) {
            ctx.grpc_status = Some(grpc::Code::parse(status.as_bytes()));
        }
        let chain = ctx.snapshot.chain(ctx.route);
        if chain.wants(Phases::RESPONSE_TRAILERS) {
            return Ok(chain.response_trailers(trailers, &mut ctx.shared));
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        respond::fail(session, error, ctx).await
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        if ctx.mirror.is_some() {
            let body_done = session.as_mut().is_body_done();
            mirror::finish(ctx, session.req_header(), body_done, &self.mirror);
        }
        observe::finish(session, error, ctx, &self.metrics);
    }
}
