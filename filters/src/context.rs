//! The per-request state that filters read and write: request id, client, route, consumer, and
//! typed per-filter state.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

/// The caller identified by an authentication filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    pub id: Arc<str>,
    pub username: Option<Arc<str>>,
    pub tags: Arc<[String]>,
}

impl Consumer {
    pub fn new(id: &str) -> Consumer {
        Consumer {
            id: id.into(),
            username: None,
            tags: Arc::from(Vec::new()),
        }
    }
}

/// What the connection says about the client beyond its address: the PROXY protocol header of
/// the L4 load balancer in front, and the client's TLS certificate. Shared by every request of
/// the connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The balancer's id for the connection (PROXY v2 `UNIQUE_ID`); it becomes the request id.
    pub unique_id: Option<String>,
    /// The host name the client asked the balancer for (PROXY v2 `AUTHORITY`, its SNI).
    pub authority: Option<String>,
    /// The client spoke TLS to the balancer (PROXY v2 `SSL`).
    pub balancer_tls: bool,
    /// The client certificate's subject common name, and whether it was verified.
    pub client_cert_cn: Option<String>,
    pub client_cert_verified: bool,
    /// The verified client certificate's subject (RFC 4514) and its DNS, URI and email
    /// subject alternative names, from the listener's mTLS.
    pub client_cert_subject: Option<String>,
    pub client_cert_sans: Vec<String>,
}

/// A rate-limit decision on a request: the policy that refused it, or of those that admitted it
/// the one with the fewest tokens left. For the access log and traces.
#[derive(Clone, Debug)]
pub struct RateLimitNote {
    pub policy: Arc<str>,
    pub result: RateLimitResult,
    pub remaining: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimitResult {
    Allowed,
    Limited,
    /// Redis did not answer in time and the policy fails closed.
    Unavailable,
}

impl RateLimitResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitResult::Allowed => "allowed",
            RateLimitResult::Limited => "limited",
            RateLimitResult::Unavailable => "unavailable",
        }
    }
}

/// State carried through every phase of one request.
///
/// Filters are shared by all requests, so anything a filter learns about one request lives here,
/// in `state`, keyed by the filter's own type.
#[derive(Debug)]
pub struct RequestContext {
    request_id: Option<String>,
    /// When the request head was received.
    pub started: Instant,
    /// The client address: the TCP peer, or a forwarded address from a trusted proxy.
    pub client_addr: Option<IpAddr>,
    /// Whether the client reached Gatehouse over TLS (or a trusted proxy said so).
    pub client_tls: bool,
    /// The matched route's name.
    pub route: Option<Arc<str>>,
    /// The upstream pool the route sends to.
    pub upstream: Option<Arc<str>>,
    /// The named captures of the route's regex path that matched, for templates.
    pub path_captures: Vec<(String, String)>,
    /// The `Host` of the upstream target of the current attempt: its configured host name or
    /// address, with the port unless it is the scheme's default.
    pub target_host: Option<http::HeaderValue>,
    /// The caller, once an authentication filter identified one.
    pub consumer: Option<Consumer>,
    /// The authenticated subject (e.g. a JWT's `sub`), for upstream identity headers.
    pub subject: Option<Arc<str>>,
    /// The verified token's claims, for filters keyed on a claim.
    pub claims: Option<Arc<serde_json::Value>>,
    /// Why authentication failed (method, reason), for the failure metric.
    pub auth_failure: Option<(&'static str, &'static str)>,
    /// The filter kind that identified the caller (`jwt`, `api_key`, ...).
    pub auth_method: Option<&'static str>,
    /// The rate-limit decision, when a rate-limit filter ran.
    pub rate_limit: Option<RateLimitNote>,
    /// Why a body transform let a body through unchanged (`too_large`, `encoded`, ...).
    pub transform_skipped: Option<&'static str>,
    /// Set by a filter that cannot finish the answer it is writing (a plugin that failed in the
    /// response body): the proxy ends the answer there, unfinished, so the client sees it cut.
    pub abort_response: Option<&'static str>,
    /// Set in the response phase by a filter that answers in the upstream's place (a
    /// transcoder turning a bodiless gRPC error into a document): the client gets this answer,
    /// head and body, instead of the upstream's, which goes no further.
    pub answer_instead: Option<Box<crate::Response>>,
    /// The response status, once known.
    pub status: Option<u16>,
    /// Whether the response is the gateway's own (a filter's answer, a problem document),
    /// written whole: response body phases do not see it.
    pub own_answer: bool,
    /// Request body bytes received so far, counted by the proxy before any filter's body phase
    /// sees a piece. A retry replays the body from its start, and the count with it.
    pub request_body_bytes: u64,
    /// Whether a filter rewrites the request body whole (so its length changes). The proxy
    /// then reads a body that fits its replay buffer before the upstream sees the head, and
    /// sends it rewritten with its new `Content-Length`; a larger one goes chunked.
    pub buffers_request_body: bool,
    /// The header the request id travels in, when a `request_id` filter named one; the
    /// gateway's own answers carry the id there.
    pub request_id_header: Option<http::HeaderName>,
    /// What the connection told beyond the client's address (PROXY protocol TLVs, client
    /// certificate), when it told anything.
    pub connection: Option<Arc<ConnectionInfo>>,
    /// Typed per-filter state.
    pub state: http::Extensions,
}

