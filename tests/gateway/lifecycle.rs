//! Process lifecycle and the command line: SIGTERM drains, SIGQUIT hands the listeners to a new
//! process, `validate`, `schema`, `explain` and the ops endpoints.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{get, request, run_cli, run_cli_with_stdin, spawn_echo, Gateway};

fn simple_routes(echo: std::net::SocketAddr) -> String {
    format!(
        "upstreams: [{{ name: echo, targets: [{{ address: \"{echo}\" }}] }}]\nfilters: [{{ kind: request_id }}]\nroutes: [{{ name: all, upstream: echo, match: {{ paths: [{{ prefix: / }}] }} }}]\n"
    )
}

#[test]
fn sigterm_drains_in_flight_requests() {
    let echo = spawn_echo("echo");
    let mut gateway = Gateway::start(&simple_routes(echo));
    let address = gateway.addr;
    let in_flight = std::thread::spawn(move || {
        request(address, "GET", "/slow", &[("x-echo-delay-ms", "1000")], b"")
    });
    std::thread::sleep(Duration::from_millis(300));
    gateway.signal("TERM");
    let reply = in_flight.join().unwrap();
    assert_eq!(
        reply.status,
        200,
        "the in-flight request was cut: {}",
        reply.text()
    );
    let status = gateway
        .wait_exit(Duration::from_secs(10))
        .expect("gatehouse exits after draining");
    assert!(status.success() || status.code().is_none(), "{status:?}");
    assert!(
        std::net::TcpStream::connect(address).is_err(),
        "still listening after exit"
    );
}

#[test]
fn sigquit_upgrade_hands_over_the_listeners_without_dropping_requests() {
    let echo = spawn_echo("echo");
    let mut gateway = Gateway::start(&simple_routes(echo));
    let address = gateway.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let client = {
        let stop = stop.clone();
        let served = served.clone();
        std::thread::spawn(move || {
            let mut failures = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match crate::support::send_raw(
                    address,
                    &crate::support::request_bytes("GET", "/x", &[], b""),
                ) {
                    Ok(reply) if reply.status == 200 => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(reply) => failures.push(format!("status {}", reply.status)),
                    Err(error) => failures.push(error.to_string()),
                }
            }
            failures
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let old_pid = gateway.pid();
    let mut old = gateway.child.take().unwrap();
    // The new process waits for the sockets; once it has bound the upgrade socket, the old one
    // is told to hand them over. (The old one retries its hand-over only for about 5 s, so a
    // fixed pause could lose the race to a new process slow to start on a busy machine.)
    let socket = gateway.dir.path().join("upgrade.sock");
    assert!(
        !socket.exists(),
        "only an upgrading process binds the upgrade socket"
    );
    gateway.spawn(true);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "the new process never bound {}:\n{}",
            socket.display(),
            gateway.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    crate::support::signal_pid(old_pid, "QUIT");
    let deadline = Instant::now() + Duration::from_secs(15);
    let old_status = loop {
        if let Some(status) = old.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "old process did not exit after SIGQUIT"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let before = served.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let failures = client.join().unwrap();
    assert!(
        failures.is_empty(),
        "requests failed during the upgrade: {failures:?}\n{}",
        gateway.stderr()
    );
    assert!(
        served.load(Ordering::Relaxed) > before,
        "the new process did not serve after the old exited"
    );
    let _ = old_status;
    // The new process owns the ops listener too.
    assert_eq!(get(gateway.ops, "/healthz").status, 200);
}

#[test]
fn validate_reports_every_error_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        r#"
version: 1
server: { listeners: [{ name: public, address: "127.0.0.1:8080" }], limits: { max_headers: 0 } }
upstreams:
  - { name: users, targets: [{ address: "127.0.0.1:9001", weight: 0 }], balance: consistent_hash }
routes:
  - { name: a, upstream: billing, match: { paths: [{ prefix: users }] } }
  - { name: b, upstream: users, strip_prefix: /b, rewrite: /c }
"#,
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["validate", bad.to_str().unwrap()], dir.path());
    assert_eq!(code, 1);
    for expected in [
        "server.limits.max_headers: must be between 1 and 256",
        "upstreams[0].hash_on: `consistent_hash` needs `hash_on`",
        "upstreams[0].targets[0].weight: weight must be at least 1",
        "routes[0].match.paths[0]: a path must start with \"/\"",
        "routes[0].upstream: no upstream named \"billing\"",
        "routes[1]: give `strip_prefix` or `rewrite`, not both",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains("6 errors"), "{stderr}");

    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        "version: 1\nroutes: [{ name: a, upstream: u, matc: {} }]\n",
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["validate", typo.to_str().unwrap()], dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("routes[0].matc: unknown field `matc`"),
        "{stderr}"
    );
}

