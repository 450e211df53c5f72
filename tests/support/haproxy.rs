//! HAProxy as the tests run it: the L4 balancer in front of Gatehouse (edge and fleet tests).

use std::process::{Child, Command, Stdio};

/// A HAProxy on `config` (checked with `haproxy -c` first), stopped with the test.
pub struct Haproxy {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    pub fn start(config: &str) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("haproxy is installed (make test installs it)");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Haproxy { child, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
