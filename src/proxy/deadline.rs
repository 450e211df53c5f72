//! The total deadline for receiving a request head. Pingora's read timeout applies to each read,
//! so a client that sends one byte at a time could hold a connection forever; this wrapper
//! around the proxy application cuts such a connection off when the whole head has not arrived
//! in time, without touching other connections.
//!
//! One timer per connection: the proxy marks, through a task-local, when a head has arrived
//! and when a response is done; the timer only looks at those marks when it fires.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;

use crate::config::ConfigStore;

/// Pingora closes idle kept-alive connections after this long.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

const WAITING_FIRST: u8 = 0;
const IN_REQUEST: u8 = 1;
const WAITING_NEXT: u8 = 2;

struct ConnectionState {
    started: Instant,
    phase: AtomicU8,
    /// Nanoseconds from `started` to when the current phase began.
    since: AtomicU64,
}

impl ConnectionState {
    fn mark(&self, phase: u8, at: Instant) {
        let elapsed = at.saturating_duration_since(self.started).as_nanos() as u64;
        self.since.store(elapsed, Ordering::Relaxed);
        self.phase.store(phase, Ordering::Relaxed);
    }
}

tokio::task_local! {
    static CONNECTION: Arc<ConnectionState>;
}

/// Called by the proxy when a request head has been read. No clock is read: while a request
/// is in progress the deadline does not apply.
pub fn head_received() {
    let _ = CONNECTION.try_with(|state| state.phase.store(IN_REQUEST, Ordering::Relaxed));
}

/// Called by the proxy when a request is over (`now` is when); the next head's clock starts.
pub fn request_done(now: Instant) {
    let _ = CONNECTION.try_with(|state| state.mark(WAITING_NEXT, now));
}

pub struct HeadDeadline<A> {
    pub inner: Arc<A>,
    /// The proxy that takes HTTP/2 with prior knowledge, for listeners with `h2c`.
    pub inner_h2c: Option<Arc<A>>,
    pub store: Arc<ConfigStore>,
    /// What a plaintext listener asks before HTTP (a PROXY header); TLS listeners ask it
    /// before the handshake.
    pub edge: Arc<crate::edge::Edge>,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeadDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // HTTP/2 requests run on their own tasks; h2 has its own flow control and settings.
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.inner.process_new(stream, shutdown).await;
        }
        // A plaintext connection: Pingora hands over its TCP stream as it is.
        let timeout = self.store.load().limits.header_read_timeout;
        let started = Instant::now();
        let stream = if stream.get_ssl_digest().is_none() {
            let mut tcp = match stream.into_any().downcast::<L4Stream>() {
                Ok(tcp) => tcp,
                Err(_) => return None,
            };
            let h2c = self.edge.accept(&mut tcp).await.ok()?;
            if let (true, Some(inner_h2c)) = (h2c, &self.inner_h2c) {
                // The HTTP/2 preface, read within the head deadline (Pingora's own read of it
                // has none); anything else is HTTP/1.
                let deadline = tokio::time::Instant::from_std(started) + timeout;
                if starts_with_h2_preface(&mut tcp, deadline).await? {
                    return inner_h2c.process_new(tcp as Stream, shutdown).await;
                }
            }
            tcp as Stream
        } else {
            stream
        };
        // Wait for the first bytes of the request before handing the connection to the proxy.
        // A proxy that is shutting down (SIGTERM, or SIGQUIT during an upgrade) drops connections
        // whose request has not started to arrive; a connection accepted just before that moment
        // would otherwise be closed without an answer. The peeked bytes stay in the stream.
        let mut stream = stream;
        let mut first = [0u8; 1];
        match tokio::time::timeout(timeout, stream.try_peek(&mut first)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return None,
        }
        let state = Arc::new(ConnectionState {
            started,
            phase: AtomicU8::new(WAITING_FIRST),
            since: AtomicU64::new(0),
        });
        let inner = CONNECTION.scope(state.clone(), self.inner.process_new(stream, shutdown));
        tokio::pin!(inner);
        let mut deadline = tokio::time::Instant::from_std(started) + timeout;
        loop {
            tokio::select! {
                biased;
                result = &mut inner => return result,
                _ = tokio::time::sleep_until(deadline) => {
                    let since = Duration::from_nanos(state.since.load(Ordering::Relaxed));
                    let phase_start = tokio::time::Instant::from_std(state.started + since);
                    let limit = match state.phase.load(Ordering::Relaxed) {
                        WAITING_FIRST => phase_start + timeout,
                        WAITING_NEXT => phase_start + KEEPALIVE_IDLE + timeout,
                        _ => {
                            deadline = tokio::time::Instant::now() + timeout;
                            continue;
                        }
                    };
                    if tokio::time::Instant::now() >= limit {
                        tracing::debug!("request head not received within {timeout:?}; closing the connection");
                        return None;
                    }
                    deadline = limit;
                }
            }
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
        if let Some(inner_h2c) = &self.inner_h2c {
            inner_h2c.cleanup().await;
        }
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the connection starts with the HTTP/2 preface, read until it is whole or the bytes
/// differ from it; what was read goes back to the stream. `None`: the connection ended, or the
/// deadline passed, first.
async fn starts_with_h2_preface(
    stream: &mut L4Stream,
    deadline: tokio::time::Instant,
) -> Option<bool> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; 24];
    while received.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&received) {
        let wanted = H2_PREFACE.len() - received.len();
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..wanted])).await {
            Ok(Ok(read)) if read > 0 => received.extend_from_slice(&chunk[..read]),
            _ => {
                tracing::debug!(
                    "the HTTP/2 preface did not arrive in time; closing the connection"
                );
                return None;
            }
        }
    }
    stream.rewind(&received);
    Some(received == H2_PREFACE)
}