/// A database config document: no `server`, `ops`, `config` or `telemetry` section, JSON.
const DATABASE_DOCUMENT: &str = r#"{"version":1,"upstreams":[{"name":"users","targets":[{"address":"127.0.0.1:9001"}]}],"routes":[{"name":"users","match":{"paths":[{"prefix":"/users"}]},"upstream":"users","filters":[{"kind":"response_headers","name":"marker","config":{"set":{"x-a":"1"}}}]}],"filters":[{"kind":"request_id"}],"consumers":[]}"#;

#[test]
fn validate_reads_a_document_from_stdin_and_answers_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |input: &str| {
        let (code, stdout, stderr) =
            run_cli_with_stdin(&["validate", "--format", "json", "-"], dir.path(), input);
        let answer: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {stdout}{stderr}"));
        (code, answer)
    };
    // An empty database document is a valid config.
    let (code, answer) =
        validate(r#"{"version":1,"upstreams":[],"routes":[],"filters":[],"consumers":[]}"#);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["routes"], 0);
    assert_eq!(answer["upstreams"], 0);

    let (code, answer) = validate(DATABASE_DOCUMENT);
    assert_eq!(code, 0, "{answer}");
    let keys: Vec<&str> = answer
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["ok", "routes", "upstreams", "hash"]);
    assert_eq!(answer["routes"], 1);
    assert_eq!(answer["upstreams"], 1);
    // The full hash, the same one the text format shortens, for the same document in a file.
    let hash = answer["hash"].as_str().unwrap();
    assert_eq!(hash.len(), 64);
    let file = dir.path().join("database.json");
    std::fs::write(&file, DATABASE_DOCUMENT).unwrap();
    let (code, stdout, stderr) = run_cli(&["validate", file.to_str().unwrap()], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!("hash {})", &hash[..12])),
        "{stdout}"
    );
    // YAML comes in the same way.
    let (code, answer) = validate(
        "version: 1
routes: []
",
    );
    assert_eq!((code, &answer["ok"]), (0, &serde_json::Value::Bool(true)));
}

#[test]
fn validate_in_json_gives_each_error_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let document = r#"{"version":1,
        "upstreams":[{"name":"users","targets":[]}],
        "filters":[{"kind":"request_id","name":"auth"},{"kind":"no_such_filter"},
                   {"kind":"request_id","name":"auth"}],
        "routes":[{"name":"a","match":{"paths":[{"prefix":"/a"}]},"upstream":"billing"}],
        "consumers":[]}"#;
    let (code, stdout, stderr) =
        run_cli_with_stdin(&["validate", "--format", "json", "-"], dir.path(), document);
    assert_eq!(code, 1, "{stdout}{stderr}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["ok"], false);
    let errors: Vec<(String, String)> = answer["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| {
            (
                error["path"].as_str().unwrap().to_string(),
                error["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (path, message) in [
        (
            "upstreams[0].targets",
            "an upstream needs at least one target",
        ),
        ("filters[1].kind", "unknown filter kind \"no_such_filter\""),
        (
            "filters[2].name",
            "duplicate filter name \"auth\" (filters[0] has it)",
        ),
        ("routes[0].upstream", "no upstream named \"billing\""),
    ] {
        assert!(
            errors
                .iter()
                .any(|(got_path, got)| got_path == path && got.starts_with(message)),
            "missing {path}: {message} in {errors:#?}"
        );
    }
    // The message never repeats its path.
    assert!(
        errors
            .iter()
            .all(|(path, message)| !message.starts_with(&format!("{path}:"))),
        "{errors:#?}"
    );

    // A document that does not parse: the error still has its path; one with no path has "".
    let (code, stdout, _) = run_cli_with_stdin(
        &["validate", "--format", "json", "-"],
        dir.path(),
        r#"{"version":1,"routes":[{"name":"a","upstream":"u","matc":{}}]}"#,
    );
    assert_eq!(code, 1);
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["errors"][0]["path"], "routes[0].matc");
    let (code, stdout, _) = run_cli_with_stdin(
        &["validate", "--format", "json", "-"],
        dir.path(),
        "version: [1
",
    );
    assert_eq!(code, 1);
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["ok"], false);
    assert_eq!(answer["errors"][0]["path"], "");
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not valid YAML"),
        "{answer}"
    );
}

