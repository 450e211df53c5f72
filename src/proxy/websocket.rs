//! WebSocket connections, on routes that accept them (`websocket: true`).
//!
//! An `Upgrade` request elsewhere, or to another protocol, is refused with 400 before any
//! upstream sees it. On a WebSocket route the request runs the route's filters as any request
//! does; then the gateway makes the upstream exchange itself: it sends the upgrade request,
//! relays the upstream's answer, and after a `101` carries the bytes both ways. Nothing the
//! client sends after its request head reaches the upstream before the upstream's `101`.
//!
//! Carrying the bytes itself, the gateway knows where each direction's frames begin, so it can
//! close a connection the way RFC 6455 asks (a close frame, 1001 "going away", to each side)
//! when it has been idle for `idle_timeout` (neither side sent anything), when it reaches
//! `max_lifetime`, and when the process drains (SIGTERM, or SIGQUIT's upgrade): shortly before
//! the `grace_period` ends, so no connection is cut without a word.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use gatehouse_filters::{Phases, Problem, ProblemType};
use once_cell::sync::Lazy;
use pingora_core::protocols::http::client::HttpSession as ClientSession;
use pingora_core::protocols::http::v1::client::HttpSession as H1Client;
use pingora_core::protocols::ALPN;
use pingora_core::{Error, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;
use tokio::sync::watch;

use super::{forwarded, peer, respond, Gateway, RequestCtx};
use crate::config::snapshot::WebSocket;

/// Whether the request asks for a protocol upgrade, and whether to WebSocket: any HTTP/1.1
/// request with an `Upgrade` header, with or without `Connection: upgrade` (Pingora would
/// complete a WebSocket handshake towards the upstream without it). `Upgrade: h2c` is not an
/// upgrade here: it is never honoured, and the header never reaches an upstream.
pub fn requested(request: &RequestHeader) -> Option<bool> {
    if request.version != http::Version::HTTP_11 {
        return None;
    }
    let mut values = request
        .headers
        .get_all(http::header::UPGRADE)
        .iter()
        .peekable();
    values.peek()?;
    let mut websocket = false;
    let mut other = false;
    for token in values.flat_map(|value| value.as_bytes().split(|&byte| byte == b',')) {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"websocket") {
            websocket = true;
        } else if !token.eq_ignore_ascii_case(b"h2c") && !token.is_empty() {
            other = true;
        }
    }
    match (websocket, other) {
        (false, false) => None,
        (true, false) => Some(true),
        _ => Some(false),
    }
}

/// The refusal of an upgrade the route does not accept.
pub fn refusal(websocket: bool) -> Problem {
    let detail = if websocket {
        "This route does not accept WebSocket connections"
    } else {
        "Only WebSocket upgrades are accepted, on routes that allow them"
    };
    Problem::new(ProblemType::UpgradeNotAllowed).detail(detail)
}

/// When open connections are closed because the process drains; `None` while it serves.
static DRAIN: Lazy<watch::Sender<Option<Instant>>> = Lazy::new(|| watch::Sender::new(None));

/// Open WebSocket connections, for `/metrics`.
pub static OPEN: AtomicI64 = AtomicI64::new(0);

/// How long a closing handshake may take once the gateway sent its close frames.
const CLOSING: Duration = Duration::from_secs(1);

/// How long before the end of the grace period connections are closed: the closing handshake,
/// and a margin, before the process stops.
const CLOSE_AHEAD: Duration = Duration::from_millis(1500);

/// The GUID of RFC 6455's `Sec-WebSocket-Accept`.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The process started to drain; its grace period is `grace`.
pub fn begin_drain(grace: Duration) {
    let at = Instant::now() + grace.saturating_sub(CLOSE_AHEAD);
    DRAIN.send_replace(Some(at));
}

/// A background service that tells open connections when the process starts to drain.
pub struct DrainWatch {
    pub grace_period: Duration,
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for DrainWatch {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        begin_drain(self.grace_period);
    }
}

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Client,
    Upstream,
    Idle,
    Lifetime,
    Drain,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Client => "client_closed",
            End::Upstream => "upstream_closed",
            End::Idle => "idle_timeout",
            End::Lifetime => "max_lifetime",
            End::Drain => "shutdown",
        }
    }

    /// The close frame's reason, when the gateway closes.
    fn reason(self) -> Option<&'static str> {
        match self {
            End::Idle => Some("idle timeout"),
            End::Lifetime => Some("connection lifetime reached"),
            End::Drain => Some("server shutting down"),
            End::Client | End::Upstream => None,
        }
    }
}

