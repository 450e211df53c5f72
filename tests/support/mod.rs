//! The integration test harness: starts the real `gatehouse` binary on ephemeral ports with a
//! generated config, real upstream servers on 127.0.0.1:0, and a raw HTTP/1.1 client that sends
//! exactly the bytes a test gives it (so hostile paths reach the gateway unmodified).

#![allow(dead_code)]

pub mod dns;
pub mod grpc;
pub mod haproxy;
pub mod idp;
pub mod load;
pub mod otlp;
pub mod pg;
pub mod recorder;
pub mod redis_cluster;
pub mod target;
pub mod websocket;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use gatehouse_loadtest::spawn_echo;

/// Starts a Python peer (`GATEHOUSE_PYTHON`, set by `make test` to its virtual environment
/// with grpcio and websockets, else `python3`) from `tests/SCRIPT` with `args`: it prints the
/// port it listens on (127.0.0.1) and serves until its stdin closes.
pub fn spawn_python_peer(script: &str, args: &[&std::ffi::OsStr]) -> (Child, SocketAddr) {
    use std::io::BufRead;
    let mut child = python(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with grpcio and websockets (make test installs them)");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{script} did not start: {line:?}"));
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// `tests/SCRIPT` under the test peers' Python.
pub fn python(script: &str) -> Command {
    let python = std::env::var("GATEHOUSE_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut command = Command::new(python);
    command.arg(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join(script),
    );
    command
}

/// Stops a peer started by [`spawn_python_peer`].
pub fn stop_python_peer(child: &mut Child) {
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}

/// A port that was free a moment ago.
/// A port for a gateway to bind later. It comes from below the kernel's ephemeral range
/// (32768 and up on Linux), where every test server binding `127.0.0.1:0` gets its port: a port
/// taken from that range and released could be handed to such a server before the gateway
/// binds it, and the gateway's requests would then reach that server (seen once: a 404 from
/// another test's server). Ports are handed out in turn, from a start that differs per
/// process, and each is checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id() * 7919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN);
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_gatehouse")
}

/// A running gateway process.
pub struct Gateway {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub ops: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    server_extra: String,
    listeners_extra: String,
}

impl Gateway {
    /// Start with `rest` (upstreams, filters, routes) below a generated `server`/`ops` section.
    pub fn start(rest: &str) -> Gateway {
        Gateway::start_with("", rest)
    }

    /// `server_extra` is YAML placed inside `server:` (indented by two spaces by the caller).
    pub fn start_with(server_extra: &str, rest: &str) -> Gateway {
        Gateway::start_full("", server_extra, rest)
    }

    /// `listeners_extra` is appended inside the `listeners: [...]` flow list (start it with ", ").
    pub fn start_full(listeners_extra: &str, server_extra: &str, rest: &str) -> Gateway {
        let gateway = Gateway::spawned(listeners_extra, server_extra, rest);
        gateway.wait_ready();
        gateway
    }

    /// Start with the operations listener `off`, without waiting: without it nothing tells
    /// when the process is ready (`ops` is then an address nothing listens on).
    pub fn start_without_ops(rest: &str) -> Gateway {
        let mut gateway = Gateway::unspawned("", "");
        let text = gateway.render_config(rest).replace(
            &format!("ops: {{ address: \"{}\" }}", gateway.ops),
            "ops: { address: \"off\" }",
        );
        assert!(text.contains("address: \"off\""), "{text}");
        std::fs::write(&gateway.config_path, text).unwrap();
        gateway.spawn(false);
        gateway
    }

    /// Start with `extra` added inside the generated `telemetry:` flow map (for example
    /// `server_timing: true`), and wait until ready. A later `write_config` drops it.
    pub fn start_with_telemetry(extra: &str, rest: &str) -> Gateway {
        let mut gateway = Gateway::unspawned("", "");
        let text = gateway.render_config(rest).replacen(
            "access.log\" } }",
            &format!("access.log\" }}, {extra} }}"),
            1,
        );
        assert!(text.contains(extra), "{text}");
        std::fs::write(&gateway.config_path, text).unwrap();
        gateway.spawn(false);
        gateway.wait_ready();
        gateway
    }

    /// Start on the generated config as `edit` changes its text (the `telemetry:` line, say),
    /// and wait until ready.
    pub fn start_edited(rest: &str, edit: impl Fn(String) -> String) -> Gateway {
        let mut gateway = Gateway::unspawned("", "");
        gateway.write_config_edited(rest, edit);
        gateway.spawn(false);
        gateway.wait_ready();
        gateway
    }