impl RequestContext {
    pub fn new(started: Instant) -> Self {
        RequestContext {
            request_id: None,
            started,
            client_addr: None,
            client_tls: false,
            route: None,
            upstream: None,
            path_captures: Vec::new(),
            target_host: None,
            consumer: None,
            subject: None,
            claims: None,
            auth_failure: None,
            auth_method: None,
            rate_limit: None,
            transform_skipped: None,
            status: None,
            abort_response: None,
            answer_instead: None,
            own_answer: false,
            request_body_bytes: 0,
            buffers_request_body: false,
            request_id_header: None,
            connection: None,
            state: http::Extensions::new(),
        }
    }

    /// The request id, generated on first use when no filter has set one.
    pub fn request_id(&mut self) -> &str {
        self.request_id.get_or_insert_with(generate_request_id)
    }

    /// The request id if one was set or generated already.
    pub fn request_id_if_set(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    pub fn set_request_id(&mut self, id: String) {
        self.request_id = Some(id);
    }

    /// What `filter` keeps about this request, if it kept anything. A chain may hold several
    /// instances of one kind, so the state is the instance's own, told apart by its address.
    pub fn instance_state<F, S: Send + Sync + 'static>(&mut self, filter: &F) -> Option<&mut S> {
        let id = instance_id(filter);
        self.state
            .get_mut::<PerInstance<S>>()?
            .0
            .iter_mut()
            .find(|(known, _)| *known == id)
            .map(|(_, state)| state)
    }

    /// Keeps `state` for `filter` (replacing what it kept before).
    pub fn set_instance_state<F, S: Send + Sync + 'static>(&mut self, filter: &F, state: S) {
        let id = instance_id(filter);
        match self.state.get_mut::<PerInstance<S>>() {
            Some(all) => match all.0.iter_mut().find(|(known, _)| *known == id) {
                Some((_, kept)) => *kept = state,
                None => all.0.push((id, state)),
            },
            None => {
                let mut all = PerInstance(SmallVec::new());
                all.0.push((id, state));
                self.state.insert(all);
            }
        }
    }

    /// Takes back what `filter` kept.
    pub fn take_instance_state<F, S: Send + Sync + 'static>(&mut self, filter: &F) -> Option<S> {
        let id = instance_id(filter);
        let all = self.state.get_mut::<PerInstance<S>>()?;
        let at = all.0.iter().position(|(known, _)| *known == id)?;
        Some(all.0.swap_remove(at).1)
    }
}

fn instance_id<F>(filter: &F) -> usize {
    filter as *const F as usize
}

/// The per-request states of type `S` of every filter instance that kept one.
struct PerInstance<S>(SmallVec<[(usize, S); 1]>);

/// The context's state map asks for `Clone`; a filter's state belongs to its one request (and
/// may hold a body being read), so a copy starts empty.
impl<S> Clone for PerInstance<S> {
    fn clone(&self) -> Self {
        PerInstance(SmallVec::new())
    }
}

/// A random 128-bit id in the textual form of a version 4 UUID.
pub fn generate_request_id() -> String {
    let high = fastrand::u64(..);
    let low = fastrand::u64(..);
    let high = (high & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    let low = (low & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    // 8-4-4-4-12 hex digits.
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&high.to_be_bytes());
    bytes[8..].copy_from_slice(&low.to_be_bytes());
    let mut digits = [0u8; 32];
    let _ = hex::encode_to_slice(bytes, &mut digits);
    let mut text = String::with_capacity(36);
    for (index, pair) in digits.chunks_exact(4).enumerate() {
        if matches!(index, 2..=5) {
            text.push('-');
        }
        text.push_str(std::str::from_utf8(pair).unwrap_or_default());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_look_like_uuid_v4_and_differ() {
        let first = generate_request_id();
        let second = generate_request_id();
        assert_ne!(first, second);
        assert_eq!(first.len(), 36);
        assert_eq!(&first[14..15], "4");
        assert!(matches!(&first[19..20], "8" | "9" | "a" | "b"));
        for (at, character) in first.char_indices() {
            if matches!(at, 8 | 13 | 18 | 23) {
                assert_eq!(character, '-', "{first}");
            } else {
                assert!(matches!(character, '0'..='9' | 'a'..='f'), "{first}");
            }
        }
    }

    #[test]
    fn each_filter_instance_keeps_its_own_state() {
        let (first, second) = (1u8, 2u8);
        let mut ctx = RequestContext::new(Instant::now());
        assert_eq!(ctx.instance_state::<_, String>(&first), None);
        ctx.set_instance_state(&first, "one".to_string());
        ctx.set_instance_state(&second, "two".to_string());
        ctx.set_instance_state(&first, "uno".to_string());
        assert_eq!(ctx.instance_state::<_, String>(&first).unwrap(), "uno");
        assert_eq!(ctx.instance_state::<_, u32>(&first), None);
        assert_eq!(
            ctx.take_instance_state::<_, String>(&second).unwrap(),
            "two"
        );
        assert_eq!(ctx.take_instance_state::<_, String>(&second), None);
        assert_eq!(ctx.instance_state::<_, String>(&first).unwrap(), "uno");
    }

    #[test]
    fn request_id_is_generated_once() {
        let mut ctx = RequestContext::new(Instant::now());
        assert!(ctx.request_id_if_set().is_none());
        let id = ctx.request_id().to_string();
        assert_eq!(ctx.request_id(), id);
    }
}
