//! The WebSocket peers: `tests/websocket/peer.py`, an echo server and clients of the
//! `websockets` library. Python is `GATEHOUSE_PYTHON` (set by `make test`), else `python3`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

fn python() -> Command {
    super::python("websocket/peer.py")
}

/// An echo server on 127.0.0.1; it stops when dropped.
pub struct EchoServer {
    child: Child,
    pub addr: SocketAddr,
}

impl EchoServer {
    pub fn start() -> EchoServer {
        let (child, addr) = super::spawn_python_peer("websocket/peer.py", &["server".as_ref()]);
        EchoServer { child, addr }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        super::stop_python_peer(&mut self.child);
    }
}

/// Runs a client (`echo URL N`, `wait URL [EVERY]`) in the background.
pub fn client(args: &[&str]) -> Child {
    python()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// What a client printed, as JSON.
pub fn outcome(child: Child) -> serde_json::Value {
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "client output {text:?}, stderr {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}
