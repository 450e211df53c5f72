//! The `http_call`s of wasm plugins: a call names one of the config's upstreams, and goes to a
//! target of that pool as the proxy would pick it (health, ejection and circuit state
//! respected), over the same kind of connection, bounded by the call's own timeout. Its
//! answer (status, headers, and up to `CALL_BODY_MAX` of body) goes back to the plugin; a call
//! that fails in any way answers with no headers, as in Envoy.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use gatehouse_wasm::{Answer, Dispatched, HttpCaller};
use pingora_core::connectors::http::Connector;
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

pub struct Caller {
    pub store: Arc<ConfigStore>,
    pub connector: Arc<Connector>,
}

impl HttpCaller for Caller {
    fn call(&self, call: Dispatched) -> Pin<Box<dyn Future<Output = Answer> + Send + 'static>> {
        let snapshot = self.store.load();
        let connector = self.connector.clone();
        Box::pin(async move {
            let timeout = call.timeout;
            tokio::time::timeout(timeout, exchange(&snapshot, &connector, call))
                .await
                .ok()
                .flatten()
                .unwrap_or_default()
        })
    }
}

async fn exchange(
    snapshot: &crate::config::Snapshot,
    connector: &Connector,
    call: Dispatched,
) -> Option<Answer> {
    let pool = snapshot
        .upstreams
        .iter()
        .find(|pool| *pool.name == *call.upstream)?;
    let pick = pool.select(None, &[], false, clock::now())?;
    let mut head = RequestHeader::build(call.method.clone(), call.path.as_bytes(), None).ok()?;
    let authority = call
        .authority
        .clone()
        .unwrap_or_else(|| call.upstream.clone());
    head.insert_header(http::header::HOST, authority).ok()?;
    for (name, value) in &call.headers {
        // The gateway frames the call and manages its connection.
        let lower = name.to_ascii_lowercase();
        if FRAMING.contains(&lower.as_str()) || lower.starts_with("proxy-") {
            continue;
        }
        head.append_header(name.clone(), value.as_slice()).ok()?;
    }
    head.insert_header(http::header::CONTENT_LENGTH, call.body.len())
        .ok()?;
    let (mut session, _reused) = connector.get_http_session(&*pick.peer).await.ok()?;
    session.write_request_header(Box::new(head)).await.ok()?;
    if !call.body.is_empty() {
        session
            .write_request_body(Bytes::from(call.body), true)
            .await
            .ok()?;
    }
    session.finish_request_body().await.ok()?;
    session.read_response_header().await.ok()?;
    let response = session.response_header()?.clone();
    let mut body = BytesMut::new();
    while let Some(piece) = session.read_response_body().await.ok()? {
        if body.len() + piece.len() > CALL_BODY_MAX {
            return None;
        }
        body.extend_from_slice(&piece);
    }
    if session.response_done() {
        connector
            .release_http_session(session, &*pick.peer, Some(IDLE_KEEPALIVE))
            .await;
    }
    let mut headers = vec![(
        ":status".to_string(),
        response.status.as_str().as_bytes().to_vec(),
    )];
    headers.extend(
        response
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec())),
    );
    Some(Answer {
        headers,
        body: body.freeze(),
    })
}