    /// As [`Gateway::write_config`], with the text changed by `edit`.
    pub fn write_config_edited(&self, rest: &str, edit: impl Fn(String) -> String) {
        let original = self.render_config(rest);
        let text = edit(original.clone());
        assert_ne!(text, original, "the edit changed nothing");
        let temporary = self.dir.path().join(".gatehouse.yaml.new");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, &self.config_path).unwrap();
    }

    /// Write the config on fresh ephemeral ports and start the process, without waiting.
    fn spawned(listeners_extra: &str, server_extra: &str, rest: &str) -> Gateway {
        let mut gateway = Gateway::unspawned(listeners_extra, server_extra);
        gateway.write_config(rest);
        gateway.spawn(false);
        gateway
    }

    /// A gateway on fresh ephemeral ports, with no config written and no process yet.
    fn unspawned(listeners_extra: &str, server_extra: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let ops: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config_path = dir.path().join("gatehouse.yaml");
        Gateway {
            child: None,
            addr,
            ops,
            dir,
            config_path,
            server_extra: server_extra.to_string(),
            listeners_extra: listeners_extra.to_string(),
        }
    }

    /// Start without waiting for `/readyz` (for tests of readiness itself); waits only until the
    /// ops listener answers.
    pub fn start_unready(rest: &str) -> Gateway {
        let gateway = Gateway::spawned("", "", rest);
        let deadline = Instant::now() + Duration::from_secs(15);
        while try_get(gateway.ops, "/healthz").is_err() {
            assert!(
                Instant::now() < deadline,
                "ops listener did not start:\n{}",
                gateway.stderr()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        gateway
    }

    pub fn render_config(&self, rest: &str) -> String {
        let dir = self.dir.path().display();
        format!(
            "version: 1\nserver:\n  listeners: [{{ name: public, address: \"{addr}\" }}{listeners}]\n  threads: 2\n  grace_period: 2s\n  shutdown_timeout: 1s\n  upgrade_socket: {dir}/upgrade.sock\n  pid_file: {dir}/gatehouse.pid\n{extra}\nops: {{ address: \"{ops}\" }}\ntelemetry: {{ log: {{ format: text, level: warn }}, access_log: {{ path: \"{dir}/access.log\" }} }}\n{rest}\n",
            addr = self.addr,
            ops = self.ops,
            extra = self.server_extra,
            listeners = self.listeners_extra,
        )
    }

    /// Replace the config file (atomically, by rename, as editors and deploy tools do).
    pub fn write_config(&self, rest: &str) {
        let text = self.render_config(rest);
        let temporary = self.dir.path().join(".gatehouse.yaml.new");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, &self.config_path).unwrap();
    }

    pub fn spawn(&mut self, upgrade: bool) {
        let mut command = Command::new(binary());
        command
            .arg("run")
            .arg("-c")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.path().join("stderr.log"))
                    .unwrap(),
            ));
        if upgrade {
            command.arg("--upgrade");
        }
        self.child = Some(command.spawn().expect("start gatehouse"));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, signal: &str) {
        signal_pid(self.pid(), signal);
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(reply) = try_get(self.ops, "/readyz") {
                if reply.status == 200 {
                    // The proxy listener starts with the ops one; make sure it accepts too.
                    if TcpStream::connect(self.addr).is_ok() {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("gatehouse did not become ready; stderr:\n{}", self.stderr());
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> Reply {
        get(self.addr, path)
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        request(self.addr, method, path, headers, body)
    }

    /// The live config version, from `/config`.
    pub fn config_version(&self) -> u64 {
        get(self.ops, "/config").json()["version"].as_u64().unwrap()
    }

    /// Wait until `/config` shows a version above `previous`.
    pub fn wait_for_version_above(&self, previous: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let version = self.config_version();
            if version > previous {
                return version;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "config version stayed at {previous}; stderr:\n{}",
            self.stderr()
        );
    }

    pub fn metrics(&self) -> String {
        String::from_utf8(get(self.ops, "/metrics").body).unwrap()
    }

    /// Wait for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn signal_pid(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// A parsed HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "body is not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// For echo upstream replies: which upstream answered.
    pub fn upstream(&self) -> String {
        self.json()["upstream"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Send raw bytes (which should ask for `Connection: close`) and read the whole response.
pub fn send_raw(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.write_all(raw)?;
    let mut buffer = Vec::new();
    stream.read_to_end(&mut buffer)?;
    parse_response(&buffer)
}

pub fn parse_response(buffer: &[u8]) -> std::io::Result<Reply> {
    let invalid =
        |message: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, message.to_string());
    let head_end = buffer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| {
            invalid(&format!(
                "no response head in {:?}",
                String::from_utf8_lossy(buffer)
            ))
        })?;
    let head = std::str::from_utf8(&buffer[..head_end]).map_err(|_| invalid("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let mut body = buffer[head_end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(name, value)| name == "transfer-encoding" && value.contains("chunked"));
    if chunked {
        let mut decoded = Vec::new();
        let mut rest = body.as_slice();
        loop {
            let line_end = rest
                .windows(2)
                .position(|window| window == b"\r\n")
                .ok_or_else(|| invalid("bad chunk"))?;
            let size = usize::from_str_radix(
                std::str::from_utf8(&rest[..line_end]).unwrap_or("0").trim(),
                16,
            )
            .map_err(|_| invalid("bad chunk size"))?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            decoded.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = decoded;
    }
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\n");
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        raw.push_str("Host: test.local\r\n");
    }
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty()
        && !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("transfer-encoding"))
    {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("Connection: close\r\n\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    raw
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    send_raw(addr, &request_bytes(method, path, headers, body))
        .unwrap_or_else(|error| panic!("{method} {path} failed: {error}"))
}

pub fn try_get(addr: SocketAddr, path: &str) -> std::io::Result<Reply> {
    send_raw(addr, &request_bytes("GET", path, &[], b""))
}

pub fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], b"")
}

/// `gatehouse` with the environment the example configs read their secrets and database from.
pub fn example_command(args: &[&str]) -> Command {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env("GATEHOUSE_API_KEY_SECRET", "an-example-server-secret")
        .env("GATEHOUSE_OAUTH_CLIENT_SECRET", "an-example-client-secret")
        .env("REDIS_PASSWORD", "an-example-redis-password")
        .env(
            "GATEHOUSE_DATABASE_URL",
            "postgres://gatehouse@127.0.0.1/gatehouse",
        );
    command
}

/// Run `gatehouse` with arguments and return (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], dir: &Path) -> (i32, String, String) {
    let output = Command::new(binary())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Run `gatehouse` with arguments and `input` on its stdin; return (exit code, stdout, stderr).
pub fn run_cli_with_stdin(args: &[&str], dir: &Path, input: &str) -> (i32, String, String) {
    let mut child = Command::new(binary())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    // Written from a thread of its own, so a large input cannot block on a full pipe while
    // the output is unread.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A kept-alive HTTP/1.1 connection for sustained load: one GET at a time, the status back.
pub struct KeepAlive {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buffer: Vec<u8>,
}

impl KeepAlive {
    pub fn new(addr: SocketAddr) -> KeepAlive {
        KeepAlive {
            addr,
            stream: None,
            buffer: Vec::with_capacity(4096),
        }
    }

    /// GET `path` and return the status; reconnects when the server closed the connection.
    pub fn get(&mut self, path: &str) -> std::io::Result<u16> {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: gatehouse.test\r\n\r\n");
        for attempt in 0..2 {
            if self.stream.is_none() {
                let stream = TcpStream::connect(self.addr)?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.set_nodelay(true)?;
                self.stream = Some(stream);
            }
            match self.exchange(raw.as_bytes()) {
                Ok((status, keep)) => {
                    if !keep {
                        self.stream = None;
                    }
                    return Ok(status);
                }
                Err(error) if attempt == 0 && self.buffer.is_empty() => {
                    // A kept-alive connection closed by the server before the request: retry once.
                    let _ = error;
                    self.stream = None;
                }
                Err(error) => {
                    self.stream = None;
                    return Err(error);
                }
            }
        }
        unreachable!("the loop returns")
    }

    fn exchange(&mut self, raw: &[u8]) -> std::io::Result<(u16, bool)> {
        let stream = self.stream.as_mut().expect("connected");
        stream.write_all(raw)?;
        self.buffer.clear();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(head_end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buffer[..head_end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|value| value.trim().parse().ok())
                    .ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "no content-length")
                    })?;
                if self.buffer.len() >= head_end + 4 + length {
                    let status = head
                        .split(' ')
                        .nth(1)
                        .and_then(|code| code.parse().ok())
                        .unwrap_or(0);
                    let keep = !head.contains("connection: close");
                    return Ok((status, keep));
                }
            }
            let read = stream.read(&mut chunk)?;
            if read == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }
}
