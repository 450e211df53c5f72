//! PostgreSQL for the config-store tests: a fresh database per test (dropped at the end), and a
//! TCP relay in front of the server that a test can cut and restore, to take the database away
//! from a running gateway without touching the server other tests use.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The server the tests use; its `postgres` database is where test databases are created.
pub fn server_url() -> String {
    std::env::var("GATEHOUSE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of the test's own, with the config store migrated in.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub fn create() -> TestDatabase {
        let name = format!(
            "gatehouse_test_{}_{}",
            std::process::id(),
            fastrand::u32(..)
        );
        let mut admin = postgres::Client::connect(&server_url(), postgres::NoTls)
            .expect("PostgreSQL runs (make test starts it)");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let base = server_url();
        let url = format!("{}/{name}", &base[..base.rfind('/').unwrap()]);
        let database = TestDatabase { name, url };
        let (code, _, stderr) = super::run_cli(
            &["migrate", "--database-url", &database.url],
            std::path::Path::new("."),
        );
        assert_eq!(code, 0, "migrate: {stderr}");
        database
    }

    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }

    pub fn execute(&self, sql: &str) {
        self.client()
            .batch_execute(sql)
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }

    /// Stores `yaml` as a new version with `gatehouse config push`.
    pub fn push(&self, yaml: &str) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pushed.yaml");
        std::fs::write(&file, yaml).unwrap();
        let (code, stdout, stderr) = super::run_cli(
            &[
                "config",
                "push",
                file.to_str().unwrap(),
                "--database-url",
                &self.url,
                "--comment",
                "test",
            ],
            dir.path(),
        );
        assert_eq!(code, 0, "config push: {stdout}{stderr}");
    }

    /// (status, error) of a `config_versions` row.
    pub fn version_status(&self, id: i64) -> (String, Option<String>) {
        let row = self
            .client()
            .query_one(
                "SELECT status, error FROM config_versions WHERE id = $1",
                &[&id],
            )
            .unwrap();
        (row.get(0), row.get(1))
    }

    pub fn latest_version(&self) -> i64 {
        self.client()
            .query_one("SELECT coalesce(max(id), 0) FROM config_versions", &[])
            .unwrap()
            .get(0)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&server_url(), postgres::NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// A TCP relay to the PostgreSQL server. `cut` closes every relayed connection and refuses new
/// ones (as a stopped server would); `pause` keeps connections open but holds every byte (as a
/// black-holed network would); `restore` lets traffic through again.
pub struct Relay {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let paused = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let relay = Relay {
            addr,
            open: open.clone(),
            paused: paused.clone(),
            connections: connections.clone(),
        };
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !open.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                {
                    let mut open_connections = connections.lock().unwrap();
                    open_connections.push(client.try_clone().unwrap());
                    open_connections.push(server.try_clone().unwrap());
                }
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    paused.clone(),
                );
                pipe(server, client, paused.clone());
            }
        });
        relay
    }

    /// The URL of `database` reached through this relay.
    pub fn url(&self, database: &TestDatabase) -> String {
        format!("postgres://postgres@{}/{}", self.addr, database.name)
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }

    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.open.store(true, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, paused: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    while paused.load(Ordering::SeqCst) {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    if to.write_all(&buffer[..read]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// The server's address, for a relay.
pub fn server_addr() -> SocketAddr {
    let url = server_url();
    let host_port = url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5432");
    host_port
        .parse()
        .unwrap_or_else(|_| "127.0.0.1:5432".parse().unwrap())
}
