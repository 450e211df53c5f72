//! The connection before HTTP: what a listener asks of a connection before the proxy reads a
//! request from it. Today that is the PROXY protocol header an L4 load balancer sends, read on
//! plaintext listeners by the connection wrapper (`proxy::deadline`) and on TLS listeners
//! before the handshake (Pingora's pre-TLS callback).
//!
//! A header's source address replaces the connection's peer address in its socket digest, so
//! every reader of the client address (forwarding headers, rate-limit keys, IP rules, logs)
//! sees the client. What else the header says (TLVs) travels with the connection as a
//! [`ConnectionInfo`] that requests find through [`connection_info`].

pub mod proxy_protocol;
pub mod tls;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use async_trait::async_trait;
use gatehouse_filters::metrics::Family;
use gatehouse_filters::{ConnectionInfo, Metrics};
use pingora_core::listeners::PreTlsProcess;
use pingora_core::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::SocketDigest;
use pingora_core::protocols::{Digest, GetProxyDigest, GetSocketDigest};
use pingora_core::{Error, ErrorType};
use prometheus::IntCounter;
use tokio::io::AsyncReadExt;

use crate::config::snapshot::ProxyProtocolPolicy;
use crate::config::ConfigStore;
use proxy_protocol::{Header, Parse};

/// The `result` labels of `gatehouse_proxy_protocol_connections_total`.
const RESULTS: [&str; 6] = [
    "proxied",
    "local",
    "untrusted",
    "invalid",
    "timeout",
    "closed",
];

pub struct Edge {
    store: Arc<ConfigStore>,
    outcomes: Family<IntCounter>,
}

/// Why a connection was closed before HTTP.
#[derive(Debug)]
pub enum Refusal {
    /// Its source is not a trusted balancer.
    Untrusted(std::net::IpAddr),
    Invalid(proxy_protocol::Invalid),
    /// The header did not complete in time.
    Timeout,
    /// The peer closed, or reading failed, before the header completed.
    Closed,
}

impl Refusal {
    fn label(&self) -> &'static str {
        match self {
            Refusal::Untrusted(_) => "untrusted",
            Refusal::Invalid(_) => "invalid",
            Refusal::Timeout => "timeout",
            Refusal::Closed => "closed",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Untrusted(address) => {
                write!(f, "{address} is not a trusted PROXY protocol sender")
            }
            Refusal::Invalid(invalid) => write!(f, "{invalid}"),
            Refusal::Timeout => write!(f, "the PROXY header did not arrive in time"),
            Refusal::Closed => write!(f, "the connection ended before its PROXY header did"),
        }
    }
}

impl Edge {
    pub fn new(store: Arc<ConfigStore>, metrics: &Metrics) -> Arc<Edge> {
        let outcomes = metrics.counters(
            "gatehouse_proxy_protocol_connections_total",
            "Connections to listeners with proxy_protocol, by listener and result (proxied, \
             local: the balancer's own, untrusted, invalid, timeout, closed)",
            &["listener", "result"],
        );
        for listener in &store.load().listeners {
            if listener.proxy_protocol.is_some() {
                for result in RESULTS {
                    outcomes.with_labels(&[&listener.name, result]);
                }
            }
        }
        Arc::new(Edge { store, outcomes })
    }

    /// Reads the PROXY header of a connection that arrived on a listener with
    /// `proxy_protocol` (and does nothing on other listeners). `Ok`: whether the listener
    /// takes h2c. `Err`: close the connection without an answer.
    pub async fn accept(&self, stream: &mut L4Stream) -> Result<bool, Refusal> {
        let Some(digest) = stream.get_socket_digest() else {
            return Ok(false);
        };
        let Some(local) = digest.local_addr().and_then(PeerAddr::as_inet).copied() else {
            return Ok(false);
        };
        let snapshot = self.store.load();
        let Some(listener) = snapshot.listener(local) else {
            return Ok(false);
        };
        let h2c = listener.h2c;
        let Some(policy) = &listener.proxy_protocol else {
            return Ok(h2c);
        };
        let peer = digest.peer_addr().and_then(PeerAddr::as_inet).copied();
        let result = read_header(stream, peer, policy).await;
        let label = match &result {
            Ok(header) if header.source.is_some() => "proxied",
            Ok(_) => "local",
            Err(refusal) => refusal.label(),
        };
        self.outcomes.with_labels(&[&listener.name, label]).inc();
        match result {
            Ok(header) => {
                attribute(stream, local, header);
                Ok(h2c)
            }
            Err(refusal) => {
                tracing::debug!(listener = %listener.name, peer = ?peer, "connection closed: {refusal}");
                Err(refusal)
            }
        }
    }
}

#[async_trait]
impl PreTlsProcess for Edge {
    async fn process(&self, stream: &mut L4Stream) -> pingora_core::Result<()> {
        self.accept(stream)
            .await
            .map(|_| ())
            .map_err(|refusal| Error::explain(ErrorType::AcceptError, refusal.to_string()))
    }
}

