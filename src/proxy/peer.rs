//! Upstream choice: the route's pool picks a target with its balancer (by the request's hash
//! key for consistent hashing), and counts it in flight until the attempt ends.

use gatehouse_filters::util::cookie;
use http::HeaderValue;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_http::RequestHeader;

use super::ctx::RequestCtx;
use crate::config::model::HashOn;

/// The peer for the next attempt of this request.
pub fn choose(request: &RequestHeader, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
    let Some(route) = ctx.route() else {
        return Err(Error::explain(ErrorType::InternalError, "no route"));
    };
    let upstream = route.upstream;
    let read_timeout = route.read_timeout;
    release(ctx);
    let pool = &ctx.snapshot.upstreams[upstream];
    let client_ip;
    let key: Option<&[u8]> = match &pool.hash_on {
        None => None,
        Some(HashOn::Header(name)) => request
            .headers
            .get(name.as_str())
            .map(HeaderValue::as_bytes),
        Some(HashOn::Cookie(name)) => cookie(request, name).map(str::as_bytes),
        Some(HashOn::ClientIp(_)) => {
            client_ip = ctx.shared.client_addr.map(|address| address.to_string());
            client_ip.as_deref().map(str::as_bytes)
        }
    };
    let target = pool.select(key);
    pool.start_request(target);
    let peer = pool.peer(target, read_timeout);
    ctx.target = Some((upstream, target));
    Ok(peer)
}

/// Ends the current attempt's count on its target.
pub fn release(ctx: &mut RequestCtx) {
    if let Some((pool, target)) = ctx.target.take() {
        ctx.snapshot.upstreams[pool].finish_request(target);
    }
}
