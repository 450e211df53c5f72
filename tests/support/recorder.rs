//! A raw HTTP/1.1 upstream that keeps the exact bytes of every request it receives and answers
//! each with the same response, whose head a test chooses. Tests of transformations read what
//! the upstream got byte for byte, header lines in order and repeated lines apart.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request as it arrived.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The request head and body, as received.
    pub raw: Vec<u8>,
    pub method: String,
    /// The request target (path and query).
    pub target: String,
    /// Header lines in order, names lower-cased, values as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// The value of the only line of `name`; panics when there are several.
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.header_all(name);
        assert!(all.len() < 2, "{name} sent {} times: {all:?}", all.len());
        all.first().copied()
    }

    /// The values of every line of `name`, in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
            .collect()
    }
}

pub struct Recorder {
    pub address: SocketAddr,
    seen: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    /// Starts on a free port; every answer is `200`, the given header lines and `body`.
    pub fn start(headers: &[(&str, &str)], body: &str) -> Recorder {
        Recorder::start_bytes(headers, body.as_bytes())
    }

    /// As [`Recorder::start`], with a body of any bytes (a compressed one, say).
    pub fn start_bytes(headers: &[(&str, &str)], body: &[u8]) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the recorder");
        let address = listener.local_addr().unwrap();
        let mut response = String::from("HTTP/1.1 200 OK\r\n");
        for (name, value) in headers {
            response.push_str(&format!("{name}: {value}\r\n"));
        }
        response.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut response = response.into_bytes();
        response.extend_from_slice(body);
        let response: Arc<[u8]> = Arc::from(response);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = Arc::clone(&shared);
                let response = Arc::clone(&response);
                std::thread::spawn(move || serve(stream, &seen, &response));
            }
        });
        Recorder { address, seen }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    /// The latest request (waiting a moment for one to arrive).
    pub fn last(&self) -> Recorded {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(last) = self.seen.lock().unwrap().last() {
                return last.clone();
            }
            assert!(Instant::now() < deadline, "the recorder got no request");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Forgets what it recorded.
    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

/// Answers the requests of one kept-alive connection.
fn serve(mut stream: TcpStream, seen: &Mutex<Vec<Recorded>>, response: &[u8]) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                break end + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_string();
        let target = request_line.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
        let (end, body) = if chunked {
            // Read up to the last chunk (no trailers), then decode.
            loop {
                if let Some(body) = dechunk(&buffer[head_end..]) {
                    break body;
                }
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                }
            }
        } else {
            let length: usize = headers
                .iter()
                .find(|(name, _)| name == "content-length")
                .and_then(|(_, value)| value.parse().ok())
                .unwrap_or(0);
            while buffer.len() < head_end + length {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                }
            }
            (length, buffer[head_end..head_end + length].to_vec())
        };
        let raw: Vec<u8> = buffer.drain(..head_end + end).collect();
        seen.lock().unwrap().push(Recorded {
            body,
            raw,
            method,
            target,
            headers,
        });
        if stream.write_all(response).is_err() {
            return;
        }
    }
}

/// A complete chunked body at the start of `bytes`: (its length on the wire, the data).
fn dechunk(bytes: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut at = 0;
    let mut data = Vec::new();
    loop {
        let line_end = at
            + bytes[at..]
                .windows(2)
                .position(|window| window == b"\r\n")?;
        let size_text = std::str::from_utf8(&bytes[at..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        let start = line_end + 2;
        if size == 0 {
            return bytes[start..]
                .starts_with(b"\r\n")
                .then_some((start + 2, data));
        }
        if bytes.len() < start + size + 2 {
            return None;
        }
        data.extend_from_slice(&bytes[start..start + size]);
        at = start + size + 2;
    }
}
