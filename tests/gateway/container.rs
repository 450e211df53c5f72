//! The container image as far as it runs without a container engine: its config
//! (`conf/container.yaml`, copied by the Dockerfile) and its entrypoint (`tini -- gatehouse run`),
//! its health check (`gatehouse health`) and the signals an orchestrator sends through tini.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{binary, free_port, get, spawn_echo};

/// `conf/container.yaml` on free ports, with its runtime files in `dir`.
fn container_config(dir: &std::path::Path, public: u16, ops: u16) -> String {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/container.yaml"))
        .unwrap();
    let edited = text
        .replace("0.0.0.0:8080", &format!("0.0.0.0:{public}"))
        .replace("0.0.0.0:9901", &format!("0.0.0.0:{ops}"))
        .replace("/run/gatehouse/", &format!("{}/", dir.display()));
    for wanted in [
        format!("0.0.0.0:{public}"),
        format!("0.0.0.0:{ops}"),
        format!("{}/upgrade.sock", dir.display()),
    ] {
        assert!(
            edited.contains(&wanted),
            "conf/container.yaml changed shape: {text}"
        );
    }
    edited
}

fn health(ops: SocketAddr) -> (bool, String) {
    let output = Command::new(binary())
        .args(["health", "--address", &ops.to_string(), "--timeout", "1s"])
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_container_config_serves_every_interface_routes_nowhere_and_obeys_signals_through_tini() {
    let dir = tempfile::tempdir().unwrap();
    let (public, ops) = (free_port(), free_port());
    let config = dir.path().join("gatehouse.yaml");
    std::fs::write(&config, container_config(dir.path(), public, ops)).unwrap();

    let validate = Command::new(binary())
        .arg("validate")
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        validate.status.success(),
        "{}",
        String::from_utf8_lossy(&validate.stdout)
    );

    // The image's entrypoint, as the Dockerfile writes it.
    let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut child = Command::new("tini")
        .arg("--")
        .arg(binary())
        .arg("run")
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("tini is installed (make test installs it)");
    let logs = || std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();

    // The HEALTHCHECK command: unhealthy until ready, then healthy.
    let ops_address: SocketAddr = format!("127.0.0.1:{ops}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !health(ops_address).0 {
        assert!(Instant::now() < deadline, "never healthy:\n{}", logs());
        std::thread::sleep(Duration::from_millis(50));
    }

    // 0.0.0.0 is every interface: a loopback address other than 127.0.0.1 reaches both
    // listeners (one bound to 127.0.0.1 would refuse it), as a published port's traffic would.
    let other: SocketAddr = format!("127.0.0.2:{public}").parse().unwrap();
    let reply = get(other, "/anything");
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        reply.json()["type"],
        "urn:gatehouse:problem:route-not-found"
    );
    assert!(
        reply.header("x-request-id").is_some(),
        "{:?}",
        reply.headers
    );
    let ready = get(format!("127.0.0.2:{ops}").parse().unwrap(), "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.text());

    // Nothing listening: the health check fails, and says why.
    let (healthy, message) = health(format!("127.0.0.1:{}", free_port()).parse().unwrap());
    assert!(!healthy);
    assert!(message.contains("gatehouse health"), "{message}");

    // The operator's config, mounted over the default, applies on SIGHUP (through tini).
    let echo = spawn_echo("echo");
    let mounted = std::fs::read_to_string(&config).unwrap().replace(
        "routes: []",
        &format!(
            "upstreams: [{{ name: echo, targets: [{{ address: \"{echo}\" }}] }}]\nroutes:\n  - {{ name: all, match: {{ paths: [{{ prefix: / }}] }}, upstream: echo }}"
        ),
    );
    let temporary = dir.path().join(".new.yaml");
    std::fs::write(&temporary, mounted).unwrap();
    std::fs::rename(&temporary, &config).unwrap();
    crate::support::signal_pid(child.id(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(other, "/anything").status != 200 {
        assert!(
            Instant::now() < deadline,
            "the new config never applied:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // SIGTERM to tini (what `docker stop` sends to PID 1): Gatehouse drains and exits 0, and
    // so does tini, well inside Docker's 10 s before SIGKILL.
    let stopped = Instant::now();
    crate::support::signal_pid(child.id(), "TERM");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}:\n{}", logs());
    assert!(
        std::net::TcpStream::connect_timeout(&other, Duration::from_millis(200)).is_err(),
        "the listener is closed"
    );
}
