//! The PostgreSQL config source through the real binary and a real PostgreSQL: each test has a
//! database of its own. Changes are committed with SQL, as an operator or the admin service
//! would, and observed through the proxy.

use std::time::{Duration, Instant};

use crate::support::pg::{server_addr, Relay, TestDatabase};
use crate::support::{get, run_cli, spawn_echo, Gateway};

/// Two upstreams and one route whose response names the config (`x-config`), so a client can
/// tell which version served it.
fn routes_yaml(a: std::net::SocketAddr, b: std::net::SocketAddr) -> String {
    format!(
        r#"version: 1
upstreams:
  - {{ name: a, targets: [{{ address: "{a}" }}] }}
  - {{ name: b, targets: [{{ address: "{b}" }}] }}
routes:
  - name: main
    match: {{ paths: [{{ prefix: / }}] }}
    upstream: a
    filters: [{{ kind: response_headers, config: {{ set: {{ x-config: a-0 }} }} }}]
"#
    )
}

/// The `config:` section of a postgres-mode node.
/// The resync is 1 s unless `extra` sets it.
fn source(url: &str, extra: &str) -> String {
    let resync = if extra.contains("resync_interval") {
        ""
    } else {
        ", resync_interval: 1s"
    };
    format!("config: {{ source: postgres, postgres: {{ url: \"{url}\"{resync}{extra} }} }}")
}

fn seeded() -> (TestDatabase, std::net::SocketAddr, std::net::SocketAddr) {
    let database = TestDatabase::create();
    let a = spawn_echo("a");
    let b = spawn_echo("b");
    database.push(&routes_yaml(a, b));
    (database, a, b)
}

/// One transaction: route `main` to `upstream` and mark its responses `marker`.
fn change(client: &mut postgres::Client, upstream: &str, marker: &str) {
    let mut transaction = client.transaction().unwrap();
    transaction
        .execute(
            "UPDATE routes SET upstream = $1 WHERE name = 'main'",
            &[&upstream],
        )
        .unwrap();
    transaction
        .execute(
            "UPDATE filters SET config = jsonb_build_object('set', jsonb_build_object('x-config', $1::text)) WHERE route = 'main' AND kind = 'response_headers'",
            &[&marker],
        )
        .unwrap();
    transaction.commit().unwrap();
}

/// Whether the latest version's document in `config_snapshots` is what the gateway's own load
/// query reads (the migration keeps a copy of that query's document part).
fn snapshot_matches_load(database: &TestDatabase) -> bool {
    let load = include_str!("../../sql/queries/load_config.sql")
        .trim_end()
        .trim_end_matches(';');
    let query = format!(
        "SELECT snapshot.document = loaded.config FROM ({load}) AS loaded \
         JOIN config_snapshots AS snapshot ON snapshot.version_id = loaded.version_id"
    );
    database.client().query_one(&query, &[]).unwrap().get(0)
}

/// The kept document of `version`.
fn snapshot(database: &TestDatabase, version: i64) -> serde_json::Value {
    let text: String = database
        .client()
        .query_one(
            "SELECT document::text FROM config_snapshots WHERE version_id = $1",
            &[&version],
        )
        .unwrap()
        .get(0);
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_version_keeps_the_document_it_committed() {
    let (database, _, _) = seeded();
    let first = database.latest_version();
    let mut client = database.client();
    // A change in plain SQL, as an operator would make it.
    change(&mut client, "b", "b-1");
    let second = database.latest_version();
    assert!(second > first);
    // A change rolled back leaves neither a version nor a document.
    let mut transaction = client.transaction().unwrap();
    transaction
        .execute("UPDATE routes SET upstream = 'a' WHERE name = 'main'", &[])
        .unwrap();
    transaction.rollback().unwrap();
    assert_eq!(database.latest_version(), second);

    let main = |document: &serde_json::Value| document["routes"][0].clone();
    let before = main(&snapshot(&database, first));
    assert_eq!(before["upstream"], "a");
    assert_eq!(before["filters"][0]["config"]["set"]["x-config"], "a-0");
    let after = main(&snapshot(&database, second));
    assert_eq!(after["upstream"], "b");
    assert_eq!(after["filters"][0]["config"]["set"]["x-config"], "b-1");
    assert!(snapshot_matches_load(&database));
    let (versions, snapshots): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM config_versions), (SELECT count(*) FROM config_snapshots)",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(versions, snapshots);
}