#[test]
fn validate_text_output_is_unchanged_by_the_json_format() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, DATABASE_DOCUMENT).unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "version: 1
routes: [{ name: a, upstream: billing, match: { paths: [{ prefix: /a }] } }]
",
    )
    .unwrap();
    for format in [&[][..], &["--format", "text"][..]] {
        let args = |file: &str| {
            let mut args = vec!["validate"];
            args.extend_from_slice(format);
            args.push(file);
            args.iter().map(|arg| arg.to_string()).collect::<Vec<_>>()
        };
        let run = |file: &std::path::Path| {
            let args = args(file.to_str().unwrap());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_cli(&args, dir.path())
        };
        let (code, stdout, stderr) = run(&good);
        assert_eq!(code, 0, "{stderr}");
        let hash = stdout
            .strip_prefix(&format!(
                "{}: ok (1 routes, 1 upstreams, hash ",
                good.display()
            ))
            .and_then(|rest| rest.strip_suffix(")\n"))
            .unwrap_or_else(|| panic!("{stdout}"));
        assert_eq!(hash.len(), 12, "{stdout}");
        assert!(
            hash.bytes().all(|byte| byte.is_ascii_hexdigit()),
            "{stdout}"
        );
        assert_eq!(stderr, "");
        let (code, stdout, stderr) = run(&bad);
        assert_eq!(code, 1);
        assert_eq!(stdout, "");
        assert_eq!(
            stderr,
            format!(
                "{}: 1 error in config:\n  routes[0].upstream: no upstream named \"billing\"\n",
                bad.display()
            )
        );
        // From stdin, the text names it so.
        let args = args("-");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) =
            run_cli_with_stdin(&args, dir.path(), &std::fs::read_to_string(&bad).unwrap());
        assert_eq!(code, 1, "{stdout}");
        assert!(
            stderr.starts_with("stdin: 1 error in config:\n  routes[0].upstream:"),
            "{stderr}"
        );
    }
}

#[test]
fn shipped_configs_validate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![format!("{root}/conf/gatehouse.yaml")];
    for entry in std::fs::read_dir(format!("{root}/conf/examples")).unwrap() {
        files.push(entry.unwrap().path().display().to_string());
    }
    assert!(files.len() > 1, "conf/examples is empty");
    for file in files {
        // The examples take their secrets from the environment, as deployments should.
        let output = crate::support::example_command(&["validate", &file])
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn committed_schema_is_current() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (code, schema, _) = run_cli(&["schema"], std::path::Path::new(root));
    assert_eq!(code, 0);
    let committed = std::fs::read_to_string(format!("{root}/conf/schema.json")).unwrap();
    assert!(
        committed.trim() == schema.trim(),
        "conf/schema.json is stale: run `cargo run -- schema > conf/schema.json`"
    );
    let parsed: serde_json::Value = serde_json::from_str(&schema).unwrap();
    let kinds = parsed.to_string();
    assert!(kinds.contains("request_id") && kinds.contains("response_headers"));
}

