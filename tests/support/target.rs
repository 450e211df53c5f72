//! A controllable upstream target for resilience tests: a real HTTP/1.1 server on 127.0.0.1
//! that a test can kill (listener and every connection closed at once) and restart on the same
//! port, and switch between answering, failing, sleeping, and dropping the connection. It counts
//! what reached it so a test can tell how many copies of a request the gateway sent, and at
//! what concurrency.
//!
//! Every answer is JSON naming the target (`{"target", "method", "path", "body_bytes",
//! "body_sha256"}`), so a test can tell who answered. `GET /healthz` is a health probe: it is
//! counted apart and answers the health status, never the request status.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

/// The path health probes use.
pub const HEALTH_PATH: &str = "/healthz";

/// One request (not a probe) as the target received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body_bytes: usize,
    /// Hex SHA-256 of the whole body as received.
    pub body_sha256: String,
    pub at: Instant,
}

/// One health probe and whether the target made it pass.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub at: Instant,
    pub passed: bool,
}

/// The switches and counters every connection of one target shares; they survive a restart.
struct Shared {
    name: String,
    status: AtomicU16,
    delay_ms: AtomicU64,
    health_status: AtomicU16,
    /// Fail every other probe (the first passes), whatever `health_status` says.
    health_alternates: AtomicBool,
    /// Read the whole request body, then close the connection without an answer.
    drop_after_body: AtomicBool,
    requests: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    probes: Mutex<Vec<Probe>>,
}

/// A running (or killed) server, for [`Target::kill`] to stop.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

pub struct Target {
    pub name: String,
    pub address: SocketAddr,
    shared: Arc<Shared>,
    running: Mutex<Option<Running>>,
}

impl Target {
    /// Starts a target named `name` on a free port, answering 200.
    pub fn start(name: &str) -> Target {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind target");
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            health_status: AtomicU16::new(200),
            health_alternates: AtomicBool::new(false),
            drop_after_body: AtomicBool::new(false),
            requests: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            probes: Mutex::new(Vec::new()),
        });
        let target = Target {
            name: name.to_string(),
            address,
            shared,
            running: Mutex::new(None),
        };
        target.serve(listener);
        target
    }

    /// Starts `count` targets named `{prefix}0`, `{prefix}1`, ...
    pub fn start_many(prefix: &str, count: usize) -> Vec<Target> {
        (0..count)
            .map(|index| Target::start(&format!("{prefix}{index}")))
            .collect()
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = Arc::clone(&self.shared);
        let thread = std::thread::Builder::new()
            .name(format!("target-{}", self.name))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("target runtime");
                runtime.block_on(accept(listener, shared, stopped));
                // Dropping the runtime drops every connection task, so every socket closes
                // here at once, as when a process dies.
                drop(runtime);
            })
            .expect("spawn target thread");
        *self.running.lock().unwrap() = Some(Running { stop, thread });
    }

    /// Closes the listener and every open connection, and returns once they are closed.
    pub fn kill(&self) {
        if let Some(running) = self.running.lock().unwrap().take() {
            let _ = running.stop.send(());
            running.thread.join().expect("target thread");
        }
    }

    /// Listens again on the same port.
    pub fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match std::net::TcpListener::bind(self.address) {
                Ok(listener) => break listener,
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => panic!("cannot listen on {} again: {error}", self.address),
            }
        };
        self.serve(listener);
    }

    /// The status every request (not probe) gets.
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    /// How long each request (not probe) waits before its answer.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// The status health probes get.
    pub fn set_health_status(&self, status: u16) {
        self.shared.health_status.store(status, Ordering::SeqCst);
    }

    /// Fail every other probe: pass, fail, pass, fail...
    pub fn set_health_alternating(&self, alternating: bool) {
        self.shared
            .health_alternates
            .store(alternating, Ordering::SeqCst);
    }

    /// Read each request's body, then close the connection without answering.
    pub fn set_drop_after_body(&self, drop: bool) {
        self.shared.drop_after_body.store(drop, Ordering::SeqCst);
    }

    /// Requests received, health probes excluded.
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Health probes received.
    pub fn probes(&self) -> usize {
        self.shared.probes.lock().unwrap().len()
    }

    pub fn probe_log(&self) -> Vec<Probe> {
        self.shared.probes.lock().unwrap().clone()
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests ever answered at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Every request received, in order, once its body was read.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Requests received at `path`.
    pub fn seen_at(&self, path: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|seen| seen.path == path)
            .collect()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn accept(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("register listener");
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(Arc::clone(&shared), request));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Gives back its place in `in_flight` however the request ends, including when the gateway
/// hangs up while the target sleeps.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes the connection without an answer: hyper drops a connection whose service failed.
#[derive(Debug)]
struct Hangup;

impl std::fmt::Display for Hangup {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("the target hangs up")
    }
}

impl std::error::Error for Hangup {}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Hangup> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    if path == HEALTH_PATH {
        let mut probes = shared.probes.lock().unwrap();
        let passed_status = shared.health_status.load(Ordering::SeqCst);
        let status = if shared.health_alternates.load(Ordering::SeqCst) && probes.len() % 2 == 1 {
            503
        } else {
            passed_status
        };
        probes.push(Probe {
            at: Instant::now(),
            passed: (200..300).contains(&status),
        });
        drop(probes);
        return Ok(reply(&shared, status, &parts.method, &path, &[]));
    }
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let running = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(running, Ordering::SeqCst);
    let _in_flight = InFlight(Arc::clone(&shared));
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    shared.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        body_bytes: body.len(),
        body_sha256: sha256_hex(&body),
        at: Instant::now(),
    });
    if shared.drop_after_body.load(Ordering::SeqCst) {
        return Err(Hangup);
    }
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = shared.status.load(Ordering::SeqCst);
    Ok(reply(&shared, status, &parts.method, &path, &body))
}

fn reply(
    shared: &Shared,
    status: u16,
    method: &http::Method,
    path: &str,
    body: &[u8],
) -> Response<Full<Bytes>> {
    let json = serde_json::json!({
        "target": shared.name,
        "method": method.as_str(),
        "path": path,
        "body_bytes": body.len(),
        "body_sha256": sha256_hex(body),
    });
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-target", shared.name.as_str())
        .body(Full::new(Bytes::from(json.to_string())))
        .unwrap()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An address that accepts no connection and refuses none: its accept queue is full and
/// nothing takes from it, so a new connection waits until the caller's connect timeout.
pub struct Blackhole {
    pub address: SocketAddr,
    _listener: std::net::TcpListener,
    _queued: std::net::TcpStream,
}

impl Blackhole {
    pub fn start() -> Blackhole {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let listener = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            // A backlog of 0 holds one connection; the next ones get no SYN-ACK.
            socket.listen(0).unwrap().into_std().unwrap()
        });
        let address = listener.local_addr().unwrap();
        let queued = std::net::TcpStream::connect(address).unwrap();
        Blackhole {
            address,
            _listener: listener,
            _queued: queued,
        }
    }
}
