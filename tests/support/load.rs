//! Client load for resilience tests: kept-alive HTTP/1.1 connections that report every failure
//! (no silent retry: a retry in the client would hide the failures the gateway must prevent),
//! and an open-loop generator that sends at a fixed rate whatever the answers take, measuring
//! each latency from the moment the request was due.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{parse_response, Reply};

/// One kept-alive connection to the gateway; it reconnects only when the gateway said it
/// closes the connection, when the gateway has closed it while idle, or for the next request
/// after a failure.
pub struct Connection {
    address: SocketAddr,
    stream: Option<TcpStream>,
    buffer: Vec<u8>,
}

impl Connection {
    pub fn new(address: SocketAddr) -> Connection {
        Connection {
            address,
            stream: None,
            buffer: Vec::with_capacity(8192),
        }
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<Reply> {
        self.send("GET", path, &[], b"")
    }

    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Reply> {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: gatehouse.test\r\n");
        for (name, value) in headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut raw = raw.into_bytes();
        raw.extend_from_slice(body);
        let result = self.exchange(&raw, true);
        match &result {
            Ok(reply) if !closes(reply) => {}
            _ => self.stream = None,
        }
        result
    }

    /// GET `path` on the connection the last answer came on, without checking whether the
    /// gateway kept it open: what a client does that trusts a keep-alive answer.
    pub fn get_on_the_same_connection(&mut self, path: &str) -> std::io::Result<Reply> {
        if self.stream.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the last answer said the connection closes",
            ));
        }
        let raw = format!("GET {path} HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n");
        self.exchange(raw.as_bytes(), false)
    }

    fn exchange(&mut self, raw: &[u8], replace_closed: bool) -> std::io::Result<Reply> {
        if replace_closed
            && self
                .stream
                .as_ref()
                .is_some_and(|stream| !still_open(stream))
        {
            self.stream = None;
        }
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.address)?;
            stream.set_read_timeout(Some(Duration::from_secs(20)))?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().unwrap();
        stream.write_all(raw)?;
        self.buffer.clear();
        let mut chunk = [0u8; 16384];
        loop {
            if let Some(head_end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buffer[..head_end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|value| value.trim().parse().ok())
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("no content-length in {head:?}"),
                        )
                    })?;
                if self.buffer.len() >= head_end + 4 + length {
                    return parse_response(&self.buffer[..head_end + 4 + length]);
                }
            }
            let read = stream.read(&mut chunk)?;
            if read == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the gateway closed the connection without an answer",
                ));
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }
}

/// Whether an idle kept-alive connection is still open: as HTTP clients do, a connection the
/// server has closed while idle is replaced before a request is written to it.
fn still_open(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let open = matches!(
        stream.peek(&mut [0u8; 1]),
        Err(error) if error.kind() == std::io::ErrorKind::WouldBlock
    );
    open && stream.set_nonblocking(false).is_ok()
}

fn closes(reply: &Reply) -> bool {
    reply
        .header("connection")
        .is_some_and(|value| value.eq_ignore_ascii_case("close"))
}

/// What one request of a load run got.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// When it was due, from the start of the run.
    pub due: Duration,
    /// From when it was due to its answer (or failure).
    pub latency: Duration,
    /// The status, or the client-side error.
    pub status: Result<u16, String>,
    /// The target named in the answer's `x-target`, when a target answered.
    pub target: Option<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        matches!(self.status, Ok(status) if (200..300).contains(&status))
    }
}

/// An open-loop run in the background: requests are due at a fixed rate, whatever the earlier
/// ones take (a slow answer does not slow the sender down, it queues behind `workers`).
pub struct OpenLoop {
    pub started: Instant,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl OpenLoop {
    pub fn start(
        address: SocketAddr,
        path: &str,
        rate: f64,
        length: Duration,
        workers: usize,
    ) -> OpenLoop {
        let started = Instant::now();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (due_sender, due_receiver) = mpsc::channel::<Duration>();
        let due_receiver = Arc::new(Mutex::new(due_receiver));
        let mut threads = Vec::new();
        for _ in 0..workers {
            let due_receiver = Arc::clone(&due_receiver);
            let outcomes = Arc::clone(&outcomes);
            let path = path.to_string();
            threads.push(std::thread::spawn(move || {
                let mut connection = Connection::new(address);
                loop {
                    let due = match due_receiver.lock().unwrap().recv() {
                        Ok(due) => due,
                        Err(_) => return,
                    };
                    let wait = (started + due).saturating_duration_since(Instant::now());
                    std::thread::sleep(wait);
                    let reply = connection.get(&path);
                    let outcome = Outcome {
                        due,
                        latency: started.elapsed().saturating_sub(due),
                        target: reply
                            .as_ref()
                            .ok()
                            .and_then(|reply| reply.header("x-target").map(str::to_string)),
                        status: reply
                            .map(|reply| reply.status)
                            .map_err(|error| error.to_string()),
                    };
                    outcomes.lock().unwrap().push(outcome);
                }
            }));
        }
        let count = (rate * length.as_secs_f64()).round() as u64;
        threads.push(std::thread::spawn(move || {
            for index in 0..count {
                let due = Duration::from_secs_f64(index as f64 / rate);
                let wait = (started + due).saturating_duration_since(Instant::now());
                std::thread::sleep(wait);
                if due_sender.send(due).is_err() {
                    return;
                }
            }
        }));
        OpenLoop {
            started,
            outcomes,
            threads,
        }
    }

    /// Waits for every request of the run; outcomes in the order they were due.
    pub fn finish(self) -> Vec<Outcome> {
        for thread in self.threads {
            thread.join().expect("load thread");
        }
        let mut outcomes = std::mem::take(&mut *self.outcomes.lock().unwrap());
        outcomes.sort_by_key(|outcome| outcome.due);
        outcomes
    }
}

/// The `share` quantile (0.0 to 1.0) of `values`.
pub fn quantile(values: &[Duration], share: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * share).round() as usize;
    sorted[index]
}

/// Runs `count` requests from `clients` threads at once, each on its own kept-alive connection,
/// and returns every reply (or error) with its latency.
pub fn concurrent(
    address: SocketAddr,
    clients: usize,
    count: usize,
    request: impl Fn(usize, &mut Connection) -> std::io::Result<Reply> + Send + Sync + 'static,
) -> Vec<(Duration, Result<Reply, String>)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let request = Arc::new(request);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let next = Arc::clone(&next);
            let request = Arc::clone(&request);
            std::thread::spawn(move || {
                let mut connection = Connection::new(address);
                let mut results = Vec::new();
                loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if index >= count {
                        return results;
                    }
                    let started = Instant::now();
                    let reply = request(index, &mut connection).map_err(|error| error.to_string());
                    results.push((started.elapsed(), reply));
                }
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|thread| thread.join().expect("client thread"))
        .collect()
}