/// Where one direction's byte stream is in its frames: the gateway only ever adds a frame of
/// its own between two.
#[derive(Debug, Default)]
struct Frames {
    /// The current frame's header bytes, while it is incomplete.
    head: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// Whether a close frame went this way.
    closed: bool,
}

impl Frames {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(bytes.len() as u64);
                self.remaining -= take;
                bytes = &bytes[take as usize..];
                continue;
            }
            self.head.push(bytes[0]);
            bytes = &bytes[1..];
            if let Some((length, size)) = header_length(&self.head) {
                debug_assert_eq!(size, self.head.len());
                self.closed |= self.head[0] & 0x0f == 0x08;
                self.head.clear();
                self.remaining = length;
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.head.is_empty() && self.remaining == 0
    }
}

/// A complete frame header's payload length and size; `None` while more bytes are needed.
fn header_length(head: &[u8]) -> Option<(u64, usize)> {
    if head.len() < 2 {
        return None;
    }
    let masked = head[1] & 0x80 != 0;
    let mask = if masked { 4 } else { 0 };
    let (length, size) = match head[1] & 0x7f {
        126 => {
            if head.len() < 4 {
                return None;
            }
            (u64::from(u16::from_be_bytes([head[2], head[3]])), 4)
        }
        127 => {
            if head.len() < 10 {
                return None;
            }
            let mut bytes = [0; 8];
            bytes.copy_from_slice(&head[2..10]);
            (u64::from_be_bytes(bytes), 10)
        }
        short => (u64::from(short), 2),
    };
    (head.len() == size + mask).then_some((length, size + mask))
}

/// A close frame with code 1001 (going away) and `reason`; masked (as a client's must be)
/// when `mask` is given.
fn close_frame(reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut payload = 1001u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    let mut frame = vec![0x88, payload.len() as u8];
    if let Some(mask) = mask {
        frame[1] |= 0x80;
        frame.extend_from_slice(&mask);
        for (index, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[index % 4];
        }
    }
    frame.extend_from_slice(&payload);
    frame
}

/// Counts a connection open while it lives.
struct Open;

