//! Copies of a route's requests sent to its `mirror` pool, fire and forget. The client's
//! answer never waits for a copy or sees its outcome:
//!
//! - a request is drawn for a copy by the mirror's share, and takes one of the route's copy
//!   slots; with none free the copy is dropped, so a slow mirror cannot pile up work;
//! - the copy is the request as the primary upstream is sent it (after the filters and the
//!   forwarding headers), with its whole body, which is held while it arrives (up to
//!   `MIRROR_BODY_MAX`; a larger body drops the copy);
//! - it leaves once the body is complete, on its own task, bounded by the mirror pool's
//!   timeouts; its answer is read and discarded.
//!
//! `gatehouse_mirror_requests_total{route,result}` counts copies sent (answered, whatever the
//! status), failed and dropped.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use tokio::sync::OwnedSemaphorePermit;

use super::ctx::RequestCtx;
use crate::upstream::clock;

/// The largest request body a copy carries.
pub const MIRROR_BODY_MAX: usize = 1024 * 1024;

/// How long a mirror's connection may stay idle in the pool for the next copy.
const IDLE_KEEPALIVE: Duration = Duration::from_secs(60);

/// A copy being gathered.
pub struct Copy {
    head: Option<Box<RequestHeader>>,
    body: Vec<Bytes>,
    body_len: usize,
    complete: bool,
    permit: OwnedSemaphorePermit,
}

/// Whether this request is copied: decided once the route is known.
pub fn draw(ctx: &mut RequestCtx) {
    let Some(route) = ctx.route() else {
        return;
    };
    let Some(mirror) = &route.mirror else {
        return;
    };
    if fastrand::f64() >= mirror.share {
        return;
    }
    match mirror.slots.clone().try_acquire_owned() {
        Ok(permit) => {
            ctx.mirror = Some(Box::new(Copy {
                head: None,
                body: Vec::new(),
                body_len: 0,
                complete: false,
                permit,
            }))
        }
        Err(_) => dropped(ctx),
    }
}

/// The request head as the primary upstream gets it, taken from the first attempt sent.
pub fn head(ctx: &mut RequestCtx, upstream_request: &RequestHeader) {
    if let Some(copy) = ctx.mirror.as_mut() {
        if copy.head.is_none() {
            copy.head = Some(Box::new(upstream_request.clone()));
        }
    }
}

/// A new attempt replays the body from its start.
pub fn restart_body(ctx: &mut RequestCtx) {
    if let Some(copy) = ctx.mirror.as_mut() {
        copy.body.clear();
        copy.body_len = 0;
        copy.complete = false;
    }
}

/// A piece of the request body; the copy leaves with the last one.
pub fn body(
    ctx: &mut RequestCtx,
    chunk: Option<&Bytes>,
    end_of_stream: bool,
    connector: &Arc<Connector>,
) {
    let Some(copy) = ctx.mirror.as_mut() else {
        return;
    };
    if let Some(chunk) = chunk.filter(|chunk| !chunk.is_empty()) {
        copy.body_len += chunk.len();
        if copy.body_len > MIRROR_BODY_MAX {
            ctx.mirror = None;
            dropped(ctx);
            return;
        }
        copy.body.push(chunk.clone());
    }
    if end_of_stream {
        copy.complete = true;
        send(ctx, connector);
    }
}

/// At the end of the request: a copy whose body is complete (or never had one) that has not
/// left yet leaves now, e.g. when no attempt reached the primary upstream.
pub fn finish(
    ctx: &mut RequestCtx,
    request: &RequestHeader,
    body_done: bool,
    connector: &Arc<Connector>,
) {
    let Some(copy) = ctx.mirror.as_mut() else {
        return;
    };
    let bodiless = body_done && copy.body_len == 0 && ctx.shared.request_body_bytes == 0;
    if !copy.complete && !bodiless {
        ctx.mirror = None;
        dropped(ctx);
        return;
    }
    copy.complete = true;
    if copy.head.is_none() {
        let mut head = request.clone();
        if head.headers.get(http::header::HOST).is_none() {
            if let Some(authority) = head.uri.authority().map(|authority| authority.to_string()) {
                head.insert_header(http::header::HOST, authority).ok();
            }
        }
        head.set_version(http::Version::HTTP_11);
        super::forwarded::tell_upstream(&mut head, ctx);
        if let Some(copy) = ctx.mirror.as_mut() {
            copy.head = Some(Box::new(head));
        }
    }
    send(ctx, connector);
}

fn dropped(ctx: &RequestCtx) {
    if let Some(metrics) = ctx.route().and_then(|route| route.metrics.mirror.as_ref()) {
        metrics.dropped.inc();
    }
}

/// Sends the copy if it has its head and its whole body.
fn send(ctx: &mut RequestCtx, connector: &Arc<Connector>) {
    let ready = ctx
        .mirror
        .as_ref()
        .is_some_and(|copy| copy.complete && copy.head.is_some());
    if !ready {
        return;
    }
    let (Some(copy), Some(route)) = (ctx.mirror.take(), ctx.route) else {
        return;
    };
    let Copy {
        head: Some(head),
        body,
        permit,
        ..
    } = *copy
    else {
        return;
    };
    let snapshot = ctx.snapshot.clone();
    let connector = connector.clone();
    tokio::spawn(async move {
        let Some(mirror) = snapshot.routes[route].mirror.as_ref() else {
            return;
        };
        let pool = &snapshot.upstreams[mirror.pool];
        let outcome = match pool.select(None, &[], false, clock::now()) {
            Some(pick) => {
                let peer = pick.peer;
                let limit = pool.connect_timeout + pool.read_timeout;
                tokio::time::timeout(limit, exchange(&connector, &peer, head, body))
                    .await
                    .unwrap_or(Err(()))
            }
            None => Err(()),
        };
        if let Some(metrics) = snapshot.routes[route].metrics.mirror.as_ref() {
            match outcome {
                Ok(()) => metrics.sent.inc(),
                Err(()) => metrics.failed.inc(),
            }
        }
        drop(permit);
    });
}

/// One copy's exchange: the request out, the answer read to its end and discarded.
async fn exchange(
    connector: &Connector,
    peer: &HttpPeer,
    head: Box<RequestHeader>,
    body: Vec<Bytes>,
) -> Result<(), ()> {
    let (mut session, _reused) = connector.get_http_session(peer).await.map_err(|_| ())?;
    session.write_request_header(head).await.map_err(|_| ())?;
    let last = body.len();
    for (index, chunk) in body.into_iter().enumerate() {
        session
            .write_request_body(chunk, index + 1 == last)
            .await
            .map_err(|_| ())?;
    }
    session.finish_request_body().await.map_err(|_| ())?;
    session.read_response_header().await.map_err(|_| ())?;
    while session
        .read_response_body()
        .await
        .map_err(|_| ())?
        .is_some()
    {}
    if session.response_done() {
        connector
            .release_http_session(session, peer, Some(IDLE_KEEPALIVE))
            .await;
    }
    Ok(())
}