/// Reads and parses the header, within the policy's timeout; bytes read past it go back to
/// the stream.
async fn read_header(
    stream: &mut L4Stream,
    peer: Option<SocketAddr>,
    policy: &ProxyProtocolPolicy,
) -> Result<Header, Refusal> {
    let Some(peer) = peer else {
        return Err(Refusal::Closed);
    };
    let peer_ip = peer.ip().to_canonical();
    if !policy.trusted.iter().any(|net| net.contains(&peer_ip)) {
        return Err(Refusal::Untrusted(peer_ip));
    }
    let deadline = tokio::time::Instant::now() + policy.timeout;
    let mut buffer = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        match proxy_protocol::parse(&buffer) {
            Ok(Parse::Complete { header, length }) => {
                stream.rewind(&buffer[length..]);
                return Ok(header);
            }
            Ok(Parse::Incomplete) => {}
            Err(invalid) => return Err(Refusal::Invalid(invalid)),
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err(Refusal::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(Refusal::Closed),
            Ok(Ok(read)) => buffer.extend_from_slice(&chunk[..read]),
        }
    }
}

/// Makes the header's client the connection's peer, and keeps its TLVs with the connection.
fn attribute(stream: &mut L4Stream, local: SocketAddr, header: Header) {
    if let Some(source) = header.source {
        let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
        let _ = digest.peer_addr.set(Some(PeerAddr::Inet(source)));
        let _ = digest.local_addr.set(Some(PeerAddr::Inet(local)));
        stream.set_socket_digest(digest);
    }
    let tlvs = header.tlvs;
    let ssl = tlvs.ssl.as_ref();
    let info = ConnectionInfo {
        unique_id: tlvs.unique_id.as_deref().and_then(request_id_text),
        authority: tlvs.authority,
        balancer_tls: ssl.is_some_and(|ssl| ssl.client_ssl),
        client_cert_cn: ssl.and_then(|ssl| ssl.common_name.clone()),
        client_cert_verified: ssl.is_some_and(|ssl| ssl.verified),
        ..ConnectionInfo::default()
    };
    if info != ConnectionInfo::default() {
        let carrier: Box<dyn std::any::Any + Send + Sync> = Box::new(Proxied {
            info: Arc::new(info),
            requests: std::sync::atomic::AtomicU64::new(0),
        });
        stream.set_proxy_digest(ProxyDigest::new(
            Box::new(pingora_http::ResponseHeader::build(200, Some(0)).expect("a valid status")),
            Some(carrier),
        ));
    }
}

/// A `UNIQUE_ID` as a request id: as sent when it is visible ASCII, hex otherwise.
fn request_id_text(id: &[u8]) -> Option<String> {
    if id.is_empty() {
        None
    } else if id.iter().all(u8::is_ascii_graphic) {
        Some(String::from_utf8_lossy(id).into_owned())
    } else {
        Some(hex::encode(id))
    }
}

/// What a PROXY header said, kept with its connection, and how many requests the connection
/// has carried (for their ids).
struct Proxied {
    info: Arc<ConnectionInfo>,
    requests: std::sync::atomic::AtomicU64,
}

fn proxied(digest: &Digest) -> Option<&Proxied> {
    digest
        .proxy_digest
        .as_ref()?
        .user_data
        .as_ref()?
        .downcast_ref::<Proxied>()
}

/// The request id a request takes from its connection's PROXY `UNIQUE_ID`: the id itself for
/// the first request, `ID-N` for the Nth after it (kept-alive requests, HTTP/2 streams), so
/// that every request has its own id and the balancer's id still finds them all.
pub fn request_id(digest: Option<&Digest>) -> Option<String> {
    let proxied = proxied(digest?)?;
    let id = proxied.info.unique_id.as_deref()?;
    match proxied
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    {
        0 => Some(id.to_string()),
        n => Some(format!("{id}-{n}")),
    }
}

/// What the connection of a request told beyond the client's address, if anything: the
/// balancer's PROXY header, the client's certificate, or both.
pub fn connection_info(digest: Option<&Digest>) -> Option<Arc<ConnectionInfo>> {
    let digest = digest?;
    let proxied = proxied(digest).map(|proxied| &proxied.info);
    let certificate = digest
        .ssl_digest
        .as_ref()
        .and_then(|ssl| ssl.extension.get::<Arc<ConnectionInfo>>());
    match (proxied, certificate) {
        (Some(proxied), Some(certificate)) => Some(Arc::new(ConnectionInfo {
            unique_id: proxied.unique_id.clone(),
            authority: proxied.authority.clone(),
            balancer_tls: proxied.balancer_tls,
            ..ConnectionInfo::clone(certificate)
        })),
        (Some(one), None) | (None, Some(one)) => Some(one.clone()),
        (None, None) => None,
    }
}