fn config_report(gateway: &Gateway) -> serde_json::Value {
    get(gateway.ops, "/config").json()
}

#[test]
fn migrations_are_idempotent_and_recorded() {
    let database = TestDatabase::create();
    let (code, stdout, stderr) = run_cli(
        &["migrate", "--database-url", &database.url],
        std::path::Path::new("."),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("up to date"), "{stdout}");
    let applied: i64 = database
        .client()
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .unwrap()
        .get(0);
    assert_eq!(applied, 3);
    // A migration in a schema of its own: created, and kept apart from the public one.
    let (code, stdout, stderr) = run_cli(
        &[
            "migrate",
            "--database-url",
            &database.url,
            "--schema",
            "tenant_a",
        ],
        std::path::Path::new("."),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("applied 0001_config_store, 0002_config_history, 0003_admin"),
        "{stdout}"
    );
    let tables: i64 = database
        .client()
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'tenant_a' AND table_name IN ('routes', 'upstreams', 'config_versions', 'config_snapshots', 'admin_tokens', 'admin_audit', 'config_nodes')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tables, 7);
}

/// `gatehouse validate` of a file, with the secrets the examples read from the environment.
fn validated_hash(file: &std::path::Path) -> String {
    let output = crate::support::example_command(&["validate", file.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}: {stdout}{}",
        file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .split("hash ")
        .nth(1)
        .unwrap()
        .trim_end_matches([')', '\n'])
        .to_string()
}

#[test]
fn push_then_pull_gives_the_same_config() {
    let database = TestDatabase::create();
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![std::path::PathBuf::from(format!(
        "{root}/conf/gatehouse.yaml"
    ))];
    for entry in std::fs::read_dir(format!("{root}/conf/examples")).unwrap() {
        files.push(entry.unwrap().path());
    }
    for file in files {
        let output = crate::support::example_command(&[
            "config",
            "push",
            file.to_str().unwrap(),
            "--database-url",
            &database.url,
        ])
        .output()
        .unwrap();
        assert!(
            output.status.success(),
            "push {}: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let (code, pulled, stderr) = run_cli(
            &["config", "pull", "--database-url", &database.url],
            dir.path(),
        );
        assert_eq!(code, 0, "{stderr}");
        // Secret references are stored as written, never resolved.
        assert!(!pulled.contains("an-example-server-secret"), "{pulled}");
        let pulled_file = dir.path().join("pulled.yaml");
        std::fs::write(&pulled_file, &pulled).unwrap();
        assert_eq!(
            validated_hash(&file),
            validated_hash(&pulled_file),
            "{} changed on the way through the database:\n{pulled}",
            file.display()
        );
        // The version's kept document is the one the gateway loads.
        assert!(
            snapshot_matches_load(&database),
            "{}: config_snapshots differs from load_config.sql",
            file.display()
        );
    }
    // A file that does not compile is refused before anything is stored.
    let before = database.latest_version();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "version: 1\nroutes: [{ name: r, match: { paths: [{ prefix: / }] }, upstream: nowhere }]\n",
    )
    .unwrap();
    let (code, _, stderr) = run_cli(
        &[
            "config",
            "push",
            broken.to_str().unwrap(),
            "--database-url",
            &database.url,
        ],
        dir.path(),
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("nothing stored") && stderr.contains("nowhere"),
        "{stderr}"
    );
    assert_eq!(database.latest_version(), before);
}