impl Open {
    fn new() -> Open {
        OPEN.fetch_add(1, Ordering::Relaxed);
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Makes the upstream exchange of a WebSocket request and carries the connection to its end.
/// `Ok(true)`: the request is answered.
pub async fn tunnel(
    gateway: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    limits: WebSocket,
) -> Result<bool> {
    let mut peer = match peer::choose(session.req_header(), ctx, true)? {
        peer::Choice::Peer(peer) => peer,
        peer::Choice::AwaitingName(record) => {
            record.first_answer(ctx.snapshot.dns.timeout).await;
            match peer::choose(session.req_header(), ctx, false)? {
                peer::Choice::Peer(peer) => peer,
                peer::Choice::AwaitingName(_) => unreachable!("choose does not wait twice"),
            }
        }
    };
    // WebSocket is HTTP/1.1's (RFC 6455); an HTTP/2 pool is spoken to in HTTP/1.1 here.
    peer.options.alpn = ALPN::H1;
    // An upgrade request's connection ends with its answer, whatever it is.
    session.set_keepalive(None);
    ctx.upstream.proxying = true;
    let mut head = session.req_header().clone();
    // A handshake has no body and asks for WebSocket only; nothing else of the client's
    // framing goes on.
    for name in [
        http::header::CONTENT_LENGTH,
        http::header::TRANSFER_ENCODING,
        http::header::TE,
        http::header::EXPECT,
        http::HeaderName::from_static("keep-alive"),
    ] {
        head.remove_header(&name);
    }
    head.insert_header(http::header::CONNECTION, "Upgrade")?;
    head.insert_header(http::header::UPGRADE, "websocket")?;
    forwarded::tell_upstream(&mut head, ctx);
    let chain = ctx.snapshot.chain(ctx.route);
    if chain.wants(Phases::UPSTREAM_REQUEST) {
        chain.upstream_request(&mut head, &mut ctx.shared);
    }
    let key = head
        .headers
        .get("sec-websocket-key")
        .map(|key| key.as_bytes().to_vec());
    let read_timeout = peer.options.read_timeout;
    let upstream = match gateway.mirror.get_http_session(&*peer).await {
        Ok((ClientSession::H1(upstream), _)) => Some(upstream),
        _ => None,
    };
    let Some(mut upstream) = upstream else {
        peer::record(ctx, true, false);
        let problem = Problem::new(ProblemType::UpstreamUnavailable);
        return respond::problem(session, ctx, problem).await;
    };
    upstream.read_timeout = read_timeout;
    upstream.write_timeout = read_timeout;
    let answered = async {
        upstream.write_request_header(Box::new(head)).await?;
        // Informational answers (a 100, a 103) before the final one are passed over.
        loop {
            upstream.read_response().await?;
            match upstream.get_status() {
                Some(status) if status.is_informational() && status.as_u16() != 101 => continue,
                _ => return Ok::<_, Box<Error>>(()),
            }
        }
    };
    let answered = match read_timeout {
        Some(limit) => tokio::time::timeout(limit, answered).await.ok(),
        None => Some(answered.await),
    };
    let response = match answered.map(|answered| answered.map(|()| upstream.resp_header())) {
        Some(Ok(Some(response))) => response.clone(),
        failed => {
            peer::record(ctx, true, false);
            let kind = if failed.is_none() {
                ProblemType::UpstreamTimeout
            } else {
                ProblemType::UpstreamUnavailable
            };
            return respond::problem(session, ctx, Problem::new(kind)).await;
        }
    };
    let status = response.status.as_u16();
    ctx.upstream.status = Some(status);
    if status == 101 && !accepts(&response, key.as_deref()) {
        // A 101 that is not a WebSocket handshake's answer would hand the client a raw pipe.
        peer::record(ctx, true, true);
        let problem = Problem::new(ProblemType::UpstreamUnavailable)
            .detail("The upstream's 101 is not a WebSocket handshake's answer");
        return respond::problem(session, ctx, problem).await;
    }
    peer::record(ctx, status >= 500, true);
    if status != 101 {
        relay(session, ctx, &mut upstream, response).await?;
        return Ok(true);
    }
    // The attempt is over; the connection must not hold a breaker permit (or count as a
    // request in flight) for its whole life.
    peer::release(ctx);
    upstream.maybe_upgrade_body_writer();
    let mut response = response;
    ctx.shared.status = Some(101);
    let chain = ctx.snapshot.chain(ctx.route);
    if chain.wants(Phases::RESPONSE) {
        chain.response(&mut response, &mut ctx.shared, ctx.reached);
    }
    session
        .write_response_header(Box::new(response), false)
        .await?;
    // The connection's own timers bound it from here, not the per-read timeouts.
    session.as_downstream_mut().set_read_timeout(None);
    upstream.read_timeout = None;
    upstream.write_timeout = None;
    let _open = Open::new();
    let route = ctx.shared.route.clone().unwrap_or_default();
    gateway.metrics.websocket_opened(&route);
    let end = carry(session, &mut upstream, limits).await;
    gateway.metrics.websocket_closed(&route, end.as_str());
    Ok(true)
}

/// Whether a 101 answers this handshake: `Upgrade: websocket`, and the `Sec-WebSocket-Accept`
/// of the request's key (RFC 6455, section 4.2.2).
fn accepts(response: &ResponseHeader, key: Option<&[u8]>) -> bool {
    use base64::Engine;
    use sha1::Digest;
    let upgrade = response
        .headers
        .get(http::header::UPGRADE)
        .is_some_and(|value| {
            value
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"websocket")
        });
    let Some(key) = key else {
        return false;
    };
    let mut digest = sha1::Sha1::new();
    digest.update(key);
    digest.update(ACCEPT_GUID);
    let expected = base64::engine::general_purpose::STANDARD.encode(digest.finalize());
    upgrade
        && response
            .headers
            .get("sec-websocket-accept")
            .is_some_and(|value| value.as_bytes() == expected.as_bytes())
}

/// An answer other than `101`: the client gets it as any answer, head and body.
async fn relay(
    session: &mut Session,
    ctx: &mut RequestCtx,
    upstream: &mut H1Client,
    mut response: ResponseHeader,
) -> Result<()> {
    ctx.shared.status = Some(response.status.as_u16());
    let chain = ctx.snapshot.chain(ctx.route);
    if chain.wants(Phases::RESPONSE) {
        chain.response(&mut response, &mut ctx.shared, ctx.reached);
    }
    // The client's connection does not carry on after a refused upgrade.
    session.set_keepalive(None);
    session
        .write_response_header(Box::new(response), false)
        .await?;
    while let Some(piece) = upstream.read_body_bytes().await? {
        session.write_response_body(Some(piece), false).await?;
    }
    session.write_response_body(None, true).await?;
    session.finish_body().await?;
    Ok(())
}

/// Carries the bytes both ways until a side closes, the connection idles or outlives its
/// limit, or the process drains. A write waits at most until the next of those deadlines: a
/// peer that stops reading cannot hold the connection open past them.
async fn carry(session: &mut Session, upstream: &mut H1Client, limits: WebSocket) -> End {
    let started = Instant::now();
    let far = started + Duration::from_secs(10 * 365 * 24 * 3600);
    let lifetime_ends = started.checked_add(limits.max_lifetime).unwrap_or(far);
    let mut drain = DRAIN.subscribe();
    let mut last = started;
    let mut to_client = Frames::default();
    let mut to_upstream = Frames::default();
    let mut initiator = None;
    let end = loop {
        if initiator.is_none() {
            if to_upstream.closed {
                initiator = Some(End::Client);
            } else if to_client.closed {
                initiator = Some(End::Upstream);
            }
        }
        let drain_at = *drain.borrow_and_update();
        let (close_at, why) = match drain_at {
            Some(at) if at < lifetime_ends => (at, End::Drain),
            _ => (lifetime_ends, End::Lifetime),
        };
        let idle_at = last.checked_add(limits.idle_timeout).unwrap_or(far);
        let (next, next_why) = if idle_at <= close_at {
            (idle_at, End::Idle)
        } else {
            (close_at, why)
        };
        let next = tokio::time::Instant::from_std(next);
        let downstream = session.as_downstream_mut();
        tokio::select! {
            piece = downstream.read_request_body() => match piece {
                Ok(Some(bytes)) => {
                    to_upstream.feed(&bytes);
                    match tokio::time::timeout_at(next, upstream.write_body(&bytes)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => break End::Upstream,
                        Err(_) => break next_why,
                    }
                    last = Instant::now();
                }
                _ => break End::Client,
            },
            piece = upstream.read_body_bytes() => match piece {
                Ok(Some(bytes)) => {
                    to_client.feed(&bytes);
                    let write = session.write_response_body(Some(bytes), false);
                    match tokio::time::timeout_at(next, write).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break End::Client,
                        Err(_) => break next_why,
                    }
                    last = Instant::now();
                }
                _ => break End::Upstream,
            },
            _ = tokio::time::sleep_until(next) => break next_why,
            _ = drain.changed() => {}
        }
    };
    if let Some(reason) = end.reason() {
        close(session, upstream, reason, &mut to_client, &mut to_upstream).await;
    }
    // The side whose close frame came first closed the connection, whichever side then
    // closed its socket first (RFC 6455 has the server close it).
    match (end, initiator) {
        (End::Client | End::Upstream, Some(initiator)) => initiator,
        _ => end,
    }
}

