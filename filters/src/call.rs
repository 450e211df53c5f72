//! Calls a filter makes to one of the config's upstreams itself, outside the proxied exchange:
//! the gateway hands the filters a caller at start (`set_caller`), which picks a target of the
//! named pool as the proxy would (health, ejection and circuit state respected).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use once_cell::sync::OnceCell;

/// A request to an upstream pool.
#[derive(Clone, Debug)]
pub struct Call {
    /// The pool's name in the config.
    pub upstream: Arc<str>,
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    /// `Host` (`:authority`); the pool's name when unset.
    pub authority: Option<String>,
    /// Headers besides the framing ones, which the caller sets.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub body: Bytes,
    /// The whole exchange, until the last byte of the answer.
    pub timeout: Duration,
    /// The most of the answer's body kept; a longer body fails the call.
    pub max_body: usize,
}

/// An answer: status, headers, the whole body, and trailers (HTTP/2).
#[derive(Clone, Debug, Default)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: http::HeaderMap,
}

/// Why a call got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("no such upstream, or none of its targets can be used")]
    NoTarget,
    #[error("the upstream could not be reached")]
    Unreachable,
    #[error("the upstream did not answer in time")]
    Timeout,
    #[error("the upstream's answer is over the size limit")]
    TooLarge,
    #[error("the upstream broke off the answer")]
    Broken,
}

/// Boxed, so the trait stays object-safe.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<Reply, CallError>> + Send + 'static>>;

/// What makes the calls.
pub trait Caller: Send + Sync + 'static {
    fn call(&self, call: Call) -> CallFuture;
}

static CALLER: OnceCell<Arc<dyn Caller>> = OnceCell::new();

/// Sets the process's caller (the first one set stays).
pub fn set_caller(caller: Arc<dyn Caller>) {
    let _ = CALLER.set(caller);
}

/// The process's caller; `None` outside the gateway (as in unit tests).
pub fn caller() -> Option<&'static Arc<dyn Caller>> {
    CALLER.get()
}
