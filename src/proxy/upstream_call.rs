//! Calls to the config's upstreams made outside the proxied exchange: filters' own calls
//! (`gatehouse_filters::call`, e.g. `grpc_json` answering a bodiless request itself) and the
//! `http_call`s of wasm plugins. A call names one of the config's upstreams, and goes to a
//! target of that pool as the proxy would pick it (health, ejection and circuit state
//! respected), over the same kind of connection (HTTP/1.1 or HTTP/2), bounded by the call's own
//! timeout. A plugin's call that fails in any way answers with no headers, as in Envoy.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use gatehouse_filters::call::{Call, CallError, CallFuture, Caller as FilterCaller, Reply};
use gatehouse_wasm::{Answer, Dispatched, HttpCaller};
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
use pingora_http::RequestHeader;

use crate::config::ConfigStore;
use crate::upstream::clock;

/// The most of an answer's body a plugin is handed.
const CALL_BODY_MAX: usize = 1024 * 1024;

/// Headers a call's module may not send: the gateway frames the call and manages its
/// connection (a pooled connection shared by other calls must never be desynchronised).
const FRAMING: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
];

/// How long a call's connection may stay idle in the pool for the next call.
const IDLE_KEEPALIVE: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Caller {
    pub store: Arc<ConfigStore>,
    pub connector: Arc<Connector>,
}

impl FilterCaller for Caller {
    fn call(&self, call: Call) -> CallFuture {
        let snapshot = self.store.load();
        let connector = self.connector.clone();
        Box::pin(async move {
            let timeout = call.timeout;
            tokio::time::timeout(timeout, exchange(&snapshot, &connector, call))
                .await
                .unwrap_or(Err(CallError::Timeout))
        })
    }
}

impl HttpCaller for Caller {
    fn call(
        &self,
        call: Dispatched,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send + 'static>> {
        let mut headers = Vec::with_capacity(call.headers.len());
        for (name, value) in &call.headers {
            // The gateway frames the call and manages its connection.
            let lower = name.to_ascii_lowercase();
            if FRAMING.contains(&lower.as_str()) || lower.starts_with("proxy-") {
                continue;
            }
            let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_bytes(value),
            ) else {
                return Box::pin(async { Answer::default() });
            };
            headers.push((name, value));
        }
        let call = Call {
            upstream: call.upstream.as_str().into(),
            method: call.method,
            path: call.path,
            authority: call.authority,
            headers,
            body: Bytes::from(call.body),
            timeout: call.timeout,
            max_body: CALL_BODY_MAX,
        };
        let reply = FilterCaller::call(self, call);
        Box::pin(async move {
            let Ok(reply) = reply.await else {
                return Answer::default();
            };
            let mut headers = vec![(":status".to_string(), reply.status.to_string().into_bytes())];
            headers.extend(
                reply
                    .headers
                    .iter()
                    .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec())),
            );
            Answer {
                headers,
                body: reply.body,
            }
        })
    }
}

async fn exchange(
    snapshot: &crate::config::Snapshot,
    connector: &Connector,
    call: Call,
) -> Result<Reply, CallError> {
    let pool = snapshot
        .upstreams
        .iter()
        .find(|pool| *pool.name == *call.upstream)
        .ok_or(CallError::NoTarget)?;
    let pick = pool
        .select(None, &[], false, clock::now())
        .ok_or(CallError::NoTarget)?;
    let broken = |_| CallError::Broken;
    let mut head = RequestHeader::build(call.method.clone(), call.path.as_bytes(), None)
        .map_err(|_| CallError::Broken)?;
    let authority = call
        .authority
        .clone()
        .unwrap_or_else(|| call.upstream.to_string());
    head.insert_header(http::header::HOST, authority)
        .map_err(broken)?;
    for (name, value) in call.headers {
        head.append_header(name, value).map_err(broken)?;
    }
    head.insert_header(http::header::CONTENT_LENGTH, call.body.len())
        .map_err(broken)?;
    let (mut session, _reused) = connector
        .get_http_session(&*pick.peer)
        .await
        .map_err(|_| CallError::Unreachable)?;
    if let HttpSession::H2(stream) = &mut session {
        // Pingora's HTTP/2 client takes the head as HTTP/2.
        head.set_version(http::Version::HTTP_2);
        if call.body.is_empty() {
            stream
                .write_request_header(Box::new(head), true)
                .map_err(|_| CallError::Unreachable)?;
        } else {
            stream
                .write_request_header(Box::new(head), false)
                .map_err(|_| CallError::Unreachable)?;
            stream
                .write_request_body(call.body.clone(), true)
                .await
                .map_err(|_| CallError::Unreachable)?;
        }
    } else {
        session
            .write_request_header(Box::new(head))
            .await
            .map_err(|_| CallError::Unreachable)?;
        if !call.body.is_empty() {
            session
                .write_request_body(call.body.clone(), true)
                .await
                .map_err(|_| CallError::Unreachable)?;
        }
        session.finish_request_body().await.map_err(broken)?;
    }
    session.read_response_header().await.map_err(broken)?;
    let response = session.response_header().ok_or(CallError::Broken)?.clone();
    let mut body = BytesMut::new();
    while let Some(piece) = session.read_response_body().await.map_err(broken)? {
        if body.len() + piece.len() > call.max_body {
            return Err(CallError::TooLarge);
        }
        body.extend_from_slice(&piece);
    }
    let trailers = match &mut session {
        HttpSession::H2(stream) => stream
            .read_trailers()
            .await
            .map_err(broken)?
            .unwrap_or_default(),
        _ => http::HeaderMap::new(),
    };
    if session.response_done() {
        connector
            .release_http_session(session, &*pick.peer, Some(IDLE_KEEPALIVE))
            .await;
    }
    Ok(Reply {
        status: response.status.as_u16(),
        headers: response.headers.clone(),
        body: body.freeze(),
        trailers,
    })
}