/// Sends each side a close frame (where its stream is between frames and it has not had one)
/// and waits, at most [`CLOSING`], for each to answer with its own close frame (or to close):
/// what they send meanwhile goes nowhere, since each has had the gateway's close already. The
/// connections then close, as RFC 6455 has the server do.
async fn close(
    session: &mut Session,
    upstream: &mut H1Client,
    reason: &str,
    to_client: &mut Frames,
    to_upstream: &mut Frames,
) {
    let deadline = tokio::time::Instant::now() + CLOSING;
    // Whether each side can be waited for: it was sent a close frame, and has not sent one.
    let mut client_open = false;
    let mut upstream_open = false;
    if to_client.at_boundary() && !to_client.closed {
        let frame = close_frame(reason, None);
        let write = session.write_response_body(Some(frame.into()), false);
        client_open = matches!(tokio::time::timeout_at(deadline, write).await, Ok(Ok(())))
            && !to_upstream.closed;
    }
    if to_upstream.at_boundary() && !to_upstream.closed {
        let mask: [u8; 4] = fastrand::u32(..).to_be_bytes();
        let frame = close_frame(reason, Some(mask));
        let write = upstream.write_body(&frame);
        upstream_open = matches!(tokio::time::timeout_at(deadline, write).await, Ok(Ok(_)))
            && !to_client.closed;
    }
    while client_open || upstream_open {
        let downstream = session.as_downstream_mut();
        tokio::select! {
            piece = downstream.read_request_body(), if client_open => match piece {
                Ok(Some(bytes)) => {
                    to_upstream.feed(&bytes);
                    client_open = !to_upstream.closed;
                }
                _ => client_open = false,
            },
            piece = upstream.read_body_bytes(), if upstream_open => match piece {
                Ok(Some(bytes)) => {
                    to_client.feed(&bytes);
                    upstream_open = !to_client.closed;
                }
                _ => upstream_open = false,
            },
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: usize, masked: bool) -> Vec<u8> {
        let mut out = vec![0x82];
        let mask = if masked { 0x80 } else { 0 };
        match payload {
            0..=125 => out.push(mask | payload as u8),
            126..=65535 => {
                out.push(mask | 126);
                out.extend_from_slice(&(payload as u16).to_be_bytes());
            }
            _ => {
                out.push(mask | 127);
                out.extend_from_slice(&(payload as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(7u8, payload));
        out
    }

    #[test]
    fn frame_boundaries_are_followed_however_the_bytes_are_cut() {
        let mut stream = Vec::new();
        for (payload, masked) in [
            (0, false),
            (5, true),
            (300, false),
            (70_000, true),
            (1, false),
        ] {
            stream.extend(frame(payload, masked));
        }
        for cut in [1, 2, 3, 7, 64, 1000, 4096] {
            let mut frames = Frames::default();
            let mut boundaries = 0;
            for piece in stream.chunks(cut) {
                frames.feed(piece);
                boundaries += usize::from(frames.at_boundary());
            }
            assert!(frames.at_boundary(), "cut {cut}");
            assert!(boundaries >= 1);
            let mut half = Frames::default();
            half.feed(&stream[..stream.len() - 1]);
            assert!(!half.at_boundary(), "cut {cut}");
        }
    }

    #[test]
    fn close_frames_say_going_away_and_are_masked_towards_the_upstream() {
        let plain = close_frame("server shutting down", None);
        assert_eq!(plain[0], 0x88);
        assert_eq!(plain[1] as usize, 2 + "server shutting down".len());
        assert_eq!(&plain[2..4], &1001u16.to_be_bytes());
        let masked = close_frame("x", Some([9, 8, 7, 6]));
        assert_eq!(masked[1], 0x80 | 3);
        let payload: Vec<u8> = masked[6..]
            .iter()
            .enumerate()
            .map(|(index, byte)| byte ^ [9, 8, 7, 6][index % 4])
            .collect();
        assert_eq!(payload, [0x03, 0xe9, b'x']);
    }

    #[test]
    fn any_http11_upgrade_counts_but_h2c() {
        let mut request = RequestHeader::build("GET", b"/ws", None).unwrap();
        assert_eq!(requested(&request), None);
        request.insert_header("upgrade", "websocket").unwrap();
        assert_eq!(
            requested(&request),
            Some(true),
            "without Connection: upgrade too"
        );
        request
            .insert_header("connection", "keep-alive, Upgrade")
            .unwrap();
        assert_eq!(requested(&request), Some(true));
        request.insert_header("upgrade", "h2c").unwrap();
        assert_eq!(requested(&request), None, "h2c is never honoured");
        request
            .insert_header("upgrade", "spdy/3, websocket")
            .unwrap();
        assert_eq!(requested(&request), Some(false));
        request.set_version(http::Version::HTTP_10);
        assert_eq!(requested(&request), None);
    }
}