/// The README's table of problem types is the catalogue: every type with its status, and
/// nothing else.
#[test]
fn the_readme_lists_every_problem_type_with_its_status() {
    use gatehouse_filters::ProblemType;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("| type (`urn:gatehouse:problem:…`) | status |")
        .nth(1)
        .expect("the README has the problem table");
    let rows: Vec<(String, String)> = table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].to_string())
        })
        .collect();
    let documented: Vec<&str> = rows.iter().map(|(slug, _)| slug.as_str()).collect();
    let catalogue: Vec<&str> = ProblemType::ALL.iter().map(|kind| kind.slug()).collect();
    assert_eq!(documented, catalogue, "the table and the catalogue differ");
    for (kind, (slug, status)) in ProblemType::ALL.iter().zip(&rows) {
        if *kind == ProblemType::Error {
            assert!(
                status.starts_with("the status of the failure"),
                "{slug}: {status}"
            );
        } else {
            assert!(
                status.starts_with(&kind.status().to_string()),
                "{slug}: the README says {status}, the catalogue {}",
                kind.status()
            );
        }
    }
}

#[test]
fn ops_endpoints_and_explain() {
    let echo = spawn_echo("echo");
    let gateway = Gateway::start(&format!(
        "upstreams: [{{ name: echo, targets: [{{ address: \"{echo}\" }}] }}]\nfilters: [{{ kind: request_id }}]\nroutes:\n  - {{ name: users, upstream: echo, match: {{ paths: [{{ prefix: /users }}] }}, strip_prefix: /users, filters: [{{ kind: response_headers, config: {{ set: {{ x-a: b }} }} }}] }}\n  - {{ name: root, upstream: echo, match: {{ paths: [{{ prefix: / }}] }} }}\n  - {{ name: posts, upstream: echo, match: {{ paths: [{{ prefix: /users }}], methods: [POST] }} }}\n"
    ));
    assert_eq!(get(gateway.ops, "/healthz").status, 200);
    let ready = get(gateway.ops, "/readyz");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["ready"], true);

    let config = get(gateway.ops, "/config").json();
    assert_eq!(config["version"], 1);
    assert_eq!(config["hash"].as_str().unwrap().len(), 64);
    assert_eq!(config["config"]["routes"][0]["name"], "users");

    gateway.get("/users/1");
    gateway.get("/nothing-here-matches-root-though");
    let metrics = gateway.metrics();
    assert!(
        metrics.contains("gatehouse_requests_total{route=\"users\",source=\"upstream\",status_class=\"2xx\",upstream=\"echo\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gatehouse_request_duration_seconds_bucket{route=\"users\""),
        "{metrics}"
    );

    let explained = get(gateway.ops, "/explain?method=GET&path=/users/../users/7").json();
    assert_eq!(explained["route"], "users");
    assert_eq!(explained["normalized_path"], "/users/7");
    assert_eq!(explained["forwarded_path"], "/7");
    assert_eq!(
        explained["filters"],
        serde_json::json!(["request_id", "response_headers"])
    );
    let outcomes: Vec<(String, String)> = explained["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|candidate| {
            (
                candidate["route"].as_str().unwrap().to_string(),
                candidate["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        outcomes.contains(&("root".into(), "beaten: less specific path".into())),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&("posts".into(), "rejected: method did not match".into())),
        "{outcomes:?}"
    );

    // The same answer from the command line.
    let (code, stdout, stderr) = run_cli(
        &[
            "explain",
            "-c",
            gateway.config_path.to_str().unwrap(),
            "-X",
            "POST",
            "/users/7",
        ],
        gateway.dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    let explained: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(explained["route"], "posts");
}

/// A listener address another process holds stops the start with the reason, rather than a
/// process whose ops listener says ready while its proxy cannot accept.
#[test]
fn a_listener_address_in_use_stops_the_start() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = holder.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatehouse.yaml");
    std::fs::write(
        &config,
        format!(
            "version: 1\nserver:\n  listeners: [{{ name: public, address: \"{address}\" }}]\n  pid_file: {dir}/gatehouse.pid\n  upgrade_socket: {dir}/upgrade.sock\nops: {{ address: \"127.0.0.1:{ops}\" }}\nupstreams: [{{ name: app, targets: [{{ address: \"127.0.0.1:9\" }}] }}]\nroutes: [{{ name: app, match: {{ paths: [{{ prefix: / }}] }}, upstream: app }}]\n",
            dir = dir.path().display(),
            ops = crate::support::free_port(),
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["run", "-c", config.to_str().unwrap()], dir.path());
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!("listener public {address}: the address is in use")),
        "{stderr}"
    );
    drop(holder);
}
