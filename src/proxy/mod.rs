//! The Pingora `ProxyHttp` implementation: each request pins one Snapshot, is normalised and
//! routed once, runs its route's filter chain in each phase, and is sent to a target chosen by
//! the route's upstream pool.

pub mod deadline;
pub mod forwarded;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use gatehouse_filters::{Decision, Problem, RequestContext, Response};
use http::HeaderValue;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::config::model::{AuthMode, HashOn};
use crate::config::{ConfigStore, Snapshot};
use crate::router::normalize::normalize_path;
use crate::router::{request_host, RequestView};
use crate::telemetry::access_log;

pub struct Gateway {
    pub store: Arc<ConfigStore>,
}

/// Per-request state of the proxy.
pub struct RequestCtx {
    pub snapshot: Arc<Snapshot>,
    pub filter: RequestContext,
    route: Option<usize>,
    /// (pool, target) of the current upstream attempt.
    target: Option<(usize, usize)>,
    /// How many filters of the chain ran their request phase.
    filters_ran: usize,
    body_bytes: u64,
    /// A problem to answer with when the proxy fails on our own decision.
    problem: Option<Problem>,
    peer: Option<IpAddr>,
    trusted_peer: bool,
}

impl RequestCtx {
    fn chain(&self) -> &[Arc<dyn gatehouse_filters::Filter>] {
        match self.route {
            Some(route) => &self.snapshot.routes[route].chain,
            None => &self.snapshot.global_chain,
        }
    }
}

fn problem_error(ctx: &mut RequestCtx, problem: Problem) -> Box<Error> {
    let status = problem.status;
    ctx.problem = Some(problem);
    Error::explain(ErrorType::HTTPStatus(status), "answered by gateway")
}

/// Write a complete response of our own, running the response phase of filters that ran.
async fn respond(session: &mut Session, ctx: &mut RequestCtx, response: Response) -> Result<()> {
    let mut header = ResponseHeader::build(response.status, Some(response.headers.len() + 2))?;
    for (name, value) in response.headers {
        header.append_header(name, value)?;
    }
    header.insert_header(http::header::CONTENT_LENGTH, response.body.len())?;
    ctx.filter.status = Some(response.status);
    let snapshot = ctx.snapshot.clone();
    let chain = match ctx.route {
        Some(route) => &snapshot.routes[route].chain,
        None => &snapshot.global_chain,
    };
    for filter in chain[..ctx.filters_ran].iter().rev() {
        filter.response(&mut header, &mut ctx.filter);
    }
    let end = response.body.is_empty();
    session.write_response_header(Box::new(header), end).await?;
    if !end {
        session
            .write_response_body(Some(response.body), true)
            .await?;
    }
    Ok(())
}

async fn respond_problem(
    session: &mut Session,
    ctx: &mut RequestCtx,
    problem: Problem,
) -> Result<bool> {
    let response = problem.into_response(ctx.filter.request_id());
    respond(session, ctx, response).await?;
    Ok(true)
}

/// A route's `auth` setting, once every auth filter has had its say.
fn enforce_auth(
    route: &crate::config::snapshot::Route,
    snapshot: &Snapshot,
    filter_ctx: &mut RequestContext,
) -> Option<Problem> {
    if filter_ctx.consumer.is_some() {
        return None;
    }
    match route.auth {
        Some(AuthMode::Required) => {
            filter_ctx
                .auth_failure
                .get_or_insert(("route", "missing_credentials"));
            Some(Problem::credentials_required())
        }
        Some(AuthMode::Optional) => {
            filter_ctx.consumer.clone_from(&snapshot.anonymous);
            None
        }
        None => None,
    }
}

