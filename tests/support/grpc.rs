//! The gRPC peers: `tests/grpc/peer.py`, a `grpcio` server of the example service
//! (conf/grpc/echo.proto) and a `grpcio` client that reports the status a call ended
//! with. Python is `GATEHOUSE_PYTHON` (set by `make test` to its virtual environment with
//! grpcio), else `python3`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};

/// The example descriptor set, with the `Echo` service only.
pub fn descriptor() -> PathBuf {
    example("echo.pb")
}

/// The example descriptor set with the `Extra` service added.
pub fn descriptor_extra() -> PathBuf {
    example("echo-extra.pb")
}

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("conf/grpc")
        .join(name)
}

/// The hex SHA-256 of a file.
pub fn sha256(path: &std::path::Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn python() -> Command {
    super::python("grpc/peer.py")
}

/// The example service, serving both services, on 127.0.0.1; it stops when dropped.
pub struct GrpcServer {
    child: Child,
    pub addr: SocketAddr,
}

impl GrpcServer {
    pub fn start() -> GrpcServer {
        let descriptor = descriptor_extra();
        let (child, addr) =
            super::spawn_python_peer("grpc/peer.py", &["server".as_ref(), descriptor.as_os_str()]);
        GrpcServer { child, addr }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        super::stop_python_peer(&mut self.child);
    }
}

/// How a call ended, as the `grpcio` client saw it.
#[derive(Debug)]
pub struct Outcome {
    /// The status name, e.g. `OK`, `UNAUTHENTICATED`.
    pub code: String,
    pub details: String,
    /// The replies, in the proto3 JSON mapping.
    pub replies: Vec<serde_json::Value>,
    /// From the call's start to its end.
    pub ms: f64,
}

/// One call through `target` (h2c), `method` as `/package.Service/Method`, the request as
/// JSON; `extra`: `--timeout S`, `--metadata K=V`, `--stream`.
pub fn call(target: SocketAddr, method: &str, request: &str, extra: &[&str]) -> Outcome {
    let output = python()
        .arg("client")
        .arg(descriptor_extra())
        .arg(target.to_string())
        .arg(method)
        .arg(request)
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "client output {text:?}, stderr {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    Outcome {
        code: value["code"].as_str().unwrap().to_string(),
        details: value["details"].as_str().unwrap().to_string(),
        replies: value["replies"].as_array().unwrap().clone(),
        ms: value["ms"].as_f64().unwrap(),
    }
}