#[test]
fn committed_changes_reach_the_gateway_quickly() {
    let (database, _, _) = seeded();
    // No periodic resync during the test: every change must come by its notification.
    let gateway = Gateway::start(&source(&database.url, ", resync_interval: 1h"));
    assert_eq!(get(gateway.addr, "/x").header("x-config"), Some("a-0"));
    let mut client = database.client();
    let mut delays = Vec::new();
    for round in 1..=50 {
        let marker = format!("a-{round}");
        let committed = Instant::now();
        change(&mut client, "a", &marker);
        loop {
            let reply = get(gateway.addr, "/x");
            if reply.header("x-config") == Some(marker.as_str()) {
                break;
            }
            assert!(
                committed.elapsed() < Duration::from_secs(10),
                "change {round} never arrived"
            );
        }
        delays.push(committed.elapsed());
    }
    delays.sort();
    let p50 = delays[delays.len() / 2];
    let p99 = delays[(delays.len() * 99).div_ceil(100) - 1];
    println!(
        "COMMIT to first request served under the new config, 50 changes: p50 {p50:?}, p99 {p99:?}, max {:?}",
        delays.last().unwrap()
    );
    let report = config_report(&gateway);
    assert_eq!(
        report["source"].as_str().unwrap().split(':').next(),
        Some("postgres")
    );
    let database_report = &report["database"];
    assert_eq!(database_report["state"], "up");
    assert_eq!(
        database_report["applied_version"].as_i64(),
        Some(database.latest_version())
    );
    assert_eq!(database_report["versions_behind"], 0);
    // The node records the outcome just after it swaps the config in.
    let latest = database.latest_version();
    let deadline = Instant::now() + Duration::from_secs(10);
    while database.version_status(latest).0 != "applied" {
        assert!(
            Instant::now() < deadline,
            "version {latest} was never marked applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let metrics = gateway.metrics();
    assert!(
        metrics.contains("gatehouse_config_source_up{source=\"postgres\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_hundred_changes_under_load_fail_no_request_and_never_mix_versions() {
    let (database, _, _) = seeded();
    let gateway = Gateway::start(&source(&database.url, ""));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let address = gateway.addr;
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut served, mut failed, mut mixed) = (0u64, Vec::new(), Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match crate::support::try_get(address, "/x") {
                        Ok(reply) if reply.status == 200 => {
                            served += 1;
                            // Upstream and marker change in one transaction: they must agree.
                            let marker = reply.header("x-config").unwrap_or("").to_string();
                            if !marker.starts_with(&format!("{}-", reply.upstream())) {
                                mixed.push(format!("{} via {}", marker, reply.upstream()));
                            }
                        }
                        Ok(reply) => failed.push(format!("status {}", reply.status)),
                        Err(error) => failed.push(error.to_string()),
                    }
                }
                (served, failed, mixed)
            })
        })
        .collect();
    let mut client = database.client();
    for round in 1..=100 {
        let upstream = if round % 2 == 0 { "a" } else { "b" };
        change(&mut client, upstream, &format!("{upstream}-{round}"));
        // Also a change of an upstream's targets and of a rate limit now and then.
        if round % 10 == 0 {
            client
                .batch_execute(
                    "UPDATE targets SET weight = coalesce(weight, 1) % 5 + 1 WHERE upstream = 'b'",
                )
                .unwrap();
            client
                .batch_execute(&format!(
                    "INSERT INTO filters (route, kind, config) VALUES ('main', 'rate_limit', '{{\"policies\": [{{\"name\": \"r{round}\", \"key\": [\"route\"], \"capacity\": 1000000, \"refill\": {{\"tokens\": 1000000, \"every\": \"1s\"}}}}]}}')"
                ))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let (served, failed, mixed) = client.join().unwrap();
        total += served;
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        assert!(mixed.is_empty(), "responses mixing two versions: {mixed:?}");
    }
    println!("{total} requests served across 110 committed changes, none failed");
    assert!(total > 100);
    // The last change arrives (a busy machine can delay it past the clients' stop).
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(gateway.addr, "/x").header("x-config") != Some("a-100") {
        assert!(Instant::now() < deadline, "the last change never arrived");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_invalid_version_is_rejected_recorded_and_the_old_one_keeps_serving() {
    let (database, _, _) = seeded();
    let gateway = Gateway::start(&source(&database.url, ""));
    database.execute(
        "UPDATE routes SET match = '{\"paths\": [{\"regex\": \"(unclosed\"}]}' WHERE name = 'main'",
    );
    let version = database.latest_version();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, error) = database.version_status(version);
        if status == "rejected" {
            let error = error.unwrap();
            assert!(error.contains("routes[0].match"), "{error}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "version {version} stays {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(gateway.addr, "/x").header("x-config"), Some("a-0"));
    assert!(gateway
        .metrics()
        .contains("gatehouse_config_reloads_total{result=\"rejected\"} 1"));
    assert_eq!(
        config_report(&gateway)["database"]["last_rejected_version"].as_i64(),
        Some(version)
    );
}

#[test]
fn losing_postgres_keeps_serving_and_catches_up_after() {
    let (database, _, _) = seeded();
    let relay = Relay::start(server_addr());
    let gateway = Gateway::start(&source(&relay.url(&database), ""));
    assert_eq!(get(gateway.addr, "/x").header("x-config"), Some("a-0"));
    relay.cut();
    // A change committed while the node cannot see the database.
    change(&mut database.client(), "b", "b-1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while config_report(&gateway)["database"]["state"] != "down" {
        assert!(Instant::now() < deadline, "the loss was not noticed");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..20 {
        let reply = get(gateway.addr, "/x");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-config"), Some("a-0"));
    }
    assert_eq!(get(gateway.ops, "/readyz").status, 200, "still ready");
    assert!(gateway
        .metrics()
        .contains("gatehouse_config_source_up{source=\"postgres\"} 0"));
    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(gateway.addr, "/x").header("x-config") != Some("b-1") {
        assert!(Instant::now() < deadline, "the node did not catch up");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(gateway.addr, "/x").upstream(), "b");
    assert_eq!(config_report(&gateway)["database"]["state"], "up");
}

#[test]
fn a_black_holed_postgres_is_noticed_within_the_timeout_and_serving_goes_on() {
    let (database, _, _) = seeded();
    let relay = Relay::start(server_addr());
    let gateway = Gateway::start(&source(&relay.url(&database), ", connect_timeout: 1s"));
    assert_eq!(get(gateway.addr, "/x").header("x-config"), Some("a-0"));
    // Packets vanish but no connection is closed: only the query deadline can tell.
    relay.pause();
    change(&mut database.client(), "b", "b-1");
    let paused = Instant::now();
    while config_report(&gateway)["database"]["state"] != "down" {
        assert!(
            paused.elapsed() < Duration::from_secs(10),
            "a silent database was never noticed"
        );
        let reply = get(gateway.addr, "/x");
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-config"), Some("a-0"));
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("black-holed database noticed after {:?}", paused.elapsed());
    assert_eq!(get(gateway.ops, "/readyz").status, 200);
    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(15);
    while get(gateway.addr, "/x").header("x-config") != Some("b-1") {
        assert!(Instant::now() < deadline, "the node did not catch up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_cold_start_without_postgres_serves_the_snapshot_file_or_is_not_ready() {
    let (database, _, _) = seeded();
    let snapshot_dir = tempfile::tempdir().unwrap();
    let snapshot = snapshot_dir.path().join("last-good.json");
    let snapshot_setting = format!(", snapshot_path: \"{}\"", snapshot.display());
    {
        let first = Gateway::start(&source(&database.url, &snapshot_setting));
        assert_eq!(get(first.addr, "/x").header("x-config"), Some("a-0"));
    }
    assert!(snapshot.exists(), "the node wrote its last good config");
    // The database is out of reach when the next node starts: it serves the file.
    let relay = Relay::start(server_addr());
    relay.cut();
    let second = Gateway::start(&source(&relay.url(&database), &snapshot_setting));
    assert_eq!(get(second.addr, "/x").header("x-config"), Some("a-0"));
    assert!(
        second
            .stderr()
            .contains("booted from the last good config snapshot"),
        "{}",
        second.stderr()
    );
    assert_eq!(
        config_report(&second)["database"]["booted_from_snapshot"],
        true
    );
    // The file holds the database's document as written, readable by this user only.
    let saved = std::fs::read_to_string(&snapshot).unwrap();
    assert!(
        saved.contains("\"database_version\"") && !saved.contains("\"server\""),
        "{saved}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&snapshot).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "snapshot file mode {mode:o}");
    }
    // Once the database answers, its version replaces the file's.
    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(15);
    while config_report(&second)["database"]["booted_from_snapshot"] != false {
        assert!(
            Instant::now() < deadline,
            "the node stayed on its snapshot file"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!config_report(&second)["source"]
        .as_str()
        .unwrap()
        .contains("snapshot file"));
    let dead = format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        crate::support::free_port(),
        database.name
    );

    // Neither the database nor a snapshot: up, but not ready, and every request gets 503.
    let third = Gateway::start_unready(&source(&dead, ""));
    std::thread::sleep(Duration::from_millis(300));
    let ready = get(third.ops, "/readyz");
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["config_loaded"], false);
    let reply = get(third.addr, "/x");
    assert_eq!(reply.status, 503);
    assert!(
        reply.text().contains("config-not-loaded"),
        "{}",
        reply.text()
    );
}

#[test]
fn the_periodic_resync_catches_a_missed_notification() {
    let (database, _, _) = seeded();
    let gateway = Gateway::start(&source(&database.url, ""));
    let version_before = config_report(&gateway)["database"]["applied_version"].clone();
    // Triggers off for this session: the change lands without a version and without NOTIFY.
    let mut client = database.client();
    client
        .batch_execute("SET session_replication_role = replica")
        .unwrap();
    change(&mut client, "b", "b-silent");
    let committed = Instant::now();
    while get(gateway.addr, "/x").header("x-config") != Some("b-silent") {
        assert!(
            committed.elapsed() < Duration::from_secs(10),
            "the resync never picked the change up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // No version was written, so no notification was sent: the resync found the new document.
    assert_eq!(
        config_report(&gateway)["database"]["applied_version"],
        version_before
    );
}

#[test]
fn tls_require_never_falls_back_to_plaintext() {
    let database = TestDatabase::create();
    // A CA that did not sign the server's certificate: the connection must fail, not go on
    // without TLS or without verification.
    let authority = rcgen::generate_simple_self_signed(vec!["elsewhere.test".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, authority.cert.pem()).unwrap();
    let gateway = Gateway::start_unready(&source(
        &database.url,
        &format!(", tls: {{ mode: require, ca_file: \"{}\" }}", ca.display()),
    ));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(get(gateway.ops, "/readyz").status, 503);
    let stderr = gateway.stderr();
    assert!(
        stderr.contains("cannot read the config from PostgreSQL at start"),
        "{stderr}"
    );
    // The reason is TLS itself (an unknown issuer, or a server without TLS), never a fallback.
    let reason = stderr.to_ascii_lowercase();
    assert!(
        reason.contains("certificate") || reason.contains("tls") || reason.contains("ssl"),
        "{stderr}"
    );
    // sslmode in the URL is refused: TLS is set in one place only.
    let config = dir.path().join("gatehouse.yaml");
    std::fs::write(
        &config,
        format!(
            "version: 1\n{}\n",
            source(&format!("{}?sslmode=prefer", database.url), "")
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["validate", config.to_str().unwrap()], dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("config.postgres.url") && stderr.contains("sslmode"),
        "{stderr}"
    );
}

/// A route with the `headers` and `rewrite` kinds; its upstream is `UPSTREAM`.
const TRANSFORM_ROUTE: &str = r#"version: 1
upstreams: [{ name: up, targets: [{ address: "UPSTREAM" }] }]
routes:
  - name: transform
    match: { paths: [{ regex: "^/shop/(?P<item>[a-z]+)$" }] }
    upstream: up
    filters:
      - kind: rewrite
        config:
          path: { regex: "^/shop/(?P<item>[a-z]+)$", replacement: "/items/${item}" }
          query: { set: { source: gateway }, remove: [debug] }
          host: { set: items.internal }
      - kind: headers
        config:
          request: { set: { x-item: "${path.item}" }, append: { x-list: gatehouse }, rename: { x-old: x-new } }
          response: { remove: [x-internal], set: { x-served-by: gatehouse } }
      - kind: json_body
        config:
          max_body_bytes: 64KiB
          request:
            - { op: set, path: /item, value: "${path.item}" }
            - { op: set, path: /meta, value: { zeta: 1, alpha: [true, null, "${method}"] } }
            - { op: rename, from: /qty, path: /quantity }
          response: [{ op: remove, path: /internal }]
"#;

/// The `headers`, `rewrite` and `json_body` kinds go into the store and come out unchanged (push, pull,
/// and the pulled file pushed again), and a node reading the store applies them.
#[test]
fn transform_filters_survive_the_store() {
    let database = TestDatabase::create();
    let upstream = crate::support::recorder::Recorder::start(&[("X-Internal", "secret")], "ok");
    let yaml = TRANSFORM_ROUTE.replace("UPSTREAM", &upstream.address.to_string());
    database.push(&yaml);
    let stored = |database: &TestDatabase| -> Vec<(String, serde_json::Value)> {
        database
            .client()
            .query(
                "SELECT kind, config::text FROM filters WHERE route = 'transform' ORDER BY position",
                &[],
            )
            .unwrap()
            .iter()
            .map(|row| {
                let config: String = row.get(1);
                (row.get(0), serde_json::from_str(&config).unwrap())
            })
            .collect()
    };
    let written: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    let written_filters: Vec<(String, serde_json::Value)> = written["routes"][0]["filters"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|filter| {
            (
                filter["kind"].as_str().unwrap().to_string(),
                serde_json::to_value(&filter["config"]).unwrap(),
            )
        })
        .collect();
    assert_eq!(stored(&database), written_filters);

    let dir = tempfile::tempdir().unwrap();
    let (code, pulled, stderr) = run_cli(
        &["config", "pull", "--database-url", &database.url],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    let pulled_value: serde_yaml::Value = serde_yaml::from_str(&pulled).unwrap();
    assert_eq!(
        pulled_value["routes"][0]["filters"], written["routes"][0]["filters"],
        "{pulled}"
    );
    // The pulled file, pushed again, stores the same rows.
    database.push(&pulled);
    assert_eq!(stored(&database), written_filters);

    let gateway = Gateway::start(&source(&database.url, ""));
    let reply = crate::support::request(
        gateway.addr,
        "GET",
        "/shop/lamp?debug=1&colour=red",
        &[("X-Old", "o"), ("X-List", "a")],
        b"",
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-internal"), None);
    assert_eq!(reply.header("x-served-by"), Some("gatehouse"));
    let received = upstream.last();
    assert_eq!(received.target, "/items/lamp?colour=red&source=gateway");
    assert_eq!(received.header("host"), Some("items.internal"));
    assert_eq!(received.header("x-item"), Some("lamp"));
    assert_eq!(received.header("x-list"), Some("a, gatehouse"));
    assert_eq!(received.header("x-new"), Some("o"));

    let reply = crate::support::request(
        gateway.addr,
        "POST",
        "/shop/lamp",
        &[("Content-Type", "application/json")],
        br#"{"qty":2,"colour":"red"}"#,
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        String::from_utf8_lossy(&upstream.last().body),
        r#"{"colour":"red","item":"lamp","meta":{"zeta":1,"alpha":[true,null,"POST"]},"quantity":2}"#
    );
}

/// This node's row in `config_nodes`: (applied_version, rejected_version, rejected_error,
/// ops_address), or `None` before it wrote one.
type NodeRow = (Option<i64>, Option<i64>, Option<String>, Option<String>);

fn node_row(database: &TestDatabase, node: &str) -> Option<NodeRow> {
    database
        .client()
        .query_opt(
            "SELECT applied_version, rejected_version, rejected_error, ops_address FROM config_nodes WHERE node = $1",
            &[&node],
        )
        .unwrap()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
}

/// Waits until the node's row satisfies `done`, and returns it.
fn wait_for_node(
    database: &TestDatabase,
    node: &str,
    what: &str,
    done: impl Fn(&NodeRow) -> bool,
) -> NodeRow {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = node_row(database, node);
        if let Some(row) = row.as_ref().filter(|row| done(row)) {
            return row.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: config_nodes has {row:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn each_node_records_what_it_serves_and_what_it_refused_in_config_nodes() {
    let (database, _, _) = seeded();
    let first = database.latest_version();
    let gateway = Gateway::start(&source(&database.url, ", node_name: node-a"));
    let ops = gateway.ops.to_string();
    let (applied, rejected, error, ops_address) =
        wait_for_node(&database, "node-a", "the first version", |row| {
            row.0 == Some(first)
        });
    assert_eq!(applied, Some(first));
    assert_eq!((rejected, error), (None, None));
    assert_eq!(ops_address.as_deref(), Some(ops.as_str()));
    assert_eq!(database.version_status(first).0, "applied");

    // A version that does not compile: refused, and the node still serves the one it had.
    database.execute("INSERT INTO filters (route, kind) VALUES ('main', 'no_such_filter')");
    let broken = database.latest_version();
    assert!(broken > first);
    let (applied, _, error, ops_address) =
        wait_for_node(&database, "node-a", "the refused version", |row| {
            row.1 == Some(broken)
        });
    assert_eq!(applied, Some(first));
    let error = error.unwrap();
    assert!(
        error.contains("routes[0].filters[1].kind: unknown filter kind \"no_such_filter\""),
        "{error}"
    );
    assert_eq!(ops_address.as_deref(), Some(ops.as_str()));
    assert_eq!(database.version_status(broken).0, "rejected");
    assert_eq!(get(gateway.addr, "/x").header("x-config"), Some("a-0"));

    // A later good version is served, and the refusal is no longer news.
    database.execute("DELETE FROM filters WHERE kind = 'no_such_filter'");
    let fixed = database.latest_version();
    assert!(fixed > broken);
    let row = wait_for_node(&database, "node-a", "the fixed version", |row| {
        row.0 == Some(fixed)
    });
    assert_eq!(row, (Some(fixed), None, None, Some(ops.clone())));
}

#[test]
fn a_node_without_an_ops_listener_records_no_address() {
    let (database, _, _) = seeded();
    let version = database.latest_version();
    let gateway = Gateway::start_without_ops(&source(&database.url, ", node_name: node-quiet"));
    let row = wait_for_node(&database, "node-quiet", "the first version", |row| {
        row.0 == Some(version)
    });
    assert_eq!(row, (Some(version), None, None, None));
    // It serves all the same.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match crate::support::try_get(gateway.addr, "/x") {
            Ok(reply) => {
                assert_eq!(reply.header("x-config"), Some("a-0"));
                break;
            }
            Err(error) => assert!(Instant::now() < deadline, "{error}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The document the load query reads (what the admin service validates before it commits).
fn loaded_document(database: &TestDatabase) -> String {
    let load = include_str!("../../sql/queries/load_config.sql")
        .trim_end()
        .trim_end_matches(';');
    database
        .client()
        .query_one(&format!("SELECT config::text FROM ({load}) AS loaded"), &[])
        .unwrap()
        .get(0)
}

#[test]
fn the_database_document_validates_from_stdin() {
    let (database, _, _) = seeded();
    let document = loaded_document(&database);
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = crate::support::run_cli_with_stdin(
        &["validate", "--format", "json", "-"],
        dir.path(),
        &document,
    );
    assert_eq!(code, 0, "{document}: {stdout}{stderr}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["routes"], 1);
    assert_eq!(answer["upstreams"], 2);
    // A change that would not compile is caught the same way, with its path.
    database
        .execute("UPDATE routes SET upstream = 'b', strip_prefix = 'no-slash' WHERE name = 'main'");
    database.execute("INSERT INTO filters (route, kind) VALUES ('main', 'no_such_filter')");
    let (code, stdout, _) = crate::support::run_cli_with_stdin(
        &["validate", "--format", "json", "-"],
        dir.path(),
        &loaded_document(&database),
    );
    assert_eq!(code, 1);
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["ok"], false);
    assert!(
        answer["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|error| error["path"] == "routes[0].filters[1].kind"),
        "{answer}"
    );
}

#[test]
fn filter_names_are_kept_by_the_store() {
    let database = TestDatabase::create();
    let yaml = r#"version: 1
upstreams: [{ name: up, targets: [{ address: "127.0.0.1:9001" }] }]
filters:
  - { kind: request_id, name: ids }
  - { kind: response_headers, name: security-headers, config: { set: { x-frame-options: DENY } } }
routes:
  - name: main
    match: { paths: [{ prefix: / }] }
    upstream: up
    filters: [{ kind: response_headers, name: route.marker, config: { set: { x-a: "1" } } }, { kind: request_limits, config: { max_body_bytes: 1KiB } }]
"#;
    database.push(yaml);
    // No column of its own: the name is kept in `extra`.
    let stored: Vec<(Option<String>, String, String)> = database
        .client()
        .query(
            "SELECT route, kind, extra::text FROM filters ORDER BY route NULLS FIRST, position",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let extra =
        |index: usize| -> serde_json::Value { serde_json::from_str(&stored[index].2).unwrap() };
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert_eq!(extra(0), serde_json::json!({ "name": "ids" }));
    assert_eq!(extra(1), serde_json::json!({ "name": "security-headers" }));
    assert_eq!(stored[2].0.as_deref(), Some("main"));
    assert_eq!(extra(2), serde_json::json!({ "name": "route.marker" }));
    assert_eq!(extra(3), serde_json::json!({}));

    let dir = tempfile::tempdir().unwrap();
    let (code, pulled, stderr) = run_cli(
        &["config", "pull", "--database-url", &database.url],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    let pulled: serde_yaml::Value = serde_yaml::from_str(&pulled).unwrap();
    assert_eq!(pulled["filters"][0]["name"].as_str(), Some("ids"));
    assert_eq!(
        pulled["filters"][1]["name"].as_str(),
        Some("security-headers")
    );
    assert_eq!(
        pulled["routes"][0]["filters"][0]["name"].as_str(),
        Some("route.marker")
    );
    assert!(pulled["routes"][0]["filters"][1].get("name").is_none());
}

/// A `wasm` filter goes into the store as its path, checksum and settings (the module stays on
/// the node's disk), comes out unchanged, and a node reading the store runs the module; a
/// version whose checksum does not match is rejected and the old one keeps serving.
#[test]
fn a_wasm_filter_round_trips_through_the_store() {
    let database = TestDatabase::create();
    let upstream = crate::support::recorder::Recorder::start(&[], "ok");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/wasm/examples");
    let sums = std::fs::read_to_string(format!("{dir}/SHA256SUMS")).unwrap();
    let sha = sums
        .lines()
        .find_map(|line| line.strip_suffix("  add_header/add_header.wasm"))
        .unwrap()
        .to_string();
    let yaml = |sha: &str, value: &str| {
        format!(
            r#"version: 1
upstreams: [{{ name: up, targets: [{{ address: "{upstream}" }}] }}]
routes:
  - name: plugged
    match: {{ paths: [{{ prefix: / }}] }}
    upstream: up
    filters:
      - kind: wasm
        config:
          path: "{dir}/add_header/add_header.wasm"
          sha256: "{sha}"
          plugin_config: {{ name: x-plugin, value: {value} }}
          fail_policy: open
          max_memory: 8MiB
          max_cpu_per_call: 10ms
          isolation: per_request
"#,
            upstream = upstream.address
        )
    };
    let first = yaml(&sha, "from-postgres");
    database.push(&first);
    let written: serde_yaml::Value = serde_yaml::from_str(&first).unwrap();
    let (kind, config): (String, String) = {
        let row = database
            .client()
            .query_one(
                "SELECT kind, config::text FROM filters WHERE route = 'plugged'",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(kind, "wasm");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&config).unwrap(),
        serde_json::to_value(&written["routes"][0]["filters"][0]["config"]).unwrap()
    );
    let workdir = tempfile::tempdir().unwrap();
    let (code, pulled, stderr) = run_cli(
        &["config", "pull", "--database-url", &database.url],
        workdir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    let pulled: serde_yaml::Value = serde_yaml::from_str(&pulled).unwrap();
    assert_eq!(
        pulled["routes"][0]["filters"],
        written["routes"][0]["filters"]
    );

    let gateway = Gateway::start(&source(&database.url, ""));
    let reply = gateway.get("/x");
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(upstream.last().header("x-plugin"), Some("from-postgres"));
    assert_eq!(reply.header("x-plugin"), Some("from-postgres"));

    // A checksum that does not match: rejected, recorded, and the old version keeps serving.
    let version = gateway.config_version();
    let mut client = database.client();
    client
        .execute(
            "UPDATE filters SET config = jsonb_set(config, '{sha256}', to_jsonb($1::text)) WHERE route = 'plugged'",
            &[&"0".repeat(64)],
        )
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rejected: Option<String> = client
            .query_opt(
                "SELECT error FROM config_versions WHERE status = 'rejected' ORDER BY id DESC LIMIT 1",
                &[],
            )
            .ok()
            .flatten()
            .and_then(|row| row.get(0));
        if let Some(error) = rejected {
            assert!(error.contains("sha256"), "{error}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the change was not rejected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gateway.config_version(), version);
    assert_eq!(gateway.get("/y").header("x-plugin"), Some("from-postgres"));
}