fn header_bytes(request: &pingora_http::RequestHeader) -> usize {
    request
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules: Pingora's default adds a (disabled) compression module that every
    /// request would still pass through.
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            snapshot: self.store.load(),
            filter: RequestContext::new(Instant::now()),
            route: None,
            target: None,
            filters_ran: 0,
            body_bytes: 0,
            problem: None,
            peer: None,
            trusted_peer: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        deadline::head_received();
        let snapshot = ctx.snapshot.clone();
        let limits = &snapshot.limits;

        // Limits first: nothing else looks at an oversized request.
        let request = session.req_header();
        let uri_length = request
            .uri
            .path_and_query()
            .map(|target| target.as_str().len())
            .unwrap_or(0);
        if uri_length > limits.max_uri_bytes {
            return respond_problem(
                session,
                ctx,
                Problem::new(414, "uri-too-long", "The request target is too long"),
            )
            .await;
        }
        if request.headers.len() > limits.max_headers
            || header_bytes(request) > limits.max_header_bytes
        {
            return respond_problem(
                session,
                ctx,
                Problem::new(
                    431,
                    "header-fields-too-large",
                    "The request header fields are too large",
                ),
            )
            .await;
        }
        let declared_length = request
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok());
        if declared_length.is_some_and(|length| length > limits.max_body_bytes) {
            return respond_problem(
                session,
                ctx,
                Problem::new(413, "content-too-large", "The request body is too large"),
            )
            .await;
        }

        // The client: the TCP peer, or what a trusted proxy says.
        if let Some(peer) = session
            .client_addr()
            .and_then(|address| address.as_inet())
            .map(|address| address.ip())
        {
            ctx.peer = Some(peer);
            ctx.trusted_peer = snapshot.is_trusted_proxy(peer);
            ctx.filter.client_addr = Some(if ctx.trusted_peer {
                forwarded::client_address(&snapshot, peer, session.req_header())
            } else {
                peer
            });
        }
        ctx.filter.client_tls = session
            .digest()
            .is_some_and(|digest| digest.ssl_digest.is_some());

        // Normalise once, route, and work out the forwarded target; every later decision uses
        // the path that is forwarded.
        let routed = {
            let request = session.req_header();
            let raw_path = request.uri.path();
            match normalize_path(raw_path) {
                Err(error) => Err(error),
                Ok(normalized) => {
                    let path = normalized.as_deref().unwrap_or(raw_path);
                    let query = request.uri.query();
                    let host = request_host(&request.uri, &request.headers);
                    let found = snapshot.router.find(&RequestView {
                        method: &request.method,
                        host: host.as_deref(),
                        path,
                        query,
                        headers: &request.headers,
                    });
                    let forwarded_path = match &found {
                        Some(found) => match &snapshot.routes[found.route].rewrite {
                            Some(rewrite) => Some(rewrite.apply(path, &found.captures)),
                            None => normalized,
                        },
                        None => None,
                    };
                    let target = forwarded_path.map(|new_path| match query {
                        Some(query) if new_path.contains('?') => format!("{new_path}&{query}"),
                        Some(query) => format!("{new_path}?{query}"),
                        None => new_path,
                    });
                    Ok((found.map(|found| found.route), target))
                }
            }
        };
        let (route_index, target) = match routed {
            Ok(routed) => routed,
            Err(error) => {
                return respond_problem(
                    session,
                    ctx,
                    Problem::new(400, "invalid-path", "The request path is not acceptable")
                        .detail(error.to_string()),
                )
                .await;
            }
        };
        let Some(route_index) = route_index else {
            // The global chain still runs, so e.g. request ids apply to the 404.
            for filter in snapshot.global_chain.iter() {
                ctx.filters_ran += 1;
                match filter
                    .request(session.req_header_mut(), &mut ctx.filter)
                    .await
                {
                    Decision::Continue => {}
                    Decision::Respond(response) => {
                        respond(session, ctx, response).await?;
                        return Ok(true);
                    }
                    Decision::Reject(problem) => {
                        return respond_problem(session, ctx, problem).await
                    }
                }
            }
            if !snapshot.serving {
                return respond_problem(
                    session,
                    ctx,
                    Problem::new(
                        503,
                        "config-not-loaded",
                        "This node has not loaded its routes yet",
                    ),
                )
                .await;
            }
            return respond_problem(
                session,
                ctx,
                Problem::new(404, "route-not-found", "No route matches this request"),
            )
            .await;
        };
        let route = &snapshot.routes[route_index];
        ctx.route = Some(route_index);
        ctx.filter.route = Some(route.name.clone());
        ctx.filter.upstream = Some(snapshot.upstreams[route.upstream].name.clone());
        if let Some(target) = target {
            match http::uri::PathAndQuery::from_maybe_shared(bytes::Bytes::from(target)) {
                Ok(path_and_query) => {
                    let mut parts = http::uri::Parts::default();
                    parts.path_and_query = Some(path_and_query);
                    match http::Uri::from_parts(parts) {
                        Ok(uri) => session.req_header_mut().set_uri(uri),
                        Err(_) => {
                            return respond_problem(
                                session,
                                ctx,
                                Problem::new(
                                    400,
                                    "invalid-path",
                                    "The request path is not acceptable",
                                ),
                            )
                            .await;
                        }
                    }
                }
                Err(_) => {
                    return respond_problem(
                        session,
                        ctx,
                        Problem::new(400, "invalid-path", "The request path is not acceptable"),
                    )
                    .await;
                }
            }
        }

        // Identity headers are ours to set: a client-sent copy never reaches a filter or upstream.
        for name in snapshot.identity_headers.names() {
            if session.req_header().headers.contains_key(name) {
                session.req_header_mut().remove_header(name);
            }
        }

        for (index, filter) in route.chain.iter().enumerate() {
            if index == route.auth_gate {
                if let Some(problem) = enforce_auth(route, &snapshot, &mut ctx.filter) {
                    return respond_problem(session, ctx, problem).await;
                }
            }
            ctx.filters_ran += 1;
            match filter
                .request(session.req_header_mut(), &mut ctx.filter)
                .await
            {
                Decision::Continue => {}
                Decision::Respond(response) => {
                    respond(session, ctx, response).await?;
                    return Ok(true);
                }
                Decision::Reject(problem) => return respond_problem(session, ctx, problem).await,
            }
        }
        if route.auth_gate >= route.chain.len() {
            if let Some(problem) = enforce_auth(route, &snapshot, &mut ctx.filter) {
                return respond_problem(session, ctx, problem).await;
            }
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.body_bytes += chunk.len() as u64;
            if ctx.body_bytes > ctx.snapshot.limits.max_body_bytes {
                return Err(problem_error(
                    ctx,
                    Problem::new(413, "content-too-large", "The request body is too large"),
                ));
            }
        }
        if let Some(route) = ctx.route {
            let RequestCtx {
                snapshot,
                filter: filter_ctx,
                problem: pending,
                ..
            } = ctx;
            for filter in snapshot.routes[route].chain.iter() {
                if let Err(problem) = filter.request_body(body, end_of_stream, filter_ctx) {
                    let status = problem.status;
                    *pending = Some(problem);
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(status),
                        "answered by gateway",
                    ));
                }
            }
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(route_index) = ctx.route else {
            return Err(Error::explain(ErrorType::InternalError, "no route"));
        };
        let route = &ctx.snapshot.routes[route_index];
        let pool = &ctx.snapshot.upstreams[route.upstream];
        if let Some((previous_pool, previous_target)) = ctx.target.take() {
            ctx.snapshot.upstreams[previous_pool].finish_request(previous_target);
        }
        let request = session.req_header();
        let client_ip;
        let key: Option<&[u8]> = match &pool.hash_on {
            None => None,
            Some(HashOn::Header(name)) => request
                .headers
                .get(name.as_str())
                .map(HeaderValue::as_bytes),
            Some(HashOn::Cookie(name)) => {
                gatehouse_filters::util::cookie(request, name).map(str::as_bytes)
            }
            Some(HashOn::ClientIp(_)) => {
                client_ip = ctx.filter.client_addr.map(|address| address.to_string());
                client_ip.as_deref().map(str::as_bytes)
            }
        };
        let target = pool.select(key);
        pool.start_request(target);
        ctx.target = Some((route.upstream, target));
        Ok(pool.peer(target, route.read_timeout))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora_http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let (Some(peer), Some(client)) = (ctx.peer, ctx.filter.client_addr) {
            forwarded::apply(
                upstream_request,
                peer,
                ctx.trusted_peer,
                client,
                ctx.filter.client_tls,
            );
        }
        if let Some(consumer) = &ctx.filter.consumer {
            let headers = &ctx.snapshot.identity_headers;
            if let Some(name) = &headers.consumer_id {
                if let Ok(value) = HeaderValue::from_str(&consumer.id) {
                    upstream_request.insert_header(name.clone(), value).ok();
                }
            }
            if let (Some(name), Some(username)) = (&headers.consumer_username, &consumer.username) {
                if let Ok(value) = HeaderValue::from_str(username) {
                    upstream_request.insert_header(name.clone(), value).ok();
                }
            }
            if let (Some(name), Some(subject)) = (&headers.subject, &ctx.filter.subject) {
                if let Ok(value) = HeaderValue::from_str(subject) {
                    upstream_request.insert_header(name.clone(), value).ok();
                }
            }
        }
        if let Some(route) = ctx.route {
            let RequestCtx {
                snapshot,
                filter: filter_ctx,
                ..
            } = ctx;
            for filter in snapshot.routes[route].chain.iter() {
                filter.upstream_request(upstream_request, filter_ctx);
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.filter.status = Some(response.status.as_u16());
        if let Some(route) = ctx.route {
            let RequestCtx {
                snapshot,
                filter: filter_ctx,
                ..
            } = ctx;
            for filter in snapshot.routes[route].chain.iter().rev() {
                filter.response(response, filter_ctx);
            }
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
        if let Some(route) = ctx.route {
            let RequestCtx {
                snapshot,
                filter: filter_ctx,
                ..
            } = ctx;
            for filter in snapshot.routes[route].chain.iter().rev() {
                filter.response_body(body, end_of_stream, filter_ctx);
            }
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        error: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let problem = ctx.problem.take().unwrap_or_else(|| match error.etype() {
            ErrorType::HTTPStatus(status) => Problem::new(*status, "error", "The request failed"),
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if error.esource() == &ErrorSource::Upstream =>
            {
                Problem::new(
                    504,
                    "upstream-timeout",
                    "The upstream did not answer in time",
                )
            }
            _ => match error.esource() {
                ErrorSource::Upstream => Problem::new(
                    502,
                    "upstream-unavailable",
                    "The upstream could not be reached or failed",
                ),
                ErrorSource::Downstream => {
                    Problem::new(400, "bad-request", "The request could not be read")
                }
                ErrorSource::Internal | ErrorSource::Unset => Problem::new(
                    500,
                    "internal-error",
                    "The gateway failed to handle the request",
                ),
            },
        });
        let client_gone = matches!(
            error.etype(),
            ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
        ) && error.esource() == &ErrorSource::Downstream;
        let status = problem.status;
        if !client_gone && session.response_written().is_none() {
            let response = problem.into_response(ctx.filter.request_id());
            if let Err(write_error) = respond(session, ctx, response).await {
                tracing::debug!(error = %write_error, "could not write the error response");
            }
        }
        FailToProxy {
            error_code: if client_gone { 0 } else { status },
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let now = Instant::now();
        deadline::request_done(now);
        if let Some((pool, target)) = ctx.target.take() {
            ctx.snapshot.upstreams[pool].finish_request(target);
        }
        let status = session
            .response_written()
            .map(|response| response.status.as_u16())
            .or(ctx.filter.status)
            .unwrap_or(if error.is_some() { 502 } else { 0 });
        ctx.filter.status = Some(status);
        let elapsed = now.saturating_duration_since(ctx.filter.started);
        let metrics = match ctx.route {
            Some(route) => &ctx.snapshot.routes[route].metrics,
            None => &ctx.snapshot.unmatched_metrics,
        };
        metrics.observe(status, elapsed.as_secs_f64());
        if let Some((method, reason)) = ctx.filter.auth_failure {
            crate::telemetry::metrics::record_auth_failure(method, reason);
        }
        for filter in ctx.chain().iter() {
            filter.log(&ctx.filter);
        }
        if access_log::wanted() {
            let request = session.req_header();
            let line = serde_json::json!({
                "ts": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                "request_id": ctx.filter.request_id(),
                "client": ctx.filter.client_addr.map(|address| address.to_string()),
                "method": request.method.as_str(),
                "host": request.headers.get(http::header::HOST).and_then(|host| host.to_str().ok()),
                "path": request.uri.path(),
                "status": status,
                "route": ctx.filter.route.as_deref(),
                "upstream": ctx.filter.upstream.as_deref(),
                "duration_ms": (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
                "bytes_in": ctx.body_bytes,
                "error": error.map(|error| error.etype().as_str()),
            });
            access_log::write(line.to_string());
        }
    }
}
