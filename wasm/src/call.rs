//! `proxy_http_call`: a call a module makes to one of the gateway's upstreams, awaited by the
//! filter while the request waits, and its answer, handed to `on_http_call_response`.

use bytes::Bytes;

/// A call the module dispatched in a callback.
#[derive(Debug)]
pub struct Dispatched {
    pub token: u32,
    pub upstream: String,
    pub method: http::Method,
    pub path: String,
    pub authority: Option<String>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub timeout: std::time::Duration,
}

impl Dispatched {
    /// `None` when the call lacks `:method` or `:path`, or its upstream is not text.
    pub fn new(
        token: u32,
        upstream: &[u8],
        headers: &[u8],
        body: Vec<u8>,
        timeout_ms: u32,
    ) -> Option<Dispatched> {
        let upstream = std::str::from_utf8(upstream).ok()?.to_string();
        let pairs = crate::abi::decode_map(headers)?;
        let mut method = None;
        let mut path = None;
        let mut authority = None;
        let mut rest = Vec::new();
        for (name, value) in pairs {
            let text = std::str::from_utf8(value).ok();
            match name {
                b":method" => method = http::Method::from_bytes(value).ok(),
                b":path" => path = text.map(str::to_string),
                b":authority" => authority = text.map(str::to_string),
                b":scheme" => {}
                name => rest.push((String::from_utf8_lossy(name).into_owned(), value.to_vec())),
            }
        }
        Some(Dispatched {
            token,
            upstream,
            method: method?,
            path: path.filter(|path| path.starts_with('/'))?,
            authority,
            headers: rest,
            body,
            timeout: std::time::Duration::from_millis(u64::from(timeout_ms.clamp(1, 60_000))),
        })
    }
}

/// What came back: the status as `:status` with the headers, and the body. A call that failed
/// (no such upstream, refused, timed out) answers with no headers at all, as in Envoy.
#[derive(Debug, Default)]
pub struct Answer {
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

/// What makes the calls: the gateway hands one to the filter kind at start.
pub trait HttpCaller: Send + Sync + 'static {
    fn call(
        &self,
        call: Dispatched,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send + 'static>>;
}
